"""Forgetting protection (meft.training.protection): nothing to do is plain training, rows
written before untouched bit for bit, replay and rehearsal against independent computations,
their state through checkpoints; options of the deleted recipe read or refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import meft_config, tiny
from meft.adapter.model import MeftModel, get_meft_model
from meft.data.records import Encoded, collate
from meft.errors import ConfigError
from meft.evaluation.evaluate import answer_loss, labelled_logits, token_loss_sum
from meft.training.protection import Background, Retainer, distill_loss
from meft.training.trainer import TrainConfig, Trainer


def examples(n: int = 8, seed: int = 0, lo: int = 2, hi: int = 97, *,
             pad: bool = True) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(lo, hi, (6 + i % 4 if pad else 8,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * 3 + ids[3:], False))
    return out


def background_of(model: MeftModel) -> Background:
    """A background of 12 documents, nothing replayed yet (tests set ``examples``)."""
    return Background(12)


def _trained(tmp_path: Path, name: str, retain: dict | None, steps: int = 3,
             values: float | None = None) -> tuple[MeftModel, Trainer]:
    """Training on examples of one length."""
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


def test_protection_with_nothing_to_replay_or_hold_is_plain_training(tmp_path: Path) -> None:
    """The protection's reference: nothing replayed and no row written before, training is
    bit for bit the training without protection (tables, routers, optimizer state, losses)."""
    plain, p = _trained(tmp_path, "plain", None, values=0.1)
    kept, k = _trained(tmp_path, "kept", {"replay": 0}, values=0.1)
    assert [r["loss"] for r in p.history] == [r["loss"] for r in k.history]
    for a, b in zip(plain.adapter_state().values(), kept.adapter_state().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = p.optimizers.state_tensors(), k.optimizers.state_tensors()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_the_replay_state_rides_in_checkpoints_and_resume_is_bitwise(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False)

    def run(name: str, stop_after: int | None, resume: Path | None = None) -> MeftModel:
        model = get_meft_model(tiny("llama"), meft_config())
        background = Background(12, examples(12, seed=5)) if resume is None else None
        if background is not None:  # the examples and kept targets ride along
            background.keep_distributions(model, pad_id=0)
        retainer = Retainer(model, background, replay=3)
        trainer = Trainer(model, examples(), cfg, tmp_path / name, pad_id=0,
                          retainer=retainer)
        if resume is not None:
            trainer.restore(resume)
            assert retainer.background is not None
            assert retainer.background.examples == examples(12, seed=5)
            assert retainer.background.top_p is not None
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


def test_rows_written_before_hold_bit_for_bit(tmp_path: Path) -> None:
    """Rows the adapter had written before protection started (continual learning) stay bit
    for bit, keys, values and moments, through the replay's gradient too; the others learn."""
    model = get_meft_model(tiny("llama"), meft_config())
    for s in model.stores:  # an adapter trained before: its first 16 rows hold values
        s.values[:16].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    bg = Background(12, examples(12, seed=5))
    bg.keep_distributions(model, pad_id=0)
    retainer = Retainer(model, bg, replay=2, pad_id=0)
    assert all(int(p.sum()) == 16 for p in retainer.protected.values())
    written = [(s.keys[:16].clone(), s.values[:16].clone()) for s in model.stores]
    trainer = Trainer(model, examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2,
                                                     progress=False),
                      tmp_path / "run", pad_id=0, retainer=retainer)
    history = trainer.train().history
    assert history[-1]["retain_replay_loss"] > 0
    for s, (k, v) in zip(model.stores, written, strict=True):
        assert torch.equal(s.keys[:16], k) and torch.equal(s.values[:16], v)
    assert any(s.values[16:].abs().sum() > 0 for s in model.stores)  # the others learned
    state = trainer.optimizers.state_tensors()
    checked = 0
    for layer in model.adapters:  # no moment of a written row moved off zero either
        for key, value in state.items():
            if key.startswith(f"host.{layer}.") and value.dim() > 1:
                assert not value[:16].any(), key
                checked += 1
    assert checked >= 2 * len(model.adapters)


