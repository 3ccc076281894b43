"""Background text (meft.training.background) and ``meft train --retain on`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, tiny_for
from meft.cli.commands import main
from meft.data.general import GENERAL_TEXT, general_questions
from meft.training.background import (
    background_prompts,
    general_prompts,
    load_background,
    model_background,
    replay_pool,
)
from meft.training.protection import REPLAY_TOKENS


def test_prompts_are_many_and_share_nothing_with_the_probe() -> None:
    from meft.data import general
    from meft.training.background import COUNTRIES, MORE_ELEMENTS, MORE_WORDS, SPOKEN_IN

    prompts = background_prompts()
    questions = general_prompts()
    assert len(prompts) == len(set(prompts)) == 480 + len(questions)
    assert len(questions) == 192 and prompts[480:] == questions
    probe = {s.messages[0]["content"] for s in general_questions()}
    assert not probe & set(prompts)
    # the topic prompts share no word with the probe's domains or its general text
    words = {w.strip(".,?").lower() for p in prompts[:480] for w in p.split()}
    for held_out in ("capital", "symbol", "plus", "times", "opposite", "photosynthesis",
                     "printing", "heart", "planet", "bees", "river"):
        assert held_out not in words
        assert held_out in " ".join([*probe, GENERAL_TEXT]).lower()
    # the general questions ask about no country, element or word the probe asks about
    asked = {c for c, _ in general.CAPITALS} | {c for c, _ in general.LANGUAGES}
    assert not asked & (set(COUNTRIES) | set(SPOKEN_IN))
    assert not {e for e, _ in general.ELEMENTS} & set(MORE_ELEMENTS)
    opposites = {w for a, b in general.OPPOSITES for w in (a, *b.split("|"))}
    assert not opposites & set(MORE_WORDS)


def test_the_model_background_is_generated_once_and_cached(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    model = tiny_for(tokenizer)
    first = model_background(model, tokenizer, progress=False)
    assert len(list((tmp_path / "base").glob("answers-*.json"))) == 1
    assert len(first) == 672 and all(s.kind == "prompt" and s.answers[0] for s in first)
    assert [s.messages[0]["content"] for s in first] == background_prompts()
    # replay alone needs only the general questions: the same answers (the same batches of
    # 32: the topic prompts are 15 whole batches), generated without the topic prompts
    questions = model_background(model, tokenizer, progress=False, questions_only=True)
    assert questions == first[480:]
    import meft.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "_generate", lambda *a, **k: pytest.fail("regenerated"))
    assert model_background(model, tokenizer, progress=False) == first  # from the cache
    assert model_background(model, tokenizer, progress=False, questions_only=True) == questions


def test_the_users_background_file(tokenizer, data_file: Path) -> None:  # type: ignore[no-untyped-def]
    samples, desc = load_background(data_file, None, tokenizer)
    assert len(samples) == 12 and desc == f"12 records of {data_file}"


def test_train_with_protection_records_it_and_resumes_bitwise(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path / "cache"))
    flags = ["--model", str(model_dir), "--data", str(data_file), "--steps", "4",
             "--batch-size", "4", "--lr", "1e-2", "--max-new-tokens", "3", "--no-progress",
             "--no-eval-before", "--no-retention", "--no-plots", "--retain", "on",
             "--retain-replay", "2", *TINY]
    assert main(["train", *flags, "--output", str(tmp_path / "whole")]) == 0
    err = capsys.readouterr().err
    assert "background: the base model's answers to 192 shipped prompts" in err
    assert "forgetting protection: 2 of 192 background examples replayed per step" in err
    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all(len(r["retained_rows_per_layer"]) == 2 for r in metrics)
    # distilled replay: nothing to hold before the first update, then the model has moved
    assert abs(metrics[0]["retain_replay_loss"]) < 1e-5
    # (a replayed question may read none of the few rows trained so far: ~0 until it does)
    assert all(r["retain_replay_loss"] > -1e-6 for r in metrics)
    assert metrics[-1]["retain_replay_loss"] > 1e-7
    assert main(["train", *flags, "--output", str(tmp_path / "half"), "--stop-after",
                 "2"]) == 0
    assert main(["train", "--resume", str(tmp_path / "half"), "--no-progress"]) == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "half" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the replayed examples ride in the checkpoint, each cut after its first answer tokens
    saved = [load_file(f) for f in (tmp_path / "half").rglob("*.safetensors")]
    replay = [t for t in saved if "retain.replay.labels" in t]
    assert replay
    labels = replay[0]["retain.replay.labels"].split(replay[0]["retain.replay.lengths"].tolist())
    targets = [int((x[1:] != -100).sum()) for x in labels]
    assert len(targets) == 192 and 0 < max(targets) <= REPLAY_TOKENS  # the general questions
    run = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert run["config"]["train"]["retain"] == "on"
    assert run["config"]["train"]["retain_replay"] == 2


def test_train_from_a_saved_adapter_keeps_its_rows_under_protection(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    monkeypatch.setenv("MEFT_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(model_dir), "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
              "--max-new-tokens", "3", "--no-progress", "--no-eval-before", "--no-retention",
              "--no-plots"]
    first = tmp_path / "first"
    assert main(["train", *common, "--data", str(data_file), "--output", str(first),
                 *TINY]) == 0
    second_data = tmp_path / "second.jsonl"
    second_data.write_text("".join(
        json.dumps({"question": f"What is the colour of item {i}?", "answer": f"Zorbic{i}"})
        + "\n" for i in range(8)))
    assert main(["train", *common, "--data", str(second_data), "--adapter",
                 str(first / "adapter"), "--neurons", "64", "--output",
                 str(tmp_path / "bad")]) == 2
    assert ("--adapter " + str(first / "adapter") + " fixes the adapter's shape; drop "
            "--neurons") in capsys.readouterr().err
    second = tmp_path / "second"
    assert main(["train", *common, "--data", str(second_data), "--adapter",
                 str(first / "adapter"), "--retain", "on", "--output", str(second)]) == 0
    err = capsys.readouterr().err
    assert "starting from the adapter in" in err and "rows written earlier kept" in err
    recorded = json.loads((second / "run_config.json").read_text())
    assert recorded["adapter"]["neurons"] == 64 and recorded["adapter"]["top_k"] == 4
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(second / "adapter" / "adapter_model.safetensors")
    changed = False
    for name in a:
        if name.endswith("values"):
            written = a[name].abs().amax(1) > 0
            assert written.any()
            assert torch.equal(a[name][written], b[name][written])  # the first run's rows
            assert torch.equal(a[name.replace("values", "keys")][written],
                               b[name.replace("values", "keys")][written])
            changed |= not torch.equal(a[name], b[name])
    assert changed  # the second run learned in other rows
    # --rehearse: the first run's data replayed instead, its rows train (--retain-written auto)
    rehearsed = tmp_path / "rehearsed"
    assert main(["train", *common, "--data", str(second_data), "--adapter",
                 str(first / "adapter"), "--rehearse", str(data_file), "--output",
                 str(rehearsed)]) == 0
    err = capsys.readouterr().err
    assert "earlier examples rehearsed per step" in err and "rows written earlier" not in err
    c = load_file(rehearsed / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(a[n][a[n].abs().amax(1) > 0], c[n][a[n].abs().amax(1) > 0])
               for n in a if n.endswith("values"))
    assert main(["train", *common, "--data", str(second_data), "--rehearse", str(data_file),
                 "--output", str(tmp_path / "no-adapter")]) == 2
    assert "--rehearse keeps what an earlier adapter learned" in capsys.readouterr().err


def test_protection_for_a_loop_of_your_own_is_meft_trains_default(
        tokenizer, data_file: Path) -> None:  # type: ignore[no-untyped-def]
    """meft.training.protection.protection (what MeftTrainer users pass as retainer=) builds what
    meft train builds by default: its settings and the statistics measured on the same text."""
    from helpers import meft_config
    from meft.adapter.model import get_meft_model
    from meft.config import TrainConfig
    from meft.data.records import load_samples
    from meft.training.protection import Retainer, protection

    def wrapped():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return get_meft_model(tiny_for(tokenizer), meft_config())

    got = protection(wrapped(), tokenizer, data_file, progress=False)
    want = Retainer.from_config(wrapped(), TrainConfig(), load_samples(data_file), tokenizer)
    defaults = TrainConfig()
    assert (got.replay, got.replay_target, got.replay_weight) == (
        defaults.retain_replay, defaults.retain_replay_target, defaults.retain_replay_weight)
    assert got.background is not None and got.background.documents == 12
    assert got.tensors().keys() == want.tensors().keys()
    for name, t in want.tensors().items():
        assert torch.equal(got.tensors()[name], t), name
    assert got.background.examples == want.background.examples  # type: ignore[union-attr]
    # without a file: the base model's own answers to the shipped prompts; replay alone (the
    # default) reads only the general questions, so only those are generated
    own = protection(wrapped(), tokenizer, progress=False)
    assert own.background is not None and own.background.documents == 192
    # a file of the user's own is replayed whole; the shipped background, its questions only
    assert len(got.background.examples) == 12  # type: ignore[union-attr]
    assert len(own.background.examples) == len(general_prompts()) == 192
    assert "1 of 192 background examples replayed per step" in own.summary()
    whole = protection(wrapped(), tokenizer, config=TrainConfig(retain_replay_pool="whole"),
                       progress=False)
    assert len(whole.background.examples) == 672  # type: ignore[union-attr]


def test_replay_draws_from_the_general_questions_when_the_background_has_them(
        tokenizer, data_file: Path) -> None:  # type: ignore[no-untyped-def]
    from meft.data.records import Sample

    def prompt(text: str) -> Sample:
        return Sample("prompt", ({"role": "user", "content": text},
                                 {"role": "assistant", "content": "x"}), "", ("x",), "t")

    questions = general_prompts()
    mixed = [prompt("Write two sentences about tea."), prompt(questions[5]),
             prompt("Describe owls in one short sentence."), prompt(questions[0])]
    assert replay_pool(mixed) == [1, 3]  # in the background's order
    own, _ = load_background(data_file, None, tokenizer)
    assert replay_pool(own) == list(range(12))  # none of them: all of it
    assert replay_pool([]) == []


def test_a_max_length_that_leaves_nothing_to_replay_is_one_line(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every replayed example cut before its answer: a user error before training, not a
    failure at the first step."""
    long_prompts = tmp_path / "bg.jsonl"
    long_prompts.write_text("".join(json.dumps({"question": "word " * 60 + f"{i}?",
                                                "answer": ["yes"]}) + "\n" for i in range(4)))
    code = main(["train", "--model", str(model_dir), "--data", str(data_file), "--background",
                 str(long_prompts), "--max-length", "40", "--steps", "1", "--no-progress",
                 "--no-plots", "--no-retention", "--no-eval-before", "--output",
                 str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "Traceback" not in "\n".join(err)
    assert err[-1] == ("meft: error: --max-length 40: every replayed background example lost "
                       "its answer to truncation; raise --max-length (or --retain-replay 0)")
