"""An adapter bigger than RAM: N=262,144 on all 30 layers of the embedded model from a disk
store, against N=65,536 in RAM with the same compact state (issue 13's target).

    python benchmarks/disk_store.py --output DIR [--steps 30] [--state rowwise] [flags]

runs, one after the other,

    DIR/ram    meft train --neurons 65536 --host-dtype bfloat16 --optim-state STATE ...
    DIR/disk   meft train --neurons 262144 --host-dtype bfloat16 --optim-state STATE
               --store disk:DIR/store ...

(both with ``--steps``, no evaluation before, no retention probe, 24 held-out questions after)
while sampling each process's peak resident memory (VmHWM) every second, and writes
DIR/table.md and DIR/summary.json: median step time over steps 4.., its ratio disk / RAM
(target <= 2), peak RSS (target < 16 GB for the disk run), the disk the store takes (allocated
blocks), adapter parameters and bytes moved per step. Fresh directories only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meft.engine.optim import STATE_FORMATS


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _run(cmd: list[str], log: Path) -> int:
    """Run ``cmd``; return its peak RSS in bytes (sampled every second)."""
    print("$", shlex.join(cmd), flush=True)
    peak = 0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid) or 0)
            time.sleep(1.0)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return peak


def _allocated(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _row(name: str, out: Path, command: list[str], peak: int) -> dict[str, Any]:
    run = json.loads((out / "run.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = lines[3:] or lines
    adapter = run["config"]["adapter"]
    return {"run": name, "command": shlex.join(command[1:]),
            "neurons": adapter["neurons"], "store": run["config"]["run"]["store"],
            "step_time_s": statistics.median(x["step_time_s"] for x in later),
            "update_s": statistics.median(x["update_s"] for x in later),
            "peak_rss_bytes": peak,
            "mb_moved_per_step": statistics.median(x["mb_h2d"] + x["mb_d2h"] for x in later),
            "held_out_em": run["scores"].get("after", {}).get("exact_match"),
            "steps": run["steps"], "environment": run["environment"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="a new directory")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--state", default="rowwise", choices=STATE_FORMATS)
    args, flags = p.parse_known_args()
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"--output {args.output} exists and is not empty (results are never "
                 "overwritten)")
    args.output.mkdir(parents=True, exist_ok=True)
    common = ["--host-dtype", "bfloat16", "--optim-state", args.state, "--steps",
              str(args.steps), "--no-eval-before", "--no-retention", "--max-eval", "24",
              "--no-progress", "--no-plots", *flags]
    meft = [sys.executable, "-m", "meft", "train"]
    ram = [*meft, "--neurons", "65536", "--output", str(args.output / "ram"), *common]
    disk = [*meft, "--neurons", "262144", "--store", f"disk:{args.output / 'store'}",
            "--output", str(args.output / "disk"), *common]
    rows = [_row("RAM, N=65536", args.output / "ram", ram, _run(ram, args.output / "ram.log"))]
    rows.append(_row("disk, N=262144", args.output / "disk", disk,
                     _run(disk, args.output / "disk.log")))
    rows[1]["store_disk_bytes"] = _allocated(args.output / "store")
    ratio = rows[1]["step_time_s"] / rows[0]["step_time_s"]
    summary = {"command": shlex.join(["python", "benchmarks/disk_store.py", *sys.argv[1:]]),
               "rows": rows, "disk_over_ram_step": ratio,
               "targets": {"step_ratio_le_2": ratio <= 2.0,
                           "disk_peak_rss_lt_16GB": rows[1]["peak_rss_bytes"] < 16e9}}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    env = rows[0]["environment"]
    lines = [
        "# An adapter bigger than RAM, from a disk store", "", f"`{summary['command']}`", "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['threads']} threads, "
        f"{env['mem_total_bytes'] / 1e9:.1f} GB RAM, torch {env['torch']}, commit "
        f"{env['git_commit']}, {env['date_utc']}.", "",
        "| run | step s (median, steps 4..) | update s | peak RSS GB | MB moved /step | "
        "store on disk GB | held-out EM (24) |", "|---|---|---|---|---|---|---|",
        *[f"| {r['run']} | {r['step_time_s']:.2f} | {r['update_s']:.2f} | "
          f"{r['peak_rss_bytes'] / 1e9:.1f} | {r['mb_moved_per_step']:.0f} | "
          f"{r.get('store_disk_bytes', 0) / 1e9:.1f} | "
          f"{'' if r['held_out_em'] is None else format(100 * r['held_out_em'], '.1f')} |"
          for r in rows], "",
        f"Step time disk / RAM: {ratio:.2f} (target <= 2); peak RSS of the disk run "
        f"{rows[1]['peak_rss_bytes'] / 1e9:.1f} GB (target < 16).", ""]
    (args.output / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