def test_written_rows_train_when_asked(tmp_path: Path) -> None:
    """written=False (--retain-written train): rows an earlier adapter wrote train like the
    others (the default, written=True, keeps them: the test above)."""
    model = get_meft_model(tiny("llama"), meft_config())
    for s in model.stores:
        s.values[:16].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    before = [s.values[:16].clone() for s in model.stores]
    retainer = Retainer(model, Background(12), written=False)
    assert not any(p.any() for p in retainer.protected.values())
    Trainer(model, examples(), TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False),
            tmp_path / "run", pad_id=0, retainer=retainer).train()
    assert any(not torch.equal(s.values[:16], b) for s, b in zip(model.stores, before,
                                                                 strict=True))


def test_replay_adds_the_answer_loss_of_the_next_examples_of_a_fixed_shuffle() -> None:
    """Step s replays examples s*R .. s*R+R-1 of one fixed shuffle of the background; its
    loss is their answer loss, and its gradient skips rows written before."""
    model = get_meft_model(tiny("llama"), meft_config())
    for s in model.stores:  # an adapter trained before: its first 8 rows hold values
        s.values[:8].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    bg = background_of(model)
    bg.examples = examples(10, seed=6)  # lengths differ: padded batches
    retainer = Retainer(model, bg, replay=3, replay_target="answers", pad_id=0)
    order = retainer.replay_order()
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, Retainer(model, bg, replay=1).replay_order())  # fixed
    for s in model.stores:
        s.values[8:].normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    got = retainer.before_clip(step=3)["retain_replay_loss"]  # shuffle 9, 10, 11: 9, 0, 1
    chosen = [bg.examples[int(i)] for i in order[torch.tensor([9, 0, 1])]]
    assert got == pytest.approx(answer_loss(model, chosen, pad_id=0), rel=1e-5)
    for s in model.stores:
        ids = s.value_grad.ids
        assert len(ids) > 0 and not (ids < 8).any()
    assert Retainer(model, bg, replay=0).replay_backward(step=0) == 0.0
    with pytest.raises(ValueError, match="replay=-1"):
        Retainer(model, bg, replay=-1)
    with pytest.raises(ValueError, match="replay_target"):
        Retainer(model, bg, replay_target="echo")


def test_distill_loss_is_kl_over_the_kept_tokens_and_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    m, v, r = 5, 40, 6
    source = torch.randn(m, v, generator=gen, dtype=torch.float64)
    logits = (source + 0.5 * torch.randn(m, v, generator=gen, dtype=torch.float64))
    logits.requires_grad_(True)
    top_p, top_ids = torch.softmax(source, -1).topk(r, -1)
    got = distill_loss(logits, top_ids, top_p)
    want = 0.0
    p = torch.softmax(logits.detach(), -1)
    for i in range(m):  # the specification: KL over r + 1 buckets, position by position
        q_i = [*top_p[i].tolist(), 1 - float(top_p[i].sum())]
        p_i = [*p[i, top_ids[i]].tolist(), 1 - float(p[i, top_ids[i]].sum())]
        want += sum(a * math.log(a / b) for a, b in zip(q_i, p_i, strict=True)) / m
    assert float(got) == pytest.approx(want, rel=1e-5)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    same = source.clone().requires_grad_(True)  # the distribution q came from: 0, no pull
    at_source = distill_loss(same, top_ids, top_p)
    at_source.backward()
    assert abs(float(at_source)) < 1e-6
    assert same.grad is not None and same.grad.abs().max() < 1e-6


def test_distilling_replay_starts_at_zero_and_follows_the_examples() -> None:
    model = get_meft_model(tiny("llama"), meft_config())
    bg = background_of(model)
    bg.examples = examples(10, seed=6)
    bg.keep_distributions(model, pad_id=0, batch_size=3)
    assert bg.top_ids is not None and bg.top_p is not None
    assert bg.top_ids.shape[0] == sum(e.target_tokens for e in bg.examples)
    retainer = Retainer(model, bg, replay=4, pad_id=0)
    assert abs(retainer.replay_backward(step=1)) < 1e-5  # the model has not moved yet
    for s in model.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    got = retainer.replay_backward(step=1)
    order = retainer.replay_order()
    chosen = [bg.examples[int(i)] for i in order[4:8]]
    fresh = Background(bg.documents, chosen)
    fresh.keep_distributions(get_meft_model(tiny("llama"), meft_config()), pad_id=0)
    from meft.data.records import collate
    from meft.evaluation.evaluate import labelled_logits

    with torch.no_grad():
        logits, _ = labelled_logits(model, collate(chosen, 0))
    assert fresh.top_ids is not None and fresh.top_p is not None
    assert got == pytest.approx(float(distill_loss(logits, fresh.top_ids, fresh.top_p)),
                                rel=1e-4)


