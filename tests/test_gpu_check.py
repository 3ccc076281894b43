"""benchmarks/gpu_check.py --dry-run: the GPU check's own code on CPU at toy sizes, so the
script a lent GPU runs cannot rot between loans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                           "--dry-run", "--output", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "result.json").read_text())
    assert printed["dry_run"] and printed["environment"]["torch"]
    assert printed["same_on_cpu"]["passed"] and printed["same_on_cpu"]["loss_max_rel_diff"] == 0
    assert printed["op"]["max_abs_diff"] < 1e-5
    steps = {s["method"]: s for s in printed["steps"]}
    assert set(steps) == {"lora:all:16", "meft:1024", "meft:4096:bf16:rowwise"}
    for name, s in steps.items():
        assert s["step_time_s"] > 0 and s["final_loss"] > 0, name
    meft = steps["meft:1024"]
    assert meft["moved_bytes_h2d_per_step"] > 0 and meft["host_s_per_step"] >= 0
    # meft plan, given the measured union, predicts the bytes moved (its own formula)
    assert meft["plan"]["moved_bytes"]["d2h"] == pytest.approx(meft["moved_bytes_d2h_per_step"],
                                                              rel=0.01)


def test_the_gpu_check_refuses_without_cuda_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--dry-run" in proc.stderr
