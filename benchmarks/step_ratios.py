"""Median step time of each `meft bench` run directory under the given directories, and each
method's ratio to lora:all:16 of the same run (issue 12 measures steps after the first 3:
``step_times_s[3:]``). Prints a markdown table, one row per run directory.

    python benchmarks/step_ratios.py benchmarks/results/step-time/ratio-b166f7c
"""
import json
import statistics
import sys
from pathlib import Path

rows = []
for parent in map(Path, sys.argv[1:]):
    runs = sorted(p for p in parent.iterdir() if p.is_dir() and any(p.glob("*@*.json")))
    for run in runs:
        med = {}
        env = None
        for f in sorted(run.glob("*@*.json")):
            r = json.loads(f.read_text())
            med[r["method"]] = statistics.median(r["step_times_s"][3:])
            env = r["environment"]
        lora = med.get("lora:all:16")
        cells = [f"{m} {s:.3f} s ({s / lora:.2f}x)" for m, s in med.items() if m != "lora:all:16"]
        rows.append(f"| {run.name} | {env['git_commit'][:7]} | {lora:.3f} | "
                    + " | ".join(cells) + " |")
print("| run | commit | lora:all:16 s | others (x LoRA) |")
print("|---|---|---:|---|")
print("\n".join(rows))
