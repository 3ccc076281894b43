"""Row-sparse AdamW against torch.optim.AdamW, and global clipping against torch's."""

from __future__ import annotations

import pytest
import torch

from meft.engine.optim import RowSparseAdamW, clip_grad_norm_
from meft.engine.store import HostTable, RowSparseGrad

N, D = 40, 6


def _table(seed: int, dtype: torch.dtype = torch.float64, dim: int = D) -> HostTable:
    gen = torch.Generator().manual_seed(seed)
    return HostTable("t", torch.randn(N, dim, generator=gen, dtype=dtype),
                     RowSparseGrad(N, dim, dtype=dtype))


def _grad(gen: torch.Generator, rows: torch.Tensor, dtype: torch.dtype,
          dim: int = D) -> torch.Tensor:
    return torch.randn(rows.numel(), dim, generator=gen, dtype=dtype)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_mode_equals_torch_adamw(weight_decay: float) -> None:
    table = _table(0)
    param = torch.nn.Parameter(table.data.clone())
    ours = RowSparseAdamW([table], lr=1e-2, weight_decay=weight_decay, mode="dense")
    ref = torch.optim.AdamW([param], lr=1e-2, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        rows = torch.randperm(N, generator=gen)[: 5 + step]  # a few rows each step, or none
        g = _grad(gen, rows, torch.float64)
        ours.zero_grad()
        table.grad.add(rows, g)
        param.grad = table.grad.to_dense()
        ours.step()
        ref.step()
        torch.testing.assert_close(table.data, param.data, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dim", [D, 64])  # the reference path, the fused one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_mode_equals_torch_adamw_when_every_row_is_touched(dtype: torch.dtype,
                                                                 dim: int) -> None:
    table = _table(2, dtype, dim)
    param = torch.nn.Parameter(table.data.clone())
    ours = RowSparseAdamW([table], lr=3e-3, weight_decay=0.05)
    ref = torch.optim.AdamW([param], lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        rows = torch.randperm(N, generator=gen)  # every row, in a random order
        g = _grad(gen, rows, dtype, dim)
        ours.zero_grad()
        table.grad.add(rows, g)
        param.grad = table.grad.to_dense()
        ours.step()
        ref.step()
        tol = 1e-14 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(table.data, param.data, rtol=tol, atol=tol)


def test_lazy_mode_is_per_row_adamw_and_leaves_untouched_rows_alone() -> None:
    """Each row follows its own AdamW, advanced only at the steps that touch it."""
    table = _table(4)
    start = table.data.clone()
    rows_params = [torch.nn.Parameter(table.data[i].clone()) for i in range(N)]
    refs = [torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1) for p in rows_params]
    ours = RowSparseAdamW([table], lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    never = torch.arange(N - 5, N)  # the last five rows are never touched
    touched_steps = torch.zeros(N, dtype=torch.long)
    for _ in range(15):
        rows = torch.randperm(N - 5, generator=gen)[:8]
        g = _grad(gen, rows, torch.float64)
        ours.zero_grad()
        table.grad.add(rows, g)
        ours.step()
        for j, i in enumerate(rows.tolist()):
            rows_params[i].grad = g[j].clone()
            refs[i].step()
            touched_steps[i] += 1
    for i in range(N):
        torch.testing.assert_close(table.data[i], rows_params[i].data, rtol=0, atol=1e-14)
    assert torch.equal(table.data[never], start[never])
    state = ours.state[table.data]
    assert torch.equal(state["step"], touched_steps)
    assert state["exp_avg"][never].abs().sum() == 0


def test_learning_rate_is_settable_and_schedulable() -> None:
    table = _table(6)
    opt = RowSparseAdamW([table], lr=1.0)
    opt.lr = 0.5
    assert opt.param_groups[0]["lr"] == 0.5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    table.grad.add(torch.tensor([0]), torch.ones(1, D, dtype=torch.float64))
    opt.step()
    sched.step()
    assert opt.lr == pytest.approx(0.25)


def test_invalid_hyperparameters_raise() -> None:
    for kw, msg in [({"lr": 0.0}, "learning rate"), ({"lr": -1.0}, "learning rate"),
                    ({"weight_decay": -0.1}, "weight_decay"), ({"mode": "eager"}, "mode"),
                    ({"betas": (1.0, 0.9)}, "betas")]:
        with pytest.raises(ValueError, match=msg):
            RowSparseAdamW([_table(0)], **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_global_clipping_includes_host_rows_and_matches_torch(max_norm: float) -> None:
    gen = torch.Generator().manual_seed(7)
    router = torch.nn.Parameter(torch.randn(4, D, dtype=torch.float64, generator=gen))
    router.grad = torch.randn(4, D, dtype=torch.float64, generator=gen)
    acc = RowSparseGrad(N, D, dtype=torch.float64)
    acc.add(torch.tensor([3, 9, 3]), torch.randn(3, D, dtype=torch.float64, generator=gen))
    dense = torch.nn.Parameter(torch.zeros(N, D, dtype=torch.float64))
    dense.grad = acc.to_dense()
    twin = torch.nn.Parameter(router.data.clone())
    twin.grad = router.grad.clone()
    want = torch.nn.utils.clip_grad_norm_([twin, dense], max_norm)
    got = clip_grad_norm_([router], [acc], max_norm)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(router.grad, twin.grad)
    torch.testing.assert_close(acc.to_dense(), dense.grad)


def test_clipping_returns_non_finite_norm_without_touching_grads() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    acc = RowSparseGrad(5, 2)
    acc.add(torch.tensor([1]), torch.full((1, 2), 3.0))
    norm = clip_grad_norm_([p], [acc], 1.0)
    assert not torch.isfinite(norm)
    assert acc.rows[0, 0] == 3.0


def _optimizer_set_case(seed: int):  # type: ignore[no-untyped-def]
    """An OptimizerSet over all four kinds of tensor, and the same tensors' copies."""
    from meft.engine.optim import OptimizerSet

    gen = torch.Generator().manual_seed(seed)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))}
    routers = {"0": torch.nn.Parameter(torch.randn(2, 4, generator=gen, dtype=torch.float64))}
    offload = {"0.keys": torch.nn.Parameter(torch.randn(5, 4, generator=gen,
                                                        dtype=torch.float64))}
    table = _table(seed + 1)
    opts = OptimizerSet(params=params, routers=routers, host_tables={"0.keys": table},
                        offload=offload, lr=1e-2, router_lr=3e-2, weight_decay=0.1)
    return opts, params["a"], routers["0"], offload["0.keys"], table


