"""Row-sparse AdamW for the host tables, and global gradient clipping across host and device.

AdamW (decoupled weight decay), per element, at a row's n-th update with gradient g:

    p <- p * (1 - lr * wd)
    m <- b1 m + (1 - b1) g                 (``lerp``, as torch does)
    v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^n)) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)

``mode="lazy"`` (default, the fast one): only the R rows touched since the last step are read
and written (gathered, updated, scattered back): O(R*d) per step instead of O(N*d). Each row
keeps its own update count n (``step``, (N,) int64) for bias correction, and untouched rows keep
their value and moments exactly, weight decay included. When every row is touched every step
this is exactly ``torch.optim.AdamW``. The fp32/fp64 update runs torch's fused AdamW kernel on
the gathered rows, grouped by update count (:func:`_lazy_update`; the elementwise
:func:`_lazy_update_reference` is its specification and fallback).

``mode="dense"``: every row is updated every step with a zero gradient where untouched and one
global step count, i.e. ``torch.optim.AdamW`` on the densified gradient. It reproduces the
authors' masked simulation and is for checking, not speed.

Compact state (``state_format``; bf16 tables are rounded stochastically, :mod:`meft.engine.quant`):
``8bit`` keeps m and sqrt(v) as per-row log codes (1 byte each per element); ``rowwise``
keeps m in bf16 and one v per row, the row's mean of g^2 (as row-wise Adagrad in embedding
systems); ``factored`` keeps m as 8-bit codes and v as a rank-one product (Adafactor's
factorisation, Shazeer & Stern 2018), per table of rows i and columns j:

    r_i <- b2 r_i + (1 - b2) mean_j g_ij^2      at the steps that touch row i (R,)
    c_j <- b2 c_j + (1 - b2) mean_i g_ij^2      every step, over the touched rows  (d,)
    v_ij = r_i * c_j / mean_j c_j               (row mean of v_i. is r_i)

then the update above with v_ij and row i's own bias corrections. A meft row's gradient is
nearly rank one across rows: a value row's is its activations times the output gradient
(d), a key row's the input x (d) times a scalar, so every row of a table shares one column
profile (the model's few large hidden dimensions), which ``rowwise`` flattens away. Bytes per
parameter with bf16 tables: 8bit 4.03, rowwise 4.02, factored 3.03 (at d = 576; the
remainder is the per-row scale, factor and step count).

The optimizer is a ``torch.optim.Optimizer`` (one param group holding the tables' data), so
``param_groups[0]["lr"]`` and ``torch.optim.lr_scheduler`` work as usual; the gradients are read
from the tables' :class:`~meft.engine.store.RowSparseGrad` accumulators, not from ``.grad``.

:func:`clip_grad_norm_` clips the global norm over device parameters and host row gradients
together (the authors' code skipped the host part), with the same coefficient as
``torch.nn.utils.clip_grad_norm_``: min(1, max_norm / (norm + 1e-6)).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from meft.engine.disk import DiskArrays
from meft.engine.kernels import put_rows
from meft.engine.pipeline import HostWorker
from meft.engine.quant import (
    RoundingNoise,
    decode_signed,
    decode_unsigned,
    encode_signed,
    encode_unsigned,
    round_bf16_,
)
from meft.engine.store import HostTable, RowSparseGrad
from meft.errors import SerializationError

MODES = ("lazy", "dense")
STATE_FORMATS = ("fp32", "rowwise", "8bit", "factored")
COLUMN_STATE = ("exp_avg_sq_col",)  # state a table's rows share, (d,): not per row
CODED_FIRST_MOMENT = ("8bit", "factored")  # m as 8-bit log codes with a scale per row
PER_ROW_SECOND_MOMENT = ("rowwise", "factored")  # v's row factor: one number per row
# formats whose update of a row reads only that row's state (so a table may be sharded by rows
# across processes): not factored, whose column factor averages over the step's rows
ROW_LOCAL_STATE = ("fp32", "8bit", "rowwise")


def is_row_state(key: str, value: Tensor) -> bool:
    """Whether optimizer state ``key`` holds one entry per table row (what a disk store
    keeps beside the table and journals with its rows)."""
    return value.dim() > 0 and key not in COLUMN_STATE


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW over host tables whose gradients are row-sparse."""

    def __init__(
        self,
        tables: Iterable[HostTable],
        *,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "lazy",
        state_format: str = "fp32",
        seed: int = 0,
        alloc: Callable[[int, str, tuple[int, ...], torch.dtype], Tensor] | None = None,
        before_write: Callable[[int, list[str], Tensor], None] | None = None,
        journal_sync: Callable[[], None] | None = None,
        worker: HostWorker | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got lr={lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if state_format not in STATE_FORMATS:
            raise ValueError(f"state_format must be one of {STATE_FORMATS}, got "
                             f"{state_format!r}")
        self.tables: list[HostTable] = list(tables)
        if not self.tables:
            raise ValueError("RowSparseAdamW needs at least one host table")
        self.mode = mode
        self.state_format = state_format
        self.seed = seed
        compact = state_format != "fp32" or any(t.data.dtype == torch.bfloat16
                                                for t in self.tables)
        if compact and mode != "lazy":
            raise ValueError("the dense mode is for checking, with fp32 state and tables only")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__([t.data for t in self.tables], defaults)
        self.before_write = before_write  # (table index, state keys, ids): a disk journal
        self.journal_sync = journal_sync  # once per step, after journaling, before updating
        if worker is not None and before_write is not None:
            raise ValueError("the host worker's deferred update is for tables in memory (a "
                             "disk store journals every write before it)")
        # updates queued on this host thread (meft.engine.pipeline); None: inline
        self.worker = worker
        for i, t in enumerate(self.tables):
            state = _initial_state(t.data, mode, state_format)
            if alloc is not None:  # per-row state where the caller keeps it (a disk store)
                state = {k: alloc(i, k, tuple(v.shape), v.dtype) if is_row_state(k, v)
                         else v for k, v in state.items()}
            self.state[t.data] = state

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        for t in self.tables:
            if self.worker is not None:  # after its queued update (FIFO)
                t.grad.zero_later(self.worker)
            else:
                t.grad.zero_()

    @property
    def host_grads(self) -> list[RowSparseGrad]:
        return [t.grad for t in self.tables]

    def settle(self) -> None:
        """Wait for every queued update (re-raising a job's error) and count them in the
        tables' stats; whatever reads the tables or the moments as a whole calls it first."""
        if self.worker is not None:
            self.worker.drain()
        for t in self.tables:
            t.settle()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        group = self.param_groups[0]
        if self.before_write is not None:  # journal every table's rows, then one sync
            for index, t in enumerate(self.tables):
                if len(t.grad):
                    keys = [k for k, v in self.state[t.data].items() if is_row_state(k, v)]
                    self.before_write(index, keys, t.grad.ids)
            if self.journal_sync is not None:
                self.journal_sync()
        hyper = dict(group)  # this step's rate, as the jobs run after the next set_lr
        for index, t in enumerate(self.tables):
            if self.worker is None:
                start = time.perf_counter()
                self._update(index, t, hyper)
                if t.stats is not None:
                    t.stats.update_s += time.perf_counter() - start
                    t.stats.touched_rows = max(t.stats.touched_rows, len(t.grad))
                continue
            t.ready.clear()  # the next forward's routing waits for it (HostTable.settle)

            def job(index: int = index, t: HostTable = t) -> None:
                start = time.perf_counter()
                self._update(index, t, hyper)
                t.update_took += time.perf_counter() - start
                t.touched = max(t.touched, len(t.grad))

            # (ready also when the job fails or is dropped: the error is raised at a drain)
            self.worker.submit(job, always=t.ready.set)
        return loss

    def _update(self, index: int, t: HostTable, group: dict[str, Any]) -> None:
        """One table's AdamW update from its accumulated row gradients."""
        state = self.state[t.data]
        if "sr_step" in state:  # compact: rounding noise seeded by table and step
            seed = ((self.seed * 1_000_003 + index) * 1_000_033 + int(state["sr_step"]))
            state["sr_step"] += 1
            _compact_update(t, state, group, self.state_format, RoundingNoise(seed % (1 << 63)))
        elif self.mode == "lazy":
            _lazy_update(t, state, group)
        else:
            _dense_update(t, state, group)


# rows updated at a time (~2 MB of fp32 per chunk): the chunks of p, m, v, g and the
# temporaries stay in cache between the elementwise ops; 4x faster than whole-table passes
_CHUNK_ELEMS = 1 << 19


def _advance_counts(state: dict[str, Any], ids: Tensor) -> Tensor:
    """Advance the touched rows' update counts; return them, n (R,) int64."""
    step: Tensor = state["step"]
    n = step.index_select(0, ids) + 1
    step.index_copy_(0, ids, n)
    return n


def _count_step(state: dict[str, Any], ids: Tensor, group: dict[str, Any],
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Advance the touched rows' update counts n; return -lr / (1 - b1^n) and
    sqrt(1 - b2^n), each (R, 1) in ``dtype`` (computed in float64)."""
    lr, (b1, b2) = group["lr"], group["betas"]
    n = _advance_counts(state, ids).to(torch.float64).unsqueeze(1)  # (R, 1)
    return (-lr / (1 - b1**n)).to(dtype), ((1 - b2**n) ** 0.5).to(dtype)


def _lazy_update(t: HostTable, state: dict[str, Any], group: dict[str, Any]) -> None:
    """The lazy update: torch's fused AdamW kernel (one pass over p, m, v, g instead of eight
    elementwise ones) where it computes exactly what
    :func:`_lazy_update_reference` does up to rounding, else the reference itself.

    The kernel takes one update count per tensor, and each row has its own: the touched rows
    are sorted by count (stable, so by id within a count) and each chunk is split into one
    tensor per count, ``torch.unique_consecutive`` of the sorted counts giving the sizes. It
    is elementwise, but its vectorised body and scalar tail round differently, so an element's
    result would depend on where its row falls in a tensor unless every tensor's length is a
    multiple of every vector width: rows of ``d % _FUSED_ALIGN == 0`` elements (576, 768,
    896, 4096 ...) keep results independent of the grouping, so of which rows a step or a
    rank touches (tested); other widths take the reference. Measured on the embedded model
    (meft:16384, one thread, same process): 0.55 s of update per step against 0.74 s; what is
    left is gathering and scattering the rows, memory-bound."""
    ids, g = t.grad.ids, t.grad.rows  # (R,), (R, d)
    if ids.numel() == 0:
        return
    if not _fused_ok(t.data):
        _lazy_update_reference(t, state, group)
        return
    (b1, b2), n = group["betas"], _advance_counts(state, ids)  # (R,)
    order = torch.argsort(n, stable=True)  # (R,): rows with one update count together
    ids, n = ids.index_select(0, order), n.index_select(0, order)
    chunk = max(1, _CHUNK_ELEMS // t.data.shape[1])
    for lo in range(0, ids.numel(), chunk):
        rows = ids[lo:lo + chunk]
        counts, sizes = torch.unique_consecutive(n[lo:lo + chunk], return_counts=True)
        parts = sizes.tolist()
        p = t.data.index_select(0, rows)
        m = state["exp_avg"].index_select(0, rows)
        v = state["exp_avg_sq"].index_select(0, rows)
        gc = g.index_select(0, order[lo:lo + chunk])
        torch._fused_adamw_(  # type: ignore[attr-defined]
            list(p.split(parts)), list(gc.split(parts)), list(m.split(parts)),
            list(v.split(parts)), [], list(counts.to(torch.float32).unbind(0)),
            lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=False)
        put_rows(t.data, rows, p)
        put_rows(state["exp_avg"], rows, m)
        put_rows(state["exp_avg_sq"], rows, v)


_FUSED_ALIGN = 32  # elements: 2 (fp32) or 4 (fp64) AVX-512 vectors, the widest on CPUs


def _fused_ok(data: Tensor) -> bool:
    """Whether :func:`_lazy_update` may use torch's fused kernel for this table."""
    return (hasattr(torch, "_fused_adamw_") and data.device.type == "cpu"
            and data.dtype in (torch.float32, torch.float64)
            and data.shape[1] % _FUSED_ALIGN == 0)


def _lazy_update_reference(t: HostTable, state: dict[str, Any], group: dict[str, Any]) -> None:
    """The lazy update in plain elementwise ops (module doc), chunk by chunk: the
    specification of :func:`_lazy_update`'s fused path, and its fallback."""
    ids, g = t.grad.ids, t.grad.rows  # (R,), (R, d)
    if ids.numel() == 0:
        return
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    neg_step_size, bc2_sqrt = _count_step(state, ids, group, t.data.dtype)
    chunk = max(1, _CHUNK_ELEMS // t.data.shape[1])
    for lo in range(0, ids.numel(), chunk):
        hi = lo + chunk
        rows, gc = ids[lo:hi], g[lo:hi]
        p = t.data.index_select(0, rows)
        m = state["exp_avg"].index_select(0, rows)
        v = state["exp_avg_sq"].index_select(0, rows)
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(gc, 1 - b1)
        v.mul_(b2).addcmul_(gc, gc, value=1 - b2)
        put_rows(t.data, rows, p.add_(neg_step_size[lo:hi] * m / v.sqrt().div_(
            bc2_sqrt[lo:hi]).add_(eps)))  # addcdiv's order: (value * m) / denom
        put_rows(state["exp_avg"], rows, m)
        put_rows(state["exp_avg_sq"], rows, v)


def _initial_state(data: Tensor, mode: str, state_format: str) -> dict[str, Tensor]:
    """Zero moments in ``state_format`` (module doc of :mod:`meft.engine.quant` for the codes)."""
    n, d = data.shape
    step = torch.zeros(n, dtype=torch.long) if mode == "lazy" else torch.zeros(())
    if state_format == "fp32" and data.dtype != torch.bfloat16:
        return {"step": step, "exp_avg": torch.zeros_like(data),
                "exp_avg_sq": torch.zeros_like(data)}
    state = {"step": step, "sr_step": torch.zeros((), dtype=torch.long)}
    if state_format in CODED_FIRST_MOMENT:  # per-row scale, one byte per element
        state |= {"exp_avg": torch.zeros(n, d, dtype=torch.int8),
                  "exp_avg_scale": torch.zeros(n, 1)}  # a zero scale decodes to zero
    else:
        state["exp_avg"] = torch.zeros(n, d, dtype=torch.bfloat16 if state_format == "rowwise"
                                       else torch.float32)
    if state_format == "8bit":
        state |= {"exp_avg_sq": torch.zeros(n, d, dtype=torch.uint8),
                  "exp_avg_sq_scale": torch.zeros(n, 1)}
    elif state_format in PER_ROW_SECOND_MOMENT:  # the row factor; factored: x the column's
        state["exp_avg_sq"] = torch.zeros(n, 1)
        if state_format == "factored":
            state["exp_avg_sq_col"] = torch.zeros(d)
    else:
        state["exp_avg_sq"] = torch.zeros(n, d)
    return state


def _compact_update(t: HostTable, state: dict[str, Any], group: dict[str, Any], fmt: str,
                    noise: RoundingNoise) -> None:
    """The lazy update with bf16 tables and/or compact moments: each chunk of rows is decoded
    to fp32, updated as in :func:`_lazy_update`, and encoded back (bf16 rounded
    stochastically; ``rowwise``: the second moment is the row's mean of g^2; ``factored``:
    the row's mean of g^2 times the table's column profile, module doc)."""
    ids, g = t.grad.ids, t.grad.rows.float()  # (R,), (R, d)
    if ids.numel() == 0:
        return
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    neg_step_size, bc2_sqrt = _count_step(state, ids, group, torch.float32)
    profile = None
    if fmt == "factored":  # the column factor: every step of the table, its touched rows
        col = state["exp_avg_sq_col"]
        col.mul_(b2).add_(g.square().mean(0), alpha=1 - b2)  # (d,)
        mean = float(col.mean())
        profile = col / mean if mean > 0 else torch.ones_like(col)  # (d,), mean 1
    chunk = max(1, _CHUNK_ELEMS // t.data.shape[1])
    for lo in range(0, ids.numel(), chunk):
        hi = lo + chunk
        rows, gc = ids[lo:hi], g[lo:hi]
        p = t.data.index_select(0, rows).float()
        if fmt in CODED_FIRST_MOMENT:
            m = decode_signed(state["exp_avg"].index_select(0, rows),
                              state["exp_avg_scale"].index_select(0, rows))
        else:
            m = state["exp_avg"].index_select(0, rows).float()
        if fmt == "8bit":
            v = decode_unsigned(state["exp_avg_sq"].index_select(0, rows),
                                state["exp_avg_sq_scale"].index_select(0, rows)).square_()
        else:  # (R, d), or (R, 1): the row factor
            v = state["exp_avg_sq"].index_select(0, rows)
        if wd != 0:
            p.mul_(1 - lr * wd)
        m.lerp_(gc, 1 - b1)
        if fmt in PER_ROW_SECOND_MOMENT:
            sq_mean = torch.linalg.vector_norm(gc, dim=1, keepdim=True).square_().div_(
                gc.shape[1])
            v.mul_(b2).add_(sq_mean, alpha=1 - b2)  # (R, 1): one pass over g, not two
        else:
            v.mul_(b2).addcmul_(gc, gc, value=1 - b2)
        full = v * profile if profile is not None else v  # (R, d) or (R, 1)
        denom = full.sqrt().div_(bc2_sqrt[lo:hi]).add_(eps)  # (R, d), or (R, 1): rowwise
        if denom.shape[1] == 1:  # one step size per row: a single pass over p and m
            p.addcmul_(m, neg_step_size[lo:hi] / denom)
        else:
            p.add_(neg_step_size[lo:hi] * m / denom)
        if t.data.dtype == torch.bfloat16:
            put_rows(t.data, rows, round_bf16_(p, noise))
        else:
            put_rows(t.data, rows, p.to(t.data.dtype))
        if fmt in CODED_FIRST_MOMENT:
            code, scale = encode_signed(m)
            put_rows(state["exp_avg"], rows, code)
            put_rows(state["exp_avg_scale"], rows, scale)
        else:
            put_rows(state["exp_avg"], rows, round_bf16_(m, noise) if fmt == "rowwise" else m)
        if fmt == "8bit":
            code, scale = encode_unsigned(v.sqrt_())
            put_rows(state["exp_avg_sq"], rows, code)
            put_rows(state["exp_avg_sq_scale"], rows, scale)
        else:
            put_rows(state["exp_avg_sq"], rows, v)

def _dense_update(t: HostTable, state: dict[str, Any], group: dict[str, Any]) -> None:
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    g = t.grad.to_dense()
    p, m, v = t.data, state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    n = float(state["step"])
    if wd != 0:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**n) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**n))


@torch.no_grad()
def clip_grad_norm_(
    device_params: Iterable[Tensor],
    host_grads: Sequence[RowSparseGrad],
    max_norm: float,
    host_sum: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Clip the global L2 norm of device ``.grad``s and host row gradients; return the norm.

    The norm is computed in float64 on the host. A non-finite norm is returned unclipped so the
    caller can stop (clipping by NaN would silently poison every table). ``host_sum`` sums the
    host rows' squared norm over the ranks of a distributed run, whose host gradients are
    sharded (the device ones are already summed and equal on every rank).
    """
    grads = [p.grad for p in device_params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        sq += g.detach().double().pow(2).sum().cpu()
    host_sq = sq if host_sum is None else torch.zeros((), dtype=torch.float64)
    for hg in host_grads:
        host_sq += hg.sq_norm().cpu()
    if host_sum is not None:
        sq = sq + host_sum(host_sq)
    total = sq.sqrt()
    if not torch.isfinite(total):
        return total
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
        for hg in host_grads:
            hg.scale_(coef)
    return total


class OptimizerSet:
    """All optimizers of one training run behind one interface.

    Up to three optimizers, each over one kind of trainable tensor, with one schedule:

        device   torch AdamW, two param groups: ``params`` at ``lr`` (LoRA, dense adapters,
                 full fine-tuning) and ``routers`` at ``router_lr`` (meft's routers)
        host     :class:`RowSparseAdamW` over host tables (meft) at ``lr``
        offload  torch AdamW on the host over dense host tensors (the offload baseline) at ``lr``

    :meth:`set_lr` scales every group's base rate by the schedule's multiplier; :meth:`clip_`
    clips the one global norm over all of them (device ``.grad``, host dense ``.grad`` and host
    row gradients); :meth:`step` steps host first, then the others. With ``worker`` (and no
    disk store) the host update is queued on that thread (:mod:`meft.engine.pipeline`) and
    :meth:`settle` waits for it. State tensors are named
    ``<kind>.<name>.<state key>`` (``host.3.keys.exp_avg``, ``router.3.step``) from the names the
    tensors were given, which is what checkpoints store.
    """

    def __init__(self, *, params: dict[str, Tensor] | None = None,
                 routers: dict[str, Tensor] | None = None,
                 host_tables: dict[str, HostTable] | None = None,
                 offload: dict[str, Tensor] | None = None, lr: float,
                 router_lr: float | None = None, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 host_state: str = "fp32", seed: int = 0,
                 arrays: DiskArrays | None = None,
                 worker: HostWorker | None = None) -> None:
        self.named: dict[str, dict[str, Any]] = {
            "device": dict(params or {}), "router": dict(routers or {}),
            "host": dict(host_tables or {}), "offload": dict(offload or {})}
        self.lr = lr
        self.router_lr = router_lr if router_lr is not None else lr
        groups = [{"params": list(group.values()), "base_lr": base}
                  for group, base in ((self.named["device"], lr),
                                      (self.named["router"], self.router_lr)) if group]
        adam = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        self.device: torch.optim.Optimizer | None = (
            torch.optim.AdamW(groups, **adam) if groups else None)  # type: ignore[arg-type]
        names = list(self.named["host"])
        self.arrays = arrays
        disk: dict[str, Any] = {}
        if arrays is not None:  # the moments beside the tables, journaled with them
            def alloc(i: int, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
                return arrays.zeros(f"{names[i]}.{key}", shape, dtype)

            def before_write(i: int, keys: list[str], ids: Tensor) -> None:
                for name in (names[i], *(f"{names[i]}.{k}" for k in keys)):
                    arrays.before_write(name, ids)

            disk = {"alloc": alloc, "before_write": before_write,
                    "journal_sync": arrays.sync}
        self.host = (RowSparseAdamW(self.named["host"].values(), state_format=host_state,
                                    seed=seed, worker=worker if arrays is None else None,
                                    **adam, **disk)  # type: ignore[arg-type]
                     if self.named["host"] else None)
        offload_params = list(self.named["offload"].values())
        self.offload = (torch.optim.AdamW(offload_params, **adam)  # type: ignore[arg-type]
                        if offload_params else None)
        if self.offload is not None:
            for group in self.offload.param_groups:
                group["base_lr"] = lr

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.host, self.device, self.offload) if o is not None]

    def set_lr(self, multiplier: float) -> None:
        if self.host is not None:
            self.host.lr = self.lr * multiplier
        for opt in (self.device, self.offload):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * multiplier

    def dense_params(self) -> list[Tensor]:
        return [p for kind in ("device", "router", "offload") for p in self.named[kind].values()]

    def clip_(self, max_norm: float,
              host_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Clip the global gradient norm; return it (non-finite: returned, nothing clipped).
        ``host_sum``: see :func:`clip_grad_norm_`."""
        host = self.host.host_grads if self.host is not None else []
        return clip_grad_norm_(self.dense_params(), host, max_norm, host_sum)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        if self.arrays is not None:  # resident: the pages of one step (meft.engine.disk)
            self.arrays.release()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def settle(self) -> None:
        """Wait for the host update queued on the worker, if any (RowSparseAdamW.settle)."""
        if self.host is not None:
            self.host.settle()

    # ----------------------------------------------------------------- state
    def _state_of(self, kind: str, tensor: Any) -> dict[str, Any]:
        if kind == "host":
            assert self.host is not None
            state: dict[str, Any] = self.host.state[tensor.data]
            return state
        opt = self.offload if kind == "offload" else self.device
        assert opt is not None
        found: dict[str, Any] = opt.state[tensor]
        return found

    def _on_disk(self, kind: str, key: str, value: Any) -> bool:
        return self.arrays is not None and kind == "host" and is_row_state(key, value)

    def state_tensors(self) -> dict[str, Tensor]:
        """Every optimizer's state, named ``<kind>.<name>.<key>`` (with a disk store, not the
        per-row host state: it is in the store)."""
        self.settle()
        out: dict[str, Tensor] = {}
        for kind, group in self.named.items():
            for name, tensor in group.items():
                for key, value in self._state_of(kind, tensor).items():
                    if isinstance(value, Tensor) and not self._on_disk(kind, key, value):
                        out[f"{kind}.{name}.{key}"] = value
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (a missing name is an error)."""
        self.settle()
        for kind, group in self.named.items():
            for name, tensor in group.items():
                prefix = f"{kind}.{name}."
                found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if kind == "host":
                    state = self._state_of(kind, tensor)
                    for key in state:
                        if self._on_disk(kind, key, state[key]):
                            continue
                        if key not in found:
                            raise SerializationError(f"optimizer state {prefix}{key} missing "
                                                 "(a checkpoint of another run?)")
                        state[key].copy_(found[key])
                elif found:  # torch AdamW keeps its step count on the host
                    opt = self.offload if kind == "offload" else self.device
                    assert opt is not None
                    opt.state[tensor] = {k: v if k == "step" else v.to(tensor.device)
                                         for k, v in found.items()}
