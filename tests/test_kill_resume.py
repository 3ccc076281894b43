"""scripts/kill_resume.py: SIGKILL at random moments never loses a completed checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"


def test_random_kills_lose_no_checkpoint() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--trials", "4", "--steps", "300",
                           "--max-delay", "10", "--seed", "1"],
                          capture_output=True, text=True, timeout=400)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["lost_checkpoints"] == 0 and summary["kills"] >= 1
    assert summary["newest_step"] > 0
