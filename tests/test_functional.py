"""The fast sparse adapter against its specification, the dense masked reference."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import Case, ambiguous_tokens, grads_of, make_inputs
from meft.engine.functional import sparse_adapter, sparse_adapter_reference
from meft.engine.routing import (
    bucketed_scores,
    candidate_scores,
    grouped_scores_loop,
    probe,
    select,
)
from meft.engine.sizes import default_experts

CASES = [
    Case(tokens=37, dim=16, neurons=256, experts=16, top_k=8, n_probe=3),
    Case(tokens=64, dim=24, neurons=512, experts=32, top_k=16, n_probe=4),
    Case(tokens=1, dim=8, neurons=64, experts=8, top_k=4, n_probe=2),
    Case(tokens=20, dim=12, neurons=96, experts=6, top_k=48, n_probe=3),  # K = all candidates
    Case(tokens=20, dim=12, neurons=96, experts=6, top_k=10, n_probe=6),  # probe every expert
    Case(tokens=33, dim=8, neurons=40, experts=40, top_k=3, n_probe=5),  # one neuron per expert
    Case(tokens=17, dim=8, neurons=40, experts=1, top_k=7, n_probe=1),  # a single expert
]
NAMES = ["y", "dx", "dkeys", "dvalues", "drouter"]


@pytest.mark.parametrize("gate", ["product", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c.tokens}N{c.neurons}E{c.experts}")
def test_fast_equals_reference_float64(case: Case, gate: str) -> None:
    for seed in range(3):
        x, k, v, r, dy = make_inputs(case, torch.float64, seed)
        kw = dict(top_k=case.top_k, n_probe=case.n_probe, gate=gate)
        fast = grads_of(sparse_adapter, x, k, v, r, dy, **kw)
        ref = grads_of(sparse_adapter_reference, x, k, v, r, dy, **kw)
        for name, a, b in zip(NAMES, fast, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
        assert fast[2].abs().sum() > 0 and fast[3].abs().sum() > 0


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_leading_dims_and_sparse_grads(sparse_grad: bool) -> None:
    case = CASES[1]
    x, k, v, r, dy = make_inputs(case, torch.float64, 7, lead=(2, 3))
    kw = dict(top_k=case.top_k, n_probe=case.n_probe)
    fast = grads_of(sparse_adapter, x, k, v, r, dy, sparse_grad=sparse_grad, **kw)
    ref = grads_of(sparse_adapter_reference, x, k, v, r, dy, **kw)
    assert fast[0].shape == x.shape
    for name, a, b in zip(NAMES, fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_sparse_grad_is_row_sparse() -> None:
    case = CASES[1]
    x, k, v, r, dy = make_inputs(case, torch.float32, 3)
    k.requires_grad_(True)
    v.requires_grad_(True)
    sparse_adapter(x, k, v, r, top_k=case.top_k, n_probe=case.n_probe, sparse_grad=True
                   ).backward(dy)
    for grad in (k.grad, v.grad):
        assert grad is not None and grad.is_sparse
        rows = grad.coalesce().indices()[0]
        assert 0 < rows.numel() < case.neurons
        assert rows.numel() <= case.tokens * case.top_k


@pytest.mark.parametrize(
    ("dtype", "rel_tol", "tol", "min_kept"),
    [(torch.float32, 1e-4, 2e-4, 0.9), (torch.bfloat16, 2e-2, 6e-2, 0.5)],
)
@pytest.mark.parametrize("gate", ["product", "none"])
def test_fast_equals_reference_low_precision(dtype: torch.dtype, rel_tol: float, tol: float,
                                             min_kept: float, gate: str) -> None:
    """Tokens within rounding of a tie may legitimately choose differently: those get dy = 0
    and are left out of the forward comparison; every other token must agree."""
    case = Case(tokens=96, dim=32, neurons=384, experts=24, top_k=12, n_probe=4)
    for seed in range(3):
        x, k, v, r, dy = make_inputs(case, dtype, 100 + seed)
        kw = dict(top_k=case.top_k, n_probe=case.n_probe, gate=gate)
        bad = ambiguous_tokens(x, k, r, rel_tol=rel_tol, **kw)
        assert (~bad).float().mean() >= min_kept
        dy[bad] = 0
        fast = grads_of(sparse_adapter, x, k, v, r, dy, **kw)
        ref = grads_of(sparse_adapter_reference, x, k, v, r, dy, **kw)
        assert fast[0].dtype == dtype
        fast[0], ref[0] = fast[0][~bad], ref[0][~bad]
        for name, a, b in zip(NAMES, fast, ref, strict=True):
            scale = b.double().abs().max().item() + 1e-6
            err = (a.double() - b.double()).abs().max().item()
            assert err <= tol * scale, f"{name}: {err} > {tol} * {scale}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_scores_match_loop_and_dense(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    t, d, e, b, p = 50, 16, 12, 8, 3
    x = torch.randn(t, d, generator=gen).to(dtype)
    keys = torch.randn(e * b, d, generator=gen).to(dtype)
    probe_ids = torch.stack([torch.randperm(e, generator=gen)[:p] for _ in range(t)])
    probe_ids[:10] = 0  # a crowded expert; some experts stay empty
    got = candidate_scores(x, keys.view(e, b, d), probe_ids).double()  # (T, P, B)
    dense = (x.double() @ keys.double().T).view(t, e, b)
    want = dense.gather(1, probe_ids.unsqueeze(-1).expand(t, p, b))
    tol = 1e-12 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 5e-2)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * dense.abs().max().item())
    flat = probe_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // p]
    counts = torch.bincount(flat, minlength=e)
    loop = grouped_scores_loop(xs, keys.view(e, b, d), counts)
    torch.testing.assert_close(got.view(t * p, b)[order], loop.double(), rtol=tol,
                               atol=tol * dense.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bucketed_scores_match_the_loop(dtype: torch.dtype) -> None:
    """Groups of every size class (1, 2, 3, 5 ... 70 rows), empty experts between them, fresh
    random rows: the padded batched matmuls give the loop's scores (up to summation order),
    and so when every row is on one expert."""
    gen = torch.Generator().manual_seed(5)
    e, b, d = 20, 8, 24
    counts = torch.tensor([0, 1, 2, 3, 0, 5, 8, 9, 0, 0, 16, 17, 33, 70, 1, 4, 0, 2, 7, 1])
    xs = torch.randn(int(counts.sum()), d, generator=gen).to(dtype)
    blocks = torch.randn(e, b, d, generator=gen).to(dtype)
    got, loop = bucketed_scores(xs, blocks, counts), grouped_scores_loop(xs, blocks, counts)
    assert got.dtype == dtype and got.shape == loop.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), loop.double(), rtol=tol, atol=tol * 10)
    one = torch.zeros(e, dtype=torch.long)
    one[3] = xs.shape[0]  # every row on one expert
    torch.testing.assert_close(bucketed_scores(xs, blocks, one).double(),
                               grouped_scores_loop(xs, blocks, one).double(), rtol=tol,
                               atol=tol * 10)


def test_bucketed_scores_reuse_their_buffer_safely() -> None:
    """The probed key blocks are gathered into a buffer reused from call to call (per thread
    and dtype): a result stays as it was when later calls, smaller and larger, reuse and grow
    the buffer; the same call again, or in a fresh thread with its own buffer, gives the same
    bits; and each call still equals the loop."""
    gen = torch.Generator().manual_seed(11)

    def case(e: int, b: int, d: int, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        counts = torch.bincount(torch.randint(0, e, (rows,), generator=gen), minlength=e)
        xs = torch.randn(rows, d, generator=gen).to(torch.bfloat16)
        return xs, torch.randn(e, b, d, generator=gen).to(torch.bfloat16), counts

    first = case(16, 8, 24, 60)
    got = bucketed_scores(*first)
    kept = got.clone()
    for args in (case(64, 16, 40, 500), case(4, 2, 8, 5)):  # grows the buffer, then reuses it
        torch.testing.assert_close(bucketed_scores(*args).double(),
                                   grouped_scores_loop(*args).double(), rtol=2e-2, atol=0.2)
    assert torch.equal(got, kept)
    assert torch.equal(bucketed_scores(*first), kept)
    other: list[Tensor] = []
    worker = threading.Thread(target=lambda: other.append(bucketed_scores(*first)))
    worker.start()
    worker.join()
    assert torch.equal(other[0], kept)


def test_route_selects_topk_of_probed_candidates() -> None:
    case = CASES[1]
    x, k, _, r, _ = make_inputs(case, torch.float64, 11)
    ids = select(x, k, *probe(x @ r.T, case.n_probe), case.experts, top_k=case.top_k)
    assert ids.shape == (case.tokens, case.top_k) and ids.dtype == torch.long
    assert bool((ids[:, 1:] > ids[:, :-1]).all())  # sorted and distinct per token
    b = case.neurons // case.experts
    g = x @ r.T
    probed = g.topk(case.n_probe, dim=1).indices
    for t in range(case.tokens):
        assert set((ids[t] // b).tolist()) <= set(probed[t].tolist())
    s = g[:, torch.arange(case.neurons) // b] * (x @ k.T)
    chosen = s.gather(1, ids)
    for t in range(case.tokens):
        mask = torch.isin(torch.arange(case.neurons) // b, probed[t])
        mask[ids[t]] = False
        assert chosen[t].min() >= s[t][mask].max()


class _LargestTensor(TorchDispatchMode):
    """Records the largest strided tensor any op allocates (views of inputs are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for t in (*args, *kwargs.values())
                if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided
                    and t.untyped_storage().data_ptr() not in seen):
                self.largest = max(self.largest, t.numel())
        return out


