"""Host store: one layer's big adapter tables, their row-sparse gradients and traffic counters.

A layer's adapter has keys and values, each (N, d), which live in host (CPU) memory as fp32
master copies by default, outside any ``nn.Module`` so ``model.to(device)`` never moves them.
Their AdamW moments belong to the optimizer (:mod:`meft.engine.optim`), which the trainer builds
over the stores' tables.

Gradients arrive from the device as (ids (U,), rows (U, d)) once per micro-batch and are
accumulated by :class:`RowSparseGrad`, which never allocates an N x d buffer: a slot map
(N,) int64 gives each touched row a slot in a growing (capacity, d) buffer, so accumulating
several micro-batches is one ``index_add_`` each and the touched set is known at step time.

:class:`TransferStats` counts, per layer and optimizer step, what the method document's cost
model counts: U, hidden states device->host (T*d), rows host->device (2*U*d), gradients
device->host (2*U*d), plus the index tensors exchanged (kept separate so the main terms equal
the document's formula exactly), the bytes sent to other ranks in a distributed run, and the
time spent routing, staging and updating.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from meft.engine.pipeline import HostWorker


class RowSparseGrad:
    """Sum of gradient rows for an (N, d) table, stored as touched ids and their rows."""

    def __init__(self, n_rows: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.n_rows = n_rows
        self.dim = dim
        self._slot = torch.full((n_rows,), -1, dtype=torch.long, device=device)  # (N,)
        self._ids = torch.empty(0, dtype=torch.long, device=device)  # (capacity,)
        self._rows = torch.empty(0, dim, dtype=dtype, device=device)  # (capacity, d)
        self._count = 0
        self._worker: HostWorker | None = None  # where adds are queued (add_later)
        self._queued = 0  # adds queued on the worker and not yet run (under _lock: two threads)
        self._lock = threading.Lock()
        self.on_wait: Callable[[float], None] | None = None  # told the seconds settle waited

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows accumulate in (read without waiting for queued adds)."""
        return self._rows.dtype

    def settle(self) -> None:
        """Wait for the adds queued on the host worker (:mod:`meft.engine.pipeline`); every
        read and every other change of the accumulator calls it first."""
        if self._queued and self._worker is not None and not self._worker.is_current():
            waited = self._worker.drain()
            if self.on_wait is not None:
                self.on_wait(waited)

    @property
    def ids(self) -> Tensor:
        """Touched row ids (R,), in first-touched order."""
        self.settle()
        return self._ids[: self._count]

    @property
    def rows(self) -> Tensor:
        """Accumulated gradient rows (R, d), aligned with :attr:`ids`."""
        self.settle()
        return self._rows[: self._count]

    def __len__(self) -> int:
        self.settle()
        return self._count

    def add_later(self, worker: HostWorker, ids: Tensor, rows: Tensor, *,
                  ready: Callable[[], object] | None = None, adopt: bool = False) -> None:
        """:meth:`add` on ``worker``'s thread, after ``ready()`` (e.g. a CUDA event's
        ``synchronize``: the copy of ``rows`` to the host has landed). Queued adds run in
        submission order, so the sum is bitwise the one of calling :meth:`add` now."""
        self._worker = worker
        with self._lock:
            self._queued += 1

        def job() -> None:
            if ready is not None:
                ready()
            self._add(ids, rows, adopt=adopt)

        worker.submit(job, always=self._done)

    def zero_later(self, worker: HostWorker) -> None:
        """:meth:`zero_` on ``worker``'s thread, after the jobs queued before it (the host
        optimizer's update of this table, which reads the rows first)."""
        self._worker = worker
        with self._lock:
            self._queued += 1

        worker.submit(self.zero_, always=self._done)

    def _done(self) -> None:
        """A queued job of this accumulator has run, failed or been dropped."""
        with self._lock:
            self._queued -= 1

    def add(self, ids: Tensor, rows: Tensor, *, adopt: bool = False) -> None:
        """Accumulate rows (R, d) into table rows ids (R,); ids may repeat.

        With ``adopt=True`` the caller hands ``rows`` over: when the accumulator is empty and
        the ids are distinct, the tensor becomes the buffer instead of being copied (the first
        micro-batch of a step then costs no copy at all).
        """
        self.settle()
        self._add(ids, rows, adopt=adopt)

    def _add(self, ids: Tensor, rows: Tensor, *, adopt: bool = False) -> None:
        if ids.dim() != 1 or rows.shape != (ids.shape[0], self.dim):
            raise ValueError(f"expected ids (R,) and rows (R, {self.dim}), got "
                             f"{tuple(ids.shape)} and {tuple(rows.shape)}")
        ids = ids.to(self._slot.device, torch.long)
        rows = rows.to(self._rows.device, self._rows.dtype)
        slots = self._slot[ids]
        fresh = ids[slots < 0]
        if fresh.numel():
            fresh = torch.unique(fresh)
            start, stop = self._count, self._count + fresh.numel()
            if fresh.numel() == ids.numel():  # all new and distinct: no zero + add
                if adopt and start == 0 and rows.is_contiguous():
                    self._ids, self._rows = ids.clone(), rows  # the buffer is the caller's
                else:
                    self._reserve(stop)
                    self._ids[start:stop] = ids
                    self._rows[start:stop] = rows
                self._slot[ids] = torch.arange(start, stop, device=self._slot.device)
                self._count = stop
                return
            self._reserve(stop)
            self._ids[start:stop] = fresh
            self._rows[start:stop].zero_()
            self._slot[fresh] = torch.arange(start, stop, device=self._slot.device)
            self._count = stop
            slots = self._slot[ids]
        self._rows.index_add_(0, slots, rows)

    def _reserve(self, capacity: int) -> None:
        if capacity <= self._ids.shape[0]:
            return
        new_cap = max(capacity, 2 * self._ids.shape[0])
        ids = self._ids.new_empty(new_cap)
        rows = self._rows.new_empty(new_cap, self.dim)
        ids[: self._count] = self._ids[: self._count]  # (not the properties: the worker's
        rows[: self._count] = self._rows[: self._count]  # thread calls this inside a job)
        self._ids, self._rows = ids, rows

    def keep_(self, keep: Tensor) -> None:
        """Keep only the touched rows where ``keep`` (R,) bool is true, in their order; the
        others are forgotten as if never touched (an optimizer step then skips them)."""
        self.settle()
        if keep.shape != (self._count,):
            raise ValueError(f"keep must be ({self._count},), got {tuple(keep.shape)}")
        ids, rows = self.ids[keep], self.rows[keep]  # copies
        self._slot[self.ids] = -1
        n = ids.numel()
        self._ids[:n] = ids
        self._rows[:n] = rows
        self._slot[ids] = torch.arange(n, device=self._slot.device)
        self._count = n

    def zero_(self) -> None:
        """Forget every touched row (keeps the buffer for the next step)."""
        self.settle()
        self._slot[self.ids] = -1
        self._count = 0

    def scale_(self, factor: float | Tensor) -> None:
        self.rows.mul_(factor)

    def sq_norm(self) -> Tensor:
        """Squared Frobenius norm of the accumulated gradient (float64 scalar; one BLAS dot
        of the rows in float64, 3x faster than ``double().pow(2).sum()``, equal to 1e-13)."""
        flat = self.rows.reshape(-1).double()
        return torch.dot(flat, flat)

    def to_dense(self) -> Tensor:
        """The (N, d) dense gradient; for checking and the dense optimizer mode only."""
        self.settle()
        dense = self._rows.new_zeros(self.n_rows, self.dim)
        dense[self.ids] = self.rows
        return dense


