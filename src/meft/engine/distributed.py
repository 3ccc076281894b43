"""Data parallelism on torch.distributed, with the host tables sharded by expert.

``torchrun --standalone --nproc_per_node=W -m meft train ...`` runs W ranks (gloo for host
tensors; on CUDA, NCCL for device tensors). Dimension letters as in :mod:`meft.engine.routing`, plus
W ranks, r this rank, T_r and U_r its tokens and union.

What is where
    replicated  the base model, the routers (E, d) and their AdamW state. Router gradients are
                summed over ranks (one all_reduce) before clipping, so every rank takes the
                same router step.
    sharded     the host tables: rank r owns experts [E r / W, E (r+1) / W) of every layer,
                i.e. rows [B E r / W, B E (r+1) / W) of keys and values, with their AdamW
                moments and per-row step counts. No rank holds the whole adapter.

One layer's forward on rank r (every rank runs the same forwards in the same order):
    device   g = x W_g^T (T_r, E), top-P probe, as in one process
    1 route  each token's x (d), probe ids and gate scores (P each) go to every rank owning
             one of its probed experts, once per (token, owner)                 all_to_all
    2 score  the owner scores its candidates (k_i . x_t, times g with the product gate; -inf
             for experts it does not own) and returns the token's top-K scores and global
             ids                                                                all_to_all
    3 merge  the sender keeps the top-K of its <= W K candidates: the top-K of a union is the
             top-K of the parts' top-Ks, so the ids are one process's
    4 fetch  the union U_r, contiguous by owner (ownership is by row range): ids go to their
             owners, key and value rows (2 U_r d) come back                     all_to_all x2
Backward accumulates the (U_r, d) gradient rows on rank r under global ids (a RowSparseGrad
over N rows: touched rows only). At the step, before clipping, :meth:`DataParallel.sync_grads`
sends them to their owners (all_to_all), who add them into their shard's accumulators; the
touched set is the union over the global batch, so the lazy AdamW updates the rows one process
would. Each rank's loss is divided by the labelled tokens of the whole global batch, so
gradients are summed over ranks and equal one process's up to the order of fp32 sums.

Lockstep. A collective waits for every rank, so all ranks run the same forwards: a rank with
no examples in a micro-batch runs a one-token forward without gradients
(:meth:`DataParallel.idle_forward`) to serve the others; evaluation and generation run on the
same inputs on every rank (replicated; rank 0 writes files). Stop requests (Ctrl-C) and
divergence are agreed on by all_reduce, so every rank stops at the same step. A rank that dies
makes the others' next collective fail (gloo: connection closed; at worst the timeout,
``--dist-timeout``) and they stop with :class:`~meft.errors.PeerLost`.

Traffic: the bytes each rank sends to the others are counted in ``TransferStats.comm_bytes``
(routing, rows, gradients) and logged per step (``mb_comm``, summed over ranks), as the
host-device transfers are. Exchanges use ``all_to_all_single``; on a backend without it,
``all_gather`` of everything (more bytes, same result).
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from meft.engine.offload import OffloadedSparseAdapter
from meft.engine.optim import COLUMN_STATE
from meft.engine.routing import pair_scores
from meft.engine.store import HostStore, RowSparseGrad, TransferStats
from meft.errors import ConfigError, PeerLost

__all__ = ["Comm", "DataParallel", "ShardPlan", "ShardedSparseAdapter", "world_size"]

# tensors sharded by rows: the tables and every per-row optimizer state of a table (not
# state the rows share, meft.engine.optim.COLUMN_STATE; runs with such state are refused anyway)
ROW_TENSOR = re.compile(r"^(layers\.\d+\.(keys|values)|host\.\d+\.(keys|values)\."
                        rf"(?!({'|'.join(COLUMN_STATE)})$)\w+)$")
_T = TypeVar("_T")
# what the backends say when a peer process is gone or silent
_LOST = re.compile(r"connection (reset|closed|refused)|timed? ?out|broken pipe|gloo/transport|"
                   r"NCCL (error|communicator)", re.IGNORECASE)


def world_size() -> int:
    """The number of ranks torchrun (or the caller's environment) started; 1 without it."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"environment WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a "
                          "number") from None


