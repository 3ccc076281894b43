"""Background text for forgetting protection: what the model should keep doing as it did.

:mod:`meft.retain` scores each step's rows against how often background text uses them. The
background must be text the user does not train on, in the form the model is used in. By
default it is the base model's own greedy answers to :func:`background_prompts` (320 prompts:
80 everyday topics x 4 instructions, written for meft), generated once per base model and cached
as JSONL under ``$MEFT_CACHE`` (default ``~/.cache/meft``); ``--background FILE`` gives the
user's own (any format ``meft train`` reads). The prompts share no topic with the retention
probe's questions or its general text (:mod:`meft.general`), so the probe stays a held-out
measurement of what was kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from meft.data import Sample, load_samples, write_jsonl
from meft.evaluate import generate_answers

TOPICS = [
    "bicycles", "bread", "the moon", "rivers", "pianos", "chess", "coffee", "rain",
    "volcanoes", "libraries", "bees", "football", "trains", "gardens", "cheese", "kites",
    "glaciers", "umbrellas", "lighthouses", "dolphins", "marathons", "candles", "bridges",
    "deserts", "owls", "tea", "windmills", "sailing", "mushrooms", "thunderstorms",
    "recycling", "dinosaurs", "telescopes", "yoga", "camping", "penguins", "chocolate",
    "earthquakes", "guitars", "museums", "forests", "rice", "birthdays", "clocks", "tigers",
    "skiing", "maps", "soap", "elephants", "snow", "origami", "cars", "the internet",
    "batteries", "dreams", "friendship", "honeybees in winter", "the alphabet", "newspapers",
    "hospitals", "pizza", "rainbows", "submarines", "the violin", "coral reefs", "wolves",
    "post offices", "solar panels", "cooking pasta", "learning a language", "swimming",
    "fireworks", "farms", "robots", "airplanes", "tides", "the Olympic Games", "knitting",
    "vaccines", "video games",
]
INSTRUCTIONS = [
    "Write two sentences about {t}.",
    "What is interesting about {t}? Answer briefly.",
    "Give one useful tip about {t}.",
    "How would you explain {t} to a child?",
]
MAX_NEW_TOKENS = 48


def background_prompts() -> list[str]:
    """The 320 shipped prompts, in a fixed order."""
    return [i.format(t=t) for t in TOPICS for i in INSTRUCTIONS]


def cache_dir() -> Path:
    return Path(os.environ.get("MEFT_CACHE", Path.home() / ".cache" / "meft"))


def fingerprint(model: Any, tokenizer: Any) -> str:
    """Identifies a base model and tokenizer well enough to reuse its generated text."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True,
                        default=str).encode())
    with torch.no_grad():
        for p in list(model.parameters())[:4]:  # embeddings and the first block
            h.update(repr(float(p.double().sum())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps([background_prompts(), MAX_NEW_TOKENS]).encode())
    return h.hexdigest()[:16]


def model_background(model: Any, tokenizer: Any, *, batch_size: int = 32,
                     progress: bool = True) -> list[Sample]:
    """The base model's own greedy answers to the shipped prompts (cached; module doc)."""
    path = cache_dir() / f"background-{fingerprint(model, tokenizer)}.jsonl"
    if path.is_file():
        return load_samples(path)
    prompts = [Sample("prompt", ({"role": "user", "content": p},
                                 {"role": "assistant", "content": ""}), "", ("",),
                      f"background:{i}") for i, p in enumerate(background_prompts())]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                               batch_size=batch_size, progress=progress, desc="background text")
    samples = [Sample("prompt", ({"role": "user", "content": s.messages[0]["content"]},
                                 {"role": "assistant", "content": a or "..."}), "",
                      (a or "...",), s.source)
               for s, a in zip(prompts, answers, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    write_jsonl(samples, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return samples


def load_background(path: str | Path | None, model: Any, tokenizer: Any, *,
                    progress: bool = True) -> tuple[list[Sample], str]:
    """The background samples and a description: the user's file, or the model's own."""
    if path is not None:
        samples = load_samples(path)
        return samples, f"{len(samples)} records of {path}"
    samples = model_background(model, tokenizer, progress=progress)
    return samples, f"the base model's answers to {len(samples)} shipped prompts"
