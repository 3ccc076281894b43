"""Host state on disk: memory-mapped arrays with an undo journal, for adapters bigger than RAM.

``--store disk:DIR`` keeps every host table and its optimizer state in files of DIR, mapped
into memory: the OS pages in the rows a step touches and writes them back, so RAM holds only
the working set. Layout::

    DIR/index.json          {"arrays": {name: {"shape", "dtype", "file"}}, "step": S}
    DIR/<name>.bin          raw little-endian rows, C order (bf16 as its 16 bits)
    DIR/journal/S.log       pre-images of the rows changed since step S: records of
                            b"MJ", name length (u16), rows n (u64), row bytes (u64), the name,
                            n int64 ids, their n rows as they were

Crash safety (a SIGKILL at any instant never leaves a store that loads wrong):

* before a step changes rows, :meth:`DiskArrays.before_write` appends to the journal the
  current bytes of those rows not yet journaled since the last commit, for every array the
  step will change, and :meth:`DiskArrays.sync` makes the journal durable once per step;
* :meth:`DiskArrays.commit` (at each checkpoint) flushes every map, fsyncs, records the new
  ``step`` in index.json atomically (the commit point), then deletes the old journal, which is
  relative to the previous step and from then on ignored;
* opening a store writes back the pre-images journaled relative to its recorded step (a
  record cut short by the crash is ignored: its rows had not been changed yet), so the store
  is again exactly what it was at ``step``.

A store therefore always opens at its last committed step; a run resumes from the checkpoint
of that step. Every array's blocks are reserved when it is created (``posix_fallocate``:
unwritten extents, read as zeros, no data written) after :meth:`DiskArrays.reserve` checked
that the whole store fits: a write through a map to a page the filesystem cannot give a block
kills the process with SIGBUS (measured: a 36 GB sparse store on a disk with 13 GB free died at
its first step), so a store either gets all its space up front or is refused with one line.

Every map is advised ``MADV_RANDOM``: a step touches scattered rows (the union of a batch's
selections, the key blocks of the probed experts), and the kernel's default read-around on a
fault (up to the disk's ``read_ahead_kb``, 8 MB on the project machine, in large folios) filled
the page cache with rows no step used; at N=262,144 (27 GB of store, 24 GB of RAM) pages were
evicted and read again every step, 2.5x slower (measured, ``benchmarks/results/disk-store``).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from meft.errors import RunDirectoryError, SerializationError

INDEX = "index.json"
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64,
          torch.int8: np.int8, torch.uint8: np.uint8, torch.bfloat16: np.int16}
_NAMES = {str(t).removeprefix("torch."): t for t in _NUMPY}


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DiskArrays:
    """A directory of named memory-mapped arrays (module doc)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        index = self.dir / INDEX
        self.index: dict[str, Any] = (json.loads(index.read_text()) if index.is_file()
                                      else {"arrays": {}, "step": 0})
        self.arrays: dict[str, Tensor] = {}
        self._maps: dict[str, np.memmap] = {}
        self._journaled: dict[str, Tensor] = {}  # name -> (rows,) bool since the last commit
        self._journal: Any = None  # the open journal file of the current step
        self.recovered = self._recover()

    @property
    def step(self) -> int:
        return int(self.index["step"])

    def _map(self, name: str) -> Tensor:
        meta = self.index["arrays"][name]
        dtype = _NAMES[meta["dtype"]]
        mm = np.memmap(self.dir / meta["file"], dtype=_NUMPY[dtype], mode="r+",
                       shape=tuple(meta["shape"]))
        if hasattr(mmap, "MADV_RANDOM"):  # no read-around: a step touches scattered rows
            mm._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
        self._maps[name] = mm
        tensor = torch.from_numpy(mm)
        if dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        self.arrays[name] = tensor
        self._journaled[name] = torch.zeros(meta["shape"][0], dtype=torch.bool)
        return tensor

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The array ``name``: mapped from its file if the store has it (shape and dtype must
        match), else created as zeros (a sparse file)."""
        if name in self.arrays:
            return self.arrays[name]
        meta = self.index["arrays"].get(name)
        if meta is not None:
            if tuple(meta["shape"]) != tuple(shape) or meta["dtype"] != str(dtype)[6:]:
                raise SerializationError(
                    f"{self.dir}: array {name} is {meta['dtype']} {tuple(meta['shape'])}, this "
                    f"run needs {str(dtype)[6:]} {tuple(shape)} (another adapter's store?)")
            return self._map(name)
        file = f"{name}.bin"
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with open(self.dir / file, "wb") as f:
            f.truncate(nbytes)
            if nbytes and hasattr(os, "posix_fallocate"):  # blocks reserved, read as zeros
                try:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                except OSError as err:
                    (self.dir / file).unlink()  # nothing half-made left in the store
                    if err.errno != errno.ENOSPC:
                        raise
                    raise RunDirectoryError(
                        f"{self.dir}: no space left for array {name} ({_size(nbytes)}); "
                        "free space or choose a smaller adapter") from None
        self.index["arrays"][name] = {"shape": list(shape), "dtype": str(dtype)[6:],
                                      "file": file}
        _write_json(self.dir / INDEX, self.index)
        return self._map(name)

    def reserve(self, nbytes: int) -> None:
        """Refuse with one line if the store cannot grow to ``nbytes`` on its filesystem
        (call before creating arrays: a write to a page the disk has no block for kills the
        process with SIGBUS, so space is checked here and reserved as each array is made)."""
        have = sum(p.stat().st_blocks * 512 for p in self.dir.glob("*.bin"))
        free = shutil.disk_usage(self.dir).free
        if have + free < nbytes:
            raise RunDirectoryError(
                f"{self.dir}: the store needs {_size(nbytes)} (tables and optimizer state), "
                f"its filesystem has {_size(have + free)} for it; free space, "
                "choose another directory or a smaller --neurons / compact --optim-state")

    def before_write(self, name: str, rows: Tensor) -> None:
        """Journal the pre-images of ``rows`` (int64 (R,)) of array ``name`` not journaled
        since the last commit (durable after :meth:`sync`; change them only after it)."""
        seen = self._journaled[name]
        fresh = rows[~seen[rows]].unique()
        if fresh.numel() == 0:
            return
        n = fresh.numel()
        data = self.arrays[name].index_select(0, fresh).reshape(n, -1).contiguous()
        data = data.view(torch.uint8)  # (n, bytes per row), 1-D arrays included
        if self._journal is None:
            (self.dir / "journal").mkdir(exist_ok=True)
            self._journal = open(self.dir / "journal" / f"{self.step}.log", "ab")  # noqa: SIM115
        key = name.encode()
        row_bytes = data.shape[1]
        self._journal.write(b"MJ" + np.array([len(key)], "<u2").tobytes()
                            + np.array([n, row_bytes], "<u8").tobytes() + key
                            + fresh.to(torch.int64).numpy().tobytes()
                            + data.numpy().tobytes())
        seen[fresh] = True

    @property
    def changed(self) -> bool:
        """Whether rows were written since the last commit (the store on disk is then not
        yet the state of any step)."""
        return self._journal is not None

    def sync(self) -> None:
        """Make what :meth:`before_write` journaled durable (once per step)."""
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def release(self) -> None:
        """Unmap every page of the store from this process (``MADV_DONTNEED``; for a shared
        file map the pages, changed ones included, stay in the page cache and reach the file
        as usual): the trainer calls it after each step, so resident memory counts the pages
        one step touches, not every page touched since the start."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mm in self._maps.values():
                mm._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]

    def commit(self, step: int) -> None:
        """Make the arrays durable as the state of ``step``, forget the journal and
        :meth:`release` the pages."""
        for mm in self._maps.values():
            mm.flush()
        self.index["step"] = step
        _write_json(self.dir / INDEX, self.index)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        shutil.rmtree(self.dir / "journal", ignore_errors=True)
        for seen in self._journaled.values():
            seen.zero_()
        self.release()  # e.g. the keys a fresh store initialises: half the store

    def _recover(self) -> bool:
        """Write back every journaled pre-image (module doc); True if there were any."""
        path = self.dir / "journal" / f"{self.step}.log"  # other steps' journals are stale
        done = False
        raw = path.read_bytes() if path.is_file() else b""
        at = 0
        while at + 20 <= len(raw) and raw[at:at + 2] == b"MJ":
            key_len = int(np.frombuffer(raw, "<u2", 1, at + 2)[0])
            n, row_bytes = (int(v) for v in np.frombuffer(raw, "<u8", 2, at + 4))
            start = at + 20 + key_len
            end = start + n * 8 + n * row_bytes
            if end > len(raw):
                break  # cut short by the crash: its rows were not changed yet
            name = raw[at + 20:start].decode()
            meta = self.index["arrays"].get(name)
            if meta is not None and n:
                ids = np.frombuffer(raw, "<i8", n, start)
                rows = np.frombuffer(raw, np.uint8, n * row_bytes, start + n * 8)
                mm = np.memmap(self.dir / meta["file"], dtype=np.uint8, mode="r+",
                               shape=(meta["shape"][0], row_bytes))
                mm[ids] = rows.reshape(n, row_bytes)
                mm.flush()
                done = True
            at = end
        shutil.rmtree(self.dir / "journal", ignore_errors=True)
        return done
