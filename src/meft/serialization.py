"""Files: atomic directories and (sharded) safetensors, never pickle.

Run directories and checkpoints go through :func:`atomic_directory`: files are written into
a temporary sibling directory, fsynced, and the directory is renamed into place, so a reader
(or a run killed at any moment) sees either the previous complete directory or the new
complete one, never a half-written mix. An adapter saved into a directory that holds other
things (``save_pretrained`` into a Trainer's output) replaces only its own files
(:func:`replaced_files`).

Tensors are stored as safetensors, split into shards of at most ``max_shard_bytes`` with a
Hugging Face style index (``<stem>.safetensors.index.json`` mapping tensor name to file) when
they do not fit one file. Loading accepts only ``.safetensors`` and JSON; a directory holding
only pickle-based weights (``.bin``, ``.pt``, ``.pkl``) is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from meft.errors import RunDirectoryError, SerializationError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` atomically when the block ends.

    On an exception the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_output(output: str | Path | None, *, overwrite: bool, prefix: str = "",
                   hint: str = "") -> Path:
    """The output directory of a run: ``output``, or a new ``runs/<prefix><timestamp>``.

    Refused when it is a file, or a non-empty directory without ``overwrite`` (``hint`` says
    what --overwrite would do); created otherwise."""
    path = Path(output) if output is not None else Path("runs") / time.strftime(
        f"{prefix}%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"--output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise RunDirectoryError(f"--output {path} exists and is not empty; pass --overwrite"
                                f"{hint} or choose another directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def recover_directory(target: Path) -> None:
    """Undo a replacement killed half-way: if ``target`` is gone but the copy it was being
    replaced from survives as ``.<name>.old-<pid>``, put that copy back; drop stale temps."""
    olds = sorted(target.parent.glob(f".{target.name}.old-*"))
    if not target.exists() and olds:
        os.rename(olds[-1], target)
        olds = olds[:-1]
    for stale in olds + list(target.parent.glob(f".{target.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def replaced_files(directory: str | Path, *, owned: Callable[[str], bool],
                   last: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory whose files then replace their namesakes in ``directory``,
    each atomically (fsync, rename; ``last`` renamed last), and remove files of ``directory``
    that ``owned(name)`` claims but the new set lacks (stale shards). Other files in
    ``directory`` are left alone: it may be a Trainer's output directory holding checkpoints.
    A crash part-way leaves a mix of old and new files, which the reader's shape checks catch.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-tmp-", dir=directory))
    try:
        yield tmp
        names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last)
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        for name in names:
            os.replace(tmp / name, directory / name)
        for stale in directory.iterdir():
            if stale.is_file() and owned(stale.name) and stale.name not in names:
                stale.unlink()
        _fsync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(tensors: dict[str, Tensor], directory: str | Path, stem: str, *,
                 max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None
                 ) -> list[str]:
    """Write tensors as ``stem.safetensors`` or shards plus an index; return the file names."""
    directory = Path(directory)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().cpu().contiguous()
        size += nbytes
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
    for shard, name in zip(shards, names, strict=True):
        save_file(shard, str(directory / name), metadata=metadata)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size()
                                           for t in tensors.values())},
            "weight_map": {k: n for shard, n in zip(shards, names, strict=True) for k in shard},
        }
        (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def load_tensors(directory: str | Path, stem: str) -> dict[str, Tensor]:
    """Read what :func:`save_tensors` wrote (single file or sharded); safetensors only."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _load(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SerializationError(f"{index}: not a valid shard index ({err})") from None
        out: dict[str, Tensor] = {}
        for name in sorted(set(weight_map.values())):
            out.update(_load(directory / name))
        missing = set(weight_map) - set(out)
        if missing:
            raise SerializationError(f"{index}: tensors missing from the shards: "
                                     f"{', '.join(sorted(missing)[:5])}")
        return out
    pickles = [p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise SerializationError(
            f"{directory}: refusing pickle-based weights ({', '.join(sorted(pickles))}); "
            "meft reads safetensors only")
    raise SerializationError(f"{directory}: no {stem}.safetensors (or sharded index) found")


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SerializationError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise SerializationError(f"{path}: not a readable safetensors file ({err})") from None
