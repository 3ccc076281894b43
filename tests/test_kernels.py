"""The row kernels: each fast primitive against its plain PyTorch definition, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from meft.engine.kernels import (
    bag_sum,
    bag_sum_transposed,
    gate_values,
    pair_dots,
    pair_dots_gather,
    put_rows,
    row_pattern,
    sparse_rows,
)


def _pattern(t: int, k: int, u: int, gen: torch.Generator) -> torch.Tensor:
    """(T, K) distinct positions per token, sorted, covering every row of U at least once."""
    local = torch.stack([torch.randperm(u, generator=gen)[:k] for _ in range(t)]).sort(1).values
    assert t * k >= u
    return local


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_dots_sddmm_equals_gather_and_definition(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    t, k, u, d = 30, 5, 40, 12
    x = torch.randn(t, d, generator=gen).to(dtype)
    table = torch.randn(u, d, generator=gen).to(dtype)
    local = _pattern(t, k, u, gen)
    want = (table[local] * x.unsqueeze(1)).sum(-1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pair_dots(x, table, local), want, rtol=tol, atol=tol)
    torch.testing.assert_close(pair_dots_gather(x, table, local), want, rtol=tol, atol=tol)


def test_bag_sums_equal_index_add() -> None:
    gen = torch.Generator().manual_seed(1)
    t, k, u, d = 25, 4, 60, 9  # some of the U rows are never used: their bags are empty
    local = torch.stack([torch.randperm(u, generator=gen)[:k] for _ in range(t)])
    w = torch.randn(t, k, generator=gen, dtype=torch.float64)
    table = torch.randn(u, d, generator=gen, dtype=torch.float64)
    src = torch.randn(t, d, generator=gen, dtype=torch.float64)
    fwd = (w.unsqueeze(-1) * table[local]).sum(1)
    torch.testing.assert_close(bag_sum(local, table, w), fwd)
    back = torch.zeros(u, d, dtype=torch.float64).index_add_(
        0, local.reshape(-1), (w.unsqueeze(-1) * src.unsqueeze(1)).reshape(-1, d))
    torch.testing.assert_close(bag_sum_transposed(row_pattern(local, u), src, w), back)


@pytest.mark.parametrize("gated", [True, False])
def test_sparse_rows_gradcheck(gated: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    t, k, u, d = 6, 3, 10, 5
    local = _pattern(t, k, u, gen)
    x = torch.randn(t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(t, k, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(gated)
    ku = torch.randn(u, d, generator=gen, dtype=torch.float64, requires_grad=True)
    vu = torch.randn(u, d, generator=gen, dtype=torch.float64, requires_grad=True)
    # keep every score away from ReLU's kink so finite differences are valid
    with torch.no_grad():
        a = pair_dots(x, ku, local)
        assert a.abs().min() > 1e-3

    def fn(x: torch.Tensor, g: torch.Tensor, ku: torch.Tensor, vu: torch.Tensor) -> torch.Tensor:
        return sparse_rows(x, g if gated else None, ku, vu, local)

    assert torch.autograd.gradcheck(fn, (x, g, ku, vu), eps=1e-6, atol=1e-7)


def test_sparse_rows_matches_dense_definition_bfloat16() -> None:
    gen = torch.Generator().manual_seed(3)
    t, k, u, d = 40, 6, 50, 16
    local = _pattern(t, k, u, gen)
    x = torch.randn(t, d, generator=gen).bfloat16()
    ku = torch.randn(u, d, generator=gen).bfloat16()
    vu = torch.randn(u, d, generator=gen).bfloat16()
    y = sparse_rows(x, None, ku, vu, local)
    assert y.dtype == torch.bfloat16
    a = (ku.double()[local] * x.double().unsqueeze(1)).sum(-1)
    want = (torch.relu(a).unsqueeze(-1) * vu.double()[local]).sum(1)
    err = (y.double() - want).abs().max() / want.abs().max()
    assert err < 3e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_values_equal_autograd_through_dense_router_scores(seed: int) -> None:
    """gate_values is g.gather(1, experts) with g = x @ router.T, forward and both gradients;
    a token's K picks repeat experts (K > P), its last probe is never picked, and the last
    expert is never probed."""
    gen = torch.Generator().manual_seed(seed)
    t, e, p, k, d = 37, 11, 3, 7, 6
    x = torch.randn(t, d, generator=gen, dtype=torch.float64)
    router = torch.randn(e, d, generator=gen, dtype=torch.float64)
    probe_ids = torch.stack([torch.randperm(e - 1, generator=gen)[:p] for _ in range(t)])
    experts = probe_ids.gather(1, torch.randint(0, p - 1, (t, k), generator=gen))
    dy = torch.randn(t, k, generator=gen, dtype=torch.float64)

    xa, ra = x.clone().requires_grad_(), router.clone().requires_grad_()
    want = (xa @ ra.T).gather(1, experts)
    want.backward(dy)
    xb, rb = x.clone().requires_grad_(), router.clone().requires_grad_()
    got = gate_values(xb, rb, (x @ router.T), probe_ids, experts)
    got.backward(dy)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rb.grad, ra.grad, rtol=1e-12, atol=1e-12)
    assert rb.grad[e - 1].eq(0).all() and rb.grad[:-1].ne(0).any(1).all()
    torch.autograd.gradcheck(lambda a, r: gate_values(a, r, a @ r.T, probe_ids, experts),
                             (xb.detach().requires_grad_(), rb.detach().requires_grad_()))


@pytest.mark.parametrize(("dtype", "width"), [
    (torch.float32, 576), (torch.float32, 12), (torch.float32, 10), (torch.float64, 6),
    (torch.bfloat16, 64), (torch.uint8, 48), (torch.uint8, 7), (torch.int64, 3)])
def test_put_rows_copies_the_bits_of_index_copy(dtype: torch.dtype, width: int) -> None:
    """Any bit pattern (NaN payloads, denormals, -0.0) lands as index_copy_ puts it, whether
    the rows go as 16-byte elements (widths of whole 16 bytes) or one element at a time."""
    gen = torch.Generator().manual_seed(width)
    n, r = 50, 17
    def bits(*shape: int) -> torch.Tensor:
        raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * torch.empty(0, dtype=dtype)
                                     .element_size()), generator=gen, dtype=torch.uint8)
        return raw.view(dtype)
    table, rows = bits(n, width), bits(r, width)
    ids = torch.randperm(n, generator=gen)[:r]
    want = table.clone().index_copy_(0, ids, rows)
    got = table.clone()
    assert put_rows(got, ids, rows) is got
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # a strided source (every other column) takes the per-element path and agrees too
    wide = bits(r, 2 * width)[:, ::2]
    got2 = table.clone()
    put_rows(got2, ids, wide)
    assert torch.equal(got2.view(torch.uint8), table.clone().index_copy_(0, ids, wide)
                       .view(torch.uint8))


def test_gate_values_under_autocast_match_autograd_and_keep_input_dtypes() -> None:
    """Under CPU autocast g is bf16 while x and the router stay fp32 (TRL, Trainer --bf16):
    the gradients come back in each input's dtype, as through the autocast matmul."""
    gen = torch.Generator().manual_seed(3)
    t, e, p, k, d = 16, 8, 2, 4, 32
    x = torch.randn(t, d, generator=gen)
    router = torch.randn(e, d, generator=gen)
    probe_ids = torch.stack([torch.randperm(e, generator=gen)[:p] for _ in range(t)])
    experts = probe_ids.gather(1, torch.randint(0, p, (t, k), generator=gen))
    dy = torch.randn(t, k, generator=gen)
    grads = []
    for fast in (False, True):
        xa, ra = x.clone().requires_grad_(), router.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = xa @ ra.T
            out = (gate_values(xa, ra, g.detach(), probe_ids, experts) if fast
                   else g.gather(1, experts))
        assert out.dtype == torch.bfloat16
        out.backward(dy.to(out.dtype))
        assert xa.grad.dtype == ra.grad.dtype == torch.float32
        grads.append((xa.grad, ra.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
