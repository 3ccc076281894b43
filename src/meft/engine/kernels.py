"""The exact, differentiable adapter output from each token's own K neurons (method step 4).

Inputs are already "staged": the union U of the neurons a batch selected, as row tables
ku (U, d) and vu (U, d), and for every token the positions of its K neurons in that union,
``local`` (T, K). With a_{t,k} = ku[local_{t,k}] . x_t and the gate value gsel_{t,k} of the
neuron's expert (product gate; absent for gate "none"):

    s = gsel * a                (T, K)
    w = ReLU(s)                 (T, K)
    y_t = sum_k w_{t,k} vu[local_{t,k}]          (T, d)

Backward, for upstream dy (T, d):

    dw_{t,k}  = dy_t . vu[local_{t,k}]           sampled dense-dense product (SDDMM)
    ds        = dw * [s > 0]
    da        = ds * gsel,   dgsel = ds * a
    dx_t      = sum_k da_{t,k} ku[local_{t,k}]   bag sum over the token's K rows
    dku[u]    = sum_{(t,k): local=u} da_{t,k} x_t     bag sum over the row's tokens
    dvu[u]    = sum_{(t,k): local=u} w_{t,k} dy_t

Every product is T*K*d multiply-adds and none materialises the (T, K, d) gather (75 MB at
T=512, K=64, d=576 in float32): the "bag sums" are ``F.embedding_bag`` with per-sample weights
(the transposed ones use the pattern sorted by row), and the SDDMM is
``torch.sparse.sampled_addmm`` on a CSR pattern where the platform has it (CPU, float32/64),
a chunked gather-and-bmm elsewhere. The gradients for ku and vu are (U, d): row-sparse
gradients of the full tables, never N x d.

Gate values. With the product gate, gsel = g.gather(1, e(ids)) for the router scores
g = x W_g^T (T, E). Autograd through the dense g would spend two (T, E, d) matmuls in
backward on a gradient that is nonzero only at the P probed experts of each token;
:func:`gate_values` takes g computed without autograd and sends the gradient through the
probed router rows only: dg (T, P), dx += bag sum of router rows, dW_g = transposed bag sum
(T*P*d each).

Rows read in place. Where the tables already sit on the compute device in its dtype (a CPU
run with fp32 tables), gathering ku and vu is a copy of 2*U*d numbers that only feeds the
kernels above, and each of them indexes rows anyway: ``sparse_rows(..., tables=(keys, values),
ids=ids)`` reads keys[ids] and values[ids] directly, ids (T, K) being the global rows, and ku,
vu serve only as the (U, d) leaves that receive the gradients (:func:`gradient_carrier`:
zeros of stride 0, never read). The same rows enter the same products in
the same order, so outputs and gradients are bitwise those of the staged path (tested).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_SDDMM_DTYPES = (torch.float32, torch.float64)
_GATHER_CHUNK_ELEMS = 1 << 22  # elements of the (chunk, K, d) gather in the fallback path


def pair_dots(x: Tensor, table: Tensor, local: Tensor) -> Tensor:
    """a_{t,k} = table[local_{t,k}] . x_t for x (T, d), table (U, d), local (T, K) -> (T, K)."""
    t, k = local.shape
    if t == 0 or k == 0:
        return x.new_zeros(t, k)
    if x.device.type == "cpu" and x.dtype in _SDDMM_DTYPES:
        crow = torch.arange(0, t * k + 1, k, device=x.device)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": known
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                crow, local.reshape(-1), x.new_zeros(t * k), (t, table.shape[0]),
                check_invariants=False,
            )
        dots: Tensor = torch.sparse.sampled_addmm(pattern, x, table.T, beta=0.0)
        return dots.values().view(t, k)
    return pair_dots_gather(x, table, local)


def pair_dots_gather(x: Tensor, table: Tensor, local: Tensor) -> Tensor:
    """The portable version of :func:`pair_dots`: gather rows in token chunks, then bmm."""
    t, k = local.shape
    out = x.new_empty(t, k)
    chunk = max(1, _GATHER_CHUNK_ELEMS // max(1, k * x.shape[1]))
    for s in range(0, t, chunk):
        rows = table[local[s : s + chunk]]  # (c, K, d)
        out[s : s + chunk] = torch.bmm(rows, x[s : s + chunk].unsqueeze(-1)).squeeze(-1)
    return out


def bag_sum(local: Tensor, table: Tensor, weights: Tensor) -> Tensor:
    """out_t = sum_k weights_{t,k} table[local_{t,k}]: local, weights (T, K), table (U, d)."""
    return F.embedding_bag(local, table, per_sample_weights=weights, mode="sum")


def put_rows(dst: Tensor, ids: Tensor, src: Tensor) -> Tensor:
    """dst[ids] = src, rows (R, ...) into (N, ...) along dim 0: ``index_copy_``, bitwise.

    CPU ``index_copy_`` moves one element at a time; where both tensors' rows are whole
    multiples of 16 bytes (fp32 rows of d % 4 == 0, int8 codes of d % 16 == 0 ...) they are
    viewed as complex128, so a 576-wide fp32 row is 144 moves instead of 576 (about 3x
    faster at d = 576). The bits are copied, not converted."""
    wide_dst, wide_src = _as_wide_rows(dst), _as_wide_rows(src)
    if wide_dst is None or wide_src is None or wide_dst.shape[1:] != wide_src.shape[1:]:
        return dst.index_copy_(0, ids, src)
    wide_dst.index_copy_(0, ids, wide_src)
    return dst


def _as_wide_rows(t: Tensor) -> Tensor | None:
    """t (R, n) as (R, n * itemsize / 16) complex128 over the same memory, or None."""
    if (t.dim() != 2 or t.dtype.is_complex or t.stride(1) != 1 or t.shape[1] == 0
            or t.device.type != "cpu"):
        return None
    size = t.element_size()
    if ((t.shape[1] * size) % 16 or (t.stride(0) * size) % 16
            or (t.storage_offset() * size) % 16 or t.data_ptr() % 16):
        return None
    return t.view(torch.complex128)


class RowPattern(NamedTuple):
    """The (T, K) pattern sorted by row: bag u of U holds tokens[offsets[u]:offsets[u+1]]."""

    tokens: Tensor  # (T*K,) token of each pair, pairs grouped by row
    offsets: Tensor  # (U,) start of each row's bag
    perm: Tensor  # (T*K,) position of each sorted pair in the flattened (T, K) pattern


def row_pattern(local: Tensor, n_rows: int) -> RowPattern:
    """Group the (token, slot) pairs of local (T, K) by the row u they point to."""
    k = local.shape[1]
    flat = local.reshape(-1)
    perm = torch.argsort(flat, stable=True)  # (T*K,)
    counts = torch.bincount(flat, minlength=n_rows)  # (U,)
    offsets = torch.zeros(n_rows, dtype=torch.long, device=local.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return RowPattern(perm // k, offsets, perm)


def bag_sum_transposed(pattern: RowPattern, src: Tensor, weights: Tensor) -> Tensor:
    """out[u] = sum_{(t,k): local_{t,k} = u} weights_{t,k} src_t -> (U, d).

    weights (T, K); src (T, d); ``pattern`` from :func:`row_pattern`. Each output row is one
    bag of token rows of src, so nothing of size (T, K, d) is built.
    """
    return F.embedding_bag(pattern.tokens, src, pattern.offsets,
                           per_sample_weights=weights.reshape(-1)[pattern.perm], mode="sum")


def rows_output(x: Tensor, gsel: Tensor | None, keys: Tensor, values: Tensor, rows: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of the module doc without autograd: y (T, d), a and s (T, K) from x (T, d),
    gsel (T, K) or None, and the rows ``rows`` (T, K) of keys and values (staged (U, d) with
    local positions, or whole tables with global ids). :func:`sparse_rows` runs exactly this."""
    a = pair_dots(x, keys, rows)  # (T, K)
    s = a * gsel if gsel is not None else a
    return bag_sum(rows, values, torch.relu(s)), a, s


