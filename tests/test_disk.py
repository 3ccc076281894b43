"""The disk store (meft.disk): round trips, recovery from any crash point, refusals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meft.disk import DiskArrays
from meft.errors import SerializationError


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


def test_an_uncommitted_step_is_undone_on_open(tmp_path: Path) -> None:
    store = DiskArrays(tmp_path)
    t = store.zeros("w", (50, 4), torch.float32)
    t.copy_(torch.randn(50, 4))
    store.commit(1)
    committed = t.clone()
    rows = torch.tensor([3, 7, 3, 20])
    store.before_write("w", rows)
    t[rows] = 99.0
    store.before_write("w", torch.tensor([7, 40]))  # 7 again: journaled once
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
    store.before_write("w", torch.tensor([1, 2]))
    t[1:3] = 5.0
    store._maps["w"].flush()
    ids = tmp_path / "journal" / "w.ids"
    ids.write_bytes(ids.read_bytes()[:12])  # one whole id and half of the next
    del store, t
    w = DiskArrays(tmp_path).zeros("w", (10, 2), torch.float32)
    assert w[1].tolist() == [1.0, 1.0]  # restored from the complete record
    assert w[2].tolist() == [5.0, 5.0]  # its record was torn: the crash came before writing


CHILD = """
import sys, torch
from meft.disk import DiskArrays
store = DiskArrays(sys.argv[1])
w = store.zeros("w", (400, 64), torch.float32)
s = store.step
while True:
    s += 1
    for lo in range(0, 400, 50):   # a step changes the rows chunk by chunk
        rows = torch.arange(lo, lo + 50)
        store.before_write("w", rows)
        w[lo:lo + 50] = float(s)
    store.commit(s)
    print(s, flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_the_last_committed_step(tmp_path: Path) -> None:
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one commit
        time.sleep(0.01 + 0.037 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = DiskArrays(tmp_path)
        w = store.zeros("w", (400, 64), torch.float32)
        assert torch.all(w == float(store.step)), (trial, store.step, np.unique(w.numpy()))
        del store, w
