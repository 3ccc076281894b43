"""Rebuild the results docs from the committed result files: nothing in them is typed by hand.

    python benchmarks/report.py            # write them
    python benchmarks/report.py --check    # exit 1 if any differs from what the files give

Writes three things, each generated only from what lies under ``benchmarks/results``:

- ``benchmarks/results/INDEX.md``: one row per question directory: its question and answer
  (the two-key header at the top of the directory's README.md, written with the results), the
  commits, CPUs, thread counts and torch versions its run files record (every JSON
  ``environment``), and a link to ``REMOVED.md`` (results deleted, with the commit that last
  had each);
- ``docs/results.md``: the same per directory with its provenance, and, for every directory
  that holds ``meft bench`` runs (one JSON per method and rate), the table of each method at
  its chosen rate, computed from those run files by the code ``meft bench`` writes its own
  table with (:mod:`meft.cli.bench.report`);
- the README's "at a glance" table (between ``<!-- results:at-a-glance -->`` markers), a
  section of docs/results.md: what each method of :data:`GLANCE` learned at its chosen rate and
  the memory it takes, with the dates, commits and machines of its runs.

tests/test_results_docs.py runs ``--check``: a number in these docs can no longer drift from
its file, and a result directory without its header fails the build.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meft.cli.bench.report import (
    aggregate,
    markdown_table,
    matched,
    matched_table,
    pct,
    pm,
    read_results,
    select,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INDEX = RESULTS / "INDEX.md"
DOCS = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
# the question directories first in reading order; any other follows alphabetically
ORDER = ["default-job", "attribution-48cb08d", "tuned-comparison-synthetic",
         "tuned-comparison-airports", "forgetting-protection", "continual-learning",
         "compact-state", "disk-store", "step-time", "profiles", "adapter-op",
         "dense-comparison", "distributed", "hf-trainer", "loss-positions", "plan"]
# where the README's at-a-glance table comes from (meft bench runs of one commit)
GLANCE = "attribution-48cb08d/synthetic"
BEGIN, END = "<!-- results:at-a-glance -->", "<!-- /results:at-a-glance -->"
HEADER = re.compile(r"\A<!--\n(.*?)\n-->\n", re.S)


def directories() -> list[Path]:
    found = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def header(directory: Path) -> dict[str, str]:
    """The README's header: ``question`` and ``answer`` (and optionally ``commits``)."""
    readme = directory / "README.md"
    if not readme.is_file():
        raise SystemExit(f"{readme}: missing (every result directory needs a README)")
    text = readme.read_text()
    match = HEADER.match(text)
    if match is None:
        raise SystemExit(f"{readme}: no header (<!--\\nquestion: ...\\nanswer: ...\\n--> "
                         "as its first lines)")
    fields = dict(line.split(": ", 1) for line in match.group(1).splitlines() if ": " in line)
    missing = {"question", "answer"} - set(fields)
    if missing:
        raise SystemExit(f"{readme}: header lacks {', '.join(sorted(missing))}")
    title = next((ln[2:].strip() for ln in text[match.end():].splitlines()
                  if ln.startswith("# ")), directory.name)
    return {**fields, "title": title}


