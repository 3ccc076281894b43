"""The comparison's outputs: one JSON per run, the table over every run in a directory, the
plots, and the issue's targets, each PASS, FAIL or SKIP with its numbers.

A run file is ``<method>.json`` (``:`` -> ``_``) holding the method's metrics at the top level
(``losses`` per step included), the resolved configuration of the comparison under ``config``
and the machine under ``environment`` (:func:`meft.sysinfo.environment`). The table and plots
cover every run file in the directory, so methods can be added a few at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meft.bench.methods import DEFAULT_METHODS
from meft.plots import pyplot
from meft.sysinfo import environment


def write_result(result: dict[str, Any], directory: Path, config: dict[str, Any],
                 device: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path: Path = directory / (str(result["method"]).replace(":", "_") + ".json")
    payload = {**result, "config": config, "environment": environment(device)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_results(directory: Path) -> list[dict[str, Any]]:
    """Every run file in ``directory``, in the order of the default method list."""
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(result, dict) and result.get("method") and "step_time_s" in result:
            results.append(result)
    order = {m: i for i, m in enumerate(DEFAULT_METHODS)}
    results.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"]))
    return results


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| method | trainable | step s | tok/s | device MB | moved MB/step | host peak GB "
            "| EM | F1 | contains |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    for r in results:
        rss = r.get("host_peak_rss_bytes")
        rows.append(
            f"| {r['method']} | {r['trainable_params'] / 1e6:.1f}M | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['device_bytes'] / 1e6:.0f} | "
            f"{r['moved_bytes_per_step'] / 1e6:.0f} | "
            f"{'–' if rss is None else f'{rss / 1e9:.2f}'} | {pct(r['exact_match'])} | "
            f"{pct(r['f1'])} | {pct(r['contains'])} |")
    return "\n".join(rows)


def plot_results(results: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    plt = pyplot()

    paths = []
    scored = [r for r in results if r["exact_match"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in scored:
            ax.scatter(r["device_bytes"] / 1e6, 100 * r["exact_match"], s=30)
            ax.annotate(r["method"], (r["device_bytes"] / 1e6, 100 * r["exact_match"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("device-resident MB (base weights + trainable state + staged rows)")
        ax.set_ylabel("exact match on held-out questions (%)")
        ax.set_title("quality vs device memory")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(directory / "em_vs_device_bytes.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("meft", "meft-noexperts", "dense", "offload"):
        pts = sorted((r["neurons"], r["step_time_s"]) for r in results if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=kind)
    for r in results:
        if r["kind"] == "lora":
            ax.axhline(r["step_time_s"], ls="--", lw=0.8, color="gray")
            ax.annotate(r["method"], (ax.get_xlim()[0], r["step_time_s"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter neurons per layer N")
    ax.set_ylabel("median step time (s)")
    ax.set_title("step time vs N (dashed: LoRA)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "step_time_vs_n.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
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
    if meft and dense and meft["exact_match"] is not None and dense["exact_match"] is not None:
        gap = 100 * (meft["exact_match"] - dense["exact_match"])
        add("meft EM >= dense EM - 3 points", gap >= -3, f"{gap:+.1f} points")
    else:
        add("meft EM >= dense EM - 3 points", None, "needs evaluated meft and dense runs")
    loras = [r for r in results if r["kind"] == "lora" and r["exact_match"] is not None]
    if meft and loras and meft["exact_match"] is not None:
        near = min(loras, key=lambda r: abs(r["device_bytes"] - meft["device_bytes"]))
        gap = 100 * (meft["exact_match"] - near["exact_match"])
        add("meft EM >= LoRA (nearest device bytes) + 10 points", gap >= 10,
            f"{gap:+.1f} points vs {near['method']} ({near['device_bytes'] / 1e6:.0f} MB "
            f"vs {meft['device_bytes'] / 1e6:.0f} MB)")
    else:
        add("meft EM >= LoRA (nearest device bytes) + 10 points", None, "needs evaluated runs")
    return out