@dataclass
class HostTable:
    """One (N, d) host tensor with its gradient accumulator; the unit the optimizer updates.

    ``ready`` is clear while an update of ``data`` is queued on the host worker
    (:mod:`meft.engine.pipeline`); the job leaves its seconds and rows in ``update_took`` and
    ``touched``, which :meth:`settle` folds into ``stats`` on the caller's thread."""

    name: str
    data: Tensor
    grad: RowSparseGrad
    stats: TransferStats | None = None
    ready: threading.Event = field(default_factory=threading.Event, repr=False,
                                   compare=False)
    update_took: float = 0.0
    touched: int = 0

    def __post_init__(self) -> None:
        self.ready.set()

    def settle(self) -> None:
        """Wait until a queued update of this table has run (the seconds waited go to
        ``stats.wait_s``), then count it in ``stats``. Re-raises nothing: a failed job's
        error is raised by the worker's drain (the next clip or :meth:`RowSparseAdamW.settle`)."""
        if not self.ready.is_set():
            start = time.perf_counter()
            self.ready.wait()
            if self.stats is not None:
                self.stats.wait_s += time.perf_counter() - start
        if self.update_took or self.touched:
            if self.stats is not None:
                self.stats.update_s += self.update_took
                self.stats.touched_rows = max(self.stats.touched_rows, self.touched)
            self.update_took, self.touched = 0.0, 0


