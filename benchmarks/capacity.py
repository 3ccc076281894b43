"""Where LoRA runs out (issue 39): recall against the number of facts, per method, and against
what each method costs on the device.

    python benchmarks/capacity.py DIR

DIR holds one ``meft bench`` directory per size, ``people-<P>/`` (``--people P``: 4P facts),
written by ``benchmarks/capacity_queue.sh``. From their run files (nothing else) this writes
into DIR:

- ``capacity.json``: one row per (method, facts): the mean over seeds of ``seen_em`` (what was
  stored: the trained phrasing asked back), ``test_em`` (the held-out phrasing: what
  generalises), ``bits_per_param`` and ``bits_recalled``, with the seeds, trainable
  parameters, device and host bytes, steps and step time;
- ``table.md``: method x facts, seen EM / held-out EM, then the costs at the largest size;
- ``recall_vs_facts.png`` (one curve per method), ``recall_vs_device_bytes.png`` and
  ``recall_vs_trainable_params.png`` (the largest size).

Device bytes are as ``meft bench`` accounts them for a GPU (base weights, trainable state with
gradients and AdamW moments, staged rows); bits per parameter are the answer bits of the facts
recalled over the trainable parameters (Physics of Language Models 3.3 measures ~2 bits per
parameter at 1,000 exposures; these runs give each fact 5).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meft.cli.bench.report import read_results
from meft.cli.plots import pyplot

SIZE = re.compile(r"people-(\d+)$")


def rows(directory: Path) -> list[dict[str, Any]]:
    """One row per (method, facts) over every ``people-*`` directory's run files."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and SIZE.match(p.name)):
        for run in read_results(sub):
            facts = run.get("facts")
            if facts is None:
                continue
            groups.setdefault((run["method"], int(facts)), []).append(run)
    out = []
    for (method, facts), runs in groups.items():
        row: dict[str, Any] = {"method": method, "facts": facts,
                               "seeds": sorted(r.get("seed") for r in runs),
                               "lr": runs[0]["lr"], "steps": runs[0]["steps"]}
        for field in ("seen_em", "test_em", "bits_per_param", "bits_recalled"):
            values = [r[field] for r in runs if r.get(field) is not None]
            row[field] = statistics.mean(values) if values else None
            row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else None
        for field in ("trainable_params", "device_bytes", "host_state_bytes"):
            row[field] = runs[0].get(field)
        row["step_time_s"] = statistics.median(r["step_time_s"] for r in runs)
        out.append(row)
    order = list(dict.fromkeys(r["method"] for r in sorted(
        out, key=lambda r: (r["device_bytes"] or 0, r["method"]))))
    return sorted(out, key=lambda r: (order.index(r["method"]), r["facts"]))


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def table(data: Sequence[dict[str, Any]]) -> str:
    sizes = sorted({r["facts"] for r in data})
    methods = list(dict.fromkeys(r["method"] for r in data))
    cell = {(r["method"], r["facts"]): r for r in data}
    out = ["Seen EM / held-out EM (%) by facts trained (mean ± sd where there are two seeds):",
           "", "| method | " + " | ".join(f"{n} facts" for n in sizes) + " |",
           "|---|" + "---:|" * len(sizes)]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(
            f"{_pct(c['seen_em'], c['seen_em_std'])} / {_pct(c['test_em'], c['test_em_std'])}"
            if (c := cell.get((m, n))) else "" for n in sizes) + " |")
    top = sizes[-1] if sizes else None
    out += ["", f"At {top} facts: what each method costs and stores:", "",
            "| method | lr | steps | trainable | device MB | host GB | bits recalled | "
            "bits / param | step s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        c = cell.get((m, top))
        if c is None:
            continue
        bits = c["bits_per_param"]
        out.append(f"| {m} | {c['lr']:g} | {c['steps']} | {c['trainable_params'] / 1e6:.1f}M | "
                   f"{c['device_bytes'] / 1e6:.0f} | "
                   f"{(c['host_state_bytes'] or 0) / 1e9:.2f} | "
                   f"{c['bits_recalled'] or 0:.0f} | "
                   f"{'–' if bits is None else f'{bits:.2e}'} | {c['step_time_s']:.2f} |")
    return "\n".join(out)


def plot(data: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    plt = pyplot()
    written = []
    methods = list(dict.fromkeys(r["method"] for r in data))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = [(r["facts"], 100 * r["seen_em"]) for r in data
               if r["method"] == m and r["seen_em"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=m,
                    linestyle="-" if m.startswith("meft") else "--")
    ax.set_xscale("log")
    ax.set(xlabel="facts trained", ylabel="seen exact match, %",
           title="Recall of trained facts as their number grows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(directory / "recall_vs_facts.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    top = max((r["facts"] for r in data), default=None)
    for key, label, name in (("device_bytes", "device MB (as a GPU would hold it)",
                              "recall_vs_device_bytes.png"),
                             ("trainable_params", "trainable parameters (millions)",
                              "recall_vs_trainable_params.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in data:
            if r["facts"] == top and r["seen_em"] is not None:
                ax.scatter(r[key] / 1e6, 100 * r["seen_em"])
                ax.annotate(r["method"], (r[key] / 1e6, 100 * r["seen_em"]), fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="seen exact match, %", title=f"At {top} facts")
        fig.tight_layout()
        written.append(directory / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    args = ap.parse_args(argv)
    data = rows(args.directory)
    if not data:
        print(f"capacity: no run files with facts under {args.directory}/people-*",
              file=sys.stderr)
        return 2
    (args.directory / "capacity.json").write_text(json.dumps(data, indent=2) + "\n")
    text = table(data)
    (args.directory / "table.md").write_text(text + "\n")
    plot(data, args.directory)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