def _grads(opts, a, r, o, table, gen: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    for p in (a, r, o):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 3
    rows = torch.randperm(N, generator=gen)[:7]
    table.grad.add(rows, _grad(gen, rows, torch.float64) * 3)


def test_optimizer_set_is_one_torch_adamw_per_kind_with_one_clip_and_one_schedule() -> None:
    opts, a, r, o, table = _optimizer_set_case(0)
    ref_params = [torch.nn.Parameter(t.detach().clone()) for t in (a, r, o)]
    ref_table = HostTable("t", table.data.clone(), RowSparseGrad(N, D, dtype=torch.float64))
    ref = [torch.optim.AdamW([ref_params[0]], lr=1e-2, weight_decay=0.1),
           torch.optim.AdamW([ref_params[1]], lr=3e-2, weight_decay=0.1),
           torch.optim.AdamW([ref_params[2]], lr=1e-2, weight_decay=0.1),
           RowSparseAdamW([ref_table], lr=1e-2, weight_decay=0.1)]
    gen, gen_ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for step, mult in enumerate((0.5, 1.0, 0.25)):
        opts.set_lr(mult)
        _grads(opts, a, r, o, table, gen)
        norm = opts.clip_(max_norm=1.0)
        opts.step()
        opts.zero_grad()
        # the reference: the same gradients, torch's clipping over all of them, four optimizers
        _grads(None, *ref_params, ref_table, gen_ref)
        dense = torch.cat([p.grad.reshape(-1) for p in ref_params] + [ref_table.grad.rows
                                                                       .reshape(-1)])
        want = dense.norm()
        coef = min(1.0, 1.0 / (float(want) + 1e-6))
        for p in ref_params:
            p.grad.mul_(coef)
        ref_table.grad.scale_(coef)
        for i, opt in enumerate(ref):
            for group in opt.param_groups:
                group["lr"] = (3e-2 if i == 1 else 1e-2) * mult
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(norm, want, rtol=1e-12, atol=0)
        for ours, theirs in zip((a, r, o, table.data), (*ref_params, ref_table.data),
                                strict=True):
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-14,
                                       msg=f"step {step}")
        assert len(table.grad) == 0 and a.grad is None