def _greedy_continuations(model: torch.nn.Module, n: int, seed: int) -> list[Encoded]:
    """Prompts of 5 tokens from the upper half of the vocabulary, each followed by the
    model's own 5 greedy next tokens (labelled): what the model already answers."""
    prompts = torch.randint(50, 97, (n, 5), generator=torch.Generator().manual_seed(seed))
    ids = prompts
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return [Encoded(row.tolist(), [-100] * 5 + row[5:].tolist(), False) for row in ids]


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    """A tiny model whose next-token distributions are peaked as a trained model's are (a
    random one's are nearly flat, max p ~0.01): the final norm scaled up 30x (max p ~0.4)."""
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model


def test_replay_keeps_the_answers_the_model_gave(tmp_path: Path) -> None:
    """Train on facts from the lower half of the vocabulary; replaying
    the base model's own continuations, by distillation or on its answers, keeps more of its
    greedy answers on held-out prompts of the same kind (the retention probe's measure, in
    miniature) than no replay does, and distillation keeps its distributions closest."""
    base = _peaked(tiny("llama", layers=2))
    held_out = _greedy_continuations(base, 8, seed=21)
    probe = torch.tensor([e.input_ids for e in held_out])  # (8, 10)
    with torch.no_grad():
        ref = torch.log_softmax(base(input_ids=probe).logits[:, 4:9].float(), -1)
    assert torch.equal(ref.argmax(-1), probe[:, 5:])
    train = examples(16, seed=1, lo=2, hi=50)
    kept, moved = {}, {}
    for name, replay, target in (("none", 0, "distill"), ("answers", 8, "answers"),
                                 ("distill", 8, "distill")):
        model = get_meft_model(_peaked(tiny("llama", layers=2)), meft_config(top_k=4))
        background = _greedy_continuations(model.base_model, 48, seed=22)
        bg = Background(len(background), background)
        bg.keep_distributions(model, pad_id=0)
        retainer = Retainer(model, bg, replay=replay, replay_target=target, pad_id=0)
        history = Trainer(model, train, TrainConfig(steps=8, batch_size=8, lr=3e-2,
                                                    progress=False),
                          tmp_path / name, pad_id=0, retainer=retainer).train().history
        assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # it still learns
        assert (history[-1]["retain_replay_loss"] > 0) == (replay > 0)
        with torch.no_grad():  # greedy answer tokens still the base model's; KL(base || now)
            out = torch.log_softmax(model(input_ids=probe).logits[:, 4:9].float(), -1)
        kept[name] = float((out.argmax(-1) == probe[:, 5:]).float().mean())
        moved[name] = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert kept["answers"] > 2 * kept["none"], kept
    assert kept["distill"] > 2 * kept["none"], kept
    assert moved["distill"] < 0.5 * moved["none"] and moved["distill"] < moved["answers"], moved


def test_replay_in_the_steps_forward_equals_a_pass_of_its_own(tmp_path: Path) -> None:
    """meft's trainer adds the replayed examples to the step's forward (one routing, one
    staging, one backward); the specification is the replay in a pass of its own after the
    step's: the same losses, tables and moments, with rows written before."""

    class SeparatePass(Trainer):
        def _forward_with_replay(self, chunk, labelled):  # type: ignore[no-untyped-def]
            loss_sum, _ = token_loss_sum(self.model, collate(chunk, self.pad_id))
            (loss_sum / labelled).backward()
            return float(loss_sum.detach()), None  # None: before_clip replays on its own

    runs = []
    for cls in (Trainer, SeparatePass):
        model = get_meft_model(tiny("llama"), meft_config())
        for s in model.stores:  # an adapter trained before: its first 8 rows hold values
            s.values[:8].normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        written = [s.values[:8].clone() for s in model.stores]
        bg = background_of(model)
        bg.examples = examples(10, seed=6)
        bg.keep_distributions(model, pad_id=0)
        retainer = Retainer(model, bg, replay=3, pad_id=0)
        history = cls(model, examples(16), TrainConfig(
            steps=3, batch_size=8, lr=1e-2, warmup_ratio=0.0, progress=False),
            tmp_path / cls.__name__, pad_id=0, retainer=retainer).train().history
        runs.append((model, history))
    (ours, mine), (spec, theirs) = runs
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["retain_replay_loss"] == pytest.approx(b["retain_replay_loss"], rel=1e-4,
                                                        abs=1e-7)
        assert a["retained_rows_per_layer"] == b["retained_rows_per_layer"]
    assert mine[-1]["retain_replay_loss"] > 0
    for name, t in ours.adapter_state().items():
        torch.testing.assert_close(spec.adapter_state()[name], t, rtol=1e-4, atol=1e-5)
    for s, before in zip(ours.stores, written, strict=True):  # rows written before: still
        assert torch.equal(s.values[:8], before)


