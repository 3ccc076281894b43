"""The training loop, the only one: every command and every benchmark method trains through it.

What it trains is a :class:`Trainable`: a module to call, its trainable tensors sorted by
where they live and how they are updated (device parameters, meft routers, host tables with
row-sparse gradients, dense host tensors of the offload baseline), and a reader of the traffic
counters. ``Trainable.of_meft`` makes one from a :class:`~meft.adapter.model.MeftModel`; the
benchmark makes one for LoRA, the dense adapters and the offload baseline. One
:class:`~meft.engine.optim.OptimizerSet` holds their optimizers.

Per optimiser step (``batch_size`` examples, split into micro-batches of
``micro_batch_size`` whose gradients accumulate):

    lr = base_lr * schedule(step): linear warmup over ``warmup_ratio`` of the steps, then
         linear decay to 0 (the paper's schedule; or constant), applied to every optimizer
    for each micro-batch:  loss = sum of answer-token cross-entropy / labelled tokens in the step
                           loss.backward()      host row gradients accumulate in the stores
    norm = one global norm over every gradient (device, host rows, host dense), clipped
    a non-finite loss or norm stops the run (TrainingDiverged) before any weight is touched
    step every optimizer (host first), zero the gradients

Every step appends one JSON line to ``metrics.jsonl`` (loss, lr, grad norm, tokens/s, mean U
per layer, MB moved each way, staged bytes, routing/staging/update seconds); the progress bar
shows loss, tokens/s, mean U and MB per step. Every ``eval_every`` steps the held-out answer loss
is logged; every ``save_every`` steps a checkpoint is written (atomic, newest ``keep`` kept).
Ctrl-C finishes the step, writes a checkpoint and raises :class:`TrainingInterrupted`.

Distributed (``Trainable.parallel``, :mod:`meft.engine.distributed`): each rank takes its share of
every global batch in micro-batches, idling (a forward without gradients that serves the
others) where its share runs out; before clipping, host gradient rows go to the ranks that own
them and device gradients are summed. The loss, the stop request and the traffic counters are
summed over ranks; rank 0 alone writes metrics.jsonl and shows the progress bar. With
forgetting protection (:mod:`meft.training.protection`), rank 0's first forward carries the step's
replay.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from meft.adapter.checkpoint import prune_checkpoints, read_checkpoint, save_checkpoint
from meft.adapter.model import MeftModel, read_adapter
from meft.config import TrainConfig
from meft.data.records import Encoded, collate, iterate_batches
from meft.engine.disk import DiskArrays
from meft.engine.distributed import DataParallel
from meft.engine.optim import OptimizerSet
from meft.engine.store import HostTable
from meft.errors import DataError, SerializationError, TrainingDiverged
from meft.evaluation.evaluate import answer_loss, labelled_logits, token_loss_sum
from meft.training.protection import Retainer

__all__ = [
    "StepTraffic",
    "TrainResult",
    "Trainable",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "lr_multiplier",
]


@dataclass
class StepTraffic:
    """What one optimizer step moved between host and device (all layers)."""

    bytes_h2d: int = 0
    bytes_d2h: int = 0
    comm_bytes: int = 0  # sent to other ranks (a distributed run)
    staged_bytes: int = 0  # peak device bytes of staged rows (and one layer's row grads)
    union_per_layer: list[float] = field(default_factory=list)
    touched_rows_per_layer: list[int] = field(default_factory=list)
    route_s: float = 0.0
    stage_s: float = 0.0
    update_s: float = 0.0
    wait_s: float = 0.0  # waiting for the host worker's queued gradient rows


def _no_traffic() -> StepTraffic:
    return StepTraffic()


@dataclass
class Trainable:
    """What a :class:`Trainer` trains.

    ``model`` is called as ``model(input_ids=, attention_mask=)`` and returns ``.logits``.
    ``params`` train with torch AdamW at ``lr``; ``routers`` with torch AdamW at ``router_lr``;
    ``host_tables`` with the row-sparse AdamW at ``lr``; ``offload`` (dense host tensors)
    with torch AdamW on the host at ``lr``. ``traffic`` returns the counters of the step just
    done and resets them. ``adapter`` is the meft model checkpoints save and restore.
    """

    model: nn.Module
    params: dict[str, Tensor] = field(default_factory=dict)
    routers: dict[str, Tensor] = field(default_factory=dict)
    host_tables: dict[str, HostTable] = field(default_factory=dict)
    offload: dict[str, Tensor] = field(default_factory=dict)
    traffic: Callable[[], StepTraffic] = _no_traffic
    adapter: MeftModel | None = None
    parallel: DataParallel | None = None

    @classmethod
    def of_meft(cls, model: MeftModel) -> Trainable:
        def traffic() -> StepTraffic:
            stats = model.transfer_stats()
            rows = [s.row_bytes_h2d // max(1, s.forwards) for s in stats]
            out = StepTraffic(
                bytes_h2d=sum(s.bytes_h2d for s in stats),
                bytes_d2h=sum(s.bytes_d2h for s in stats),
                comm_bytes=sum(s.comm_bytes for s in stats),
                staged_bytes=sum(rows) + max(rows, default=0),  # all layers' rows + 1 grad
                union_per_layer=[s.mean_union for s in stats],
                touched_rows_per_layer=[s.touched_rows for s in stats],
                route_s=sum(s.route_s for s in stats), stage_s=sum(s.stage_s for s in stats),
                update_s=sum(s.update_s for s in stats), wait_s=sum(s.wait_s for s in stats))
            for s in stats:
                s.reset()
            return out

        return cls(model, routers=dict(model.named_routers()),
                   host_tables=model.named_host_tables(), traffic=traffic, adapter=model,
                   parallel=model.parallel)

    @property
    def host_state(self) -> str:
        """The host tables' AdamW moments (MeftConfig.optim_state)."""
        return self.adapter.meft_config.optim_state if self.adapter is not None else "fp32"

    @property
    def arrays(self) -> DiskArrays | None:
        """The disk store of the tables and moments, if any."""
        return self.adapter.arrays if self.adapter is not None else None

    def count(self) -> int:
        """Trainable parameters."""
        dense = [*self.params.values(), *self.routers.values(), *self.offload.values()]
        return sum(t.numel() for t in dense) + sum(t.data.numel()
                                                   for t in self.host_tables.values())

    def device_tensors(self) -> list[Tensor]:
        """The trainable tensors that live on the compute device."""
        return [*self.params.values(), *self.routers.values()]


