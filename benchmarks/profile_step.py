"""Where a training step's time goes: torch.profiler over real steps of `meft bench` methods.

For each method (default: meft:16384 and lora:all:16) on the embedded model and the built-in
set, it trains ``--steps`` steps through meft's one Trainer (the same batches, rate and seed as
``meft bench``), profiles the last ``--profile-steps`` of them, and writes a markdown report:
per method the step time with and without the profiler (medians) and the top-20 operators by
self CPU time *per step*, with the environment (CPU, threads, torch, commit). The step times
without the profiler are the unprofiled steps after the first 2 (warm-up), measured in the same
process run after run, so their ratio is the comparison; absolute numbers depend on the
machine. Those steps are also split into phases (medians): forward (the loss), backward,
clipping, optimizer step, and the rest of the step.

Run (from the repository root; writes a fresh file, refusing an existing one)::

    python benchmarks/profile_step.py --output benchmarks/results/profiles/profile-COMMIT.md
    python benchmarks/profile_step.py --methods meft:65536 --steps 6 --output /tmp/p.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from meft.adapter.loading import load_model
from meft.config import BenchJob
from meft.sysinfo import environment
from meft.training import trainer as trainer_module
from meft.training.trainer import Trainer
from method_steps import embedded_training_set, method_steps

TOP = 20
PHASES = ("forward", "backward", "clip", "optimizer")


class PhaseClock:
    """Seconds spent per phase during one step, by wrapping what the trainer calls."""

    def __init__(self, trainer: Trainer) -> None:
        self.spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._undo: list[tuple[Any, str, Any]] = []
        self._wrap(trainer_module, "token_loss_sum", "forward")
        self._wrap(torch.Tensor, "backward", "backward")
        self._wrap(trainer.optimizers, "clip_", "clip")
        self._wrap(trainer.optimizers, "step", "optimizer")

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[phase] += time.perf_counter() - start

        self._undo.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out, self.spent = self.spent, dict.fromkeys(PHASES, 0.0)
        return out

    def close(self) -> None:
        for owner, name, old in reversed(self._undo):
            if old is None:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


def profile_method(name: str, base: torch.nn.Module, tokenizer: Any, train: list[Any],
                   job: BenchJob, steps: int, profiled: int) -> dict[str, Any]:
    with method_steps(name, copy.deepcopy(base), tokenizer, train, job) as (trainer, batches):
        plain: list[float] = []
        phases: list[dict[str, float]] = []
        clock = PhaseClock(trainer)
        try:
            for _ in range(steps - profiled):
                plain.append(trainer.train_step(next(batches))["step_time_s"])
                phases.append(clock.take())
                phases[-1]["rest"] = plain[-1] - sum(phases[-1].values())
        finally:
            clock.close()
        warm = slice(2, None) if len(plain) > 2 else slice(None)
        timed: list[float] = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                start = time.perf_counter()
                trainer.train_step(next(batches))
                timed.append(time.perf_counter() - start)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / profiled,
            "share": e.self_cpu_time_total / total if total else 0.0,
            "calls_per_step": e.count / profiled} for e in rows[:TOP]]
    return {"method": name, "lr": trainer.config.lr,
            "step_s": statistics.median(plain[warm]),
            "phases_s": {k: statistics.median(p[k] for p in phases[warm])
                         for k in (*PHASES, "rest")},
            "profiled_step_s": statistics.median(timed), "ops": ops,
            "self_ms_per_step_total": total / 1e3 / profiled}


def report(results: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    lines = ["# Profile of training steps", "",
             f"Machine: {env.get('cpu')}, {env.get('threads')} threads, torch {env.get('torch')}, "
             f"commit {env.get('git_commit')}, {env.get('date_utc')}.", "",
             f"command: `{command}`", "",
             "| method | step s (median, no profiler) | ratio to the first | step s profiled |",
             "|---|---:|---:|---:|"]
    first = results[0]["step_s"]
    for r in results:
        lines.append(f"| {r['method']} | {r['step_s']:.3f} | {r['step_s'] / first:.2f} | "
                     f"{r['profiled_step_s']:.3f} |")
    lines += ["", "Phases of the unprofiled steps (median seconds per step; forward is the loss, "
              "backward the gradients):", "",
              "| method | " + " | ".join((*PHASES, "rest")) + " |",
              "|---|" + "---:|" * (len(PHASES) + 1)]
    for r in results:
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{r['phases_s'][k]:.3f}" for k in (*PHASES, "rest")) + " |")
    for r in results:
        lines += ["", f"## {r['method']} (lr {r['lr']:g}): top {TOP} operators by self CPU "
                  f"time per step (all operators: {r['self_ms_per_step_total']:.0f} ms/step)", "",
                  "| operator | self ms / step | share | calls / step |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['self_ms_per_step']:.1f} | {100 * o['share']:.1f}% | "
                  f"{o['calls_per_step']:.0f} |" for o in r["ops"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--methods", nargs="+", default=["meft:16384", "lora:all:16"])
    ap.add_argument("--steps", type=int, default=8, help="steps per method (profiled included)")
    ap.add_argument("--profile-steps", type=int, default=3, help="the last steps, profiled")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "airports"])
    ap.add_argument("--output", type=Path, required=True, help="a new markdown file")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite or choose another file",
              file=sys.stderr)
        return 2
    if not 0 < args.profile_steps < args.steps:
        print("error: --profile-steps must be between 1 and --steps - 1", file=sys.stderr)
        return 2
    job = BenchJob.from_options({"methods": args.methods, "steps": args.steps,
                                 "batch_size": args.batch_size, "dataset": args.dataset,
                                 "progress": False})
    source, tokenizer, train = embedded_training_set(job, args.dataset)
    base = load_model(source)
    results = []
    for name in args.methods:
        print(f"profiling {name} ...", file=sys.stderr)
        results.append(profile_method(name, base, tokenizer, train, job, args.steps,
                                      args.profile_steps))
    env = environment("cpu")
    command = "python benchmarks/profile_step.py " + " ".join(argv or sys.argv[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(results, env, command))
    args.output.with_suffix(".json").write_text(json.dumps(
        {"command": command, "environment": env, "results": results}, indent=2) + "\n")
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
