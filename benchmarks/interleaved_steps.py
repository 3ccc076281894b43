"""Step-time ratios with the methods' steps interleaved in one process: the noise-robust way
to compare `meft bench` methods on a shared machine.

`meft bench` trains its methods one after another, each in its own process, so a change in
the machine's state between them (other tenants, memory bandwidth, frequency) enters the
ratio: on the project machine a whole step of unchanged code moves ~10% from run to run.
Here every method is built once (the same embedded model, built-in set, batches, rate and
seed as `meft bench`), and the steps alternate: round r runs one step of each method, in an
order rotated every round so none always runs first. Each round's ratio (a method's step
over the first method's step of that round) sees the same machine state, and the median of
those ratios over the rounds after ``--warmup`` is the figure to read; the medians of the
step times are reported beside it.

Run (from the repository root; writes a fresh directory, refusing an existing one)::

    python benchmarks/interleaved_steps.py --output /tmp/interleaved
    python benchmarks/interleaved_steps.py --methods lora:all:16 meft:16384 --steps 20 \\
        --output /tmp/i2

All methods' host state is resident at once (meft:16384 fp32 ~7 GB, meft:65536 bf16 with
rowwise state ~7 GB on the embedded model): choose methods that fit in RAM together.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `meft bench` (meft.cli) sets it

import torch

from meft.bench.methods import build, parse_method
from meft.config import BenchJob
from meft.data import encode_all
from meft.datasets import load_splits
from meft.loading import load_model, load_tokenizer, resolve_model
from meft.sysinfo import environment
from meft.trainer import Trainer

DEFAULT_METHODS = ["lora:all:16", "meft:16384", "meft:65536:bf16:rowwise"]


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
    lines = ["# Step times, methods interleaved step by step in one process", "",
             f"Machine: {env.get('cpu')}, {env.get('cpu_count')} cores, {env.get('threads')} "
             f"threads, torch {env.get('torch')}, commit {env.get('git_commit')}, "
             f"{env.get('date_utc')}, THP_MEM_ALLOC_ENABLE={env.get('THP_MEM_ALLOC_ENABLE')}.",
             "", f"command: `{command}`", "",
             f"{rounds} rounds, one step of each method per round (order rotated each round); "
             f"statistics over rounds {warmup + 1}-{rounds}.", "",
             f"| method | median step s | x {first} (per-round ratio: median) | quartiles of "
             f"the per-round ratio | ratio of the medians |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_step_s']:.3f} | {r['ratio_median']:.3f} | "
                     f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} | {r['ratio_of_medians']:.3f} |")
    return "\n".join(lines) + "\n"


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
    job = BenchJob.from_options(options)
    source = resolve_model(None)
    tokenizer = load_tokenizer(source)
    base = load_model(source)
    splits = load_splits(None, None, seed=job.seed, dataset=args.dataset)
    train = encode_all(splits.train, tokenizer, job.train_config(1e-3).max_length, "training")
    names = list(args.methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        trainers, batches = {}, {}
        for name in names:
            method = parse_method(name)
            tconfig = job.train_config(method.default_lr)
            torch.manual_seed(tconfig.seed)
            trainable = build(method, copy.deepcopy(base), job, torch.device("cpu"))
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="meft-interleaved-"))
            trainers[name] = Trainer(trainable, train, tconfig, tmp,
                                     pad_id=tokenizer.pad_token_id)
            batches[name] = trainers[name]._batches()
        start = time.perf_counter()
        for r in range(args.steps):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out = trainers[name].train_step(next(batches[name]))
                times[name].append(out["step_time_s"])
            print(f"round {r + 1}/{args.steps}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s" for n in names)
                + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
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