def test_a_resumed_run_does_not_protect_the_rows_it_wrote_itself(tmp_path: Path) -> None:
    """The rows written before protection started ride in the checkpoint: a store that
    reopens with this run's own values (a disk store does) must not freeze them on resume."""
    model = get_meft_model(tiny("llama"), meft_config())
    retainer = Retainer(model, background_of(model), pad_id=0)
    config = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_ratio=0.0, progress=False)
    trainer = Trainer(model, examples(16), config, tmp_path / "a", pad_id=0, retainer=retainer)
    trainer.train()
    assert not any(m.any() for m in retainer.protected.values())
    reopened = get_meft_model(tiny("llama"), meft_config())
    for s, t in zip(reopened.stores, model.stores, strict=True):  # the tables as trained
        s.values.copy_(t.values)
    again = Retainer(reopened, None, pad_id=0)
    assert any(m.any() for m in again.protected.values())  # found written at start
    Trainer(reopened, examples(16), config, tmp_path / "b", pad_id=0,
            retainer=again).restore(trainer.save_checkpoint())
    assert not any(m.any() for m in again.protected.values())
    assert again.background is not None and again.background.documents == 12


def test_rehearsal_is_a_replay_stream_of_its_own() -> None:
    """Earlier examples (the last ``rehearsal`` of the background's examples) are replayed
    ``rehearse`` per step from their own fixed shuffle, after the background's, which stay
    the ones a background without them replays; the loss is each stream's distillation mean,
    summed; the count rides in the saved state."""
    model = get_meft_model(tiny("llama"), meft_config())
    background, earlier = examples(10, seed=6), examples(5, seed=7)
    plain = background_of(model)
    plain.examples = list(background)
    bg = background_of(model)
    bg.examples, bg.rehearsal = [*background, *earlier], 5
    bg.keep_distributions(model, pad_id=0, batch_size=4)
    retainer = Retainer(model, bg, replay=2, rehearse=3, pad_id=0)
    assert retainer.replayed == 5
    seen = []
    for step in range(5):
        replayed, chosen = retainer.replay_examples(step)
        assert len(replayed) == 5 and (chosen[:2] < 10).all() and (chosen[2:] >= 10).all()
        assert torch.equal(chosen[:2], Retainer(model, plain, replay=2).replay_examples(step)[1])
        seen += chosen[2:].tolist()
    assert sorted(seen) == sorted(list(range(10, 15)) * 3)  # every earlier one, in turn
    for s in model.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    got = retainer.replay_backward(step=1)
    _, chosen = retainer.replay_examples(1)
    start = get_meft_model(tiny("llama"), meft_config())  # the model as it was
    want = 0.0
    for part in (chosen[:2], chosen[2:]):
        picked = [bg.examples[int(i)] for i in part]
        fresh = Background(bg.documents, picked)
        fresh.keep_distributions(start, pad_id=0)
        with torch.no_grad():
            logits, _ = labelled_logits(model, collate(picked, 0))
        assert fresh.top_ids is not None and fresh.top_p is not None
        want += float(distill_loss(logits, fresh.top_ids, fresh.top_p))
    assert got == pytest.approx(want, rel=1e-4)
    assert Background.from_tensors(bg.tensors()).rehearsal == 5
    assert Background.from_tensors(plain.tensors()).rehearsal == 0
    no_rehearsal = Retainer(model, plain, replay=2, rehearse=3)  # nothing to rehearse
    assert no_rehearsal.replayed == 2


