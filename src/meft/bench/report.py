"""The comparison's outputs: one JSON per (method, rate) run, the selection of each method's
rate on validation, ``summary.json``, the tables, the plots, and the issue's targets.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meft.bench.methods import DEFAULT_METHODS
from meft.plots import pyplot
from meft.sysinfo import environment

SUMMARY_FIELDS = ("method", "lr", "selected", "lr_at_grid_edge", "lr_grid", "validation_em",
                  "test_em", "test_f1", "retention", "general_loss_delta", "step_time_s",
                  "tokens_per_s", "device_bytes", "host_bytes", "moved_bytes_per_step",
                  "trainable_params")


def run_name(method: str, lr: float) -> str:
    return f"{method.replace(':', '_')}@{lr:g}"


def write_result(result: dict[str, Any], directory: Path, config: dict[str, Any],
                 device: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path: Path = directory / f"{run_name(result['method'], result['lr'])}.json"
    payload = {**result, "config": config, "environment": environment(device)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_results(directory: Path) -> list[dict[str, Any]]:
    """Every run file in ``directory``, in the order of the default method list, then lr."""
    results = []
    for path in sorted(directory.glob("*@*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(result, dict) and result.get("method") and "step_time_s" in result:
            results.append(result)
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    results.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"], r["lr"]))
    return results


def _key(r: dict[str, Any]) -> tuple[float, float, float]:
    def val(x: float | None) -> float:
        return -math.inf if x is None else x

    return (val(r.get("validation_em")), val(r.get("validation_f1")), -r["final_loss"])


def select(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each method's run with the best validation score ``selected`` (and where its rate
    sits in the method's grid); return the selected runs, one per method."""
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
        chosen.append(best)
    return chosen


def summary(selected: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r.get(k) for k in SUMMARY_FIELDS} for r in selected]


def edge_warnings(selected: Sequence[dict[str, Any]]) -> list[str]:
    return [f"WARNING: {r['method']}'s best rate {r['lr']:g} is the {r['lr_at_grid_edge']} of "
            f"its grid {','.join(f'{x:g}' for x in r['lr_grid'])}: a better rate may lie "
            f"beyond it" for r in selected if r.get("lr_at_grid_edge")]


def pct(v: float | None, unit: str = "") -> str:
    """A fraction as a percentage with one decimal (``–`` when missing)."""
    return "–" if v is None else f"{100 * v:.1f}{unit}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per run given (usually the selected ones)."""
    head = ("| method | lr | val EM | test EM | test F1 | retention | Δ general loss | "
            "trainable | step s | tok/s | device MB | host GB | moved MB/step |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        host = r.get("host_bytes")
        delta = r.get("general_loss_delta")
        edge = " (edge)" if r.get("lr_at_grid_edge") else ""
        rows.append(
            f"| {r['method']} | {r['lr']:g}{edge} | {pct(r.get('validation_em'))} | "
            f"{pct(r.get('test_em'))} | {pct(r.get('test_f1'))} | "
            f"{pct(r.get('retention'))} | {'–' if delta is None else f'{delta:+.3f}'} | "
            f"{r['trainable_params'] / 1e6:.1f}M | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['device_bytes'] / 1e6:.0f} | "
            f"{'–' if host is None else f'{host / 1e9:.2f}'} | "
            f"{r['moved_bytes_per_step'] / 1e6:.0f} |")
    return "\n".join(rows)


def grid_table(results: Sequence[dict[str, Any]]) -> str:
    """Validation / test exact match of every (method, rate) run."""
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


def evaluate_targets(results: Sequence[dict[str, Any]], neurons: int = 16384
                     ) -> list[dict[str, Any]]:
    """The issue's targets for meft at ``neurons``; each PASS, FAIL or SKIP with numbers."""
    out: list[dict[str, Any]] = []
    meft = _find(results, f"meft:{neurons}")
    lora = _find(results, "lora:qv:16")
    dense = _find(results, f"dense:{neurons}")
    offload = _find(results, f"offload:{neurons}")

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "passed": ok, "detail": detail})

    if meft and lora:
        ratio = meft["step_time_s"] / lora["step_time_s"]
        add("meft step time <= 1.25x LoRA r=16", ratio <= 1.25, f"{ratio:.2f}x "
            f"({meft['step_time_s']:.2f} s vs {lora['step_time_s']:.2f} s)")
    else:
        add("meft step time <= 1.25x LoRA r=16", None, "needs meft and lora:qv:16")
    if meft and dense:
        speed = dense["step_time_s"] / meft["step_time_s"]
        add("meft >= 3x faster than dense, same N", speed >= 3, f"{speed:.2f}x")
    else:
        add("meft >= 3x faster than dense, same N", None, f"needs dense:{neurons}")
    if meft and offload:
        frac = meft["moved_bytes_per_step"] / offload["moved_bytes_per_step"]
        add("meft bytes moved <= 0.3x dense offload", frac <= 0.3, f"{frac:.3f}x "
            f"({meft['moved_bytes_per_step'] / 1e6:.0f} MB vs "
            f"{offload['moved_bytes_per_step'] / 1e6:.0f} MB)")
    else:
        add("meft bytes moved <= 0.3x dense offload", None, f"needs offload:{neurons}")
    if meft and dense and meft["test_em"] is not None and dense["test_em"] is not None:
        gap = 100 * (meft["test_em"] - dense["test_em"])
        add("meft EM >= dense EM - 3 points", gap >= -3, f"{gap:+.1f} points")
    else:
        add("meft EM >= dense EM - 3 points", None, "needs evaluated meft and dense runs")
    loras = [r for r in results if r["kind"] == "lora" and r["test_em"] is not None]
    if meft and loras and meft["test_em"] is not None:
        near = min(loras, key=lambda r: abs(r["device_bytes"] - meft["device_bytes"]))
        gap = 100 * (meft["test_em"] - near["test_em"])
        add("meft EM >= LoRA (nearest device bytes) + 10 points", gap >= 10,
            f"{gap:+.1f} points vs {near['method']} ({near['device_bytes'] / 1e6:.0f} MB "
            f"vs {meft['device_bytes'] / 1e6:.0f} MB)")
    else:
        add("meft EM >= LoRA (nearest device bytes) + 10 points", None, "needs evaluated runs")
    return out