@dataclass
class TransferStats:
    """Per-layer counters, accumulated over the micro-batches of one optimizer step."""

    forwards: int = 0
    tokens: int = 0
    union_rows: int = 0  # sum of U over forwards
    hidden_bytes_d2h: int = 0  # T*d*s_x
    row_bytes_h2d: int = 0  # 2*U*d*s_w
    grad_bytes_d2h: int = 0  # 2*U*d*s_g
    index_bytes_d2h: int = 0  # probe ids and gate values
    index_bytes_h2d: int = 0  # union ids and per-token positions
    comm_bytes: int = 0  # sent to other ranks (meft.engine.distributed): routing, rows, gradients
    route_s: float = 0.0
    stage_s: float = 0.0
    update_s: float = 0.0
    wait_s: float = 0.0  # the compute device waiting for queued host work (engine.pipeline)
    touched_rows: int = 0  # rows the optimizer updated at the last step
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    @property
    def bytes_h2d(self) -> int:
        return self.row_bytes_h2d + self.index_bytes_h2d

    @property
    def bytes_d2h(self) -> int:
        return self.hidden_bytes_d2h + self.grad_bytes_d2h + self.index_bytes_d2h

    @property
    def mean_union(self) -> float:
        return self.union_rows / self.forwards if self.forwards else 0.0

    def snapshot(self) -> dict[str, float]:
        out = {k: v for k, v in asdict(self).items() if k != "history"}
        out.update(bytes_h2d=self.bytes_h2d, bytes_d2h=self.bytes_d2h, mean_union=self.mean_union)
        return out

    def reset(self, *, keep_history: bool = False) -> None:
        """Start counting a new step (optionally appending the finished one to ``history``)."""
        if keep_history:
            self.history.append(self.snapshot())
        for f in fields(self):
            if f.name != "history":
                setattr(self, f.name, f.default)


class HostStore:
    """One layer's adapter tables in host memory: keys and values (N, d), their gradients."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        if keys.dim() != 2 or keys.shape != values.shape:
            raise ValueError(f"keys and values must both be (N, d), got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        if keys.dtype != values.dtype or not keys.dtype.is_floating_point:
            raise ValueError(f"keys and values need one floating dtype, got {keys.dtype} "
                             f"and {values.dtype}")
        if keys.device.type != "cpu" or values.device.type != "cpu":
            raise ValueError("a HostStore keeps its tables in host (cpu) memory")
        self.keys = keys.contiguous()
        self.values = values.contiguous()
        n, d = keys.shape
        self.stats = TransferStats()
        # gradients accumulate in fp32 (or fp64) even over bf16 tables: they are U x d, small
        grad_dtype = torch.float32 if keys.dtype == torch.bfloat16 else keys.dtype
        self.key_grad = RowSparseGrad(n, d, dtype=grad_dtype)
        self.value_grad = RowSparseGrad(n, d, dtype=grad_dtype)
        self.tables = (
            HostTable("keys", self.keys, self.key_grad, self.stats),
            HostTable("values", self.values, self.value_grad, self.stats),
        )

    @classmethod
    def initialize(cls, n_neurons: int, dim: int, *, std: float = 0.02,
                   dtype: torch.dtype = torch.float32,
                   generator: torch.Generator | None = None) -> HostStore:
        """Keys ~ N(0, std), values = 0: the wrapped model starts equal to the base model."""
        keys = torch.empty(n_neurons, dim, dtype=dtype)
        keys.normal_(0.0, std, generator=generator)
        return cls(keys, torch.zeros(n_neurons, dim, dtype=dtype))

    @property
    def n_neurons(self) -> int:
        return int(self.keys.shape[0])

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the two tables (the optimizer's moments add twice as much)."""
        return self.keys.nbytes + self.values.nbytes

    def zero_grad(self) -> None:
        self.key_grad.zero_()
        self.value_grad.zero_()

    def settle_tables(self) -> None:
        """Wait for queued optimizer updates of the keys and values (:meth:`HostTable.settle`):
        anything that reads the tables calls it first."""
        for t in self.tables:
            t.settle()

