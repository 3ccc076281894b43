"""One process of a data-parallel training run of a tiny model, for tests/test_distributed.py.

Run under torchrun (``python -m torch.distributed.run --nproc_per_node=2 dist_worker.py ...``)
or by hand with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; with neither it is the one-process
reference. :func:`run` is also called in-process by the tests for that reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import meft_config, tiny
from meft.adapter.model import MeftModel, get_meft_model
from meft.config import TrainConfig
from meft.data.records import Encoded
from meft.engine.distributed import DataParallel
from meft.errors import UserError
from meft.training.protection import Background, Retainer
from meft.training.trainer import Trainer, TrainingInterrupted

WRITTEN = (3, 40)  # rows an earlier run wrote, one per rank's half of N=64: protection keeps them


def examples(n: int = 12, seed: int = 0, vary: bool = False) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 5 if vary else 8
        ids = torch.randint(2, 97, (length,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * 3 + ids[3:], False))
    return out


def protection(model: MeftModel) -> Retainer:
    """Forgetting protection over a background of 8 random sequences: 2 of them replayed per
    step (distilled), and rows :data:`WRITTEN` written before it starts (so kept as they
    are)."""
    for adapter in model.adapter_modules:
        lo, hi = adapter.plan.rows if model.parallel is not None else (0, adapter.n_neurons)
        for row in WRITTEN:
            if lo <= row < hi:
                adapter.store.values[row - lo] = 0.05
    background = examples(8, seed=1, vary=True)
    stats = Background(len(background), [e.first_targets(2) for e in background])
    stats.keep_distributions(model, 0)
    return Retainer(model, stats, replay=2, pad_id=0)


def run(out: Path, *, steps: int = 4, batch: int = 6, micro: int | None = 2,
        resume: str | None = None, stop_after: int | None = None, die_at: int | None = None,
        save_every: int = 0, timeout: float = 60.0, gather: bool = False,
        retain: bool = False) -> Trainer:
    torch.manual_seed(0)
    parallel = DataParallel.from_env(torch.device("cpu"), timeout_s=timeout)
    if parallel is not None and gather:  # the all_gather fallback instead of all_to_all
        parallel.comm.all_to_all = False
    model = get_meft_model(tiny("llama"), meft_config(), parallel=parallel)
    trainer = Trainer(model, examples(), TrainConfig(
        steps=steps, batch_size=batch, micro_batch_size=micro, lr=1e-2, warmup_ratio=0.0,
        save_every=save_every, progress=False), out, pad_id=0,
        retainer=protection(model) if retain else None)
    trainer.stop_after = stop_after
    if resume:
        trainer.restore(resume)
    if die_at is not None and parallel is not None and parallel.rank == 1:
        step = trainer.train_step

        def dying(idx: list[int]) -> dict[str, object]:
            if trainer.step + 1 == die_at:
                os._exit(17)
            return step(idx)

        trainer.train_step = dying  # type: ignore[method-assign]
    try:
        trainer.train()
    except TrainingInterrupted:
        return trainer
    model.save_pretrained(out / "adapter")
    rank = parallel.rank if parallel is not None else 0
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": parallel.world if parallel is not None else 1,
        "store_rows": [s.n_neurons for s in model.stores],
        "rows": list(model.shard_plan.rows) if model.shard_plan is not None else None,
        "routers": [r.detach().sum().item() for r in model.router_parameters()],
    }))
    if parallel is not None:  # as meft train does: barrier, then the group goes
        parallel.close()
    return trainer


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--resume")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--die-at", type=int)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--gather", action="store_true")
    p.add_argument("--retain", action="store_true")
    a = p.parse_args()
    try:
        run(a.out, steps=a.steps, batch=a.batch, micro=a.micro, resume=a.resume,
            stop_after=a.stop_after, die_at=a.die_at, save_every=a.save_every,
            timeout=a.timeout, gather=a.gather, retain=a.retain)
    except UserError as err:
        print(f"meft: error: {err}", file=sys.stderr)
        return 2
    if dist.is_initialized():  # a run that stopped early; gloo's threads exiting live can abort
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # as python -m meft under torchrun: no interpreter teardown
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
