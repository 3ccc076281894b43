"""Compact host state (meft.engine.quant, the compact RowSparseAdamW): against fp32 references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import meft_config, tiny
from meft.adapter.model import get_meft_model
from meft.engine.optim import RowSparseAdamW
from meft.engine.quant import (
    RoundingNoise,
    decode_signed,
    decode_unsigned,
    encode_signed,
    encode_unsigned,
    round_bf16_,
)
from meft.engine.store import HostTable, RowSparseGrad
from meft.training.trainer import TrainConfig, Trainer, TrainingInterrupted
from test_retain import examples


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values() -> None:
    gen, noise = torch.Generator().manual_seed(0), RoundingNoise(0)
    exact = torch.randn(1000, generator=gen).to(torch.bfloat16).float()
    assert torch.equal(round_bf16_(exact.clone(), noise).float(), exact)
    x = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of the way from 1 to the next bf16
    r = round_bf16_(x.clone(), noise).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    se = 2**-7 * math.sqrt(1 / 8 * 7 / 8 / x.numel())  # standard error of the mean
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=4 * se)  # unbiased
    neg = round_bf16_(-x, noise).float()
    assert neg.mean().item() == pytest.approx(-(1.0 + 2**-10), abs=4 * se)


def test_stochastic_rounding_equals_its_integer_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """round_bf16_ (int32 adds in place, high halves) against the rule written in int64
    torch ops with the same noise: add u in [0, 2^16) to the bits, keep the top 16. Fresh random
    values over many magnitudes and both signs, zeros, subnormals, a 2-d input; the noise is
    uniform over all 2^16 values and a seed reproduces it."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 301, generator=gen) * torch.logspace(-40, 30, 301)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-45, -1e-44, 3.0e38])
    u = torch.from_numpy(RoundingNoise(7).uint16(x.numel()).astype("int64")).view(x.shape)
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    top = ((bits + u) >> 16).to(torch.int32)  # 0 .. 2^16: a carry out of the top half wraps
    top = torch.where(top >= 1 << 15, top - (1 << 16), top).to(torch.int16)
    assert torch.equal(round_bf16_(x.clone(), RoundingNoise(7)).view(torch.int16), top)
    with pytest.raises(ValueError, match="contiguous float32"):
        round_bf16_(x.t(), RoundingNoise(7))
    monkeypatch.setattr(sys, "byteorder", "big")  # the byte-order-free branch: same bits
    assert torch.equal(round_bf16_(x.clone(), RoundingNoise(7)).view(torch.int16), top)
    sample = RoundingNoise(11).uint16(1 << 21)  # 32 draws of each value on average
    assert len(set(sample.tolist())) == 1 << 16
    assert abs(sample.mean() - (2**16 - 1) / 2) < 4 * 2**16 / math.sqrt(12 * 2**21)
    assert (RoundingNoise(5).uint16(10) == RoundingNoise(5).uint16(10)).all()


def test_log_codes_bound_the_relative_error_and_keep_zeros() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 64, generator=gen) * torch.logspace(-3, 0, 64)  # 3 decades per row
    x[3] = 0.0
    x[5, :10] = 0.0
    code, scale = encode_unsigned(x.abs())
    back = decode_unsigned(code, scale)
    ok = (x.abs() >= scale * 2**-15) & (x != 0)
    assert torch.all((back[ok] / x.abs()[ok] - 1).abs() <= 2 ** (1 / 32) - 1 + 1e-4)
    assert torch.all(back[x == 0] == 0)
    code, scale = encode_signed(x)
    back = decode_signed(code, scale)
    ok = (x.abs() >= scale * 2**-15) & (x != 0)
    assert torch.all((back[ok] / x[ok] - 1).abs() <= 2 ** (1 / 16) - 1 + 1e-4)  # sign kept
    assert torch.all(back[x == 0] == 0)
    assert code.dtype == torch.int8 and scale.shape == (50, 1)


def _run(fmt: str, dtype: torch.dtype, steps: int = 8) -> tuple[torch.Tensor, RowSparseAdamW]:
    """A 64 x 32 table trained on random row-sparse gradients; returns it and the optimizer."""
    n, d = 64, 32
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(n, d, generator=gen) * 0.5).to(torch.bfloat16).to(dtype)  # one start
    table = HostTable("t", data, RowSparseGrad(n, d))
    opt = RowSparseAdamW([table], lr=1e-2, weight_decay=0.01, state_format=fmt, seed=3)
    for _ in range(steps):
        rows = torch.randperm(n, generator=gen)[:20]
        table.grad.add(rows, torch.randn(20, d, generator=gen) * torch.logspace(-2, 0, d))
        opt.step()
        opt.zero_grad()
    return table.data.float(), opt


