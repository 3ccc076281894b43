"""What the base model answered, computed once: a cache of base-model results.

Before its first step a job asks the untouched base model several things: the held-out
questions (evaluation before training), the retention probe's general questions and its loss
on general text, and, for forgetting protection, its own answers to the shipped background
prompts. Each is a pure function of the base weights, the tokenizer, the prompts and the
generation settings, and together they took most of the main job's first minutes. So each is
computed once and kept as one JSON file named by a SHA-256 of all of that:

    key   = sha256(model fingerprint, kind, inputs)           (16 hex digits in the name)
    file  = {"format": "meft-base-cache", "version": 1, "kind": ..., "model": fingerprint,
             "inputs": {...}, "value": ...}

``kind`` "answers": inputs are the prompts' token ids and the greedy settings (max_new_tokens,
batch size: left padding changes the float sums, pad and eos ids), the value the stripped
answers (:func:`meft.evaluation.evaluate.generate_answers`). ``kind`` "general_loss": inputs are the
token windows, the value the mean loss (:func:`meft.evaluation.probe.general_loss`). The inputs are
kept in the file, so a file can be recomputed and checked (the slow test does that for the
shipped ones).

The model fingerprint (:func:`fingerprint`) hashes the configuration (less where the model was
loaded from: ``_name_or_path``, private keys, the transformers version), every parameter's name,
shape, dtype and the bytes of 65,536 of its elements, evenly spaced (all of a smaller one:
exact bytes, so the same on every machine and thread count, unlike a float sum), and the
tokenizer (vocabulary, chat template, special ids); adapters live outside the base model's
parameters, so attaching one changes nothing. Callers pass a :class:`BaseCache` only where they
ask the base model itself (adapter disabled or not yet attached). The device is not part of
the key: the answers are the model's, and a GPU's different float sums change a greedy answer
rarely if ever.

Lookup order: ``$MEFT_CACHE/base/<key>.json`` (default ``~/.cache/meft``), then the files
shipped in the package (``meft/shipped/``: the embedded model's results for the README's main
job, so its first run computes none of them). Writes are atomic (a reader never sees half a
file); an unwritable cache costs the next run the computation, and says so once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from meft.console import say

FORMAT = "meft-base-cache"
VERSION = 1
SHIPPED = Path(__file__).parents[1] / "shipped"
SAMPLED = 1 << 16  # elements of each parameter hashed, evenly spaced (all of a smaller one)
# configuration keys that say where and by what a model was loaded, not what it computes:
# with them the key changed with the virtual environment's path (``_name_or_path``)
WHERE_FROM = ("transformers_version", "name_or_path")
V = TypeVar("V")


def cache_dir() -> Path:
    """Where meft keeps what it computed once (``$MEFT_CACHE``, default ``~/.cache/meft``)."""
    return Path(os.environ.get("MEFT_CACHE", Path.home() / ".cache" / "meft"))


def fingerprint(model: Any, tokenizer: Any) -> str:
    """Identifies a base model's weights and its tokenizer (module doc)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    shape = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
             if not k.startswith("_") and k not in WHERE_FROM}
    h.update(json.dumps(shape, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLED)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[::step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(repr((getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id,
                   tokenizer.pad_token_id, getattr(tokenizer, "bos_token_id", None))).encode())
    return h.hexdigest()[:16]


class BaseCache:
    """Base-model results of one model and tokenizer, looked up before they are computed."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = fingerprint(model, tokenizer)
        self._warned = False

    def key(self, kind: str, inputs: Any) -> str:
        payload = json.dumps([self.model, kind, inputs], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def get(self, kind: str, inputs: Any, compute: Callable[[], V]) -> V:
        """The cached value of (kind, inputs), or ``compute()`` stored for the next time."""
        name = f"{kind}-{self.key(kind, inputs)}.json"
        for path in (cache_dir() / "base" / name, SHIPPED / name):
            found = _read(path, self.model, kind)
            if found is not None:
                return found["value"]  # type: ignore[no-any-return]
        value = compute()
        self._write(cache_dir() / "base" / name, {
            "format": FORMAT, "version": VERSION, "kind": kind, "model": self.model,
            "inputs": inputs, "value": value})
        return value

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
            os.replace(tmp, path)  # atomic: a reader never sees half a file
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                self._warned = True
                say(f"base-model results not cached ({err.strerror or err}: {path.parent}); "
                    "set MEFT_CACHE to a writable directory to keep them for the next run")


def _read(path: Path, model: str, kind: str) -> dict[str, Any] | None:
    """The cache file at ``path`` if it is a complete one of this model and kind, else None
    (absent, unreadable or foreign files are recomputed, never trusted)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("format") != FORMAT
            or record.get("version") != VERSION or record.get("model") != model
            or record.get("kind") != kind or "value" not in record):
        return None
    return record


def shipped_files() -> list[Path]:
    """The cache files shipped with the package (the embedded model's)."""
    return sorted(SHIPPED.glob("*.json"))
