"""Training checkpoints: adapter, optimiser state and trainer state, atomically, safetensors+JSON.

Layout of ``OUTPUT/checkpoints/step-00000050/``::

    adapter_config.json, adapter_model.safetensors   the adapter (as save_pretrained writes it)
    optimizer.safetensors    host row-sparse AdamW moments and per-row steps, router AdamW
                             state (names: meft.engine.optim.OptimizerSet), the torch RNG state
    trainer_state.json       step, schedule, data position, metrics so far (small)

Each checkpoint is written into a temporary directory and renamed into place
(:func:`meft.adapter.serialization.atomic_directory`), so a crash leaves the previous complete
checkpoint; only the newest ``keep`` are kept. Nothing is pickled.

In a distributed run the adapter and the optimizer state are row-sharded (one file per rank
plus an index, :mod:`meft.adapter.serialization`): every rank writes its files into rank 0's
temporary directory, then rank 0 writes the indexes and the trainer state and renames it into place.
``read_checkpoint(rows=...)`` reads one rank's rows, whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from meft.adapter.model import MeftModel
from meft.adapter.serialization import (
    RowSelector,
    atomic_directory,
    commit_directory,
    load_tensors,
    recover_directory,
    save_rank_shard,
    save_shard_index,
    save_tensors,
)
from meft.errors import SerializationError

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(directory: str | Path, model: MeftModel,
                    optimizer_state: dict[str, Tensor], trainer_state: dict[str, Any], *,
                    rng: Tensor | None = None) -> Path:
    """Write one complete checkpoint directory atomically: the adapter as save_pretrained
    writes it, the optimizer state (named by :class:`~meft.engine.optim.OptimizerSet`), the
    trainer state and the RNG state. (With a disk store the adapter part holds the routers
    only: the tables and their moments are the store's, committed at this step by the
    caller.)"""
    directory = Path(directory)
    tensors = dict(optimizer_state)
    if rng is not None:
        tensors["rng.torch"] = rng
    if model.parallel is not None:
        return _save_sharded(directory, model, tensors, trainer_state)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp / "adapter", tables=model.arrays is None,
                              tables_step=trainer_state["step"])
        save_tensors(tensors, tmp, "optimizer")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    return directory


def _save_sharded(directory: Path, model: MeftModel, tensors: dict[str, Tensor],
                  trainer_state: dict[str, Any]) -> Path:
    par, plan = model.parallel, model.shard_plan
    assert par is not None and plan is not None
    tmp = directory.parent / f".{directory.name}.tmp-ranks"
    if par.is_main:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    par.barrier()
    try:
        model.save_pretrained(tmp / "adapter")  # a collective: every rank's rows, then index
        sharded = {k for k, v in tensors.items() if plan.is_row_tensor(k, v.shape)}
        save_rank_shard(tensors, tmp, "optimizer", rank=par.rank, ranges=plan.ranges,
                        sharded=sharded)
        par.barrier()
        if par.is_main:
            save_shard_index(tensors, tmp, "optimizer", ranges=plan.ranges, sharded=sharded)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            commit_directory(tmp, directory)
    except BaseException:
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    par.barrier()
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


def read_checkpoint(directory: str | Path, *, rows: RowSelector | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(optimizer and RNG tensors, trainer state) of one checkpoint directory; ``rows``: read
    only a row range of the per-row optimizer state (a distributed rank's)."""
    state = read_trainer_state(directory)
    return load_tensors(Path(directory), "optimizer", rows=rows), state


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state (step, schedule, data position) of one checkpoint directory, without
    its tensors."""
    directory = Path(directory)
    try:
        state: dict[str, Any] = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SerializationError(f"{directory / 'trainer_state.json'}: unreadable ({err})"
                                 ) from None
    missing = [k for k in ("step", "epoch", "position") if not isinstance(state, dict)
               or k not in state]
    if missing:
        raise SerializationError(f"{directory / 'trainer_state.json'}: missing "
                                 f"{', '.join(missing)}")
    return state
