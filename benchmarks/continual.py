"""Continual learning: a second set of facts on top of the first, with and without protection.

    python benchmarks/continual.py --output DIR [--people 15] [--modes off,on] [meft train flags]

Two invented knowledge sets A and B (seeds 0 and 1, ``--people`` people x 4 facts each) are
written to DIR/data as JSONL. For each mode M of ``--modes`` (``off``: ``--retain off``; ``on``:
``--retain on``; ``rehearse``: ``--retain on``, and the second stage also ``--rehearse
A/train``, with which the rows A wrote train too; the given flags apply to both stages):

    DIR/M/first    meft train --data A/train --eval-data A/test --retain M
    DIR/M/second   meft train --adapter DIR/M/first/adapter --data B/train --eval-data B/test
                   --retain M
    DIR/M/a_after_b.json    meft eval --adapter DIR/M/second/adapter --data A/test

and DIR/table.md, DIR/summary.json: A's held-out exact match after A and after B (and the share
kept), B's after B, and retention and general-text loss change after B. The issue's target:
A after B >= 90% of A after A. Fresh directories only: results are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment


def _write(samples: list[Any], path: Path) -> None:
    rows = [{"question": s.messages[0]["content"], "answer": list(s.answers)} for s in samples]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run(cmd: list[str], log: Path) -> str:
    print("$", shlex.join(cmd), flush=True)
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return proc.stdout


def _pick(flags: list[str], names: dict[str, int], keep: bool) -> list[str]:
    """The flags named in ``names`` (name -> number of values) with their values, or
    (``keep=False``) all the others."""
    out, i = [], 0
    while i < len(flags):
        name = flags[i].split("=")[0]
        takes = names.get(name)
        width = 1 if takes is None or "=" in flags[i] else 1 + takes
        if (takes is not None) == keep:
            out += flags[i:i + width]
        i += width
    return out


# what meft eval shares with meft train; the adapter's shape, which --adapter fixes
EVAL_FLAGS = {"--model": 1, "--max-new-tokens": 1, "--eval-batch-size": 1, "--device": 1,
              "--trust-remote-code": 0}
SHAPE_FLAGS = {f: 1 for f in ("--neurons", "--top-k", "--experts", "--n-probe", "--gate",
                              "--layers", "--router-init", "--init-std", "--host-dtype",
                              "--optim-state")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, required=True, help="a new directory")
    p.add_argument("--people", type=int, default=15, help="people per set (4 facts each)")
    p.add_argument("--modes", default="off,on,rehearse", help="modes to compare (off, on, "
                   "rehearse)")
    args, flags = p.parse_known_args()
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"--output {args.output} exists and is not empty (results are never "
                 "overwritten)")
    data = args.output / "data"
    data.mkdir(parents=True)
    for name, seed in (("a", 0), ("b", 1)):
        ks = make_knowledge_set(args.people, seed=seed)
        _write(ks.train, data / f"{name}_train.jsonl")
        _write(ks.eval, data / f"{name}_test.jsonl")
    meft = [sys.executable, "-m", "meft"]
    rows = []
    modes = args.modes.split(",")
    if set(modes) - {"off", "on", "rehearse"}:
        sys.exit(f"--modes: off, on or rehearse, got {args.modes!r}")
    for mode in modes:
        out = args.output / mode
        out.mkdir()
        common = ["--no-progress", "--no-plots", "--retain", "off" if mode == "off" else "on",
                  *flags]
        second_flags = (["--rehearse", str(data / "a_train.jsonl")] if mode == "rehearse"
                        else [])
        _run([*meft, "train", "--data", str(data / "a_train.jsonl"), "--eval-data",
              str(data / "a_test.jsonl"), "--output", str(out / "first"), *common],
             out / "first.log")
        _run([*meft, "train", "--adapter", str(out / "first" / "adapter"), "--data",
              str(data / "b_train.jsonl"), "--eval-data", str(data / "b_test.jsonl"),
              "--output", str(out / "second"), "--no-eval-before", *second_flags,
              *_pick(common, SHAPE_FLAGS, keep=False)], out / "second.log")
        evaluate = [*meft, "eval", "--adapter", str(out / "second" / "adapter"), "--data",
                    str(data / "a_test.jsonl"), *_pick(flags, EVAL_FLAGS, keep=True)]
        scores = json.loads(_run(evaluate, out / "a_after_b.log"))
        (out / "a_after_b.json").write_text(json.dumps(scores, indent=2) + "\n")
        first = json.loads((out / "first" / "run.json").read_text())
        second = json.loads((out / "second" / "run.json").read_text())
        a_after_a = first["scores"]["after"]["exact_match"]
        rows.append({
            "mode": mode, "a_after_a": a_after_a, "a_after_b": scores["exact_match"],
            "a_kept": scores["exact_match"] / a_after_a if a_after_a else None,
            "b_after_b": second["scores"]["after"]["exact_match"],
            "retention_after_b": (second["retention"] or {}).get("retention"),
            "general_loss_delta_after_b": (second["retention"] or {}).get("general_loss_delta"),
            "steps": [first["steps"], second["steps"]],
        })
    env = environment()
    summary = {"command": shlex.join(["python", "benchmarks/continual.py", *sys.argv[1:]]),
               "rows": rows, "environment": env}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Continual learning: facts B trained on top of facts A", "",
        f"`{summary['command']}`", "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['threads']} threads, torch "
        f"{env['torch']}, commit {env['git_commit']}, {env['date_utc']}.", "",
        "| mode | A EM after A | A EM after B | A kept | B EM after B | retention after B "
        "| general loss Δ after B |", "|---|---|---|---|---|---|---|",
        *[f"| {r['mode']} | {pct(r['a_after_a'])} | {pct(r['a_after_b'])} | "
          f"{pct(r['a_kept'])} | {pct(r['b_after_b'])} | {pct(r['retention_after_b'])} | "
          + ("–" if r["general_loss_delta_after_b"] is None
             else f"{r['general_loss_delta_after_b']:+.3f}") + " |" for r in rows], ""]
    (args.output / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
