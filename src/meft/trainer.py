"""The training loop: one readable loop over micro-batches, two optimisers, one schedule.

Per optimiser step (``batch_size`` examples, split into micro-batches of
``micro_batch_size`` whose gradients accumulate):

    for each micro-batch:  loss = sum of answer-token cross-entropy / labelled tokens in the step
                           loss.backward()      host row gradients accumulate in the stores
    norm = clip_grad_norm_(routers, host row grads, max_grad_norm)    one global norm
    a non-finite norm stops the run (TrainingDiverged) before any weight is touched
    host RowSparseAdamW.step() (keys, values: touched rows only); router AdamW.step()
    lr = base_lr * schedule(step): linear warmup over ``warmup_ratio`` of the steps, then
    linear decay to 0 (the paper's schedule), applied to both optimisers

Every step appends one JSON line to ``metrics.jsonl`` (loss, lr, grad norm, tokens/s, mean U
per layer, MB moved each way, routing/staging/update seconds); the progress bar shows loss,
tokens/s, mean U and MB per step. Every ``eval_every`` steps the held-out answer loss is
logged; every ``save_every`` steps a checkpoint is written (atomic, newest ``keep`` kept).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meft.checkpoint import (
    load_optimizer_tensors,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from meft.data import Encoded, collate, iterate_batches
from meft.evaluate import answer_loss, token_loss_sum
from meft.model import MeftModel
from meft.optim import RowSparseAdamW, clip_grad_norm_
from meft.serialization import load_tensors


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class TrainConfig:
    """How to train (the adapter's own shape and lr live in MeftConfig)."""

    steps: int | None = None  # total optimiser steps; None: derived from epochs
    epochs: float = 3.0
    batch_size: int = 8  # examples per optimiser step
    micro_batch_size: int | None = None  # examples per forward; None: batch_size
    lr: float | None = None  # None: the adapter config's lr
    router_lr: float | None = None  # None: same as lr
    warmup_ratio: float = 0.02
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        for name in ("lr", "router_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


def lr_multiplier(step: int, total: int, warmup: int) -> float:
    """Linear warmup for ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains a :class:`MeftModel` on encoded examples; writes metrics and checkpoints."""

    def __init__(self, model: MeftModel, train: Sequence[Encoded], config: TrainConfig,
                 output: str | Path, *, pad_id: int,
                 eval_encoded: Sequence[Encoded] | None = None) -> None:
        if not train:
            raise ValueError("no training examples")
        self.model = model
        self.train_set = list(train)
        self.config = config
        self.output = Path(output)
        self.pad_id = pad_id
        self.eval_encoded = list(eval_encoded or [])
        self.total = config.total_steps(len(self.train_set))
        self.warmup = max(1, round(config.warmup_ratio * self.total))
        lr = config.lr if config.lr is not None else model.config.lr
        self.lr = lr
        self.router_lr = config.router_lr if config.router_lr is not None else lr
        wd = model.config.weight_decay
        tables = [t for s in model.stores for t in s.tables]
        self.host_opt = RowSparseAdamW(tables, lr=lr, weight_decay=wd)
        self.router_opt = torch.optim.AdamW(model.router_parameters(), lr=self.router_lr,
                                            weight_decay=wd)
        self.step = 0
        self.epoch = 0  # data position: batch ``position`` of epoch ``epoch`` comes next
        self.position = 0
        self.stop_after: int | None = None  # stop (with a checkpoint) after this many steps
        self._stop_requested = False
        self.history: list[dict[str, Any]] = []
        self.metrics_path = self.output / "metrics.jsonl"

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
    def _set_lr(self) -> float:
        mult = lr_multiplier(self.step, self.total, self.warmup)
        self.host_opt.lr = self.lr * mult
        for group in self.router_opt.param_groups:
            group["lr"] = self.router_lr * mult
        return self.lr * mult

    def train_step(self, idx: Sequence[int]) -> dict[str, Any]:
        start = time.perf_counter()
        lr = self._set_lr()
        examples = [self.train_set[i] for i in idx]
        labelled = sum(e.target_tokens for e in examples)
        tokens = sum(len(e.input_ids) for e in examples)
        micro = self.config.micro_batch_size or self.config.batch_size
        loss_total = 0.0
        self.model.train()
        for lo in range(0, len(examples), micro):
            batch = collate(examples[lo:lo + micro], self.pad_id)
            loss_sum, _ = token_loss_sum(self.model, batch)
            (loss_sum / max(1, labelled)).backward()
            loss_total += float(loss_sum.detach())
        host_grads = [g for s in self.model.stores for g in (s.key_grad, s.value_grad)]
        norm = clip_grad_norm_(self.model.router_parameters(), host_grads,
                               self.config.max_grad_norm)
        loss = loss_total / max(1, labelled)
        if not (math.isfinite(loss) and torch.isfinite(norm)):
            raise TrainingDiverged(f"step {self.step + 1}: loss {loss}, grad norm {float(norm)}; "
                                   "stopping (lower --lr?)")
        self.host_opt.step()
        self.router_opt.step()
        self.host_opt.zero_grad()
        self.router_opt.zero_grad(set_to_none=True)
        self.step += 1
        stats = self.model.transfer_stats()
        step_time = time.perf_counter() - start
        unions = [s.mean_union for s in stats]
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(norm),
            "examples": len(examples),
            "tokens": tokens,
            "step_time_s": step_time,
            "tokens_per_s": tokens / step_time,
            "union_per_layer": unions,
            "union_mean": sum(unions) / max(1, len(unions)),
            "touched_rows_per_layer": [s.touched_rows for s in stats],
            "mb_h2d": sum(s.bytes_h2d for s in stats) / 1e6,
            "mb_d2h": sum(s.bytes_d2h for s in stats) / 1e6,
            "route_s": sum(s.route_s for s in stats),
            "stage_s": sum(s.stage_s for s in stats),
            "update_s": sum(s.update_s for s in stats),
        }
        for s in stats:
            s.reset()
        return record

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Train up to ``total`` steps. Ctrl-C (SIGINT) finishes the current step, writes a
        checkpoint and raises :class:`TrainingInterrupted`; a second Ctrl-C stops at once."""
        self.output.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        first_step = self.step
        total_tokens = 0
        batches = self._batches()
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                   disable=not self.config.progress, dynamic_ncols=True)
        with _graceful_sigint(self), open(self.metrics_path, "a") as metrics:
            while self.step < self.total:
                epoch = self.epoch
                record = self.train_step(next(batches))
                record["epoch"] = epoch
                total_tokens += record["tokens"]
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    record["eval_loss"] = self.eval_loss()
                if self.step == self.total and self.eval_encoded and "eval_loss" not in record:
                    record["eval_loss"] = self.eval_loss()
                self.history.append(record)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:.0f}",
                                U=f"{record['union_mean']:.0f}",
                                MB=f"{record['mb_h2d'] + record['mb_d2h']:.0f}")
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
        final = self.history[-1]["loss"] if self.history else math.nan
        return TrainResult(self.step, final, time.perf_counter() - start, total_tokens,
                           self.history)

    def eval_loss(self) -> float:
        if not self.eval_encoded:
            return math.nan
        return answer_loss(self.model, self.eval_encoded, self.pad_id)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total, "epoch": self.epoch,
                "position": self.position, "train_config": asdict(self.config),
                "lr": self.lr, "router_lr": self.router_lr}

    def save_checkpoint(self) -> Path:
        root = self.output / "checkpoints"
        path = root / f"step-{self.step:08d}"
        if not (path / "trainer_state.json").is_file():  # already saved at this step
            save_checkpoint(path, self.model, self.host_opt, self.router_opt, self.state(),
                            rng=torch.get_rng_state())
        prune_checkpoints(root, self.config.keep_checkpoints)
        return path

    def restore(self, directory: str | Path) -> None:
        """Continue exactly from a checkpoint written by :meth:`save_checkpoint`."""
        directory = Path(directory)
        tensors, state = read_checkpoint(directory)
        adapter = load_tensors(directory / "adapter", "adapter_model")
        with torch.no_grad():
            for i, adapter_module in zip(self.model.layer_ids, self.model.adapter_modules,
                                         strict=True):
                adapter_module.store.keys.copy_(adapter[f"layers.{i}.keys"])
                adapter_module.store.values.copy_(adapter[f"layers.{i}.values"])
                adapter_module.router.copy_(adapter[f"layers.{i}.router"])
        load_optimizer_tensors(self.model, self.host_opt, self.router_opt, tensors)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        if self.metrics_path.is_file():  # drop lines logged after the checkpoint
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