def machines(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per (CPU, threads, commit, torch) the runs were made on, with their names."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in results:
        env = r.get("environment") or {}
        key = (str(env.get("cpu")), str(env.get("threads")), str(env.get("git_commit"))[:7],
               str(env.get("torch")))
        groups.setdefault(key, []).append(f"{r['method']}@{r['lr']:g}")
    return [f"{cpu}, {threads} thread{'' if threads == '1' else 's'}, commit {commit}, "
            f"torch {torch_}: {', '.join(runs)}"
            for (cpu, threads, commit, torch_), runs in groups.items()]


def write_report(output: Path, command: str | None = None) -> dict[str, Any]:
    """From every run file in ``output``: mark the selection in each, write summary.json,
    table.md and the plots; return them. ``command`` joins the runs' own commands in the
    header (the invocation that wrote the report)."""
    results = read_results(output)
    chosen = select(results)
    for r in results:  # record the selection in every run file
        path = output / f"{run_name(r['method'], r['lr'])}.json"
        path.write_text(json.dumps(r, indent=2) + "\n")
    rows = summary(chosen)
    (output / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    targets = evaluate_targets(chosen)
    lines = [f"{'PASS' if t['passed'] else 'FAIL'} {t['target']}: {t['detail']}"
             for t in targets if t["passed"] is not None]  # only what these runs can check
    if lines:
        lines.insert(0, "meft 0.1's targets, where these runs have what they need:\n")
    first = results[0] if results else {}  # none: every method failed, nothing before
    tc = first.get("train_config") or {}
    where = machines(results)
    setups = {(env.get("cpu"), env.get("threads"))
              for env in ((r.get("environment") or {}) for r in results)}
    header = (f"{first.get('model')}, {first.get('data')}; {first.get('steps')} steps x "
              f"{tc.get('batch_size')} examples, seed {tc.get('seed')}\n\n"
              + "".join(f"command: {c}\n" for c in dict.fromkeys(
                  [*(r["command"] for r in results if r.get("command")),
                   *([command] if command else [])]))
              + "\nRuns made on:\n\n" + "".join(f"- {w}\n" for w in where)).rstrip()
    if len(setups) > 1:
        header += ("\n\nWARNING: these runs come from different CPUs or thread counts; step "
                   "times and tokens/s compare only between runs of one CPU and thread count")
    warnings = edge_warnings(chosen)
    text = (f"{header}\n\nEach method at its chosen rate (best validation exact match):\n\n"
            f"{markdown_table(chosen)}\n\n" + "".join(w + "\n" for w in warnings)
            + f"\nEvery run (validation EM / test EM, %; bold: chosen):\n\n"
            f"{grid_table(results)}\n" + "".join(f"\n{line}" for line in lines) + "\n")
    (output / "table.md").write_text(text)
    plots = plot_results(results, output)
    print(text)
    return {"output": str(output), "results": results, "summary": rows, "targets": targets,
            "plots": [str(p) for p in plots]}
