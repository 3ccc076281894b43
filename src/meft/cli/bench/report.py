"""The comparison's outputs: one JSON per (method, rate) run, the selection of each method's
rate on validation, ``summary.json``, the tables and the plots.

A run file is ``<method>@<lr>.json`` (``:`` -> ``_``) holding the run's metrics at the top level
(``losses`` per step included), the resolved configuration under ``config`` and the machine
under ``environment`` (:func:`meft.sysinfo.environment`). :func:`select` marks, per method, the
run with the best validation exact match (ties: validation F1, then the lower final training
loss) as ``selected`` and says whether its rate sits at an end of the grid; test scores take no
part. ``summary.json`` has one row per method at its selected rate with the fields of
:data:`SUMMARY_FIELDS`. The tables and plots cover every run file in the directory, so methods
can be added a few at a time (:func:`write_report`, also ``meft bench --report-only``); the
header names the machine and commit of every run, and warns when step times come from more
than one kind of CPU (speed compares only within one machine).

``device_bytes``: on CUDA the peak ``torch.cuda.max_memory_allocated``; elsewhere the bytes a GPU
would have to hold: frozen base weights, trainable device tensors with their gradients and two
AdamW moments, and the peak staged rows (meft) or whole tables (offload) of a step
(activations excluded). ``host_bytes``: the worker process's peak RSS.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meft.cli.bench.methods import DEFAULT_METHODS
from meft.cli.plots import pyplot
from meft.sysinfo import environment

# the fields that vary with the seed: each a mean over a (method, rate)'s seeds, with its
# sample standard deviation beside it (``<field>_std``; None for one seed)
QUALITY_FIELDS = ("validation_em", "validation_f1", "test_em", "test_f1", "test_contains",
                  "seen_em", "bits_recalled", "bits_per_param", "written_rows",
                  "untouched_tokens", "exact_windows", "exact_questions",
                  "exact_questions_adjacent", "retention", "retention_seen_kinds",
                  "retention_adjacent", "general_loss_delta", "final_loss",
                  "continual_kept_mean", "continual_kept_min")
SUMMARY_FIELDS = ("method", "lr", "seeds", "selected", "lr_at_grid_edge", "lr_grid", "facts",
                  *(f for q in ("validation_em", "test_em", "test_f1", "seen_em",
                                "bits_per_param", "retention", "retention_seen_kinds",
                                "retention_adjacent", "general_loss_delta", "written_rows",
                                "untouched_tokens", "continual_kept_mean",
                                "continual_kept_min")
                    for f in (q, f"{q}_std")),
                  "step_time_s", "tokens_per_s", "device_bytes", "host_bytes",
                  "moved_bytes_per_step", "trainable_params")


def run_name(method: str, lr: float, seed: int | None = None) -> str:
    """A run file's stem: ``meft_4096@0.003``, or ``meft_4096@0.003@seed1`` with ``--seeds``."""
    name = f"{method.replace(':', '_')}@{lr:g}"
    return name if seed is None else f"{name}@seed{seed}"