def test_rehearsal_keeps_what_an_earlier_adapter_learned(tmp_path: Path) -> None:
    """Continual learning in miniature: an adapter learns set A, then trains on set B with
    every row trainable; rehearsing A's examples keeps A's answer loss far lower than no
    rehearsal, and B is still learned."""
    set_a, set_b = examples(16, seed=1, lo=2, hi=50), examples(16, seed=2, lo=50, hi=97)
    config = TrainConfig(steps=12, batch_size=8, lr=3e-2, progress=False)
    first = get_meft_model(_peaked(tiny("llama", layers=2)), meft_config(top_k=4))
    Trainer(first, set_a, config, tmp_path / "a", pad_id=0).train()
    learned = answer_loss(first, set_a, pad_id=0)
    state = first.adapter_state()
    after = {}
    for name, rehearse in (("none", 0), ("rehearse", 8)):
        model = get_meft_model(_peaked(tiny("llama", layers=2)), meft_config(top_k=4))
        model.load_adapter_state(state)
        bg = Background(12, list(set_a), rehearsal=len(set_a))
        bg.keep_distributions(model, pad_id=0)
        retainer = Retainer(model, bg, written=False, rehearse=rehearse, pad_id=0)
        history = Trainer(model, set_b, config, tmp_path / name, pad_id=0,
                          retainer=retainer).train().history
        assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # B is learned
        after[name] = answer_loss(model, set_a, pad_id=0)
    assert learned < 0.3 * after["none"], (learned, after)  # A was learned, then forgotten
    assert after["rehearse"] < 0.5 * after["none"], (learned, after)


def test_rehearse_needs_an_adapter_and_protection() -> None:
    from meft.config import REHEARSE, TrainJob

    with pytest.raises(ConfigError, match="--rehearse"):
        TrainJob.from_options({"rehearse": "a.jsonl"})
    with pytest.raises(ConfigError, match="--rehearse"):
        TrainJob.from_options({"rehearse": "a.jsonl", "adapter": "x", "retain": "off"})
    job = TrainJob.from_options({"rehearse": "a.jsonl", "adapter": "x"})
    assert job.run.rehearse == "a.jsonl" and job.train.retain_rehearse == REHEARSE