class _SparseRows(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, gsel: Tensor | None, ku: Tensor, vu: Tensor, local: Tensor,
        keys: Tensor, values: Tensor, rows: Tensor,
    ) -> Tensor:
        # keys, values, rows: what is read (ku, vu, local, or the whole tables and global ids)
        y, a, s = rows_output(x, gsel, keys, values, rows)
        ctx.n_rows = ku.shape[0]
        ctx.save_for_backward(x, gsel, keys, values, rows, local, a, s)  # type: ignore[arg-type]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, gsel, keys, values, rows, local, a, s = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_g, need_k, need_v = ctx.needs_input_grad[:4]
        dx = dgsel = dku = dvu = None
        w = torch.relu(s)
        pattern = row_pattern(local, ctx.n_rows)
        if need_v:
            dvu = bag_sum_transposed(pattern, dy, w)
        if need_x or need_g or need_k:
            ds = pair_dots(dy, values, rows) * (s > 0)  # (T, K)
            da = ds * gsel if gsel is not None else ds
            if need_g:
                dgsel = ds * a
            if need_x:
                dx = bag_sum(rows, keys, da)
            if need_k:
                dku = bag_sum_transposed(pattern, x, da)
        return dx, dgsel, dku, dvu, None, None, None, None


class _GateValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, router: Tensor, g: Tensor,  # type: ignore[override]
                probe_ids: Tensor, experts: Tensor) -> Tensor:
        ctx.save_for_backward(x, router, probe_ids, experts)
        ctx.n_experts, ctx.dtype = g.shape[1], g.dtype  # g's dtype: autocast may have set it
        return g.gather(1, experts)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dgsel: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, router, probe_ids, experts = ctx.saved_tensors
        need_x, need_r = ctx.needs_input_grad[:2]
        # dg (T, E) is dgsel summed per expert; only the probed experts can be nonzero
        dg = dgsel.new_zeros(x.shape[0], ctx.n_experts).scatter_add_(1, experts, dgsel)
        dgp = dg.gather(1, probe_ids).to(ctx.dtype)  # (T, P)
        # in g's dtype, as autograd through an autocast matmul, then back to each input's
        dx = bag_sum(probe_ids, router.to(ctx.dtype), dgp).to(x.dtype) if need_x else None
        dr = (bag_sum_transposed(row_pattern(probe_ids, ctx.n_experts), x.to(ctx.dtype), dgp)
              .to(router.dtype) if need_r else None)
        return dx, dr, None, None, None