def lr_multiplier(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Linear warmup for ``warmup`` steps, then linear decay to 0 at ``total`` (``linear``) or
    the peak rate to the end (``constant``)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains a :class:`Trainable` (or a MeftModel) on encoded examples."""

    def __init__(self, model: Trainable | MeftModel, train: Sequence[Encoded],
                 config: TrainConfig, output: str | Path, *, pad_id: int,
                 eval_encoded: Sequence[Encoded] | None = None,
                 retainer: Retainer | None = None) -> None:
        if not train:
            raise DataError("no training examples")
        self.trainable = Trainable.of_meft(model) if isinstance(model, MeftModel) else model
        self.model = self.trainable.model
        self.train_set = list(train)
        self.config = config
        self.output = Path(output)
        self.pad_id = pad_id
        self.eval_encoded = list(eval_encoded or [])
        self.total = config.total_steps(len(self.train_set))
        self.warmup = max(1, round(config.warmup_ratio * self.total))
        t = self.trainable
        self.parallel = t.parallel
        self.is_main = t.parallel is None or t.parallel.is_main
        self.retainer = retainer
        self.optimizers = OptimizerSet(params=t.params, routers=t.routers,
                                       host_tables=t.host_tables, offload=t.offload,
                                       lr=config.lr, router_lr=config.device_lr,
                                       weight_decay=config.weight_decay,
                                       host_state=t.host_state, seed=config.seed,
                                       arrays=t.arrays, worker=(
                                           t.adapter.host_worker if t.adapter is not None
                                           and t.parallel is None else None))
        self.step = 0
        self.epoch = 0  # data position: batch ``position`` of epoch ``epoch`` comes next
        self.position = 0
        self.stop_after: int | None = None  # stop (with a checkpoint) after this many steps
        self._stop_requested = False
        self.history: list[dict[str, Any]] = []
        self.metrics_path = self.output / "metrics.jsonl"
        self.desc = "train"  # progress bar label

    # ------------------------------------------------------------------ data order
    def _batches(self) -> Iterator[list[int]]:
        """Batches from the current data position on; advances ``epoch``/``position``."""
        while True:
            order = list(iterate_batches(self.train_set, self.config.batch_size,
                                         seed=self.config.seed, epoch=self.epoch))
            while self.position < len(order):
                idx = order[self.position]
                self.position += 1
                yield idx
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------ one step
    def train_step(self, idx: Sequence[int]) -> dict[str, Any]:
        start = time.perf_counter()
        mult = lr_multiplier(self.step, self.total, self.warmup, self.config.schedule)
        self.optimizers.set_lr(mult)
        examples = [self.train_set[i] for i in idx]
        labelled = sum(e.target_tokens for e in examples)
        tokens = sum(len(e.input_ids) for e in examples)
        micro = self.config.micro_batch_size or self.config.batch_size
        par = self.parallel
        chunks = ([examples[lo:lo + micro] for lo in range(0, len(examples), micro)]
                  if par is None else par.micro_batches(examples, micro))
        loss_total = 0.0
        replay_loss: float | None = None
        replays = self.retainer is not None and self.retainer.replayed > 0
        carry = replays and self.is_main  # the first forward (of rank 0) carries the replay
        self.model.train()
        for chunk in chunks:
            if carry:  # this micro-batch carries the step's replay (meft.training.protection)
                chunk_sum, replay_loss = self._forward_with_replay(chunk, labelled)
                loss_total += chunk_sum
                carry = False
                continue
            if not chunk:  # this rank's share ran out: serve the others' row requests
                assert par is not None
                par.idle_forward(self.model, self._device())
                continue
            loss_sum, _ = token_loss_sum(self.model, collate(chunk, self.pad_id))
            (loss_sum / max(1, labelled)).backward()
            loss_total += float(loss_sum.detach())
        host_sum = None
        if par is not None:
            par.sync_grads(self.trainable.adapter.adapter_modules
                           if self.trainable.adapter is not None else [],
                           self.trainable.device_tensors())
            loss_total, replay_sum = par.sum([loss_total, replay_loss or 0.0])
            replay_loss = replay_sum if replays else None  # rank 0's, on every rank
            host_sum = par.sum_tensor
        protection = (self.retainer.before_clip(self.step, replay_loss)
                      if self.retainer is not None
                      else {"retained_rows_per_layer": []})
        norm = self.optimizers.clip_(self.config.max_grad_norm, host_sum)
        loss = loss_total / max(1, labelled)
        if not (math.isfinite(loss) and torch.isfinite(norm)):
            raise TrainingDiverged(f"step {self.step + 1}: loss {loss}, grad norm {float(norm)}; "
                                   "stopping (lower --lr?)")
        self.optimizers.step()
        self.optimizers.zero_grad()  # (a disk store's pages were released by the step)
        self.step += 1
        traffic = self.trainable.traffic()
        if par is not None:  # every rank's bytes; and stop where any rank was asked to
            comm, stop = par.sum([traffic.comm_bytes, float(self._stop_requested)])
            traffic.comm_bytes, self._stop_requested = int(comm), stop > 0
        step_time = time.perf_counter() - start
        unions = traffic.union_per_layer
        return {
            "step": self.step,
            "loss": loss,
            "lr": self.config.lr * mult,
            "grad_norm": float(norm),
            "examples": len(examples),
            "tokens": tokens,
            "step_time_s": step_time,
            "tokens_per_s": tokens / step_time,
            "union_per_layer": unions,
            "union_mean": sum(unions) / max(1, len(unions)),
            "touched_rows_per_layer": traffic.touched_rows_per_layer,
            **protection,
            "mb_h2d": traffic.bytes_h2d / 1e6,
            "mb_d2h": traffic.bytes_d2h / 1e6,
            **({"mb_comm": traffic.comm_bytes / 1e6} if par is not None else {}),
            "staged_mb": traffic.staged_bytes / 1e6,
            "route_s": traffic.route_s,
            "stage_s": traffic.stage_s,
            "update_s": traffic.update_s,
            "wait_s": traffic.wait_s,
        }

    def _forward_with_replay(self, chunk: list[Encoded], labelled: int) -> tuple[float, float]:
        """One micro-batch forward and backward carrying the step's replayed background
        examples (:mod:`meft.training.protection`) after ``chunk``'s: loss = the chunk's
        answer-token cross-entropy sum / ``labelled`` + the replay loss. Returns the chunk's
        loss sum and the replay loss."""
        assert self.retainer is not None
        replayed, chosen = self.retainer.replay_examples(self.step)
        batch = collate([*chunk, *replayed], self.pad_id)
        logits, labels = labelled_logits(self.model, batch)  # (M, V), (M,): rows in order
        m = sum(e.target_tokens for e in chunk)
        loss_sum = F.cross_entropy(logits[:m].float(), labels[:m], reduction="sum")
        replay = self.retainer.replay_loss(logits[m:], labels[m:], chosen)
        (loss_sum / max(1, labelled) + replay).backward()
        return float(loss_sum.detach()), float(replay.detach())

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Train up to ``total`` steps. Ctrl-C (SIGINT) finishes the current step, writes a
        checkpoint and raises :class:`TrainingInterrupted`; a second Ctrl-C stops at once."""
        self.output.mkdir(parents=True, exist_ok=True)
        self.trainable.traffic()  # forget what evaluation before training moved
        start = time.perf_counter()
        first_step = self.step
        total_tokens = 0
        batches = self._batches()
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, unit="step",
                   disable=not (self.config.progress and self.is_main), dynamic_ncols=True)
        with _graceful_sigint(self), (open(self.metrics_path, "a") if self.is_main
                                      else open(os.devnull, "w")) as metrics:
            while self.step < self.total:
                epoch = self.epoch
                record = self.train_step(next(batches))
                record["epoch"] = epoch
                total_tokens += record["tokens"]
                if self.eval_encoded and (
                        self.step == self.total
                        or (self.config.eval_every and self.step % self.config.eval_every == 0)):
                    record["eval_loss"] = self.eval_loss()
                self.history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                moved = record["mb_h2d"] + record["mb_d2h"]  # 0 where rows are read in place
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"U": f"{record['union_mean']:.0f}"}
                                   if record["union_mean"] else {}),
                                **({"MB": f"{moved:.0f}"} if moved else {}))
                bar.update(1)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    self.save_checkpoint()
                if self._stop_requested or (self.stop_after is not None
                                            and self.step - first_step >= self.stop_after
                                            and self.step < self.total):
                    bar.close()
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(self.step, path, self._stop_requested)
        bar.close()
        self.optimizers.settle()  # the last step's queued host update, if any
        final = self.history[-1]["loss"] if self.history else math.nan
        return TrainResult(self.step, final, time.perf_counter() - start, total_tokens,
                           self.history)

    def _device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def eval_loss(self) -> float:
        if not self.eval_encoded:
            return math.nan
        return answer_loss(self.model, self.eval_encoded, self.pad_id)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total, "epoch": self.epoch,
                "position": self.position, "train_config": asdict(self.config),
                "lr": self.config.lr, "router_lr": self.config.device_lr}

    def _adapter(self) -> MeftModel:
        if self.trainable.adapter is None:
            raise TypeError("checkpoints need a meft adapter (Trainable.adapter)")
        return self.trainable.adapter

    def save_checkpoint(self) -> Path:
        root = self.output / "checkpoints"
        path = root / f"step-{self.step:08d}"
        if not (path / "trainer_state.json").is_file():  # already saved at this step
            tensors = self.optimizers.state_tensors()
            if self.retainer is not None:
                tensors.update(self.retainer.tensors())
            save_checkpoint(path, self._adapter(), tensors, self.state(),
                            rng=torch.get_rng_state())
        arrays = self.trainable.arrays
        if arrays is not None and arrays.step != self.step:  # the store: this step's state
            arrays.commit(self.step)
        if self.is_main:
            prune_checkpoints(root, self.config.keep_checkpoints)
        return path

    def restore(self, directory: str | Path) -> None:
        """Continue exactly from a checkpoint written by :meth:`save_checkpoint`."""
        directory = Path(directory)
        plan = self._adapter().shard_plan
        rows = plan.select_rows if plan is not None else None  # this rank's rows
        tensors, state = read_checkpoint(directory, rows=rows)
        arrays = self.trainable.arrays
        if arrays is not None and arrays.step != state["step"]:
            raise SerializationError(
                f"{directory}: checkpoint of step {state['step']}, but the disk store "
                f"{arrays.dir} holds step {arrays.step}; resume from its checkpoint")
        _, adapter = read_adapter(directory / "adapter", rows=rows)
        self._adapter().load_adapter_state(adapter, source=str(directory / "adapter"),
                                           tables=arrays is None)
        self.optimizers.load_state_tensors(tensors)
        if self.retainer is not None:  # the replay targets training started with, not new ones
            self.retainer.restore(tensors)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        if self.is_main and self.metrics_path.is_file():  # drop lines logged after it
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
            self.history = [json.loads(line) for line in kept]


class TrainingInterrupted(Exception):
    """Training stopped early (Ctrl-C or ``stop_after``) after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path, by_signal: bool) -> None:
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
        self.by_signal = by_signal


@contextlib.contextmanager
def _graceful_sigint(trainer: Trainer) -> Iterator[None]:
    """First SIGINT: ask the loop to stop after the current step. Second: stop now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer._stop_requested = True
        print("\nmeft: stopping after this step (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
