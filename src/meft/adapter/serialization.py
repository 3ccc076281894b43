"""Files: atomic directories and (sharded) safetensors, never pickle.

Run directories and checkpoints go through :func:`atomic_directory`: files are written into
a temporary sibling directory, fsynced, and the directory is renamed into place, so a reader
(or a run killed at any moment) sees either the previous complete directory or the new
complete one, never a half-written mix. An adapter saved into a directory that holds other
things (``save_pretrained`` into a Trainer's output) replaces only its own files
(:func:`replaced_files`).

Tensors are stored as safetensors, split into shards of at most ``max_shard_bytes`` with a
Hugging Face style index (``<stem>.safetensors.index.json`` mapping tensor name to file) when
they do not fit one file. A distributed run (:mod:`meft.engine.distributed`) writes its row-sharded
tensors as one file per rank, ``<stem>.rank-00001-of-00002.safetensors``, each holding its
rank's rows of every table (rank 0's file also the replicated tensors), plus the index
``<stem>.shards.json`` (world size, each rank's file and row range, each tensor's whole shape).
Any of these layouts can be read whole, or as a row range of each table (``rows``), reading only
those rows from disk: a checkpoint of W ranks loads into any other number.

Loading accepts only ``.safetensors`` and JSON; a directory holding only pickle-based weights
(``.bin``, ``.pt``, ``.pkl``) is refused with a clear error.
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

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from meft.errors import RunDirectoryError, SerializationError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SHARDS_SUFFIX = ".shards.json"
# (tensor name, whole shape) -> the rows [start, stop) to read, or None for all of it
RowSelector = Callable[[str, tuple[int, ...]], "tuple[int, int] | None"]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _made_as_mkdir(path: Path) -> Path:
    """``mkdtemp`` makes its directory 0700 (private); the directory it becomes (an adapter,
    a checkpoint) gets the permissions ``mkdir`` would give it under the umask."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o777 & ~mask)
    return path


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` atomically when the block ends.

    On an exception the temporary directory is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = _made_as_mkdir(Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-",
                                               dir=target.parent)))
    try:
        yield tmp
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_directory(tmp: Path, target: Path) -> None:
    """Fsync every file of ``tmp`` and rename it to ``target`` (replacing it atomically)."""
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


def rank_file(stem: str, rank: int, world: int) -> str:
    return f"{stem}.rank-{rank + 1:05d}-of-{world:05d}.safetensors"


def save_rank_shard(tensors: dict[str, Tensor], directory: str | Path, stem: str, *,
                    rank: int, ranges: list[tuple[int, int]], sharded: set[str],
                    metadata: dict[str, str] | None = None) -> str:
    """Write one rank's file of a row-sharded set: its rows ``ranges[rank]`` of the
    ``sharded`` tensors (given as those rows) and, on rank 0, the other (replicated) tensors.
    Returns the file name. Rank 0 then writes the index (:func:`save_shard_index`) once every
    rank's file is in place."""
    lo, hi = ranges[rank]
    for name in sharded:
        if tensors[name].shape[0] != hi - lo:
            raise ValueError(f"{name}: rank {rank} holds rows [{lo}, {hi}) but the tensor has "
                             f"{tensors[name].shape[0]}")
    mine = {k: v.detach().cpu().contiguous() for k, v in tensors.items()
            if k in sharded or rank == 0}
    name = rank_file(stem, rank, len(ranges))
    save_file(mine, str(Path(directory) / name), metadata=metadata)
    return name


def save_shard_index(tensors: dict[str, Tensor], directory: str | Path, stem: str, *,
                     ranges: list[tuple[int, int]], sharded: set[str]) -> str:
    """The index of a row-sharded set (``tensors``: any one rank's); returns its file name."""
    world = len(ranges)
    index = {"format": "meft-row-shards", "world_size": world,
             "files": [rank_file(stem, r, world) for r in range(world)],
             "rows": [list(r) for r in ranges],
             "sharded": {k: [ranges[-1][1], *tensors[k].shape[1:]] for k in sorted(sharded)},
             "replicated": sorted(set(tensors) - sharded)}
    name = f"{stem}{SHARDS_SUFFIX}"
    (Path(directory) / name).write_text(json.dumps(index, indent=2) + "\n")
    return name


def load_tensors(directory: str | Path, stem: str, *,
                 rows: RowSelector | None = None) -> dict[str, Tensor]:
    """Read what :func:`save_tensors` or :func:`save_rank_shard` wrote; safetensors only.
    ``rows(name, shape)`` may ask for a row range of a tensor (the rest is not read)."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    shards = directory / f"{stem}{SHARDS_SUFFIX}"
    if shards.is_file():
        return _load_rank_shards(directory, shards, rows)
    if single.is_file():
        return _load(single, rows)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SerializationError(f"{index}: not a valid shard index ({err})") from None
        out: dict[str, Tensor] = {}
        for name in sorted(set(weight_map.values())):
            out.update(_load(directory / name, rows))
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


def _load(path: Path, rows: RowSelector | None = None) -> dict[str, Tensor]:
    if not path.is_file():
        raise SerializationError(f"{path}: no such file")
    try:
        if rows is None:
            return load_file(str(path))
        out: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                part = f.get_slice(name)
                span = rows(name, tuple(part.get_shape()))
                out[name] = part[span[0]:span[1]] if span is not None else f.get_tensor(name)
        return out
    except SerializationError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise SerializationError(f"{path}: not a readable safetensors file ({err})") from None


def _load_rank_shards(directory: Path, path: Path, rows: RowSelector | None
                      ) -> dict[str, Tensor]:
    """Assemble tensors (or row ranges of them) from the files of a row-sharded set."""
    try:
        index = json.loads(path.read_text())
        files, ranges = index["files"], [tuple(r) for r in index["rows"]]
        sharded, replicated = index["sharded"], index["replicated"]
        if len(files) != len(ranges) or not files:
            raise ValueError("files and rows differ in length")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise SerializationError(f"{path}: not a valid row-shard index ({err})") from None
    out: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[int, object] = {}

        def handle(k: int) -> object:
            if k not in handles:
                file = directory / files[k]
                if not file.is_file():
                    raise SerializationError(f"{path}: shard {files[k]} missing")
                try:
                    handles[k] = stack.enter_context(safe_open(str(file), framework="pt"))
                except Exception as err:
                    raise SerializationError(f"{file}: not a readable safetensors file "
                                             f"({err})") from None
            return handles[k]

        try:
            for name in replicated:
                out[name] = handle(0).get_tensor(name)  # type: ignore[attr-defined]
            for name, shape in sharded.items():
                span = rows(name, tuple(shape)) if rows is not None else None
                start, stop = span if span is not None else (0, shape[0])
                parts = []
                for k, (lo, hi) in enumerate(ranges):
                    a, b = max(lo, start), min(hi, stop)
                    if a < b:
                        parts.append(handle(k).get_slice(name)[a - lo:b - lo])  # type: ignore[attr-defined]
                out[name] = torch.cat(parts) if parts else torch.empty(0, *shape[1:])
        except SerializationError:
            raise
        except Exception as err:
            raise SerializationError(f"{path}: shards do not match their index ({err})"
                                     ) from None
    return out