@dataclass(frozen=True)
class ShardPlan:
    """Which rows of every layer's (N, d) tables each of W ranks owns."""

    n_neurons: int
    n_experts: int
    world: int
    rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a world of {self.world}")
        if self.world > self.n_experts:
            raise ConfigError(f"{self.world} processes but E={self.n_experts} experts per "
                              "layer: each process must own at least one expert (use fewer "
                              "processes or more --experts)")

    @property
    def block(self) -> int:
        """B, neurons per expert."""
        return self.n_neurons // self.n_experts

    def experts_of(self, rank: int) -> tuple[int, int]:
        return self.n_experts * rank // self.world, self.n_experts * (rank + 1) // self.world

    def rows_of(self, rank: int) -> tuple[int, int]:
        e0, e1 = self.experts_of(rank)
        return e0 * self.block, e1 * self.block

    @property
    def rows(self) -> tuple[int, int]:
        """This rank's rows [start, stop)."""
        return self.rows_of(self.rank)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [self.rows_of(r) for r in range(self.world)]

    def owner_of_experts(self, experts: Tensor) -> Tensor:
        starts = torch.tensor([self.experts_of(r)[0] for r in range(1, self.world)],
                              dtype=experts.dtype)
        return torch.bucketize(experts, starts, right=True)

    def owner_of_rows(self, ids: Tensor) -> Tensor:
        return self.owner_of_experts(ids // self.block)

    def is_row_tensor(self, name: str, shape: Sequence[int]) -> bool:
        """Whether a tensor of a checkpoint or adapter file is split by rows across ranks."""
        return len(shape) >= 1 and ROW_TENSOR.match(name) is not None

    def select_rows(self, name: str, shape: Sequence[int]) -> tuple[int, int] | None:
        """This rank's rows of a whole tensor in a file (None: read it whole)."""
        if self.is_row_tensor(name, shape) and shape[0] == self.n_neurons:
            return self.rows
        return None


# ---------------------------------------------------------------------- exchanges
def _row_bytes(t: Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n * t.element_size()


def _pack(tensors: Sequence[Tensor]) -> Tensor:
    """Tensors with one leading size n -> (n, bytes per row) uint8, side by side."""
    n = tensors[0].shape[0]
    return torch.cat([t.contiguous().view(torch.uint8).reshape(n, _row_bytes(t))
                      for t in tensors], dim=1)


def _unpack(packed: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    n = packed.shape[0]
    out, start = [], 0
    for t in like:
        width = _row_bytes(t)
        part = packed[:, start:start + width].contiguous().view(t.dtype)
        out.append(part.reshape(n, *t.shape[1:]))
        start += width
    return out


class Comm:
    """Variable-size exchanges between the ranks of the default process group."""

    def __init__(self, rank: int, world: int, *, timeout_s: float = 300.0) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.all_to_all = True  # False: the backend lacks it, all_gather instead

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except dist.DistError as err:
            raise self.lost(err) from None
        except RuntimeError as err:  # gloo reports a lost peer as a plain RuntimeError
            if not _LOST.search(str(err)):
                raise  # a bug (a shape, a dtype): keep its traceback
            raise self.lost(err) from None

    def lost(self, err: BaseException) -> PeerLost:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return PeerLost(f"rank {self.rank}: another process of this run stopped or did not "
                        f"answer within {self.timeout_s:g} s ({first[:160]}); stopping. "
                        "Continue from the last complete checkpoint with --resume")

    def exchange(self, sends: Sequence[Sequence[Tensor]],
                 stats: TransferStats | None = None) -> list[list[Tensor]]:
        """``sends[k]``: the tensors for rank k, all with one leading size n_k (and the same
        dtypes and trailing shapes for every k, on every rank). Returns, for each rank k, the
        tensors rank k sent here. Bytes sent to other ranks are added to ``stats``."""
        if len(sends) != self.world:
            raise ValueError(f"exchange needs one message per rank ({self.world}), got "
                             f"{len(sends)}")
        packed = [_pack(ts) for ts in sends]  # (n_k, bytes per row) uint8
        counts = torch.tensor([p.shape[0] for p in packed], dtype=torch.long)
        got = self._payload(torch.cat(packed), counts)
        if stats is not None:
            stats.comm_bytes += sum(p.nbytes + counts[k].nbytes for k, p in enumerate(packed)
                                    if k != self.rank)
        return [_unpack(chunk, sends[0]) for chunk in got]

    def _payload(self, flat: Tensor, counts: Tensor) -> list[Tensor]:
        width = flat.shape[1]
        if self.all_to_all:
            recv_counts = torch.empty_like(counts)
            try:
                self._call(dist.all_to_all_single, recv_counts, counts)
            except RuntimeError as err:  # a backend without all_to_all (not a lost peer)
                if "all_to_all" not in str(err) and "alltoall" not in str(err).lower():
                    raise
                self.all_to_all = False
                return self._payload(flat, counts)
            received = flat.new_empty(int(recv_counts.sum()), width)
            self._call(dist.all_to_all_single, received, flat, recv_counts.tolist(),
                       counts.tolist())
            return list(received.split(recv_counts.tolist()))
        # all_gather: every rank's counts, then every rank's whole payload, padded
        all_counts = [torch.empty_like(counts) for _ in range(self.world)]
        self._call(dist.all_gather, all_counts, counts)
        longest = max(int(c.sum()) for c in all_counts)
        padded = flat.new_zeros(longest, width)
        padded[: flat.shape[0]] = flat
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        self._call(dist.all_gather, gathered, padded)
        out: list[Tensor] = []
        for c, data in zip(all_counts, gathered, strict=True):
            start = int(c[: self.rank].sum())
            out.append(data[start:start + int(c[self.rank])])
        return out

    def all_reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        self._call(dist.all_reduce, tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        # a tiny all_reduce rather than dist.barrier: gloo's barrier ignores device choices
        self.all_reduce(torch.zeros(1))


# ---------------------------------------------------------------------- the adapter
class ShardedSparseAdapter(OffloadedSparseAdapter):
    """One layer's adapter whose store holds only this rank's rows (``plan.rows``)."""

    def __init__(self, store: HostStore, *, plan: ShardPlan, comm: Comm, router: Tensor,
                 **kwargs: Any) -> None:
        lo, hi = plan.rows
        if store.n_neurons != hi - lo:
            raise ValueError(f"rank {plan.rank} owns rows [{lo}, {hi}) but its store has "
                             f"{store.n_neurons}")
        super().__init__(store, n_experts=plan.n_experts, router=router,
                         n_neurons=plan.n_neurons, **kwargs)
        self.plan, self.comm = plan, comm
        grad_dtype = store.key_grad.rows.dtype
        # this rank's gradient rows by global id, sent to their owners at the step
        self.used_key_grad = RowSparseGrad(plan.n_neurons, store.dim, dtype=grad_dtype)
        self.used_value_grad = RowSparseGrad(plan.n_neurons, store.dim, dtype=grad_dtype)

    def extra_repr(self) -> str:
        lo, hi = self.plan.rows
        return f"{super().extra_repr()}, rows=[{lo}, {hi}) of rank {self.plan.rank}"

    def _route(self, x: Tensor, probe_scores: Tensor, probe_ids: Tensor) -> Tensor:
        t, k, w = x.shape[0], self.top_k, self.plan.world
        owners = self.plan.owner_of_experts(probe_ids)  # (T, P)
        need = torch.zeros(t, w, dtype=torch.bool).scatter_(1, owners, True)  # (T, W)
        who = [need[:, r].nonzero().squeeze(1) for r in range(w)]  # tokens per owner
        asked = self.comm.exchange(
            [(x[tok], probe_ids[tok], probe_scores[tok]) for tok in who], self.store.stats)
        answers = self.comm.exchange([self._score_own(*a) for a in asked], self.store.stats)
        scores = x.new_full((t, w, k), float("-inf"))  # (T, W, K) candidates per owner
        ids = torch.zeros(t, w, k, dtype=torch.long)
        for r, (tok, (s, i)) in enumerate(zip(who, answers, strict=True)):
            scores[tok, r] = s
            ids[tok, r] = i
        top = scores.view(t, w * k).topk(k, dim=1).indices  # (T, K)
        return ids.view(t, w * k).gather(1, top).sort(dim=1).values

    def _score_own(self, x: Tensor, probe_ids: Tensor, probe_scores: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """Another rank's tokens x (n, d) with their probes (n, P): the top-K (scores, global
        ids) among the candidates of the experts this rank owns, -inf where it owns none."""
        n, p = probe_ids.shape
        b, (e0, e1) = self.plan.block, self.plan.experts_of(self.plan.rank)
        own = (probe_ids >= e0) & (probe_ids < e1)  # (n, P)
        pairs = own.nonzero()  # (R, 2): token, probe slot, row-major as own's True entries
        blocks = self.store.keys.view(e1 - e0, b, self.store.dim)  # (E_r, B, d)
        s = pair_scores(x, blocks, pairs[:, 0], probe_ids[own] - e0)  # (R, B)
        if self.gate == "product":
            s = s * probe_scores[own].unsqueeze(1)
        full = x.new_full((n, p, b), float("-inf"))
        full[own] = s
        top = full.view(n, p * b).topk(self.top_k, dim=1)  # (n, K)
        ids = probe_ids.gather(1, top.indices // b) * b + top.indices % b
        return top.values, ids

    def _tables_in_place(self, dtype: torch.dtype) -> None:
        return None  # this rank holds only its own rows: the others' come from their owners

    def _fetch(self, uniq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        lo, _ = self.plan.rows
        counts = torch.bincount(self.plan.owner_of_rows(uniq), minlength=self.plan.world)
        asked = self.comm.exchange([(part,) for part in uniq.split(counts.tolist())],
                                   self.store.stats)
        keys, values = self.store.keys, self.store.values
        replies = []
        for (ids,) in asked:
            local = ids - lo
            replies.append((torch.cat([keys.index_select(0, local),
                                       values.index_select(0, local)], dim=1),))
        got = self.comm.exchange(replies, self.store.stats)
        rows = torch.cat([g[0] for g in got])  # (U, 2d), in uniq's order
        d = self.store.dim
        ku = rows[:, :d].to(dtype).contiguous()
        vu = rows[:, d:].to(dtype).contiguous()
        if self.device.type != "cpu":
            ku, vu = ku.to(self.device), vu.to(self.device)
        return ku, vu

    def _accumulators(self) -> tuple[RowSparseGrad, RowSparseGrad]:
        return self.used_key_grad, self.used_value_grad

    def send_grads(self) -> None:
        """Move this rank's gradient rows to their owners' accumulators (a collective)."""
        lo, _ = self.plan.rows
        for used, own in ((self.used_key_grad, self.store.key_grad),
                          (self.used_value_grad, self.store.value_grad)):
            order = torch.argsort(used.ids)
            ids, rows = used.ids[order], used.rows[order]
            counts = torch.bincount(self.plan.owner_of_rows(ids),
                                    minlength=self.plan.world).tolist()
            got = self.comm.exchange(list(zip(ids.split(counts), rows.split(counts),
                                              strict=True)), self.store.stats)
            for gids, grows in got:
                if gids.numel():
                    own.add(gids - lo, grows)
            used.zero_()


# ---------------------------------------------------------------------- the run
class DataParallel:
    """This process's place in a data-parallel run, and the steps the trainer delegates."""

    def __init__(self, rank: int, world: int, *, local_rank: int = 0,
                 local_world: int | None = None, timeout_s: float = 300.0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.local_world = local_world if local_world is not None else world
        self.comm = Comm(rank, world, timeout_s=timeout_s)

    @classmethod
    def from_env(cls, device: torch.device, *, timeout_s: float = 300.0
                 ) -> DataParallel | None:
        """Join the run torchrun started (None when WORLD_SIZE is 1 or unset)."""
        if world_size() == 1:
            return None
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend,
                                        timeout=datetime.timedelta(seconds=timeout_s))
            except (ValueError, dist.DistError) as err:
                raise ConfigError(f"cannot join the distributed run ({err}); start it with "
                                  "torchrun") from None
        return cls(dist.get_rank(), dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
                   timeout_s=timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def plan(self, n_neurons: int, n_experts: int) -> ShardPlan:
        return ShardPlan(n_neurons, n_experts, self.world, self.rank)

    # ------------------------------------------------------------------ the batch
    def split(self, items: Sequence[_T]) -> list[_T]:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        n = len(items)
        return list(items[n * self.rank // self.world: n * (self.rank + 1) // self.world])

    def micro_batches(self, items: Sequence[_T], micro: int) -> list[list[_T]]:
        """This rank's micro-batches of a global batch, padded with empty ones to the count
        every rank runs (the largest share's)."""
        mine = self.split(items)
        largest = -(-len(items) // self.world)
        count = max(1, -(-largest // micro))
        return [mine[i * micro:(i + 1) * micro] for i in range(count)]

    def idle_forward(self, model: nn.Module, device: torch.device) -> None:
        """A one-token forward without gradients: serve the other ranks' row requests."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    # ------------------------------------------------------------------ the step
    def sync_grads(self, adapters: Sequence[nn.Module], device_tensors: Sequence[Tensor]
                   ) -> None:
        """Host gradient rows to their owners; device gradients summed over ranks."""
        for adapter in adapters:
            if isinstance(adapter, ShardedSparseAdapter):
                adapter.send_grads()
        if not device_tensors:
            return
        for p in device_tensors:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in device_tensors])  # type: ignore[union-attr]
        self.comm.all_reduce(flat)
        start = 0
        for p in device_tensors:
            n = p.numel()
            p.grad.copy_(flat[start:start + n].view_as(p))  # type: ignore[union-attr]
            start += n

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        return self.comm.all_reduce(t).tolist()  # type: ignore[no-any-return]

    def sum_tensor(self, t: Tensor) -> Tensor:
        return self.comm.all_reduce(t.clone())

    def barrier(self) -> None:
        self.comm.barrier()

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (e.g. the output directory it chose)."""
        data = torch.zeros(4096, dtype=torch.uint8)
        if self.is_main:
            raw = (text or "").encode()
            if len(raw) > data.numel():
                raise ConfigError(f"path too long for a distributed run: {text!r}")
            data[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        self.comm._call(dist.broadcast, data, 0)
        return bytes(data[data != 0].tolist()).decode()

    def close(self) -> None:
        """Leave the run: every rank waits here for the others, then the process group goes.
        (A rank that destroyed its group while another still wrote its results was seen to
        die in gloo's teardown: "terminate called without an active exception", SIGABRT.)"""
        if dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()
