"""PNG plots of a run from its metrics records (matplotlib, headless Agg backend).

    loss.png        training loss per step, held-out answer loss where evaluated
    union.png       neurons used per layer: mean union U per layer over the run (bars) and
                    the mean U over layers per step (line)
    transfer.png    MB moved per step, host->device and device->host
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: Sequence[dict[str, Any]], directory: str | Path, *,
             layer_ids: Sequence[int] | None = None, title: str = "") -> list[Path]:
    """Write the three plots for a run into ``directory``; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not history:
        return []
    plt = pyplot()
    steps = [r["step"] for r in history]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], label="train loss", lw=1.2)
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out answer loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, directory / "loss.png"))

    per_layer = [r["union_per_layer"] for r in history if r.get("union_per_layer")]
    if per_layer:
        n_layers = len(per_layer[0])
        ids = list(layer_ids) if layer_ids is not None else list(range(n_layers))
        means = [sum(row[i] for row in per_layer) / len(per_layer) for i in range(n_layers)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.bar([str(i) for i in ids], means)
        ax1.set_xlabel("decoder layer")
        ax1.set_ylabel("mean union U (neurons per micro-batch)")
        ax1.set_title("neurons used per layer")
        ax1.tick_params(axis="x", labelsize=7)
        ax2.plot(steps, [r["union_mean"] for r in history], lw=1.2)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("U, mean over layers")
        ax2.set_title("neurons used per step")
        ax2.grid(alpha=0.3)
        paths.append(_save(fig, directory / "union.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["mb_h2d"] for r in history], label="host -> device (rows)", lw=1.2)
    ax.plot(steps, [r["mb_d2h"] for r in history], label="device -> host (hidden, grads)",
            lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MB per step (all layers)")
    ax.set_title("bytes moved")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, directory / "transfer.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
