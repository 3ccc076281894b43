"""The disk store (meft.engine.disk): round trips, recovery from any crash point, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meft.engine.disk import DiskArrays
from meft.errors import RunDirectoryError, SerializationError


def test_arrays_round_trip_in_every_dtype(tmp_path: Path) -> None:
    store = DiskArrays(tmp_path)
    made = {}
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.int8, torch.uint8,
                               torch.int64)):
        t = store.zeros(f"a{i}", (7, 5), dtype)
        assert t.dtype == dtype and torch.count_nonzero(t) == 0
        t.copy_(torch.arange(35).reshape(7, 5).to(dtype))
        made[f"a{i}"] = t.clone()
    store.commit(3)
    again = DiskArrays(tmp_path)
    assert again.step == 3 and not again.recovered
    for name, want in made.items():
        assert torch.equal(again.zeros(name, (7, 5), want.dtype), want)
    with pytest.raises(SerializationError, match="array a0 is float32"):
        DiskArrays(tmp_path).zeros("a0", (8, 5), torch.float32)


def _smaps(path: Path, field: str) -> list[str]:
    """The values of ``field`` (``Rss``, ``VmFlags`` ...) of this process's mapping of
    ``path`` (Linux /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            return next(x.split()[1:] for x in lines[i + 1:] if x.startswith(f"{field}:"))
    raise AssertionError(f"{path} is not mapped")


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc only")
def test_maps_are_advised_random_access(tmp_path: Path) -> None:
    # without MADV_RANDOM each fault reads ahead around the row (up to the disk's
    # read_ahead_kb, 8 MB here): at N=262,144 that filled the page cache with rows no step
    # used and made a step 2.5x slower (benchmarks/results/disk-store)
    store = DiskArrays(tmp_path)
    store.zeros("w", (1000, 64), torch.float32)
    assert "rr" in _smaps(tmp_path / "w.bin", "VmFlags")
    del store
    again = DiskArrays(tmp_path)
    again.zeros("w", (1000, 64), torch.float32)  # mapped from the existing file
    assert "rr" in _smaps(tmp_path / "w.bin", "VmFlags")


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc only")
def test_release_unmaps_pages_and_keeps_what_was_written(tmp_path: Path) -> None:
    store = DiskArrays(tmp_path)
    t = store.zeros("w", (4096, 64), torch.float32)  # 1 MB
    data = torch.randn(4096, 64)
    t.copy_(data)  # dirty pages, not flushed
    assert int(_smaps(tmp_path / "w.bin", "Rss")[0]) >= 1000
    store.release()
    assert int(_smaps(tmp_path / "w.bin", "Rss")[0]) == 0
    assert torch.equal(t, data)  # read back through the page cache
    raw = np.fromfile(tmp_path / "w.bin", dtype=np.float32).reshape(4096, 64)
    assert np.array_equal(raw, data.numpy())  # the file sees the changes too
    t[7] = 1.0
    store.commit(1)  # commits release too
    assert int(_smaps(tmp_path / "w.bin", "Rss")[0]) == 0
    assert torch.equal(DiskArrays(tmp_path).zeros("w", (4096, 64), torch.float32)[7],
                       torch.ones(64))


def test_an_uncommitted_step_is_undone_on_open(tmp_path: Path) -> None:
    store = DiskArrays(tmp_path)
    t = store.zeros("w", (50, 4), torch.float32)
    t.copy_(torch.randn(50, 4))
    store.commit(1)
    committed = t.clone()
    rows = torch.tensor([3, 7, 3, 20])
    store.before_write("w", rows)
    store.sync()
    t[rows] = 99.0
    store.before_write("w", torch.tensor([7, 40]))  # 7 again: journaled once
    store.sync()
    t[40] = -1.0
    store._maps["w"].flush()  # the changed pages reached the disk before the "crash"
    del store, t
    reopened = DiskArrays(tmp_path)
    assert reopened.recovered and reopened.step == 1
    assert torch.equal(reopened.zeros("w", (50, 4), torch.float32), committed)


def test_torn_journal_records_are_ignored(tmp_path: Path) -> None:
    store = DiskArrays(tmp_path)
    t = store.zeros("w", (10, 2), torch.float32)
    t.fill_(1.0)
    store.commit(1)
    store.before_write("w", torch.tensor([1]))
    store.before_write("w", torch.tensor([2]))
    store.sync()
    t[1:3] = 5.0
    store._maps["w"].flush()
    log = tmp_path / "journal" / "1.log"
    log.write_bytes(log.read_bytes()[:-3])  # the second record cut short
    del store, t
    w = DiskArrays(tmp_path).zeros("w", (10, 2), torch.float32)
    assert w[1].tolist() == [1.0, 1.0]  # restored from the complete record
    assert w[2].tolist() == [5.0, 5.0]  # its record was torn: the crash came before writing


CHILD = """
import sys, torch
from meft.engine.disk import DiskArrays
store = DiskArrays(sys.argv[1])
w = store.zeros("w", (400, 64), torch.float32)
s = store.step
while True:
    s += 1
    for lo in range(0, 400, 50):   # a step changes the rows chunk by chunk
        rows = torch.arange(lo, lo + 50)
        store.before_write("w", rows)
        store.sync()
        w[lo:lo + 50] = float(s)
    store.commit(s)
    print(s, flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_last_committed_step(tmp_path: Path) -> None:
    for trial in range(12):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one commit
        time.sleep(0.005 + 0.023 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = DiskArrays(tmp_path)
        w = store.zeros("w", (400, 64), torch.float32)
        assert torch.all(w == float(store.step)), (trial, store.step, np.unique(w.numpy()))
        del store, w


# ------------------------------------------------------------------ training on a disk store
from helpers import TINY, meft_config, tiny  # noqa: E402
from meft.adapter.model import MeftModel, get_meft_model  # noqa: E402
from meft.cli.commands import main  # noqa: E402
from meft.training.trainer import TrainConfig, Trainer, TrainingInterrupted  # noqa: E402
from test_retain import examples  # noqa: E402

CFG = TrainConfig(steps=5, batch_size=4, lr=1e-2, progress=False)


def _model(path: Path | None, **kw: object) -> MeftModel:
    arrays = DiskArrays(path) if path is not None else None
    return get_meft_model(tiny("llama"), meft_config(**kw), arrays=arrays)


@pytest.mark.parametrize("kw", [{}, {"host_dtype": "bfloat16", "optim_state": "8bit"},
                                {"host_dtype": "bfloat16", "optim_state": "factored"}])
def test_training_on_disk_equals_training_in_ram(kw: dict, tmp_path: Path) -> None:
    ram = _model(None, **kw)
    Trainer(ram, examples(), CFG, tmp_path / "ram", pad_id=0).train()
    disk = _model(tmp_path / "store", **kw)
    Trainer(disk, examples(), CFG, tmp_path / "disk", pad_id=0).train()
    for name, t in ram.adapter_state().items():
        assert torch.equal(disk.adapter_state()[name], t), name
    arrays = disk.arrays
    assert arrays is not None and arrays.step == 0  # nothing committed without a checkpoint
    names = set(arrays.index["arrays"])
    assert {"0.keys", "0.values", "0.keys.exp_avg", "2.values.step"} <= names
    assert not any(n.endswith("exp_avg_sq_col") for n in names)  # shared by rows: in RAM


def test_a_crash_after_a_checkpoint_resumes_bitwise(tmp_path: Path) -> None:
    """Train to step 2 (checkpoint, store committed), run step 3 without a checkpoint, let
    its pages reach the disk, drop everything (the crash); reopening undoes step 3 and the
    resumed run ends where an uninterrupted one does."""
    whole = _model(None)
    Trainer(whole, examples(), CFG, tmp_path / "whole", pad_id=0).train()
    first = _model(tmp_path / "store")
    trainer = Trainer(first, examples(), CFG, tmp_path / "run", pad_id=0)
    trainer.stop_after = 2
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    trainer.train_step(next(trainer._batches()))  # step 3, never checkpointed
    assert first.arrays is not None and first.arrays.changed
    with pytest.raises(SerializationError, match="changed since its last commit"):
        first.save_pretrained(tmp_path / "uncommitted", tables=False)  # names no state
    for mm in first.arrays._maps.values():
        mm.flush()
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert not (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 100_000
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["tables_step"] == 2
    del first, trainer
    again = _model(tmp_path / "store")
    assert again.arrays is not None and again.arrays.recovered and again.arrays.step == 2
    resumed = Trainer(again, examples(), CFG, tmp_path / "run", pad_id=0)
    resumed.restore(ckpt)
    resumed.train()
    resumed.save_checkpoint()  # step 5: the store commits
    for name, t in whole.adapter_state().items():
        assert torch.equal(again.adapter_state()[name], t), name
    stale = Trainer(_model(tmp_path / "store"), examples(), CFG, tmp_path / "x", pad_id=0)
    with pytest.raises(SerializationError, match=r"the disk store .* holds step 5"):
        stale.restore(ckpt)


def test_meft_train_with_a_disk_store(model_dir: Path, data_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", str(model_dir), "--data", str(data_file), "--steps", "4",
             "--batch-size", "4", "--max-new-tokens", "2", "--no-progress", "--no-eval-before",
             "--no-retention", "--no-plots", *TINY]
    store = tmp_path / "store"
    assert main(["train", *flags, "--output", str(tmp_path / "a"), "--store",
                 f"disk:{store}", "--stop-after", "2"]) == 0
    assert f"GB on disk in {store} with optimizer state" in capsys.readouterr().err
    assert DiskArrays(store).step == 2
    assert main(["train", "--resume", str(tmp_path / "a"), "--no-progress"]) == 0
    assert DiskArrays(store).step == 4
    assert main(["train", *flags, "--output", str(tmp_path / "b")]) == 0  # in RAM
    from safetensors.torch import load_file

    from helpers import tiny_for
    from meft.adapter.model import MeftModel
    from tokenizers_for_tests import make_tokenizer

    # the final adapter of a disk-store run holds the routers and names the store
    files = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert all(k.endswith(".router") for k in files)
    a = MeftModel.from_pretrained(tiny_for(make_tokenizer()), tmp_path / "a" / "adapter")
    assert a.arrays is not None and a.arrays.step == 4
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    state = a.adapter_state()
    assert state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in b)
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "a" / "adapter"),
                 "--data", str(data_file), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["info", "--adapter", str(tmp_path / "a" / "adapter")]) == 0
    assert f"tables: in the disk store {store.resolve()} (step 4)" in capsys.readouterr().out
    store.rename(tmp_path / "moved")
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "a" / "adapter"),
                 "--data", str(data_file), "--max-new-tokens", "2"]) == 2
    assert "tables are in the disk store" in capsys.readouterr().err
    (tmp_path / "moved").rename(store)
    assert main(["train", *flags, "--output", str(tmp_path / "c"), "--store",
                 f"disk:{store}"]) == 2
    assert "holds another run's store" in capsys.readouterr().err
    assert main(["train", *flags, "--store", "tape"]) == 2
    assert "store must be ram or disk:DIR, got 'tape'" in capsys.readouterr().err


def test_arrays_take_their_blocks_when_made(tmp_path: Path) -> None:
    # a write to a page the filesystem has no block for is SIGBUS, not an exception: each
    # array reserves its blocks up front (read as zeros)
    t = DiskArrays(tmp_path).zeros("w", (1000, 64), torch.float32)
    assert (tmp_path / "w.bin").stat().st_blocks * 512 >= 1000 * 64 * 4
    assert torch.count_nonzero(t) == 0


def test_an_array_the_disk_cannot_hold_is_refused_and_not_left_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = DiskArrays(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(RunDirectoryError, match="no space left for array w "):
        store.zeros("w", (1000, 64), torch.float32)
    assert not (tmp_path / "w.bin").exists() and "w" not in store.index["arrays"]


def test_a_store_the_disk_cannot_hold_is_refused_in_one_line(
        model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    store = DiskArrays(tmp_path / "s")
    store.reserve(1000)  # fits
    with pytest.raises(RunDirectoryError, match=r"the store needs 1000000\.0 GB"):
        store.reserve(10**15)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert main(["train", "--model", str(model_dir), "--data", str(data_file), "--steps", "1",
                 "--no-progress", "--no-eval-before", "--no-retention", "--no-plots", *TINY,
                 "--output", str(tmp_path / "run"), "--store", f"disk:{tmp_path / 'big'}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("meft: error: ") and "the store needs" in last
    assert "its filesystem has 1.0 kB for it" in last
    assert not list((tmp_path / "big").glob("*.bin"))  # refused before making any array
