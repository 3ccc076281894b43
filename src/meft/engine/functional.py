"""The MEFT sparse adapter as a function: the fast op and its dense masked reference.

    y = sparse_adapter(x, keys, values, router, top_k=K, n_probe=P, gate="product")

x (..., d), keys (N, d), values (N, d), router (E, d) -> y (..., d). Neuron i belongs to
expert i // (N // E). See :mod:`meft.engine.routing` for the selection and
:mod:`meft.engine.kernels` for the exact output and gradients. Letters: T tokens, d hidden, N
neurons, K kept per token, E experts, P probed, U union of the selected ids.

Fast path (``sparse_adapter``):
    g = x W_g^T                         (T, E)   no autograd, on x's device
    ids = select(x, keys, probe(g))     (T, K)   no autograd; scores only probed experts' keys
    U, local = unique(ids)              (U,), (T, K)
    ku, vu = keys[U], values[U]         (U, d)   only as the carriers of the row gradients:
                                                 the kernels read keys[ids] and values[ids] in
                                                 the tables (no gather of U rows); with
                                                 ``sparse_grad=True`` the table gradients are
                                                 sparse COO (U rows), as ``F.embedding``'s
    gsel = g[t, e(ids)]                 (T, K)   product gate only; differentiable in x and
                                                 W_g through the probed experts' rows
                                                 (:func:`meft.engine.kernels.gate_values`)
    y = sparse_rows(x, gsel, ku, vu, local, tables=(keys, values), ids=ids)

Reference (``sparse_adapter_reference``), the specification: score every key, mask the
experts not probed with -inf, take the top-K of the masked scores as a dense (T, N) mask, and
y = (ReLU(s) * mask) @ values. Autograd through it defines the gradients: to x, to the selected
key and value rows, and to the router rows of the experts used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from meft.engine.kernels import gate_values, gradient_carrier, sparse_rows
from meft.engine.routing import check_adapter_args, probe, select


def sparse_adapter(
    x: Tensor,
    keys: Tensor,
    values: Tensor,
    router: Tensor,
    *,
    top_k: int,
    n_probe: int,
    gate: str = "product",
    sparse_grad: bool = False,
) -> Tensor:
    """Fast sparse adapter. Gradients flow to x, keys, values and router.

    With ``sparse_grad=True`` keys and values receive sparse COO gradients holding only the
    U selected rows (as ``nn.Embedding(sparse=True)`` does); otherwise dense (N, d) ones.
    """
    check_adapter_args(x, keys, values, router, top_k=top_k, n_probe=n_probe, gate=gate)
    d = x.shape[-1]
    n_per_expert = keys.shape[0] // router.shape[0]
    x2 = x.reshape(-1, d)  # (T, d)
    with torch.no_grad():
        g = x2 @ router.T  # (T, E)
    probe_scores, probe_ids = probe(g, n_probe)  # (T, P) each
    ids = select(x2.detach(), keys.detach(), probe_scores, probe_ids, router.shape[0],
                 top_k=top_k, gate=gate)  # (T, K)
    uniq, local = torch.unique(ids, return_inverse=True)  # (U,), (T, K)
    ku = _RowGrads.apply(keys, uniq, sparse_grad)  # (U, d), never read
    vu = _RowGrads.apply(values, uniq, sparse_grad)  # (U, d), never read
    gsel = (gate_values(x2, router, g, probe_ids, ids // n_per_expert)
            if gate == "product" else None)  # (T, K)
    y = sparse_rows(x2, gsel, ku, vu, local, tables=(keys.detach(), values.detach()), ids=ids)
    return y.reshape(x.shape)


class _RowGrads(torch.autograd.Function):
    """table[uniq] for the gradient only: forward returns a (U, d) placeholder of zeros (the
    kernels read the rows in the table), backward gives the table the (U, d) row gradient,
    sparse COO or dense, as ``F.embedding(uniq, table, sparse=...)`` would (uniq is unique,
    so each row receives exactly its own gradient row)."""

    @staticmethod
    def forward(ctx: Any, table: Tensor, uniq: Tensor,  # type: ignore[override]
                sparse: bool) -> Tensor:
        ctx.save_for_backward(uniq)
        ctx.shape, ctx.sparse = table.shape, sparse
        return gradient_carrier(table, uniq.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (uniq,) = ctx.saved_tensors
        if ctx.sparse:
            return (torch.sparse_coo_tensor(uniq.unsqueeze(0), grad, ctx.shape,
                                            check_invariants=False, is_coalesced=True),
                    None, None)
        return grad.new_zeros(ctx.shape).index_copy_(0, uniq, grad), None, None


def sparse_adapter_reference(
    x: Tensor,
    keys: Tensor,
    values: Tensor,
    router: Tensor,
    *,
    top_k: int,
    n_probe: int,
    gate: str = "product",
) -> Tensor:
    """Dense masked computation of :func:`sparse_adapter`: O(T*N*d), the specification."""
    check_adapter_args(x, keys, values, router, top_k=top_k, n_probe=n_probe, gate=gate)
    n, d = keys.shape
    e = router.shape[0]
    x2 = x.reshape(-1, d)  # (T, d)
    expert_of = torch.arange(n, device=keys.device) // (n // e)  # (N,)
    g = x2 @ router.T  # (T, E)
    a = x2 @ keys.T  # (T, N)
    probe = g.topk(n_probe, dim=1).indices  # (T, P)
    probed = torch.zeros_like(g, dtype=torch.bool).scatter_(1, probe, True)[:, expert_of]
    s = g[:, expert_of] * a if gate == "product" else a  # (T, N)
    chosen = s.detach().masked_fill(~probed, float("-inf")).topk(top_k, dim=1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, chosen, True)  # (T, N)
    y = (torch.relu(s) * mask) @ values
    return y.reshape(x.shape)