def _rowwise_reference(steps: int = 8) -> torch.Tensor:
    """Row-wise Adam written out in fp64, row by row: the specification of ``rowwise``."""
    n, d = 64, 32
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, d, generator=gen) * 0.5).to(torch.bfloat16).double()
    m, v, count = torch.zeros(n, d, dtype=torch.float64), [0.0] * n, [0] * n
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    for _ in range(steps):
        rows = torch.randperm(n, generator=gen)[:20]
        grads = (torch.randn(20, d, generator=gen) * torch.logspace(-2, 0, d)).double()
        for r, g in zip(rows.tolist(), grads, strict=True):
            count[r] += 1
            w[r] *= 1 - lr * wd
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * float(g.pow(2).mean())
            denom = math.sqrt(v[r] / (1 - b2 ** count[r])) + eps
            w[r] -= lr / (1 - b1 ** count[r]) * m[r] / denom
    return w.float()


def _factored_reference(steps: int = 8) -> torch.Tensor:
    """Factored Adam written out in fp64, row by row, the first moment exact: the
    specification of ``factored`` (rows: mean g^2 at their own steps; columns: mean g^2 over
    each step's touched rows; v = row factor x column factor / its mean)."""
    n, d = 64, 32
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, d, generator=gen) * 0.5).to(torch.bfloat16).double()
    m, r, count = torch.zeros(n, d, dtype=torch.float64), [0.0] * n, [0] * n
    c = torch.zeros(d, dtype=torch.float64)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.01
    for _ in range(steps):
        rows = torch.randperm(n, generator=gen)[:20]
        grads = (torch.randn(20, d, generator=gen) * torch.logspace(-2, 0, d)).double()
        c = b2 * c + (1 - b2) * grads.pow(2).mean(0)
        for i, g in zip(rows.tolist(), grads, strict=True):
            count[i] += 1
            w[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            r[i] = b2 * r[i] + (1 - b2) * float(g.pow(2).mean())
            v = r[i] * c / c.mean()
            denom = (v / (1 - b2 ** count[i])).sqrt() + eps
            w[i] -= lr / (1 - b1 ** count[i]) * m[i] / denom
    return w.float()


def test_compact_updates_stay_close_to_their_references() -> None:
    """8 steps of lr 1e-2 on random row-sparse gradients whose columns differ in scale 100x.
    Stated tolerances (relative to how far fp32 AdamW moved the weights): bf16 tables with
    stochastic rounding: mean error < 12%, unbiased (signed mean < 1%), at most a few bf16
    steps; 8bit moments: mean < 2%, max < 10%; rowwise is another optimizer (one second
    moment per row) and is held to its fp64 row-by-row specification: mean < 2%."""
    start, _ = _run("fp32", torch.float32, steps=0)
    ref, _ = _run("fp32", torch.float32)
    moved = (ref - start).abs()
    bf16, _ = _run("fp32", torch.bfloat16)
    assert (bf16 - ref).abs().max() < 2**-5
    assert (bf16 - ref).abs().mean() < 0.12 * moved.mean()
    assert (bf16 - ref).mean().abs() < 0.01 * moved.mean()
    eight, _ = _run("8bit", torch.float32)
    assert (eight - ref).abs().max() < 0.1 * moved.max()
    assert (eight - ref).abs().mean() < 0.02 * moved.mean()
    compact, _ = _run("8bit", torch.bfloat16)
    assert (compact - ref).abs().mean() < 0.12 * moved.mean()
    row_ref = _rowwise_reference()
    row, _ = _run("rowwise", torch.float32)
    assert (row - row_ref).abs().mean() < 0.02 * (row_ref - start).abs().mean()
    fac_ref = _factored_reference()
    fac, opt = _run("factored", torch.float32)
    assert (fac - fac_ref).abs().mean() < 0.02 * (fac_ref - start).abs().mean()
    assert (fac - fac_ref).abs().max() < 0.1 * (fac_ref - start).abs().max()
    assert opt.state[next(iter(opt.state))]["exp_avg_sq_col"].shape == (32,)


def test_factored_is_adamw_on_rank_one_gradients() -> None:
    """A meft row's gradient is its own scalar times a profile its table shares (module doc
    of meft.engine.optim): there the factored second moment is AdamW's exactly, and only the 8-bit
    first moment differs (within 8bit's tolerance); one v per row (rowwise) is not."""
    n, d = 64, 32
    profile = torch.logspace(-2, 0, d)  # columns 100x apart, as a model's hidden dimensions

    def run(fmt: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        table = HostTable("t", torch.randn(n, d, generator=gen) * 0.5, RowSparseGrad(n, d))
        opt = RowSparseAdamW([table], lr=1e-2, weight_decay=0.01, state_format=fmt)
        for _ in range(8):
            rows = torch.randperm(n, generator=gen)[:20]
            table.grad.add(rows, torch.randn(20, 1, generator=gen) * profile)
            opt.step()
            opt.zero_grad()
        return table.data

    start = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.5
    ref, fac, row = run("fp32"), run("factored"), run("rowwise")
    moved = (ref - start).abs()
    assert (fac - ref).abs().mean() < 0.02 * moved.mean()
    assert (fac - ref).abs().max() < 0.1 * moved.max()
    assert (row - ref).abs().mean() > 0.3 * moved.mean()


def test_untouched_rows_and_fp32_path_are_unchanged() -> None:
    n, d = 16, 8
    for fmt in ("rowwise", "8bit", "factored"):
        table = HostTable("t", torch.randn(n, d).to(torch.bfloat16), RowSparseGrad(n, d))
        before = table.data.clone()
        opt = RowSparseAdamW([table], lr=1e-2, weight_decay=0.1, state_format=fmt)
        table.grad.add(torch.tensor([2, 5]), torch.randn(2, d))
        opt.step()
        changed = (table.data != before).any(1).nonzero().flatten().tolist()
        assert changed == [2, 5]
        state = opt.state[table.data]
        assert state["step"].tolist() == [1 if i in (2, 5) else 0 for i in range(n)]
    with pytest.raises(ValueError, match="dense mode is for checking"):
        RowSparseAdamW([table], mode="dense", state_format="8bit")


def test_host_bytes_per_parameter() -> None:
    """Tables + moments + per-row extras, from the tensors themselves: <= 4 bytes per adapter
    parameter with bf16 tables and rowwise or 8bit moments, <= 3.05 with factored ones, <= 4
    with 8-bit-coded ones beside fp32 tables is out of reach (d = 576, the embedded model's)."""
    n, d = 256, 576
    for fmt, dtype, most in (("fp32", torch.float32, 12.1), ("rowwise", torch.bfloat16, 4.05),
                             ("8bit", torch.bfloat16, 4.05), ("factored", torch.bfloat16, 3.05)):
        tables = [HostTable(name, torch.zeros(n, d, dtype=dtype), RowSparseGrad(n, d))
                  for name in ("keys", "values")]
        opt = RowSparseAdamW(tables, state_format=fmt)
        nbytes = sum(t.data.nbytes for t in tables) + sum(
            s.nbytes for t in tables for s in opt.state[t.data].values())
        per_param = nbytes / (2 * n * d)
        assert per_param <= most, (fmt, per_param)
        config = meft_config(neurons=n, experts=16, host_dtype=str(dtype)[6:],
                             optim_state=fmt)
        assert config.host_bytes_per_layer(d) == nbytes  # the planner's count is exact


@pytest.mark.parametrize("fmt", ["rowwise", "8bit", "factored"])
def test_resume_with_compact_state_is_bitwise(fmt: str, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False)

    def trainer(name: str) -> Trainer:
        model = get_meft_model(tiny("llama"), meft_config(host_dtype="bfloat16",
                                                          optim_state=fmt))
        return Trainer(model, examples(), cfg, tmp_path / name, pad_id=0)

    whole = trainer("whole")
    whole.train()
    half = trainer("half")
    half.stop_after = 2
    with pytest.raises(TrainingInterrupted):
        half.train()
    resumed = trainer("half")
    resumed.restore(tmp_path / "half" / "checkpoints" / "step-00000002")
    resumed.train()
    for name, t in whole.trainable.adapter.adapter_state().items():  # type: ignore[union-attr]
        assert torch.equal(resumed.trainable.adapter.adapter_state()[name], t), name
    assert all(s.keys.dtype == torch.bfloat16 for s in whole.trainable.adapter.stores)  # type: ignore[union-attr]
    assert math.isfinite(whole.history[-1]["loss"])
