"""Host store and its row-sparse gradient accumulator."""

from __future__ import annotations

import pytest
import torch

from meft.engine.routing import router_init
from meft.engine.store import HostStore, RowSparseGrad, TransferStats


def test_row_sparse_grad_accumulates_like_a_dense_index_add() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 50, 7
    acc = RowSparseGrad(n, d, dtype=torch.float64)
    dense = torch.zeros(n, d, dtype=torch.float64)
    first = torch.arange(0, n, 3)  # distinct fresh rows: the copy path
    rows0 = torch.randn(first.numel(), d, generator=gen, dtype=torch.float64)
    acc.add(first, rows0)
    dense.index_add_(0, first, rows0)
    for _ in range(6):  # several micro-batches, ids repeating within and across them
        ids = torch.randint(0, n, (13,), generator=gen)
        rows = torch.randn(13, d, generator=gen, dtype=torch.float64)
        acc.add(ids, rows)
        dense.index_add_(0, ids, rows)
    torch.testing.assert_close(acc.to_dense(), dense)
    touched = set(torch.nonzero(dense.abs().sum(1)).flatten().tolist())
    assert set(acc.ids.tolist()) == touched
    assert len(acc) == len(touched) == len(set(acc.ids.tolist()))
    assert acc.sq_norm().item() == pytest.approx(dense.pow(2).sum().item())
    acc.scale_(0.5)
    torch.testing.assert_close(acc.to_dense(), dense * 0.5)


def test_row_sparse_grad_zero_then_reuse() -> None:
    acc = RowSparseGrad(10, 3)
    acc.add(torch.tensor([1, 2]), torch.ones(2, 3))
    acc.zero_()
    assert len(acc) == 0
    acc.add(torch.tensor([2, 5]), torch.full((2, 3), 2.0))
    want = torch.zeros(10, 3)
    want[[2, 5]] = 2.0
    torch.testing.assert_close(acc.to_dense(), want)  # row 1 and the old row 2 are gone


def test_row_sparse_grad_keep_is_a_masked_dense_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d = 40, 5
    acc = RowSparseGrad(n, d, dtype=torch.float64)
    dense = torch.zeros(n, d, dtype=torch.float64)
    for _ in range(3):
        ids = torch.randint(0, n, (17,), generator=gen)
        rows = torch.randn(17, d, generator=gen, dtype=torch.float64)
        acc.add(ids, rows, adopt=True)
        dense.index_add_(0, ids, rows)
    keep = torch.rand(len(acc), generator=gen) < 0.5
    kept = acc.ids[keep].tolist()
    acc.keep_(keep)
    mask = torch.zeros(n, 1, dtype=torch.float64)
    mask[kept] = 1
    torch.testing.assert_close(acc.to_dense(), dense * mask)
    assert acc.ids.tolist() == kept  # order kept, dropped rows forgotten
    more = torch.randn(n, d, generator=gen, dtype=torch.float64)  # accumulating still works
    acc.add(torch.arange(n), more)
    torch.testing.assert_close(acc.to_dense(), dense * mask + more)
    with pytest.raises(ValueError, match="keep must be"):
        acc.keep_(torch.ones(3, dtype=torch.bool))


def test_row_sparse_grad_adopts_the_first_rows_then_grows() -> None:
    acc = RowSparseGrad(20, 4, dtype=torch.float64)
    first = torch.randn(3, 4, dtype=torch.float64)
    acc.add(torch.tensor([7, 2, 9]), first, adopt=True)
    assert acc.rows.data_ptr() == first.data_ptr()  # handed over, not copied
    more = torch.randn(4, 4, dtype=torch.float64)
    acc.add(torch.tensor([2, 11, 12, 13]), more, adopt=True)  # not empty: accumulated
    want = torch.zeros(20, 4, dtype=torch.float64)
    want[[7, 2, 9]] += first
    want[[2, 11, 12, 13]] += more
    torch.testing.assert_close(acc.to_dense(), want)
    assert sorted(acc.ids.tolist()) == [2, 7, 9, 11, 12, 13]


def test_row_sparse_grad_rejects_bad_shapes() -> None:
    acc = RowSparseGrad(10, 3)
    with pytest.raises(ValueError, match="expected ids"):
        acc.add(torch.tensor([1, 2]), torch.ones(3, 3))


def test_host_store_initialisation_and_validation() -> None:
    gen = torch.Generator().manual_seed(0)
    store = HostStore.initialize(4096, 32, generator=gen)
    assert store.keys.shape == (4096, 32) and store.keys.dtype == torch.float32
    assert store.values.abs().sum() == 0  # values start at zero: identity at step 0
    assert abs(store.keys.std().item() - 0.02) < 1e-3
    assert store.nbytes == 2 * 4096 * 32 * 4
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        HostStore(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        HostStore(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64))


def test_router_init_schemes() -> None:
    keys = torch.randn(64, 8, dtype=torch.float64) * 0.02
    r = router_init(keys, 8, scheme="key_mean")
    torch.testing.assert_close(r[3], keys[24:32].mean(0) * 8**0.5)
    assert router_init(keys, 8, scheme="normal").shape == (8, 8)
    with pytest.raises(ValueError, match="router init scheme"):
        router_init(keys, 8, scheme="zeros")
    # dtype=: what converting the keys first gave, without the converted copy of the table
    stored = keys.to(torch.bfloat16)
    for scheme in ("normal", "key_mean"):
        want = router_init(stored.float(), 8, scheme=scheme,
                           generator=torch.Generator().manual_seed(1))
        got = router_init(stored, 8, scheme=scheme, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_transfer_stats_reset_keeps_history() -> None:
    stats = TransferStats()
    stats.forwards, stats.row_bytes_h2d, stats.index_bytes_h2d = 2, 100, 8
    assert stats.bytes_h2d == 108
    stats.reset(keep_history=True)
    assert stats.forwards == 0 and stats.bytes_h2d == 0
    assert stats.history[0]["bytes_h2d"] == 108