def environments(directory: Path) -> Iterator[dict[str, Any]]:
    """Every ``environment`` block (or top-level commit) in the directory's JSON files."""
    for path in sorted(directory.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        yield from _envs(data)


def _envs(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        if "git_commit" in data and ("cpu" in data or "torch" in data):
            yield data
            return
        for value in data.values():
            yield from _envs(value)
    elif isinstance(data, list):
        for value in data:
            yield from _envs(value)


def provenance(directory: Path, fields: dict[str, str]) -> dict[str, list[str]]:
    """Commits (in date order), CPUs, thread counts and torch versions the runs record."""
    envs = sorted(environments(directory), key=lambda e: str(e.get("date_utc", "")))
    commits = list(dict.fromkeys(str(e["git_commit"])[:7] for e in envs if e.get("git_commit")))
    if not commits and fields.get("commits"):
        commits = [c.strip() for c in fields["commits"].split(",")]
    return {
        "commits": commits,
        "cpus": sorted({_cpu(str(e["cpu"])) for e in envs if e.get("cpu")}),
        "threads": sorted({str(e["threads"]) for e in envs if e.get("threads")}, key=int),
        "torch": sorted({str(e["torch"]) for e in envs if e.get("torch")}),
        "dates": sorted({str(e["date_utc"])[:10] for e in envs if e.get("date_utc")}),
    }


def _cpu(name: str) -> str:
    """A CPU's short name: ``AMD EPYC 7B13`` -> ``AMD EPYC``, ``Intel(R) Xeon(R) ...`` ->
    ``Intel Xeon``."""
    name = re.sub(r"\((R|TM)\)", "", name)
    for family in ("AMD EPYC", "Intel Xeon"):
        if family.split()[-1] in name and family.split()[0] in name:
            return family
    return " ".join(name.split()[:3])


def _commits(commits: list[str], most: int = 4) -> str:
    if not commits:
        return "–"
    shown = commits[-most:]  # the latest ones
    return ("... " if len(commits) > most else "") + ", ".join(shown)


def index_md() -> str:
    lines = [
        "# Results index",
        "",
        "Generated by `python benchmarks/report.py` from the result files: do not edit (the",
        "question and answer come from the header of each directory's README.md; the commits,",
        "CPUs, threads and torch versions from the `environment` its run files record). One",
        "directory per question; each README gives the commands and the full answer. Deleted",
        "results, with the commit that last had each: [REMOVED.md](REMOVED.md).",
        "",
        "| directory | question | answer | commits | machines, threads, torch |",
        "|---|---|---|---|---|",
    ]
    for d in directories():
        h = header(d)
        p = provenance(d, h)
        lines.append(f"| [`{d.name}/`]({d.name}/README.md) | {h['question']} | {h['answer']} | "
                     f"{_commits(p['commits'])} | {_machines(p)} |")
    return "\n".join(lines) + "\n"


def _machines(p: dict[str, list[str]]) -> str:
    parts = [", ".join(p["cpus"]) or "–"]
    if p["threads"]:
        parts.append(f"{'/'.join(p['threads'])} threads")
    if p["torch"]:
        parts.append("torch " + ", ".join(p["torch"]))
    return "; ".join(parts)


def bench_dirs(directory: Path) -> list[Path]:
    """The directory and its direct subdirectories that hold meft bench run files (deeper
    ones are the runs behind a README's own tables: repeats, step-time pairs)."""
    return [d for d in [directory, *sorted(p for p in directory.iterdir() if p.is_dir())]
            if read_results(d)]


def bench_table(directory: Path) -> str:
    rows = aggregate(read_results(directory))
    return markdown_table(select(rows))


def glance() -> str:
    """The README's table: each method of GLANCE at its chosen rate (best mean validation
    exact match): what it learned, what it kept, what it holds where, with the seeds. (No step
    times: a step-time ratio means something only within one run: see step-time/.)"""
    directory = RESULTS / GLANCE
    runs = read_results(directory)
    chosen = select(aggregate(runs))
    p = provenance(directory, {})
    lines = [
        "| method | lr | seeds | test EM | retention | Δ general loss | trainable parameters | "
        "device MB | host GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in chosen:
        host = r.get("host_state_bytes") or 0
        seeds = ",".join("–" if x is None else str(x) for x in r.get("seeds") or [])
        lines.append(f"| {r['method']} | {r['lr']:g} | {seeds} | {pm(r, 'test_em')} | "
                     f"{pm(r, 'retention')} | {pm(r, 'general_loss_delta')} | "
                     f"{r['trainable_params'] / 1e6:.1f}M | {r['device_bytes'] / 1e6:.0f} | "
                     f"{host / 1e9:.2f} |")
    first = runs[0]
    tc = first.get("train_config") or {}
    seeds = sorted({r.get("seed", tc.get("seed")) for r in runs}, key=str)
    lines += ["", f"{first.get('model')}, {first.get('data')}; {first.get('steps')} steps of "
              f"{tc.get('batch_size')}, "
              + (f"seeds {','.join(map(str, seeds))} (mean ± standard deviation over the "
                 "seeds of each row)"
                 if len(seeds) > 1 else "one seed (a 90-step run moves by up to 20 points "
                 "with the seed)")
              + ", each method at the rate of its grid with the best mean validation "
              f"exact match; {', '.join(p['dates'])}, commit {_commits(p['commits'])}, "
              f"{_machines(p)} (`benchmarks/results/{GLANCE}`). Retention: of the general "
              "questions the base model answered, of kinds replay never trains, the share "
              "still answered after training. `+retain`: the same replay for every method. "
              "Device bytes as a GPU would hold them (weights, trainable state, staged rows); "
              "host: meft's tables and moments."]
    return "\n".join(lines) + matched_glance(runs)


def matched_glance(runs: list[dict[str, Any]]) -> str:
    """Where GLANCE has protected methods (``+retain``) on several rates: every method compared
    at matched learning, at the highest level every protected method reaches (the lowest of
    their best mean validation exact matches), each at its least-forgetting rate that reaches
    it (:func:`meft.cli.bench.report.matched`)."""
    every = aggregate(runs)
    rows = [r for r in every if r["method"].endswith("+retain")]
    methods = {r["method"] for r in rows}
    if len(methods) < 2 or len({r["lr"] for r in rows}) < 2:
        return ""
    level = min(max(r["validation_em"] for r in rows if r["method"] == m) for m in methods)
    _, picked = matched(every, level)
    return ("\n\nAt matched learning: each method at its least-forgetting rate whose mean "
            f"validation exact match reaches {pct(level)}% (the highest level every protected "
            f"method reaches):\n\n{matched_table(level, picked)}")


def results_md() -> str:
    out = [
        "# Results",
        "",
        "Generated by `python benchmarks/report.py` from the committed result files under",
        "`benchmarks/results/` (do not edit; tests/test_results_docs.py fails if it differs).",
        "Every table is computed from the run files by the code `meft bench` uses for its own",
        "table; each section links the directory whose README has the commands and the full",
        "answer. Index: [benchmarks/results/INDEX.md](../benchmarks/results/INDEX.md).",
        "",
        "## At a glance",
        "",
        glance(),
    ]
    for d in directories():
        h = header(d)
        p = provenance(d, h)
        rel = f"../benchmarks/results/{d.name}"
        out += ["", f"## {h['title']}", "",
                f"**Question.** {h['question']}", "",
                f"**Answer.** {h['answer']}", "",
                f"Commits {_commits(p['commits'], most=6)}; {_machines(p)}"
                + (f"; {p['dates'][0]} to {p['dates'][-1]}" if p["dates"] else "")
                + f". Commands and details: [{d.name}/]({rel}/README.md)."]
        for b in bench_dirs(d):
            name = b.relative_to(RESULTS).as_posix()
            out += ["", f"`{name}/` (each method at its best rate on validation):", "",
                    bench_table(b)]
    return "\n".join(out) + "\n"


def readme_md() -> str:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: no {BEGIN} ... {END} section for the table")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{glance()}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a file differs from what the results give")
    args = ap.parse_args()
    outputs = {INDEX: index_md(), DOCS: results_md(), README: readme_md()}
    stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)}: differs from the results (python benchmarks/"
                  "report.py rebuilds it)", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