def write_result(result: dict[str, Any], directory: Path, config: dict[str, Any],
                 device: str, *, with_seed: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = run_name(result["method"], result["lr"], result.get("seed") if with_seed else None)
    path: Path = directory / f"{stem}.json"
    payload = {**result, "file": path.name, "config": config,
               "environment": environment(device)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_results(directory: Path) -> list[dict[str, Any]]:
    """Every run file in ``directory``, in the order of the default method list, then lr,
    then seed; each knows its file (``file``)."""
    results = []
    for path in sorted(directory.glob("*@*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(result, dict) and result.get("method") and "step_time_s" in result:
            result["file"] = path.name
            results.append(result)
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    results.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["lr"],
                                r.get("seed") or 0))
    return results


def _num(x: float | None) -> float:
    return -math.inf if x is None else x


def quality(run: dict[str, Any], field: str) -> Any:
    """A quality field of a run file. Files written before the retention probe was split
    (no ``retention_seen_kinds``) asked their ``retention`` on the kinds replay trains: that
    is today's ``retention_seen_kinds``, and they have no headline retention."""
    if "retention_seen_kinds" not in run and field in ("retention", "retention_seen_kinds"):
        return run.get("retention") if field == "retention_seen_kinds" else None
    return run.get(field)


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, rate): the :data:`QUALITY_FIELDS` as means over its seeds with
    their standard deviations (``<field>_std``), step time and tokens/s as medians, memory as
    the largest; the rest as its first run has them; ``runs`` holds the runs themselves."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for runs in groups.values():
        row = {k: v for k, v in runs[0].items() if k not in QUALITY_FIELDS}
        row["runs"] = runs
        row["seeds"] = [r.get("seed") for r in runs]
        for f in QUALITY_FIELDS:
            values = [v for r in runs if (v := quality(r, f)) is not None]
            row[f] = statistics.mean(values) if values else None
            row[f"{f}_std"] = statistics.stdev(values) if len(values) > 1 else None
        for f in ("step_time_s", "tokens_per_s"):
            row[f] = statistics.median(r[f] for r in runs)
        for f in ("device_bytes", "host_bytes"):
            values = [r[f] for r in runs if r.get(f) is not None]
            row[f] = max(values) if values else None
        rows.append(row)
    return rows


def _key(r: dict[str, Any]) -> tuple[float, float, float]:
    return (_num(r.get("validation_em")), _num(r.get("validation_f1")), -r["final_loss"])


def select(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each method's row (a run, or a (method, rate) of :func:`aggregate`: its mean over
    seeds) with the best validation score ``selected`` (and where its rate sits in the
    method's grid), its runs too; return the selected rows, one per method."""
    chosen = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        best = max(runs, key=_key)
        grid = sorted({r["lr"] for r in runs})
        for r in runs:
            r["selected"] = r is best
            r["lr_grid"] = grid
            r["lr_at_grid_edge"] = (None if len(grid) < 2 or grid[0] < r["lr"] < grid[-1]
                                    else "lowest" if r["lr"] == grid[0] else "highest")
            for run in r.get("runs", []):
                run.update(selected=r["selected"], lr_grid=grid,
                           lr_at_grid_edge=r["lr_at_grid_edge"])
        chosen.append(best)
    return chosen


MATCHED_FIELDS = ("method", "lr", "reached", "validation_em", "validation_em_std", "test_em",
                  "test_em_std", "retention", "retention_std", "retention_seen_kinds",
                  "retention_seen_kinds_std", "retention_adjacent", "retention_adjacent_std",
                  "general_loss_delta", "general_loss_delta_std")


def matched(rows: Sequence[dict[str, Any]], target: float | None = None
            ) -> tuple[float | None, list[dict[str, Any]]]:
    """Learning against forgetting at one level of learning: per method, of its rates whose
    mean validation exact match reaches ``target`` (default: 90% of the best (method, rate)'s),
    the one that forgets least (highest mean retention, then the smallest general-loss
    change). Validation chooses, as it chooses rates; test and retention are reported.
    Returns the target and one row per method (``reached`` False: none of its rates got
    there)."""
    scored = [r for r in rows if r.get("validation_em") is not None]
    if not scored:
        return None, []
    level = 0.9 * max(r["validation_em"] for r in scored) if target is None else target
    out = []
    for method in dict.fromkeys(r["method"] for r in scored):
        reach = [r for r in scored if r["method"] == method and r["validation_em"] >= level]
        if not reach:
            out.append({"method": method, "lr": None, "reached": False})
            continue
        pick = max(reach, key=lambda r: (_num(r.get("retention")),
                                         -abs(_num(r.get("general_loss_delta")))))
        out.append({**{k: pick.get(k) for k in MATCHED_FIELDS}, "reached": True})
    return level, out


def matched_table(level: float, rows: Sequence[dict[str, Any]]) -> str:
    out = ["| method | lr | val EM | test EM | retention | retention, seen kinds | "
           "Δ general loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["reached"]:
            out.append(f"| {r['method']} | does not reach {pct(level)} | | | | | |")
            continue
        out.append(f"| {r['method']} | {r['lr']:g} | {pm(r, 'validation_em')} | "
                   f"{pm(r, 'test_em')} | {pm(r, 'retention')} | "
                   f"{pm(r, 'retention_seen_kinds')} | {pm(r, 'general_loss_delta')} |")
    return "\n".join(out)


def summary(selected: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in SUMMARY_FIELDS} for r in selected]


def edge_warnings(selected: Sequence[dict[str, Any]]) -> list[str]:
    return [f"WARNING: {r['method']}'s best rate {r['lr']:g} is the {r['lr_at_grid_edge']} of "
            f"its grid {','.join(f'{x:g}' for x in r['lr_grid'])}: a better rate may lie "
            f"beyond it" for r in selected if r.get("lr_at_grid_edge")]


def pct(v: float | None, unit: str = "") -> str:
    """A fraction as a percentage with one decimal (``–`` when missing)."""
    return "–" if v is None else f"{100 * v:.1f}{unit}"


def pm(r: dict[str, Any], field: str) -> str:
    """A row's mean with its standard deviation over seeds when it has one: ``70.8 ± 3.1``
    (a percentage), or ``+0.021 ± 0.004`` for the general-loss change."""
    v, sd = r.get(field), r.get(f"{field}_std")
    loss = field == "general_loss_delta"
    text = ("–" if v is None else f"{v:+.3f}") if loss else pct(v)
    if v is None or sd is None:
        return text
    return f"{text} ± {sd:.3f}" if loss else f"{text} ± {100 * sd:.1f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per run or (method, rate) given (usually the selected ones); with several
    seeds, quality is mean ± standard deviation."""
    head = ("| method | lr | seeds | val EM | test EM | test F1 | retention | retention, seen "
            "kinds | retention, adjacent | Δ general loss | trainable | step s | tok/s | "
            "device MB | host GB | moved MB/step |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            "---:|"]
    for r in results:
        host = r.get("host_bytes")
        edge = " (edge)" if r.get("lr_at_grid_edge") else ""
        seeds = r.get("seeds") or [r.get("seed")]
        rows.append(
            f"| {r['method']} | {r['lr']:g}{edge} | "
            f"{','.join('–' if x is None else str(x) for x in seeds)} | "
            f"{pm(r, 'validation_em')} | {pm(r, 'test_em')} | {pm(r, 'test_f1')} | "
            f"{pm(r, 'retention')} | {pm(r, 'retention_seen_kinds')} | "
            f"{pm(r, 'retention_adjacent')} | {pm(r, 'general_loss_delta')} | "
            f"{r['trainable_params'] / 1e6:.1f}M | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['device_bytes'] / 1e6:.0f} | "
            f"{'–' if host is None else f'{host / 1e9:.2f}'} | "
            f"{r['moved_bytes_per_step'] / 1e6:.0f} |")
    return "\n".join(rows)


def continual_table(rows: Sequence[dict[str, Any]]) -> str:
    """Continual runs (``--sets``), one row per (method, rate) given: each set's test exact
    match right after it was learned and after the last set (means over seeds), and the share
    each earlier set keeps (mean and worst set, means over seeds); empty without such runs."""
    rows = [r for r in rows if any(x.get("continual_test_em") for x in r.get("runs", [r]))]
    if not rows:
        return ""

    def per_set(r: dict[str, Any], which: str) -> str:
        grids = [x["continual_test_em"] for x in r.get("runs", [r]) if x.get("continual_test_em")]
        n = len(grids[0])
        cells = [statistics.mean((g[j][j] if which == "learned" else g[-1][j]) for g in grids)
                 for j in range(n)]
        return " / ".join(pct(c) for c in cells)

    out = ["| method | lr | seeds | test EM of each set when learned | after the last set | "
           "kept, mean of earlier sets | kept, worst set |", "|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        seeds = r.get("seeds") or [r.get("seed")]
        out.append(f"| {r['method']} | {r['lr']:g} | "
                   f"{','.join('–' if x is None else str(x) for x in seeds)} | "
                   f"{per_set(r, 'learned')} | {per_set(r, 'last')} | "
                   f"{pm(r, 'continual_kept_mean')} | {pm(r, 'continual_kept_min')} |")
    return "\n".join(out)


def grid_table(results: Sequence[dict[str, Any]]) -> str:
    """Validation / test exact match of every (method, rate) (means over seeds)."""
    rates = sorted({r["lr"] for r in results})
    rows = ["| method | " + " | ".join(f"lr {x:g}" for x in rates) + " |",
            "|---|" + "---:|" * len(rates)]
    for method in dict.fromkeys(r["method"] for r in results):
        cells = []
        for x in rates:
            r = next((r for r in results if r["method"] == method and r["lr"] == x), None)
            cell = "" if r is None else f"{pct(r.get('validation_em'))} / {pct(r.get('test_em'))}"
            cells.append(f"**{cell}**" if r is not None and r.get("selected") else cell)
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _base(method: str) -> tuple[str, bool]:
    """(the method without protection, whether it has it): one colour per method."""
    name, plus, _ = method.partition("+retain")
    return name, bool(plus)


def plot_pareto(rows: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """Held-out exact match against retention and against the general-loss change, one curve
    per method over its rates (solid: with protection, dashed: without; error bars: the
    standard deviation over seeds): the Pareto view of learning against forgetting."""
    pts = [r for r in rows if r.get("test_em") is not None
           and (r.get("retention") is not None or r.get("general_loss_delta") is not None)]
    if not pts:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colours: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for method in dict.fromkeys(r["method"] for r in pts):
        base, protected = _base(method)
        colour = colours.setdefault(base, cycle[len(colours) % len(cycle)])
        curve = sorted((r for r in pts if r["method"] == method), key=lambda r: r["lr"])
        for ax, field, scale in ((axes[0], "retention", 100), (axes[1], "general_loss_delta", 1)):
            got = [r for r in curve if r.get(field) is not None]
            if not got:
                continue
            xs = [scale * r[field] for r in got]
            ys = [100 * r["test_em"] for r in got]
            ax.errorbar(xs, ys, xerr=[scale * (r.get(f"{field}_std") or 0) for r in got],
                        yerr=[100 * (r.get("test_em_std") or 0) for r in got],
                        fmt="o-" if protected else "s--", color=colour, capsize=2, lw=1.2,
                        label=method)
            for r, x, y in zip(got, xs, ys, strict=True):
                ax.annotate(f"{r['lr']:g}", (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    axes[0].set_xlim(0, 101)
    axes[0].set_ylim(0, 100)
    axes[0].set_xlabel("retention: questions of kinds replay never trains, still answered (%)")
    axes[0].set_ylabel("exact match on held-out questions (%)")
    axes[1].set_xlabel("general text loss, after - before")
    for ax in axes:
        ax.grid(alpha=0.3)
    labelled = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), None)
    if labelled is not None:
        labelled.legend(fontsize=7)
    fig.suptitle("learning against forgetting, each method over its rates (labels: lr; "
                 "solid: +retain)", fontsize=10)
    fig.tight_layout()
    path = directory / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    plt = pyplot()
    paths = []
    selected = [r for r in results if r.get("selected")]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths.append(directory / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if any(r.get("validation_em") is not None for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in results):
            pts = sorted((r["lr"], 100 * r["validation_em"]) for r in results
                         if r["method"] == method and r.get("validation_em") is not None)
            ax.plot(*zip(*pts, strict=True), "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylim(0, 100)
        ax.set_ylabel("exact match on validation questions (%)")
        ax.set_title("exact match vs learning rate (the rate is chosen here)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "em_vs_lr.png")
    scored = [r for r in selected if r.get("test_em") is not None]
    if any(r.get("retention") is not None for r in scored):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in scored:
            if r.get("retention") is not None:
                ax.scatter(100 * r["retention"], 100 * r["test_em"], s=30)
                ax.annotate(r["method"], (100 * r["retention"], 100 * r["test_em"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(0, 100)  # full scales: distances read as they are
        ax.set_ylim(0, 100)
        ax.set_xlabel("retention: general questions still answered (%)")
        ax.set_ylabel("exact match on test questions (%)")
        ax.set_title("learning vs forgetting (each method at its chosen rate)")
        ax.grid(alpha=0.3)
        save(fig, "em_vs_retention.png")
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in scored:
            ax.scatter(r["device_bytes"] / 1e6, 100 * r["test_em"], s=30)
            ax.annotate(r["method"], (r["device_bytes"] / 1e6, 100 * r["test_em"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("device MB (base weights + trainable state + staged rows)")
        ax.set_ylabel("exact match on test questions (%)")
        ax.set_title("quality vs device memory")
        ax.grid(alpha=0.3)
        save(fig, "em_vs_device_bytes.png")
    curves = [r for r in selected if r.get("validation_losses")]
    if curves:  # did the budget of steps plateau? (meft bench --eval-every S)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in curves:
            ax.plot(*zip(*r["validation_losses"], strict=True), "o-",
                    label=f"{r['method']} @ {r['lr']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("answer loss on validation questions")
        ax.set_title("held-out loss during training (each method at its chosen rate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "validation_loss.png")
    sized = [r for r in selected if r.get("neurons")]
    if sized:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for kind in ("meft", "meft-noexperts", "dense", "offload"):
            pts = sorted((r["neurons"], r["step_time_s"]) for r in sized if r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=kind)
        for r in selected:
            if not r.get("neurons"):
                ax.axhline(r["step_time_s"], ls="--", lw=0.8, color="gray")
                ax.annotate(r["method"], (ax.get_xlim()[0], r["step_time_s"]), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapter neurons per layer N")
        ax.set_ylabel("median step time (s)")
        ax.set_title("step time vs N (dashed: LoRA, full)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "step_time_vs_n.png")
    return paths


def _find(results: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r["method"] == name), None)


def machines(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (CPU, threads, commit, torch) the runs were made on, with their names
    (``lora:all:16@0.003 (seeds 0,1,2)`` when a (method, rate) ran with several seeds)."""
    groups: dict[tuple[str, ...], dict[str, list[str]]] = {}
    for r in results:
        env = r.get("environment") or {}
        key = (str(env.get("cpu")), str(env.get("threads")), str(env.get("git_commit"))[:7],
               str(env.get("torch")))
        groups.setdefault(key, {}).setdefault(f"{r['method']}@{r['lr']:g}", []).append(
            str(r.get("seed")))
    return [f"{cpu}, {threads} thread{'' if threads == '1' else 's'}, commit {commit}, "
            f"torch {torch_}: "
            + ", ".join(name + (f" (seeds {','.join(seeds)})" if len(seeds) > 1 else "")
                        for name, seeds in runs.items())
            for (cpu, threads, commit, torch_), runs in groups.items()]


def write_report(output: Path, command: str | None = None, *,
                 matched_em: float | None = None) -> dict[str, Any]:
    """From every run file in ``output``: mean and spread over seeds per (method, rate), mark
    the selection (by mean validation exact match) in each run, write summary.json,
    matched.json, table.md and the plots; return them. ``command`` joins the runs' own
    commands in the header (the invocation that wrote the report); ``matched_em``: the
    learning level of the matched-learning table (None: 90% of the best)."""
    results = read_results(output)
    rows = aggregate(results)
    chosen = select(rows)
    for r in results:  # record the selection in every run file
        (output / r["file"]).write_text(json.dumps(r, indent=2) + "\n")
    summary_rows = summary(chosen)
    (output / "summary.json").write_text(json.dumps(summary_rows, indent=2) + "\n")
    level, matched_rows = matched(rows, matched_em)
    if level is not None:  # (runs without evaluation have nothing to match)
        (output / "matched.json").write_text(json.dumps(
            {"validation_em_target": level, "default_target": matched_em is None,
             "methods": matched_rows}, indent=2) + "\n")
    first = results[0] if results else {}  # none: every method failed, nothing before
    tc = first.get("train_config") or {}
    seeds = sorted({r.get("seed", tc.get("seed")) for r in results}, key=str)
    where = machines(results)
    setups = {(env.get("cpu"), env.get("threads"))
              for env in ((r.get("environment") or {}) for r in results)}
    header = (f"{first.get('model')}, {first.get('data')}; {first.get('steps')} steps x "
              f"{tc.get('batch_size')} examples, seed{'s' if len(seeds) > 1 else ''} "
              f"{','.join(map(str, seeds))}\n\n"
              + "".join(f"command: {c}\n" for c in dict.fromkeys(
                  [*(r["command"] for r in results if r.get("command")),
                   *([command] if command else [])]))
              + "\nRuns made on:\n\n" + "".join(f"- {w}\n" for w in where)).rstrip()
    if len(setups) > 1:
        header += ("\n\nWARNING: these runs come from different CPUs or thread counts; step "
                   "times and tokens/s compare only between runs of one CPU and thread count")
    warnings = edge_warnings(chosen)
    spread = " (mean ± standard deviation over seeds)" if len(seeds) > 1 else ""
    match = ("" if level is None else
             f"\nAt matched learning{spread}: each method's least-forgetting rate whose mean "
             f"validation EM reaches {pct(level, '%')}"
             f"{' (90% of the best)' if matched_em is None else ''}:\n\n"
             f"{matched_table(level, matched_rows)}\n")
    sets = continual_table(rows)
    learning = ("" if not sets else
                "\nContinual learning: the sets one after another (test EM %, sets in the order "
                f"learned; kept: an earlier set's EM after the last set over its EM when "
                f"learned){spread}:\n\n{sets}\n")
    text = (f"{header}\n\nEach method at its chosen rate (best mean validation exact match)"
            f"{spread}:\n\n{markdown_table(chosen)}\n\n" + "".join(w + "\n" for w in warnings)
            + match + learning
            + f"\nEvery (method, rate) (validation EM / test EM, %; bold: chosen):\n\n"
            f"{grid_table(rows)}\n")
    (output / "table.md").write_text(text)
    plots = plot_results(rows, output)
    pareto = plot_pareto(rows, output)
    print(text)
    return {"output": str(output), "results": results, "summary": summary_rows,
            "matched": matched_rows,
            "plots": [str(p) for p in [*plots, *([pareto] if pareto else [])]]}