def _lora(seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny Llama with LoRA on every linear layer, as meft bench builds lora:all:4."""
    from meft.cli.bench.methods import build, parse_method
    from meft.config import BenchJob

    torch.manual_seed(seed)
    model = tiny("llama", layers=2)
    return build(parse_method("lora:all:4"), model, BenchJob.from_options({}),
                 torch.device("cpu"))


def _replaying(trainable, weight: float = 1.0) -> Retainer:  # type: ignore[no-untyped-def]
    """Replay of one example per step from a background of 10 (no meft tables: replay only)."""
    bg = Background(10, examples(10, seed=6))
    bg.keep_distributions(trainable.model, pad_id=0)
    retainer = Retainer(trainable.model, bg, replay=1, pad_id=0)
    retainer.replay_weight = weight  # 0: the replayed examples ride along and add nothing
    return retainer


def test_lora_replay_with_weight_zero_is_plain_lora(tmp_path: Path) -> None:
    """Replay works for a model without meft's tables (LoRA) through the one trainer; at
    weight 0 it changes nothing: the same loss at every step and the same weights."""
    pytest.importorskip("peft")
    config = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0, progress=False)
    runs = []
    for weight in (None, 0.0):
        trainable = _lora()
        retainer = _replaying(trainable, weight) if weight is not None else None
        history = Trainer(trainable, examples(16), config, tmp_path / str(weight), pad_id=0,
                          retainer=retainer).train().history
        runs.append((trainable, history))
    (plain, a), (replayed, b) = runs
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert "retain_replay_loss" in b[-1] and "retain_replay_loss" not in a[-1]
    assert all(float(p.detach().abs().max()) > 1e-3 for n, p in plain.params.items()
               if "lora_B" in n)  # it trained (B starts at 0): not a comparison of idle runs
    for name, p in plain.params.items():
        torch.testing.assert_close(replayed.params[name], p, rtol=1e-4, atol=1e-6)


def test_lora_replay_loss_equals_an_independent_computation(tmp_path: Path) -> None:
    """The replay loss a LoRA step records is KL(q || p) over the kept top-32 tokens and the
    rest, q from the base model, p from the LoRA model as it is at that step, at the first
    answer tokens of the fixed shuffle's next example: computed here from full forwards."""
    pytest.importorskip("peft")
    import copy

    from meft.training.protection import REPLAY_SEED, REPLAY_TOKENS, REPLAY_TOP

    trainable = _lora()
    base = copy.deepcopy(trainable.model.get_base_model())  # LoRA starts as the base model
    retainer = _replaying(trainable)
    trainer = Trainer(trainable, examples(16), TrainConfig(
        steps=3, batch_size=4, lr=3e-2, warmup_ratio=0.0, progress=False), tmp_path,
        pad_id=0, retainer=retainer)
    batches = trainer._batches()
    first = trainer.train_step(next(batches))
    assert first["retain_replay_loss"] == pytest.approx(0.0, abs=1e-6)  # nothing moved yet
    order = torch.randperm(10, generator=torch.Generator().manual_seed(REPLAY_SEED))
    example = examples(10, seed=6)[int(order[1])]  # step 1 replays the second of the shuffle
    answer = [i for i, y in enumerate(example.labels) if y != -100][:REPLAY_TOKENS]
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        q = torch.softmax(base(input_ids=ids).logits[0, [i - 1 for i in answer]].float(), -1)
        logp = torch.log_softmax(
            trainable.model(input_ids=ids).logits[0, [i - 1 for i in answer]].float(), -1)
    top_q, top = q.topk(REPLAY_TOP, -1)
    rest_q = 1 - top_q.sum(-1)
    rest_p = 1 - logp.exp().gather(1, top).sum(-1)
    kl = ((top_q * (top_q.log() - logp.gather(1, top))).sum(-1)
          + rest_q * (rest_q.log() - rest_p.log())).mean()
    second = trainer.train_step(next(batches))
    assert float(kl) > 1e-4  # the step moved the model: a real comparison
    assert second["retain_replay_loss"] == pytest.approx(float(kl), rel=1e-4)


def test_the_protection_costs_one_forward_and_saves_no_statistics(tmp_path: Path) -> None:
    """Setting up the default protection (replay) is one pass over the replayed examples (their
    kept distributions), and its checkpoint tensors read back."""
    from meft.data.records import Sample
    from tokenizers_for_tests import make_tokenizer

    tokenizer = make_tokenizer()
    background = [Sample("qa", ({"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": str(2 * i)}), "",
                         (str(2 * i),), f"bg:{i}") for i in range(6)]
    model = get_meft_model(tiny("llama", vocab=len(tokenizer)), meft_config())
    forwards: list[int] = []
    handle = model.base_model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False, retain="on",
                         retain_replay=1)
    retainer = Retainer.from_config(model, config, background, tokenizer)
    handle.remove()
    assert len(forwards) == 1
    Trainer(model, examples(8, hi=len(tokenizer)), config, tmp_path / "run", pad_id=0,
            retainer=retainer).train()
    saved = retainer.tensors()
    assert not any(k.endswith((".counts", ".df", ".inputs")) for k in saved)
    retainer.restore(saved)
    assert retainer.background is not None and len(retainer.background.examples) == 6


def test_options_of_the_deleted_recipe_read_at_their_off_value_and_are_refused_else() -> None:
    """Runs and YAML files written before SMF's recipe was deleted: its options at the value
    that meant off (or with protection off) read as before, any other value is one error."""
    from meft.config import TrainJob

    job = TrainJob.from_options({"retain_rows": 0, "retain_hubs": 1.0, "retain_score": "kl",
                                 "retain_update": "keys+values"}, source="run.json")
    assert job.train.retain == "on"
    TrainJob.from_options({"retain": "off", "retain_rows": 512}, source="run.json")
    with pytest.raises(ConfigError, match=r"run\.json: retain_rows 512: that protection"):
        TrainJob.from_options({"retain_rows": 512}, source="run.json")
    with pytest.raises(ConfigError, match="retain_router 'frozen'"):
        TrainJob.from_options({"retain_router": "frozen"}, source="run.json")
