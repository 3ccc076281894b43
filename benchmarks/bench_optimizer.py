"""The row-sparse AdamW update, fused against its elementwise reference, on a step's rows.

    python benchmarks/bench_optimizer.py --output DIR [--neurons 16384] [--rows 2836] [--steps 40]

One (N, d) fp32 host table with its AdamW state (d = 576, SmolLM2-135M's hidden size), two
copies: each step draws ``--rows`` random rows (R; the default is the union a meft:16384 step
of the built-in set touches per layer), adds a random gradient on them, and updates each copy,
one with ``meft.engine.optim._lazy_update`` (torch's fused AdamW kernel on rows grouped by update
count) and one with ``_lazy_update_reference`` (the elementwise ops it is tested against),
alternating which goes first. The rows are random, so the tables stay out of cache as in
training (the update is memory-bound: gathering and scattering p, m and v). Reports the median
milliseconds per table update after the first 5 steps, their ratio, the largest difference
between the two tables, and ms per step for 60 tables (SmolLM2's 30 layers x keys, values).
Writes DIR/bench_optimizer.json (a fresh directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from meft.engine import optim
from meft.engine.store import HostTable, RowSparseGrad
from meft.sysinfo import environment

D = 576
TABLES = 60  # SmolLM2-135M: 30 layers x (keys, values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--neurons", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=2836)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.output.exists():
        print(f"error: {args.output} exists; benchmarks write to a fresh directory",
              file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(args.neurons, D, generator=gen) * 0.02
    runs = {}
    for name, update in (("fused", optim._lazy_update),
                         ("reference", optim._lazy_update_reference)):
        table = HostTable(name, start.clone(), RowSparseGrad(args.neurons, D))
        runs[name] = (table, optim.RowSparseAdamW([table], lr=3e-3), update)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps):
        ids = torch.randperm(args.neurons, generator=gen)[: args.rows]
        grad = torch.randn(args.rows, D, generator=gen) * 1e-3
        names = list(runs) if step % 2 == 0 else list(reversed(runs))
        for name in names:
            table, opt, update = runs[name]
            table.grad.zero_()
            table.grad.add(ids, grad)
            t0 = time.perf_counter()
            update(table, opt.state[table.data], opt.param_groups[0])
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(t[5:]) for name, t in times.items()}
    diff = float((runs["fused"][0].data - runs["reference"][0].data).abs().max())
    result = {
        "command": "python benchmarks/bench_optimizer.py " + " ".join(argv or sys.argv[1:]),
        "neurons": args.neurons, "d": D, "rows": args.rows, "steps": args.steps,
        "ms_per_table": ms, "reference_over_fused": ms["reference"] / ms["fused"],
        "ms_per_step_60_tables": {k: v * TABLES for k, v in ms.items()},
        "max_abs_difference": diff, "environment": environment(),
    }
    args.output.mkdir(parents=True)
    (args.output / "bench_optimizer.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_table", "reference_over_fused",
                                             "ms_per_step_60_tables", "max_abs_difference")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
