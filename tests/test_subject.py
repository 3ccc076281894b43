"""Subject routing's fit and decision (meft.training.subject) against plain references: the
cumulative decision equals a loop over positions; the fit equals an LDA computed by hand on
the tokens whose surprise (from a full pass of the base model, one example at a time) is above
the cut; the pre-pass stops at the deciding block and decides as a full pass would."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from helpers import TINY, files, meft_config, random_examples, tiny
from meft.adapter.model import MeftModel, find_decoder_layers, find_mlp, get_meft_model
from meft.adapter.serialization import load_tensors
from meft.cli.commands import main
from meft.data.records import Encoded, collate
from meft.errors import ConfigError
from meft.training.subject import decide, fit_subject_router, positions, routed, token_surprise


def _reference(model: MeftModel, e: Encoded, layer: int) -> tuple[Tensor, Tensor]:
    """Block ``layer``'s MLP inputs (T, d) float64 and each token's surprise (T,), from a
    full pass of the base model on ``e`` alone, the surprise by a loop over positions."""
    mlp = find_mlp(find_decoder_layers(model.base_model)[layer])
    assert mlp is not None
    seen: list[Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
    handle.remove()
    surprise = [0.0]
    for t in range(1, len(e.input_ids)):
        p = torch.softmax(logits[t - 1], -1)[e.input_ids[t]]
        surprise.append(-math.log(float(p)))
    return seen[0].double(), torch.tensor(surprise, dtype=torch.float64)


def test_routed_is_every_real_position_from_the_first_that_passes_on() -> None:
    gen = torch.Generator().manual_seed(3)
    passes = torch.rand(6, 11, generator=gen) < 0.15
    mask = torch.ones(6, 11, dtype=torch.long)
    for row, n in enumerate((11, 9, 4, 11, 1, 7)):
        mask[row, n:] = 0  # right padding
    out = routed(passes, mask)
    for row in range(6):
        on = False
        for t in range(11):
            real = bool(mask[row, t])
            on = on or (real and bool(passes[row, t]))
            assert bool(out[row, t]) == (on and real)


def test_token_surprise_is_the_negative_log_probability_of_each_next_token() -> None:
    gen = torch.Generator().manual_seed(4)
    logits, ids = torch.randn(2, 5, 7, generator=gen), torch.randint(0, 7, (2, 5), generator=gen)
    out = token_surprise(logits, ids)
    for row in range(2):
        assert float(out[row, 0]) == 0.0
        for t in range(1, 5):
            expected = -math.log(float(torch.softmax(logits[row, t - 1].double(), -1)[ids[row, t]]))
            assert abs(float(out[row, t]) - expected) < 1e-5


@pytest.mark.parametrize("layer", [0, 1])
def test_fit_equals_an_lda_by_hand_on_the_surprising_tokens(layer: int) -> None:
    model = get_meft_model(tiny(), meft_config())
    train, background = random_examples(10, 1, 2, 40), random_examples(16, 2, 30, 97)
    refs = [_reference(model, e, layer) for e in train]
    ordered = torch.cat([s[1:] for _, s in refs]).sort().values
    mid = len(ordered) // 2  # about half the tokens new; tau between two of them, so float
    tau = float(ordered[mid - 1] + ordered[mid]) / 2  # rounding cannot move a token across
    share, shrink = 0.1, 1.0
    router = fit_subject_router(model, train, background, layer=layer, share=share, tau=tau,
                                shrink=shrink, batch_size=3)
    new = torch.cat([x[s > tau] for x, s in refs])
    old = torch.cat([_reference(model, e, layer)[0] for e in background])
    mn, mo = new.mean(0), old.mean(0)
    s = ((new - mn).T @ (new - mn) + (old - mo).T @ (old - mo)) / (len(new) + len(old) - 2)
    w = torch.linalg.solve(s + shrink * s.diagonal().mean() * torch.eye(32, dtype=s.dtype),
                           mn - mo)
    b = torch.quantile(old @ w, 1 - share) + 1e-3 * (old @ w).std()
    torch.testing.assert_close(router, torch.cat([w, b.reshape(1)]).float(), rtol=1e-4,
                               atol=1e-5)
    passed = float((old.float() @ router[:-1] > router[-1]).float().mean())
    assert passed <= share + 1 / len(old)


def test_the_pre_pass_stops_at_the_deciding_block_and_decides_as_a_full_pass() -> None:
    model = get_meft_model(tiny(layers=3), meft_config())
    examples = random_examples(5, 7, 2, 97)
    router = fit_subject_router(model, examples, random_examples(8, 8, 2, 97), layer=1, share=0.3,
                                tau=0.0)
    batch = collate(examples, pad_id=0)
    above: list[int] = []
    block2 = find_decoder_layers(model.base_model)[2]
    handle = block2.register_forward_pre_hook(lambda m, args: above.append(1))
    out = decide(model, router, 1, batch["input_ids"], batch["attention_mask"])
    handle.remove()
    assert not above  # nothing above the deciding block ran
    for row, e in enumerate(examples):
        x, _ = _reference(model, e, 1)
        passes = (x.float() @ router[:-1] > router[-1])[None]
        expected = routed(passes, torch.ones_like(passes, dtype=torch.long))[0]
        assert torch.equal(out[row, :len(e.input_ids)], expected)
        assert not out[row, len(e.input_ids):].any()  # pads are never routed
    assert out.any() and not out.all()  # the case decides something


def test_bad_fit_settings_are_errors() -> None:
    model = get_meft_model(tiny(), meft_config())
    train = random_examples(4, 1, 2, 40)
    with pytest.raises(ValueError, match="share"):
        fit_subject_router(model, train, train, layer=0, share=0.0)
    with pytest.raises(ValueError, match=r"blocks 0\.\.2"):
        fit_subject_router(model, train, train, layer=3)
    with pytest.raises(ConfigError, match="surprise above"):
        fit_subject_router(model, train, train, layer=0, tau=1e9)


TRIGGER = 95  # the token that starts routing in the tests below (the random ids avoid it)


def _written(model: MeftModel) -> MeftModel:
    """Every row written (values no longer zero), as after training."""
    gen = torch.Generator().manual_seed(5)
    for adapter in model.adapter_modules:
        values = adapter.store.values
        values.copy_(0.5 * torch.randn(values.shape, generator=gen, dtype=values.dtype))
    return model


def _from_trigger(input_ids: Tensor, mask: Tensor) -> Tensor:
    return routed(input_ids == TRIGGER, mask)


def test_routed_positions_only_a_sequence_with_none_is_the_base_model_bitwise() -> None:
    model = _written(get_meft_model(tiny(), meft_config()))
    ids = torch.randint(2, 90, (3, 10), generator=torch.Generator().manual_seed(6))
    ids[1, 4] = TRIGGER  # routed from position 4 on
    ids[2, 0] = TRIGGER  # routed everywhere
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.route_positions(_from_trigger)
        out = model(input_ids=ids).logits
    assert torch.equal(out[0], base[0])  # no position routed: the base model
    assert torch.equal(out[1, :4], base[1, :4])  # before the first routed position
    assert not torch.allclose(out[1, 4:], base[1, 4:])  # routed: the written rows act
    assert torch.equal(out[2], full[2])  # every position routed: the adapter as without
    assert not torch.allclose(full[0], base[0])  # (the case is not trivial)


def test_routed_generation_with_a_cache_is_the_whole_sequences() -> None:
    model = _written(get_meft_model(tiny(), meft_config()))
    ids = torch.randint(2, 90, (2, 6), generator=torch.Generator().manual_seed(7))
    ids[0, 3] = TRIGGER
    model.route_positions(_from_trigger)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, use_cache=True, **kw)
    whole = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, whole)
    with model.disable_adapter():
        base = model.generate(input_ids=ids[1:], use_cache=True, **kw)
    if not (cached[1] == TRIGGER).any():  # nothing routed in row 1: the base model's answer
        assert torch.equal(cached[1:], base)


def test_subject_routing_leaves_every_position_before_the_first_routed_one_exact() -> None:
    model = get_meft_model(tiny(layers=3), meft_config())
    examples = random_examples(6, 9, 2, 97)
    router = fit_subject_router(model, examples, random_examples(8, 8, 2, 97), layer=1, share=0.2,
                                tau=0.0)
    _written(model)
    batch = collate(examples, pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    decided = decide(model, router, 1, ids, mask)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
        model.route_positions(positions(model, router, 1))
        out = model(input_ids=ids, attention_mask=mask).logits
    assert decided.any() and not decided[mask.bool()].all()
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        first = int(decided[row].nonzero()[0]) if decided[row].any() else n
        assert torch.equal(out[row, :first], base[row, :first])
        if first < n:
            assert not torch.allclose(out[row, first:n], base[row, first:n])


RUN = ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--lr", "1e-2",
       "--no-progress", "--no-plots", "--no-eval-before", "--no-retention",
       "--max-new-tokens", "2", "--retain-subject", "1", *TINY]



def test_train_with_subject_routing_stops_and_resumes_bitwise(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    background = tmp_path / "background.jsonl"  # small, so that nothing is generated
    background.write_text("".join(json.dumps({"question": f"What colour is thing {i}?",
                                              "answer": ["blue" if i % 2 else "red"]}) + "\n"
                                  for i in range(16)))
    common = ["train", "--model", str(model_dir), "--data", str(data_file), "--background",
              str(background), "--retain-replay", "0"]
    assert main([*common, "--output", str(whole), *RUN]) == 0
    assert "subject routing decided at block 1" in capsys.readouterr().err
    assert main([*common, "--output", str(split), *RUN, "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(split), "--no-progress"]) == 0  # restored from it
    assert files(whole / "adapter") == files(split / "adapter")
    ckpt = load_tensors(split / "checkpoints" / "step-00000004", "optimizer")
    assert ckpt["retain.subject"].shape == (33,)
    losses = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert losses == again and len(losses) == 4


def test_bad_subject_settings_are_one_line_errors(model_dir: Path, data_file: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common = ["train", "--model", str(model_dir), "--data", str(data_file), *TINY]
    for extra, message in (
            (["--retain-subject", "1", "--retain", "off"],
             "--retain-subject is fitted on the protection's background"),
            (["--retain-subject", "1", "--retain-gate", "0.1"],
             "--retain-subject and --retain-gate both decide"),
            (["--retain-gate-contrast", "people"],
             "it needs --retain-gate or --retain-subject")):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--methods", "meft:4096+retain", "lora:qv:4+retain",
                 "--retain-subject", "13"]) == 2
    err = capsys.readouterr().err
    assert "lora:qv:4+retain: --retain-subject is protection only meft's sparse tables" in err
