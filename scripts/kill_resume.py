"""Kill a training run with SIGKILL at random moments, resume it each time, and check that no
completed checkpoint is ever lost.

    python scripts/kill_resume.py --trials 20 --seed 0

It trains a tiny random Llama (built here, no download) on a tiny JSONL with a checkpoint
every step, kills ``meft train`` after a random delay, then verifies that the newest complete
checkpoint loads (adapter and optimizer safetensors, trainer state) and is not older than the
newest one seen before, and resumes with ``meft train --resume``. It prints one line per trial
and a final JSON summary; the exit status is 1 if any completed checkpoint was lost or
unreadable.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model and tokenizer of the tests


def newest_checkpoint(run: Path) -> tuple[int, str | None]:
    """(step, error) of the newest complete checkpoint; error is None if it loads."""
    from meft.adapter.checkpoint import list_checkpoints, read_checkpoint
    from meft.adapter.model import read_adapter

    found = list_checkpoints(run / "checkpoints")
    if not found:
        return 0, None
    try:
        tensors, state = read_checkpoint(found[-1])
        read_adapter(found[-1] / "adapter")
        assert tensors and state["step"] == int(found[-1].name.split("-")[1])
        return int(state["step"]), None
    except Exception as err:  # report, do not crash the checker
        return int(found[-1].name.split("-")[1]), f"{found[-1]}: {err}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="kills to attempt (default 20)")
    ap.add_argument("--steps", type=int, default=400, help="total steps of the run")
    ap.add_argument("--max-delay", type=float, default=6.0,
                    help="kill after a uniform random delay up to this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="meft-kill-") as tmp:
        tmp_path = Path(tmp)
        from helpers import save_tiny_llama

        save_tiny_llama(tmp_path / "model")
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"question": f"Where was person {i} born?",
                                            "answer": f"City{i % 5}"}) + "\n"
                                for i in range(40)))
        run = tmp_path / "run"
        first = [sys.executable, "-m", "meft", "train", "--model", str(tmp_path / "model"),
                 "--data", str(data), "--output", str(run), "--steps", str(args.steps),
                 "--batch-size", "2", "--save-every", "1", "--keep-checkpoints", "3",
                 "--neurons", "64", "--top-k", "4", "--experts", "8", "--n-probe", "2",
                 "--no-progress", "--no-plots", "--no-eval-before", "--max-new-tokens", "2",
                 # kills come within seconds: no background to generate first (protection's
                 # checkpoints are tested bitwise in tests/test_background.py)
                 "--retain", "off"]
        resume = [sys.executable, "-m", "meft", "train", "--resume", str(run), "--steps",
                  str(args.steps), "--no-progress"]
        seen, kills, lost, finished = 0, 0, [], False
        for trial in range(1, args.trials + 1):
            cmd = resume if (run / "run_config.json").is_file() and seen else first
            if cmd is first and run.exists():
                cmd = [*first, "--overwrite"]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            delay = rng.uniform(0.5, args.max_delay)
            try:
                code = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                code = proc.wait()
                kills += 1
            step, error = newest_checkpoint(run)
            ok = error is None and step >= seen
            if not ok:
                lost.append({"trial": trial, "newest": step, "seen_before": seen,
                             "error": error})
            print(f"trial {trial}: {'killed' if code == -9 else f'exit {code}'} after "
                  f"{delay:.1f}s, newest complete checkpoint step {step} "
                  f"({'ok' if ok else 'LOST'})", flush=True)
            seen = max(seen, step)
            if code == 0:
                finished = True
                break
            time.sleep(0.1)
        summary = {"trials": trial, "kills": kills, "lost_checkpoints": len(lost),
                   "failures": lost, "newest_step": seen, "run_finished": finished}
        print(json.dumps(summary))
        return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
