"""Step-time ratios with the methods' steps taking turns: the noise-robust way to compare
`meft bench` methods on a shared machine.

`meft bench` trains its methods one after another, each in its own process, so a change in
the machine's state between them (other tenants, memory bandwidth, frequency) enters the
ratio: on the project machine a whole step of unchanged code moves ~10% from run to run.
Here every method is built in its own process as in `meft bench` (the same embedded model,
built-in set, batches, rate and seed), and the processes take turns: round r runs one step of
each method, one process at a time while the others wait, in an order rotated every round so
none always runs first. Each round's ratio (a method's step over the first method's step of
that round) sees the same machine state, and the median of those ratios over the rounds
after ``--warmup`` is the figure to read; the medians of the step times are reported beside
it. (One process per method, as `meft bench` runs them: with all methods in one process
both LoRA's and meft's steps ran 3-8% slower and meft's ratio came out 1-3% lower than
with a process each, benchmarks/results/step-time/ratio-5c1717f.)

Run (from the repository root; writes a fresh directory, refusing an existing one)::

    python benchmarks/interleaved_steps.py --output /tmp/interleaved   # LoRA, meft:16384
    python benchmarks/interleaved_steps.py --methods lora:all:16 meft:65536:bf16:rowwise \\
        --output /tmp/i2

Every method's process stays resident for the whole run: their peak memory adds up (on the
embedded model, `meft bench`'s host GB: LoRA 2.4, meft:16384 9.6, meft:65536 with bf16 tables
and rowwise state 13.6), so on a 24 GB machine compare LoRA with one large meft at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from meft.adapter.loading import load_model
from meft.config import BenchJob
from meft.sysinfo import environment
from method_steps import embedded_training_set, method_steps

DEFAULT_METHODS = ["lora:all:16", "meft:16384"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of ``values``."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summarise(names: list[str], times: dict[str, list[float]], warmup: int
              ) -> list[dict[str, Any]]:
    """Per method: the median step after ``warmup`` rounds, and the quartiles of its per-round
    ratio to the first method's step of the same round."""
    first = times[names[0]]
    rows = []
    for name in names:
        own = times[name][warmup:]
        ratios = [t / f for t, f in zip(own, first[warmup:], strict=True)]
        lo, mid, hi = quartiles(ratios)
        rows.append({"method": name, "median_step_s": statistics.median(own),
                     "ratio_of_medians": statistics.median(own) / statistics.median(
                         first[warmup:]),
                     "ratio_median": mid, "ratio_q1": lo, "ratio_q3": hi})
    return rows


def table(rows: list[dict[str, Any]], env: dict[str, Any], command: str, rounds: int,
          warmup: int) -> str:
    first = rows[0]["method"]
    lines = ["# Step times, the methods' processes taking turns step by step", "",
             f"Machine: {env.get('cpu')}, {env.get('cpu_count')} cores, {env.get('threads')} "
             f"threads, torch {env.get('torch')}, commit {env.get('git_commit')}, "
             f"{env.get('date_utc')}, THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE')}.",
             "", f"command: `{command}`", "",
             f"{rounds} rounds, one step of each method per round, one process per method, "
             f"one running at a time (order rotated each round); "
             f"statistics over rounds {warmup + 1}-{rounds}.", "",
             f"| method | median step s | x {first} (per-round ratio: median) | quartiles of "
             f"the per-round ratio | ratio of the medians |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_step_s']:.3f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {r['ratio_of_medians']:.3f} |")
    return "\n".join(lines) + "\n"


def _worker(name: str, options: dict[str, Any], conn: Connection) -> None:
    """One method in its own process: build it, say "ready", then run one training step per
    "step" message and answer with its seconds, until "stop"."""
    try:
        job = BenchJob.from_options(options)
        source, tokenizer, train = embedded_training_set(job, options["dataset"])
        with method_steps(name, load_model(source), tokenizer, train, job) as (trainer,
                                                                               batches):
            conn.send(("ready", 0.0))
            while conn.recv() == "step":
                conn.send(("step", trainer.train_step(next(batches))["step_time_s"]))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _answer(name: str, conn: Connection, expected: str) -> float:
    kind, value = conn.recv()
    if kind != expected:
        raise RuntimeError(f"{name}: {value}")
    return float(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                    help="`meft bench` method names; ratios are to the first")
    ap.add_argument("--steps", type=int, default=40, help="rounds (steps of each method)")
    ap.add_argument("--warmup", type=int, default=3, help="first rounds left out")
    ap.add_argument("--batch-size", type=int, default=None, help="default: meft bench's")
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "airports"])
    ap.add_argument("--output", type=Path, required=True, help="a new directory")
    args = ap.parse_args(argv)
    if args.output.exists():
        print(f"error: {args.output} exists; choose a new directory", file=sys.stderr)
        return 2
    if not 0 <= args.warmup < args.steps:
        print("error: --warmup must be between 0 and --steps - 1", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"methods": args.methods, "steps": args.steps,
                               "dataset": args.dataset, "progress": False}
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    job = BenchJob.from_options(options)  # checks the methods before any process starts
    names = list(args.methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    spawn = mp.get_context("spawn")
    conns, procs = {}, []
    try:
        for name in names:
            here, there = spawn.Pipe()
            proc = spawn.Process(target=_worker, args=(name, options, there), daemon=True)
            proc.start()
            conns[name] = here
            procs.append(proc)
        for name in names:
            _answer(name, conns[name], "ready")
        start = time.perf_counter()
        for r in range(args.steps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                conns[name].send("step")
                times[name].append(_answer(name, conns[name], "step"))
            print(f"round {r + 1}/{args.steps}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s" for n in names)
                + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    finally:
        for conn in conns.values():
            with contextlib.suppress(OSError):
                conn.send("stop")
        for proc in procs:
            proc.join(timeout=60)
    rows = summarise(names, times, args.warmup)
    env = environment("cpu")
    command = "python benchmarks/interleaved_steps.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.output.mkdir(parents=True)
    (args.output / "result.json").write_text(json.dumps(
        {"command": command, "environment": env, "rounds": args.steps, "warmup": args.warmup,
         "batch_size": job.bench.batch_size, "summary": rows, "step_times_s": times},
        indent=2) + "\n")
    text = table(rows, env, command, args.steps, args.warmup)
    (args.output / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
