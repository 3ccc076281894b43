"""Training checkpoints: adapter, optimiser state and trainer state, atomically, safetensors+JSON.

Layout of ``OUTPUT/checkpoints/step-00000050/``::

    adapter_config.json, adapter_model.safetensors   the adapter (as save_pretrained writes it)
    optimizer.safetensors    host row-sparse AdamW moments and per-row steps, router AdamW state
    trainer_state.json       step, schedule, data position, metrics so far (small)

Each checkpoint is written into a temporary directory and renamed into place
(:func:`meft.serialization.atomic_directory`), so a crash leaves the previous complete
checkpoint; only the newest ``keep`` are kept. Nothing is pickled.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meft.model import MeftModel
from meft.optim import RowSparseAdamW
from meft.serialization import atomic_directory, load_tensors, save_tensors

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_tensors(model: MeftModel, host_opt: RowSparseAdamW,
                      router_opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, store in zip(model.layer_ids, model.stores, strict=True):
        for table in store.tables:
            state = host_opt.state[table.data]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"host.{i}.{table.name}.{key}"] = state[key]
    for i, router in zip(model.layer_ids, model.router_parameters(), strict=True):
        state = router_opt.state.get(router, {})
        for key, value in state.items():
            if isinstance(value, Tensor):
                out[f"router.{i}.{key}"] = value
    return out


def load_optimizer_tensors(model: MeftModel, host_opt: RowSparseAdamW,
                           router_opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    for i, store in zip(model.layer_ids, model.stores, strict=True):
        for table in store.tables:
            state = host_opt.state[table.data]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                state[key].copy_(tensors[f"host.{i}.{table.name}.{key}"])
    for i, router in zip(model.layer_ids, model.router_parameters(), strict=True):
        prefix = f"router.{i}."
        state = {k[len(prefix):]: v.to(router.device) for k, v in tensors.items()
                 if k.startswith(prefix)}
        if state:
            router_opt.state[router] = state


def save_checkpoint(directory: str | Path, model: MeftModel, host_opt: RowSparseAdamW,
                    router_opt: torch.optim.Optimizer, trainer_state: dict[str, Any], *,
                    rng: Tensor | None = None) -> Path:
    """Write one complete checkpoint directory atomically."""
    directory = Path(directory)
    tensors = optimizer_tensors(model, host_opt, router_opt)
    if rng is not None:
        tensors["rng.torch"] = rng
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp / "adapter")
        save_tensors(tensors, tmp, "optimizer")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    return directory


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop leftovers of killed writes."""
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in Path(root).glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    directory = Path(directory)
    state = json.loads((directory / "trainer_state.json").read_text())
    return load_tensors(directory, "optimizer"), state
