"""Stop and resume: k steps, stop, resume to S gives the same adapter files, bit for bit, as S
steps in one go; Ctrl-C saves a checkpoint and exits 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import pytest

from helpers import TINY
from meft.adapter.serialization import load_tensors
from meft.cli.commands import main

RUN = ["--steps", "6", "--batch-size", "4", "--save-every", "2", "--lr", "1e-2",
       "--no-progress", "--no-plots", "--no-eval-before", "--max-new-tokens", "2", *TINY]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_stop_and_resume_is_bitwise_identical(model_dir: Path, data_file: Path,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["train", "--model", str(model_dir), "--data", str(data_file)]
    assert main([*common, "--output", str(whole), *RUN]) == 0
    assert main([*common, "--output", str(split), *RUN, "--stop-after", "3"]) == 0
    assert not (split / "adapter").exists()  # stopped: no final adapter yet
    state = json.loads((split / "checkpoints" / "step-00000003" / "trainer_state.json")
                       .read_text())
    assert state["step"] == 3
    # the original flags may be repeated as they were (only a changed value is refused)
    assert main(["train", "--resume", str(split), *common[1:], "--output", str(split), *RUN]) == 0
    assert _files(whole / "adapter") == _files(split / "adapter")
    a = load_tensors(whole / "checkpoints" / "step-00000006", "optimizer")
    b = load_tensors(split / "checkpoints" / "step-00000006", "optimizer")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert main(["train", "--resume", str(split), "--lr", "0.1"]) == 2  # settings are the run's
    assert "--lr 0.1 (the run has 0.01)" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_missing_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(tmp_path), "--steps", "4"]) == 2
    assert "run_config.json" in capsys.readouterr().err
    (tmp_path / "run_config.json").write_text("{}")
    assert main(["train", "--resume", str(tmp_path), "--steps", "4"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    assert main(["train", "--resume", str(tmp_path), "--steps", "4"]) == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(model_dir: Path, data_file: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    cmd = [sys.executable, "-m", "meft.cli.commands", "train", "--model", str(model_dir), "--data",
           str(data_file), "--output", str(out), "--steps", "100000", "--batch-size", "2",
           "--no-progress", "--no-eval-before", *TINY]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines: list[str] = []  # stderr, drained by a thread so neither side can block on the pipe
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120

    def give_up(why: str) -> NoReturn:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
        pytest.fail(f"{why}; stderr:\n{''.join(lines)}")

    # wait until at least one step is logged
    while not (metrics.is_file() and metrics.read_text()):
        if proc.poll() is not None:
            reader.join(timeout=5)
            pytest.fail(f"training exited with {proc.returncode} before its first step; "
                        f"stderr:\n{''.join(lines)}")
        if time.monotonic() > deadline:
            give_up(f"no step logged to {metrics} within 120 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        give_up("training did not exit within 120 s of starting after SIGINT")
    reader.join(timeout=10)
    err = "".join(lines)
    assert code == 130, err
    assert "interrupted at step" in err and "--resume" in err
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and (ckpts[-1] / "adapter" / "adapter_model.safetensors").is_file()
