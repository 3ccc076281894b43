"""One process against two on `meft train`'s default job (the embedded model, the built-in set,
90 steps of 12): the data-parallel run must learn what one process learns, and this says what
two processes cost and move per step.

    python benchmarks/distributed_embedded.py --output DIR [meft train flags ...]

runs, one after the other into fresh directories,

    DIR/one   meft train --output DIR/one [flags]
    DIR/two   torchrun --standalone --nproc_per_node=2 -m meft train --output DIR/two [flags]

and writes DIR/table.md and DIR/summary.json: held-out and seen-phrasing exact match, retention,
general-text loss change, median step time over steps 4.. (these are 2-core machines: two
processes of one thread each against one process of two threads), MB host<->device per step
(each process's, summed) and MB exchanged between the processes per step, with the machine,
threads, torch version and commit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def _run(cmd: list[str], log: Path) -> None:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")


def _row(name: str, out: Path, command: str) -> dict[str, Any]:
    run = json.loads((out / "run.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    later = lines[3:] or lines
    return {
        "run": name, "command": command, "world_size": run.get("world_size", 1),
        "held_out_em": run["scores"]["after"]["exact_match"],
        "seen_em": run["scores"].get("after_seen_phrasing", {}).get("exact_match"),
        "retention": (run["retention"] or {}).get("retention"),
        "general_loss_delta": (run["retention"] or {}).get("general_loss_delta"),
        "final_loss": run["final_loss"],
        "step_time_s": statistics.median(x["step_time_s"] for x in later),
        "mb_h2d_per_step": statistics.median(x["mb_h2d"] for x in later),
        "mb_d2h_per_step": statistics.median(x["mb_d2h"] for x in later),
        "mb_comm_per_step": statistics.median(x.get("mb_comm", 0.0) for x in later),
        "train_seconds": run["train_seconds"],
        "environment": run["environment"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="a new directory")
    p.add_argument("--nproc", type=int, default=2)
    args, flags = p.parse_known_args()
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"--output {args.output} exists and is not empty (results are never "
                 "overwritten)")
    args.output.mkdir(parents=True, exist_ok=True)
    one = [sys.executable, "-m", "meft", "train", "--no-progress", *flags,
           "--output", str(args.output / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "meft", "train", "--no-progress", *flags,
           "--output", str(args.output / "two")]
    _run(one, args.output / "one.log")
    _run(two, args.output / "two.log")
    rows = [_row("1 process", args.output / "one", shlex.join(one[1:])),
            _row(f"{args.nproc} processes", args.output / "two", shlex.join(two[1:]))]
    (args.output / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    env = rows[0]["environment"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    table = [
        f"# One process against {args.nproc} (torchrun, gloo on CPU)", "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, commit "
        f"{env['git_commit']}, {env['date_utc']}. Threads: one process {env['threads']}; "
        f"each of the {args.nproc} processes "
        f"{rows[1]['environment']['threads']}.", "",
        "Produced by:", "",
        f"    python benchmarks/distributed_embedded.py {shlex.join(sys.argv[1:])}", "",
        "which ran:", "", *[f"    {r['command']}" for r in rows], "",
        "| run | held-out EM | seen EM | retention | general loss Δ | final loss | step s "
        "(median, steps 4..) | MB host→device /step | MB device→host /step | MB between "
        "processes /step |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['run']} | {pct(r['held_out_em'])} | {pct(r['seen_em'])} | "
          f"{pct(r['retention'])} | "
          f"{'' if r['general_loss_delta'] is None else format(r['general_loss_delta'], '+.3f')}"
          f" | {r['final_loss']:.4f} | {r['step_time_s']:.2f} | {r['mb_h2d_per_step']:.1f} | "
          f"{r['mb_d2h_per_step']:.1f} | {r['mb_comm_per_step']:.1f} |" for r in rows], "",
        "MB host↔device are rank 0's (each process moves its own share); MB between processes "
        "are summed over the processes.", ""]
    (args.output / "table.md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