def test_optimizer_set_state_round_trips_by_name() -> None:
    first, a, r, o, table = _optimizer_set_case(0)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        _grads(first, a, r, o, table, gen)
        first.step()
        first.zero_grad()
    state = first.state_tensors()
    assert {"device.a.exp_avg", "router.0.exp_avg_sq", "offload.0.keys.step",
            "host.0.keys.exp_avg", "host.0.keys.step"} <= set(state)
    second, a2, r2, o2, table2 = _optimizer_set_case(0)
    for mine, theirs in zip((a2, r2, o2, table2.data), (a, r, o, table.data), strict=True):
        with torch.no_grad():
            mine.copy_(theirs)
    second.load_state_tensors({k: v.clone() for k, v in state.items()})
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _grads(first, a, r, o, table, gen_a)
    _grads(second, a2, r2, o2, table2, gen_b)
    first.step()
    second.step()
    for x, y in zip((a, r, o, table.data), (a2, r2, o2, table2.data), strict=True):
        assert torch.equal(x, y)
    from meft.errors import SerializationError

    with pytest.raises(SerializationError, match=r"host\.0\.keys\.step missing"):
        second.load_state_tensors({})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_lazy_update_equals_its_reference(dtype: torch.dtype, weight_decay: float) -> None:
    """The fused path (rows of a multiple of 32 elements) against the elementwise reference,
    over steps that touch varied rows, so rows carry different update counts."""
    import meft.engine.optim as optim

    fast, slow = _table(4, dtype, 128), _table(4, dtype, 128)
    assert optim._fused_ok(fast.data)
    opt_fast = RowSparseAdamW([fast], lr=3e-2, weight_decay=weight_decay)
    opt_slow = RowSparseAdamW([slow], lr=3e-2, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(5)
    for step in range(15):
        rows = torch.randperm(N, generator=gen)[: 3 + (7 * step) % N]
        g = _grad(gen, rows, dtype, 128) * 10.0 ** -(step % 4)
        slow.data.copy_(fast.data)  # one update compared at a time: no drift to tolerate
        for key in ("exp_avg", "exp_avg_sq"):
            opt_slow.state[slow.data][key].copy_(opt_fast.state[fast.data][key])
        before = fast.data.clone()
        for t in (fast, slow):
            t.grad.zero_()
            t.grad.add(rows, g)
        opt_fast.step()
        optim._lazy_update_reference(slow, opt_slow.state[slow.data], opt_slow.param_groups[0])
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(fast.data[untouched], before[untouched])
        # a few units in the last place of |p| ~ 1 (a wrong count would be off by ~lr)
        tol = 1e-14 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(fast.data, slow.data, rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_fast.state[fast.data][key],
                                       opt_slow.state[slow.data][key], rtol=tol, atol=1e-30)
        assert torch.equal(opt_fast.state[fast.data]["step"], opt_slow.state[slow.data]["step"])
    assert len(set(opt_fast.state[fast.data]["step"].tolist())) > 5  # counts did differ


def test_fused_lazy_update_of_a_row_ignores_the_other_rows() -> None:
    """A row's update is bit for bit the same whichever other rows the step touches (what
    lets a disk store, or ranks holding row shards, match one process in RAM)."""
    a, b = _table(6, torch.float32, 32), _table(6, torch.float32, 32)
    opt_a = RowSparseAdamW([a], lr=1e-2, weight_decay=0.1)
    opt_b = RowSparseAdamW([b], lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    shared = torch.arange(0, N, 3)
    for step in range(8):
        g = _grad(gen, shared, torch.float32, 32)
        extra = torch.randperm(N, generator=gen)[: 4 + step]
        extra = extra[extra % 3 != 0]
        for t in (a, b):
            t.grad.zero_()
        a.grad.add(shared, g)
        b.grad.add(torch.cat([extra, shared]),
                   torch.cat([_grad(gen, extra, torch.float32, 32), g]))
        opt_a.step()
        opt_b.step()
        assert torch.equal(a.data[shared], b.data[shared])
        assert torch.equal(opt_a.state[a.data]["exp_avg"][shared],
                           opt_b.state[b.data]["exp_avg"][shared])