def test_fast_path_never_builds_dense_tensors() -> None:
    """No (T, N) score matrix in forward, no (N, d) gradient in backward with sparse_grad."""
    case = Case(tokens=64, dim=16, neurons=4096, experts=256, top_k=8, n_probe=4)
    x, k, v, r, dy = make_inputs(case, torch.float32, 0)
    for t in (x, k, v, r):
        t.requires_grad_(True)
    with _LargestTensor() as mode:
        y = sparse_adapter(x, k, v, r, top_k=case.top_k, n_probe=case.n_probe, sparse_grad=True)
        y.backward(dy)
    b = case.neurons // case.experts
    t = case.tokens
    # g (T, E), candidates (T, P*B), staged rows (U <= T*K, d), (N,) index maps
    assert mode.largest <= max(t * case.experts, t * case.n_probe * b,
                               t * case.top_k * case.dim, case.neurons)
    assert mode.largest < t * case.neurons / 4
    with _LargestTensor() as ref_mode:
        sparse_adapter_reference(x, k, v, r, top_k=case.top_k, n_probe=case.n_probe)
    assert ref_mode.largest >= case.tokens * case.neurons  # the check can see a dense tensor


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(neurons=100, experts=7), "must divide"),
        (dict(n_probe=9), "n_probe=9"),
        (dict(top_k=100), "top_k=100"),
        (dict(gate="sigmoid"), "gate must be"),
        (dict(x_dim=5), "last dimension"),
        (dict(values_rows=10), "values shape"),
        (dict(router_dim=3), "router must be"),
        (dict(values_dtype=torch.float64), "share one dtype"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, message: str) -> None:
    n, e, d = kwargs.get("neurons", 64), kwargs.get("experts", 8), 8
    x = torch.randn(4, kwargs.get("x_dim", d))
    keys = torch.randn(n, d)
    values = torch.randn(kwargs.get("values_rows", n), d, dtype=kwargs.get("values_dtype",
                                                                          torch.float32))
    router = torch.randn(e, kwargs.get("router_dim", d))
    for fn in (sparse_adapter, sparse_adapter_reference):
        with pytest.raises(ValueError, match=message):
            fn(x, keys, values, router, top_k=kwargs.get("top_k", 4),
               n_probe=kwargs.get("n_probe", 2), gate=kwargs.get("gate", "product"))


@pytest.mark.parametrize(("n", "e"), [(4096, 256), (16384, 512), (65536, 1024), (3072, 192),
                                      (6144, 256), (100, 50), (7, 7)])
def test_default_experts_divides_and_is_near_4_sqrt_n(n: int, e: int) -> None:
    assert default_experts(n) == e
    assert n % default_experts(n) == 0
