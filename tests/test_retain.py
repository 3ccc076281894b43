"""Forgetting protection (meft.retain): scores against loops, the selection against plain
training, untouched rows bit for bit, background statistics through checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import meft_config, tiny
from meft.data import Encoded
from meft.model import MeftModel, get_meft_model, tensor_name
from meft.retain import (
    AccessCounter,
    Background,
    Retainer,
    hub_rows,
    row_scores,
    top_rows,
)
from meft.trainer import TrainConfig, Trainer


def examples(n: int = 8, seed: int = 0, lo: int = 2, hi: int = 97, *,
             pad: bool = True) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(lo, hi, (6 + i % 4 if pad else 8,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * 3 + ids[3:], False))
    return out


def background_of(model: MeftModel, seed: int = 5) -> Background:
    return Background.measure(model, examples(12, seed=seed), pad_id=0, batch_size=5,
                              progress=False)


def test_row_scores_match_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    n, docs = 30, 9
    counts = torch.randint(0, 4, (n,), generator=gen)
    bg = torch.randint(0, 20, (n,), generator=gen)
    df = torch.randint(0, docs + 1, (n,), generator=gen)
    total, bg_total = int(counts.sum()), int(bg.sum()) + n
    for score in ("tfidf", "kl"):
        got = row_scores(counts, bg, df, docs, score)
        for i in range(n):
            c = int(counts[i])
            if c == 0:
                assert got[i] == -math.inf
                continue
            p = c / total
            want = (p * math.log((docs + 1) / (int(df[i]) + 1)) if score == "tfidf"
                    else p * math.log(p / ((int(bg[i]) + 1) / bg_total)))
            assert float(got[i]) == pytest.approx(want, rel=1e-12)
    scores = torch.tensor([0.5, -math.inf, 0.5, 0.9, 0.1])
    assert top_rows(scores, 3).tolist() == [3, 0, 2]  # ties to the lower id
    assert top_rows(scores, 10).tolist() == [3, 0, 2, 4]  # never a row not accessed


def test_access_counter_counts_tokens_and_documents() -> None:
    gen = torch.Generator().manual_seed(1)
    n, t, k = 20, 14, 3
    ids = torch.randint(0, n, (t, k), generator=gen)
    docs = torch.tensor([0, 0, 0, 1, 1, -1, -1, 2, 2, 2, 2, 3, -1, 3])
    counter = AccessCounter(n)
    counter.add(ids, torch.zeros(t, 2))  # not counting: ignored
    assert counter.counts.sum() == 0
    counter.docs, counter.track_docs = docs, True
    counter.add(ids, torch.zeros(t, 2))
    want_counts, want_df = [0] * n, [0] * n
    for doc in set(docs.tolist()) - {-1}:
        seen = set()
        for row, d in zip(ids.tolist(), docs.tolist(), strict=True):
            if d == doc:
                for i in row:
                    want_counts[i] += 1
                    seen.add(i)
        for i in seen:
            want_df[i] += 1
    assert counter.counts.tolist() == want_counts
    assert counter.df.tolist() == want_df
    with pytest.raises(ValueError, match="13 in the mask"):
        counter.docs = docs[:13]
        counter.add(ids, torch.zeros(t, 2))


def _trained(tmp_path: Path, name: str, retain: dict | None, steps: int = 3,
             values: float | None = None) -> tuple[MeftModel, Trainer]:
    """Training on examples of one length (no padding: rows that only padding chose are
    dropped by the protection, but updated by plain training through their momentum)."""
    model = get_meft_model(tiny("llama"), meft_config())
    retainer = (Retainer(model, background_of(model), **retain) if retain is not None
                else None)
    if values is not None:  # non-zero values so keys and routers get gradients too (set
        for s in model.stores:  # after the protection started: not rows written earlier)
            s.values.normal_(0, values, generator=torch.Generator().manual_seed(3))
    trainer = Trainer(model, examples(pad=False), TrainConfig(steps=steps, batch_size=4, lr=1e-2,
                                                     progress=False),
                      tmp_path / name, pad_id=0, retainer=retainer)
    trainer.train()
    return model, trainer


def test_keeping_every_row_is_plain_training(tmp_path: Path) -> None:
    """The selection's reference: with t >= N nothing is dropped, and training is bit for bit
    the training without protection (tables, routers, optimizer state, losses)."""
    plain, p = _trained(tmp_path, "plain", None, values=0.1)
    kept, k = _trained(tmp_path, "kept", {"rows": 64}, values=0.1)
    assert [r["loss"] for r in p.history] == [r["loss"] for r in k.history]
    for a, b in zip(plain.adapter_state().values(), kept.adapter_state().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = p.optimizers.state_tensors(), k.optimizers.state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_rows_outside_the_selection_do_not_move(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    retainer = Retainer(model, background_of(model), rows=5)
    for s in model.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    trainer = Trainer(model, examples(), TrainConfig(steps=1, batch_size=8, lr=1e-2,
                                                     progress=False),
                      tmp_path / "run", pad_id=0, retainer=retainer)
    before = {k: v.clone() for k, v in model.adapter_state().items()}
    state_before = {k: v.clone() for k, v in trainer.optimizers.state_tensors().items()}
    record = trainer.train().history[0]
    assert record["retained_rows_per_layer"] == [5] * len(model.stores)
    after, state_after = model.adapter_state(), trainer.optimizers.state_tensors()
    for layer in model.adapters:
        moved = set()
        for part in ("keys", "values"):
            name = tensor_name(int(layer), part)
            diff = (after[name] != before[name]).any(1)
            moved |= set(torch.nonzero(diff).flatten().tolist())
        assert 0 < len(moved) <= 5  # the selected rows move, nothing else
        for key, value in state_after.items():
            if key.startswith(f"host.{layer}."):
                rows = torch.ones(value.shape[0], dtype=torch.bool)
                rows[sorted(moved)] = False
                assert torch.equal(value[rows], state_before[key][rows]), key


def test_values_only_with_frozen_routers(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    keys = [s.keys.clone() for s in model.stores]
    routers = [r.detach().clone() for r in model.router_parameters()]
    bg = Background.measure(model, examples(12, seed=5), pad_id=0, batch_size=5,
                            progress=False, keep_inputs=40)
    retainer = Retainer(model, bg, rows=8, keys=False, router=False, penalty=1.0,
                        penalty_tokens=16)
    trainer = Trainer(model, examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2,
                                                     progress=False),
                      tmp_path / "run", pad_id=0, retainer=retainer)
    trainer.train()
    assert all(torch.equal(s.keys, k) for s, k in zip(model.stores, keys, strict=True))
    assert all(torch.equal(r, r0) for r, r0 in zip(model.router_parameters(), routers,
                                                   strict=True))
    assert any(s.values.abs().sum() > 0 for s in model.stores)  # values learned


def test_background_statistics_ride_in_checkpoints_and_resume_is_bitwise(tmp_path: Path
                                                                          ) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False)

    def run(name: str, stop_after: int | None, resume: Path | None = None) -> MeftModel:
        model = get_meft_model(tiny("llama"), meft_config())
        background = (Background.measure(model, examples(12, seed=5), pad_id=0, batch_size=5,
                                         progress=False, keep_inputs=30)
                      if resume is None else None)
        retainer = Retainer(model, background, rows=6, score="kl", penalty=1.0,
                            penalty_tokens=8)
        trainer = Trainer(model, examples(), cfg, tmp_path / name, pad_id=0,
                          retainer=retainer)
        if resume is not None:
            trainer.restore(resume)
            assert retainer.background is not None
        trainer.stop_after = stop_after
        try:
            trainer.train()
        except Exception as e:  # TrainingInterrupted
            assert "stopped at step 2" in str(e)
        return model

    whole = run("whole", None)
    run("half", 2)
    resumed = run("half", None, tmp_path / "half" / "checkpoints" / "step-00000002")
    for a, b in zip(whole.adapter_state().values(), resumed.adapter_state().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_protection_reduces_the_change_on_background_inputs(tmp_path: Path) -> None:
    """Train on facts drawn from one half of the vocabulary; background text is the other
    half. With protection the model's output on background text moves less."""
    base = tiny("llama", layers=2)
    probe = torch.randint(50, 97, (6, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = base(input_ids=probe).logits
    train = examples(16, seed=1, lo=2, hi=50)
    moved = {}
    variants = (("off", None), ("on", {"rows": 4}), ("penalty", {"rows": 0, "penalty": 30.0}))
    for name, retain in variants:
        model = get_meft_model(tiny("llama", layers=2), meft_config(top_k=4))
        retainer = None
        if retain is not None:
            bg = Background.measure(model, examples(24, seed=7, lo=50, hi=97), pad_id=0,
                                    progress=False, keep_inputs=150)
            retainer = Retainer(model, bg, penalty_tokens=64, **retain)
        history = Trainer(model, train, TrainConfig(steps=6, batch_size=8, lr=3e-2,
                                                    progress=False),
                          tmp_path / name, pad_id=0, retainer=retainer).train().history
        assert history[-1]["loss"] < history[0]["loss"]  # it still learns
        with torch.no_grad():
            moved[name] = float((model(input_ids=probe).logits - ref).abs().mean())
    assert moved["off"] > 0
    assert moved["on"] < 0.5 * moved["off"], moved
    assert moved["penalty"] < 0.5 * moved["off"], moved


def test_background_keeps_the_adapter_inputs_of_the_drawn_tokens() -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    data = examples(7, seed=2)
    seen: dict[str, list[torch.Tensor]] = {layer: [] for layer in model.adapters}
    handles = [a.register_forward_pre_hook(
        lambda mod, args, layer=layer: seen[layer].append(args[0].reshape(-1, 32).clone()))
        for layer, a in model.adapters.items()]
    everything = Background.measure(model, data, pad_id=0, batch_size=3, progress=False,
                                    keep_inputs=10_000)
    for h in handles:
        h.remove()
    total = sum(len(e.input_ids) for e in data)
    for layer in model.adapters:  # every non-padding token, in order (right padding)
        rows = []
        for b, x in enumerate(seen[layer]):  # one forward per batch of 3, (3 * width, d)
            batch = data[3 * b:3 * b + 3]
            width = x.shape[0] // len(batch)
            rows += [x[j * width:j * width + len(e.input_ids)] for j, e in enumerate(batch)]
        assert torch.equal(everything.inputs[layer], torch.cat(rows))
        assert everything.inputs[layer].shape == (total, 32)
    some = Background.measure(model, data, pad_id=0, batch_size=3, progress=False,
                              keep_inputs=9, seed=4)
    for layer in model.adapters:
        kept = some.inputs[layer]
        assert kept.shape == (9, 32)
        assert all((everything.inputs[layer] == row).all(1).any() for row in kept)
    assert torch.equal(some.counts["0"], everything.counts["0"])  # counting is unchanged


def test_the_penalty_is_the_mean_squared_adapter_output(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    bg = Background.measure(model, examples(6, seed=3), pad_id=0, progress=False,
                            keep_inputs=20)
    retainer = Retainer(model, bg, rows=0, penalty=2.0, penalty_tokens=8)
    for s in model.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    got = retainer.penalty_backward(step=3)
    want = 0.0
    with torch.no_grad():
        for layer, adapter in model.adapters.items():
            idx = (torch.arange(8) + 24) % 20
            want += float(2.0 * adapter(bg.inputs[layer][idx]).pow(2).sum(-1).mean())
    assert got == pytest.approx(want, rel=1e-6)
    assert all(len(s.value_grad) > 0 for s in model.stores)  # it sends gradients to rows


def test_hub_rows_are_never_selected(tmp_path: Path) -> None:
    """A row most background documents read is not trained even when the step's accesses would
    select it; the others train as before."""
    df = torch.tensor([0, 4, 5, 10])
    assert hub_rows(df, 10, 0.5).tolist() == [False, False, True, True]
    assert not hub_rows(df, 10, 1.01).any()
    model = get_meft_model(tiny("llama"), meft_config())
    background = background_of(model)
    retainer = Retainer(model, background, rows=64, hubs=0.9)  # every row but for hubs
    for s in model.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    retainer.protected = {k: torch.zeros_like(v) for k, v in retainer.protected.items()}
    layer = next(iter(model.adapters))
    # make every row a hub of this layer but for the first half
    n = background.df[layer].shape[0]
    background.df[layer][n // 2:] = background.documents
    trainer = Trainer(model, examples(), TrainConfig(steps=1, batch_size=8, lr=1e-2,
                                                     progress=False),
                      tmp_path / "run", pad_id=0, retainer=retainer)
    store = model.adapters[layer].store
    before = store.values.clone()
    trainer.train()
    moved = (store.values != before).any(1)
    assert moved[: n // 2].any() and not moved[n // 2:].any()
