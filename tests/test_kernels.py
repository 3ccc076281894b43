"""The row kernels: each fast primitive against its plain PyTorch definition, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from meft.kernels import (
    bag_sum,
    bag_sum_transposed,
    pair_dots,
    pair_dots_gather,
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
