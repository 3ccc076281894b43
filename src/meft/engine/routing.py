"""Routing: which K neurons each token uses (method steps 1-3), computed without autograd.

Dimension letters used in every module of meft:
    T tokens (all leading dims of x flattened), d hidden size, N adapter neurons per layer,
    K neurons kept per token (``top_k``), E experts per layer, P experts probed per token
    (``n_probe``), B = N // E neurons per expert, U size of the union of the ids selected by
    a batch.

Neuron i belongs to expert ``i // B`` (contiguous blocks), so the keys viewed as (E, B, d) are
the experts' key blocks without any copy.

For token t with router scores g_t = W_g x_t (E,):
    1. probe the top-P experts by raw score g_t,
    2. score the P*B candidates of those experts: s_{t,i} = g_{t,e(i)} * (k_i . x_t) with the
       "product" gate, or s_{t,i} = k_i . x_t with gate "none",
    3. keep the top-K candidates by s.

Cost. Step 2 is the only large product. The T*P (token, expert) pairs are sorted by expert and
each expert's key block multiplies the block of tokens that probed it, as one grouped matmul
(``torch.nn.functional.grouped_mm``; a per-expert loop where that kernel is unavailable, e.g.
float64; for bf16 keys one batched matmul per power-of-two group size,
:func:`bucketed_scores`). That is T*P*B*d multiply-adds, plus T*E*d for the router:
O(T*d*(E + P*N/E)), i.e. O(T*d*sqrt(N)) with E ~ sqrt(N), instead of T*N*d for scoring every
key. No (T, N) tensor is ever built; the largest intermediate is the (T, P*B) candidate score
matrix.

Routing is not differentiable (a discrete choice); gradients flow through the recomputed scores
of the selected neurons only (see :mod:`meft.engine.kernels`).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from meft.engine.kernels import put_rows
from meft.engine.sizes import check_routing_sizes
from meft.sysinfo import half_matmul_native

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# half-precision tables: their candidates are scored by batched matmuls (_grouped_scores),
# and they probe in their dtype (meft.engine.offload) where the CPU has native half matmuls
HALF_DTYPES = (torch.bfloat16, torch.float16)


def routing_dtype(table_dtype: torch.dtype) -> torch.dtype:
    """The dtype the host routes tables of ``table_dtype`` in: their own, except half tables
    on a CPU without native half matmuls (:func:`meft.sysinfo.half_matmul_native`), which
    route in float32: the probed key blocks are converted as they are gathered
    (:func:`bucketed_scores`), so the storage stays compact and only the arithmetic changes."""
    if table_dtype in HALF_DTYPES and not half_matmul_native(table_dtype):
        return torch.float32
    return table_dtype


def check_adapter_args(
    x: Tensor,
    keys: Tensor,
    values: Tensor,
    router: Tensor,
    *,
    top_k: int,
    n_probe: int,
    gate: str,
) -> None:
    """Raise a one-line ``ValueError`` naming the first inconsistent argument."""
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D (N, d), got shape {tuple(keys.shape)}")
    n, d = keys.shape
    if values.shape != keys.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} does not match keys shape {tuple(keys.shape)}"
        )
    if router.dim() != 2 or router.shape[1] != d:
        raise ValueError(f"router must be (E, d={d}), got shape {tuple(router.shape)}")
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have last dimension d={d}, got shape {tuple(x.shape)}")
    dtypes = {x.dtype, keys.dtype, values.dtype, router.dtype}
    if len(dtypes) != 1:
        raise ValueError(
            "x, keys, values and router must share one dtype, got "
            f"x={x.dtype}, keys={keys.dtype}, values={values.dtype}, router={router.dtype}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"sparse_adapter needs floating-point tensors, got {x.dtype}")
    check_routing_sizes(n, router.shape[0], top_k=top_k, n_probe=n_probe, gate=gate)


def _grouped_scores(xs: Tensor, key_blocks: Tensor, counts: Tensor) -> Tensor:
    """Rows of xs (R, d), grouped by expert with counts (E,), times their expert's keys.

    key_blocks (E, B, d). Row r of group e gives xs[r] @ key_blocks[e].T -> (R, B).
    """
    # half-precision keys (bf16 tables): the CPU grouped matmul runs one small matmul per
    # probed expert, ~13 us each in bf16 (7.6 in fp32); a few batched matmuls over padded
    # groups take 3.1 against 7.0-7.3 ms per layer at N=65,536 with a real step's group sizes
    # (368 of E=1024 experts probed, the largest group 302 rows; 6.6 against 8.1 inside a
    # training step; benchmarks/results/step-time/ratio-b166f7c); in fp32 they are no faster
    if (xs.dtype in HALF_DTYPES or key_blocks.dtype != xs.dtype) and xs.device.type == "cpu":
        return bucketed_scores(xs, key_blocks, counts)  # (half keys scored in fp32: converted)
    if _grouped_mm is not None and xs.dtype in _GROUPED_MM_DTYPES and xs.device.type == "cpu":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        out: Tensor = _grouped_mm(xs, key_blocks.transpose(1, 2), offs=offs)
        return out
    return grouped_scores_loop(xs, key_blocks, counts)


def bucketed_scores(xs: Tensor, key_blocks: Tensor, counts: Tensor) -> Tensor:
    """:func:`_grouped_scores` as one batched matmul per size class: the non-empty groups with
    2^(k-1) < count <= 2^k are zero-padded to 2^k rows, (E_k, 2^k, d) @ (E_k, d, B) with their
    key blocks gathered (E_k, B, d), and the valid rows put back. At most ~log2(R) + 1
    matmuls instead of one per expert and at most 2x the multiply-adds; a crowded expert is
    in a class of its own, so skewed routing pays no padding for it."""
    r, d = xs.shape
    b = key_blocks.shape[1]
    out = xs.new_empty(r, b)
    nonempty = counts.nonzero().squeeze(1)  # (E',)
    n = counts.index_select(0, nonempty)  # (E',) rows per group
    start = (torch.cumsum(counts, 0) - counts).index_select(0, nonempty)  # (E',) first row
    size_class = torch.ceil(torch.log2(n.double())).long()  # (E',): padded to 2^k rows
    # the probed experts' key blocks, gathered class after class into one reused buffer, in
    # xs's dtype (half keys scored in fp32 are converted here, block by block)
    blocks = _scratch(nonempty.numel() * b * d, xs.dtype, key_blocks.device)
    first = 0  # of the class's blocks in the buffer
    for k in torch.unique(size_class).tolist():
        chosen = (size_class == k).nonzero().squeeze(1)
        experts = nonempty.index_select(0, chosen)  # (E_k,)
        e_k = experts.numel()
        slot = torch.arange(1 << k, device=xs.device)
        valid = (slot < n.index_select(0, chosen).unsqueeze(1)).view(-1)  # (E_k * 2^k,)
        pos = valid.nonzero().squeeze(1)  # padded slots holding a row
        rows = (start.index_select(0, chosen).unsqueeze(1) + slot).view(-1).index_select(0, pos)
        padded = xs.new_zeros(e_k << k, d).index_copy_(0, pos, xs.index_select(0, rows))
        class_keys = blocks[first * b * d:(first + e_k) * b * d].view(e_k, b, d)
        if key_blocks.dtype == xs.dtype:
            torch.index_select(key_blocks, 0, experts, out=class_keys)
        else:
            class_keys.copy_(key_blocks.index_select(0, experts))
        first += e_k
        scores = torch.bmm(padded.view(e_k, 1 << k, d), class_keys.transpose(1, 2))
        out.index_copy_(0, rows, scores.view(-1, b).index_select(0, pos))
    return out


_SCRATCH = threading.local()  # per thread: {(dtype, device): reused flat buffer}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of ``numel`` elements, reused from call to call (per thread, dtype and
    device; it grows to the largest request, at most the E*B*d of one key table). Gathering
    the probed key blocks into a fresh 27 MB tensor per layer at N=65,536 pays page faults on
    first touch, more with PyTorch's huge-page allocator (benchmarks/results/
    step-time/ratio-5c1717f/gather_buf.txt)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = buffers[(dtype, device)] = torch.empty(numel + numel // 4, dtype=dtype,
                                                     device=device)
    return buf[:numel]


def grouped_scores_loop(xs: Tensor, key_blocks: Tensor, counts: Tensor) -> Tensor:
    """Per-expert loop over the non-empty groups: the portable version of the grouped matmul."""
    out = xs.new_empty(xs.shape[0], key_blocks.shape[1])
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            torch.mm(xs[start : start + c], key_blocks[e].T, out=out[start : start + c])
            start += c
    return out


def candidate_scores(x: Tensor, key_blocks: Tensor, probe_ids: Tensor) -> Tensor:
    """Key scores k_i . x_t of every candidate: x (T, d), key_blocks (E, B, d),
    probe_ids (T, P) -> (T, P, B)."""
    t, p = probe_ids.shape
    tokens = torch.arange(t, device=x.device).repeat_interleave(p)  # (T*P,)
    scores = pair_scores(x, key_blocks, tokens, probe_ids.reshape(-1))  # (T*P, B)
    return scores.view(t, p, key_blocks.shape[1])


def pair_scores(x: Tensor, key_blocks: Tensor, tokens: Tensor, experts: Tensor) -> Tensor:
    """Scores of (token, expert) pairs: x (T, d), key_blocks (E, B, d), tokens and experts
    (R,) -> (R, B), row r = key_blocks[experts[r]] @ x[tokens[r]]. The pairs are grouped by
    expert (stable sort) for one grouped matmul and put back in their order."""
    order = torch.argsort(experts, stable=True)  # pairs grouped by expert
    counts = torch.bincount(experts, minlength=key_blocks.shape[0])  # (E,)
    xs = x.index_select(0, tokens.index_select(0, order))  # (R, d)
    scores_sorted = _grouped_scores(xs, key_blocks, counts)  # (R, B)
    return put_rows(torch.empty_like(scores_sorted), order, scores_sorted)


@torch.no_grad()
def probe(gate_scores: Tensor, n_probe: int) -> tuple[Tensor, Tensor]:
    """Step 1: g (T, E) -> (scores, expert ids), each (T, P), the top-P experts by raw score."""
    scores, ids = gate_scores.topk(n_probe, dim=1)
    return scores, ids


@torch.no_grad()
def select(
    x: Tensor,
    keys: Tensor,
    probe_scores: Tensor,
    probe_ids: Tensor,
    n_experts: int,
    *,
    top_k: int,
    gate: str = "product",
) -> Tensor:
    """Steps 2-3: x (T, d), keys (N, d), probe scores and expert ids (T, P) -> ids (T, K).

    ids are int64 global neuron ids, sorted ascending within each token (the order is
    irrelevant to the math; sorted rows make valid CSR patterns for the kernels).
    """
    t, d = x.shape
    b = keys.shape[0] // n_experts
    p = probe_ids.shape[1]
    scores = candidate_scores(x, keys.view(n_experts, b, d), probe_ids)  # (T, P, B)
    if gate == "product":
        scores = scores * probe_scores.unsqueeze(-1)
    # the K best candidate slots (T, K) in no order (the same set as a sorted top-K: the
    # selection does not depend on ``sorted``; ids are sorted below)
    top = scores.view(t, p * b).topk(top_k, dim=1, sorted=False).indices
    ids = probe_ids.gather(1, top // b) * b + top % b  # (T, K) global neuron ids
    return ids.sort(dim=1).values


def router_init(keys: Tensor, n_experts: int, *, scheme: str = "normal", std: float = 0.02,
                generator: torch.Generator | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
    """Router (E, d) in ``dtype`` (default the keys'): ``normal`` ~ N(0, std), or
    ``key_mean``: sqrt(B) x the mean of each expert's keys (the sum over B i.i.d. rows scaled
    back to the keys' std). Only ``key_mean`` reads the keys (a disk store's keys stay on
    disk otherwise)."""
    n, d = keys.shape
    dtype = keys.dtype if dtype is None else dtype
    if scheme == "normal":
        out = torch.empty(n_experts, d, dtype=dtype)
        return out.normal_(0.0, std, generator=generator)
    if scheme == "key_mean":
        b = n // n_experts
        return keys.view(n_experts, b, d).to(dtype).sum(1) / math.sqrt(b)
    raise ValueError(f"router init scheme must be 'normal' or 'key_mean', got {scheme!r}")
