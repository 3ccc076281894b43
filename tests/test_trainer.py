"""The training loop: schedule, accumulation, divergence, metrics and checkpoints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from helpers import meft_config as config
from helpers import tiny
from meft.adapter.checkpoint import list_checkpoints, read_checkpoint
from meft.adapter.model import get_meft_model
from meft.data.records import Encoded
from meft.training.trainer import TrainConfig, Trainer, TrainingDiverged, lr_multiplier


def examples(n: int = 8, seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 4
        ids = torch.randint(2, 97, (length,), generator=gen).tolist()
        labels = [-100] * 3 + ids[3:]
        out.append(Encoded(ids, labels, False))
    return out


def test_schedule_warms_up_then_decays_to_zero() -> None:
    total, warmup = 100, 5
    mults = [lr_multiplier(s, total, warmup) for s in range(total)]
    assert mults[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert mults[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(mults[5:]))
    assert mults[-1] == pytest.approx(1 / 95)
    flat = [lr_multiplier(s, total, warmup, "constant") for s in range(total)]
    assert flat[:5] == mults[:5] and flat[5:] == [1.0] * 95


def test_micro_batches_accumulate_to_the_full_batch_update(tmp_path: Path) -> None:
    """One step over 8 examples equals one step over 4 micro-batches of 2."""
    data = examples()
    results = []
    for micro in (None, 2):
        model = get_meft_model(tiny("llama"), config())
        for s in model.stores:  # non-zero values so keys and routers get gradients too
            s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        trainer = Trainer(model, data, TrainConfig(steps=1, batch_size=8, micro_batch_size=micro,
                                                   lr=1e-2, progress=False),
                          tmp_path / f"run{micro}", pad_id=0)
        trainer.train()
        results.append(([s.keys.clone() for s in model.stores],
                         [s.values.clone() for s in model.stores],
                         [r.detach().clone() for r in model.router_parameters()]))
    for a, b in zip(results[0], results[1], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_training(tmp_path: Path) -> None:
    """Three steps with every example alone (no padding) equal three steps with all examples
    padded into one micro-batch: padding is never routed, so no row takes a zero-gradient
    AdamW step because a pad token chose it (uneven lengths, weight decay on). Before, the
    padded run changed 2808 rows (tables of 3 layers) against 2642, and 2299 values differed
    by more than 2e-4 (up to 1e-2)."""
    data = examples()
    results = []
    for micro in (1, None):
        model = get_meft_model(tiny("llama"), config(neurons=1024, experts=128))
        for s in model.stores:
            s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        before = [t.clone() for s in model.stores for t in (s.keys, s.values)]
        trainer = Trainer(model, data, TrainConfig(steps=3, batch_size=8, micro_batch_size=micro,
                                                   lr=1e-2, weight_decay=0.1, progress=False),
                          tmp_path / f"run{micro}", pad_id=0)
        trainer.train()
        after = [t.clone() for s in model.stores for t in (s.keys, s.values)]
        changed = [(a != b).any(1).nonzero().squeeze(1) for a, b in zip(after, before, strict=True)]
        results.append((after, changed))
    (alone, alone_rows), (padded, padded_rows) = results
    for x, y in zip(alone_rows, padded_rows, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(alone, padded, strict=True):  # fp32 sums in another order, through AdamW
        torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-4)


def test_training_lowers_the_loss_and_writes_metrics_and_checkpoints(tmp_path: Path) -> None:
    model = get_meft_model(tiny("qwen2"), config())
    lr = 2e-2
    trainer = Trainer(model, examples(), TrainConfig(steps=12, batch_size=4, lr=lr,
                                                     warmup_ratio=0.25, save_every=5,
                                                     keep_checkpoints=2, progress=False),
                      tmp_path, pad_id=0, eval_encoded=examples(4, seed=1))
    result = trainer.train()
    assert result.steps == 12
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first
    assert "eval_loss" in records[-1]
    assert all(r["union_mean"] > 0 and r["mb_h2d"] > 0 for r in records)
    # 3 warmup steps (0.25 of 12) rising to lr, then linear decay towards 0 at step 12
    lrs = [r["lr"] for r in records]
    assert lrs == [lr * lr_multiplier(s, 12, 3) for s in range(12)]
    assert lrs[0] < lrs[1] < lrs[2] == lrs[3] == lr
    assert all(a > b for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] == pytest.approx(lr / 9)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000005", "step-00000010"]
    tensors, state = read_checkpoint(ckpts[-1])
    assert state["step"] == 10
    assert any(k.endswith(".exp_avg") for k in tensors)
    assert (ckpts[-1] / "adapter" / "adapter_model.safetensors").is_file()


def test_non_finite_loss_stops_before_touching_the_tables(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), config())
    with torch.no_grad():
        model.router_parameters()[0].fill_(float("nan"))
    for s in model.stores:
        s.values.fill_(0.1)
    before = [s.values.clone() for s in model.stores]
    trainer = Trainer(model, examples(), TrainConfig(steps=3, batch_size=4, progress=False),
                      tmp_path, pad_id=0)
    with pytest.raises(TrainingDiverged, match="step 1"):
        trainer.train()
    assert all(torch.equal(a, s.values) for a, s in zip(before, model.stores, strict=True))


@pytest.mark.parametrize(("kw", "msg"), [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch"),
                                         ({"lr": -1.0}, "lr"), ({"warmup_ratio": 1.0}, "warmup")])
def test_train_config_validation(kw: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_first_step_counts_only_its_own_traffic(tmp_path: Path) -> None:
    """Forwards before training (evaluation) do not land in step 1's bytes."""
    moved = []
    for warm in (False, True):
        model = get_meft_model(tiny("llama"), config())
        trainer = Trainer(model, examples(), TrainConfig(steps=1, batch_size=4, progress=False),
                          tmp_path / f"run{warm}", pad_id=0)
        if warm:
            with torch.no_grad():
                model(input_ids=torch.randint(2, 97, (8, 20)))
        moved.append(trainer.train().history[0]["mb_h2d"])
    assert moved[0] > 0 and moved[1] == moved[0]