def gate_values(x: Tensor, router: Tensor, g: Tensor, probe_ids: Tensor,
                experts: Tensor) -> Tensor:
    """gsel_{t,k} = g_{t, experts_{t,k}} (T, K) for g = x @ router.T (T, E) computed without
    autograd; differentiable in x (T, d) and router (E, d).

    Every expert in ``experts`` (T, K) must be one of the token's probes ``probe_ids`` (T, P):
    the gradient is then sparse in the experts, and backward costs T*P*d per product
    (``dx_t = sum_p dg_{t,p} router[probe_{t,p}]`` and its transpose for the router) instead
    of the T*E*d of the two dense matmuls autograd would run through ``g.gather``."""
    out: Tensor = _GateValues.apply(x, router, g, probe_ids, experts)
    return out


def gradient_carrier(like: Tensor, n_rows: int) -> Tensor:
    """An (n_rows, d) stand-in for staged rows read in place: zeros of ``like``'s dtype and
    device with stride 0 (no memory), only there to receive the rows' (U, d) gradient."""
    return like.new_zeros(1, like.shape[-1]).expand(n_rows, like.shape[-1])


def sparse_rows(x: Tensor, gsel: Tensor | None, ku: Tensor, vu: Tensor, local: Tensor, *,
                tables: tuple[Tensor, Tensor] | None = None, ids: Tensor | None = None
                ) -> Tensor:
    """y (T, d) from x (T, d), gate values gsel (T, K) or None, staged rows ku, vu (U, d) and
    positions local (T, K) into them; differentiable in x, gsel, ku and vu.

    With ``tables`` (keys, values), each (N, d), and ``ids`` (T, K), the global rows with
    keys[ids] == ku[local], rows are read from the tables in place and ku, vu only receive
    the gradients (module docstring)."""
    if tables is None:
        keys, values, rows = ku, vu, local
    else:
        if ids is None or ids.shape != local.shape:
            raise ValueError("sparse_rows: tables need ids of the shape of local")
        (keys, values), rows = tables, ids
    out: Tensor = _SparseRows.apply(x, gsel, ku, vu, local, keys, values, rows)
    return out
