"""The base-model results cache (meft.evaluation.cache): computed once, found again, never wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, tiny_for
from meft.adapter.model import get_meft_model
from meft.cli.commands import main
from meft.config import MeftConfig
from meft.data.records import parse_record
from meft.evaluation.cache import BaseCache, fingerprint, shipped_files
from meft.evaluation.evaluate import generate_answers
from meft.evaluation.probe import general_loss


def _questions(n: int = 5) -> list:  # type: ignore[type-arg]
    return [parse_record({"question": f"Where is place {i}?", "answer": "there"}, f"q:{i}")
            for i in range(n)]


def test_the_fingerprint_follows_the_weights_not_the_adapter(tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tiny_for(tokenizer)
    before = fingerprint(model, tokenizer)
    get_meft_model(model, MeftConfig(neurons=64, top_k=4, n_probe=2))
    assert fingerprint(model, tokenizer) == before  # the adapter lives outside the base
    with torch.no_grad():
        list(model.parameters())[-1].view(-1)[0] += 1e-3  # one element of the last tensor
    assert fingerprint(model, tokenizer) != before


def test_the_fingerprint_does_not_depend_on_where_the_model_was_loaded_from(
        tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same weights loaded from two directories (two virtual environments hold the
    embedded model at two paths) have one fingerprint, so the shipped results are found."""
    from transformers import AutoModelForCausalLM

    model = tiny_for(tokenizer)
    for where in ("a", "b"):
        model.save_pretrained(tmp_path / where)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / w) for w in "ab")
    assert a.config._name_or_path != b.config._name_or_path
    assert fingerprint(a, tokenizer) == fingerprint(b, tokenizer) == fingerprint(model, tokenizer)


def test_answers_are_computed_once_and_equal_a_fresh_generation(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    model = tiny_for(tokenizer)
    cache = BaseCache(model, tokenizer)
    kw = {"max_new_tokens": 4, "batch_size": 2, "progress": False}
    fresh = generate_answers(model, tokenizer, _questions(), **kw)
    assert generate_answers(model, tokenizer, _questions(), cache=cache, **kw) == fresh
    files = list((tmp_path / "base").glob("answers-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["value"] == fresh and record["model"] == cache.model
    assert record["inputs"]["batch_size"] == 2 and len(record["inputs"]["prompts"]) == 5
    import meft.evaluation.evaluate as ev

    real = ev._generate
    monkeypatch.setattr(ev, "_generate", lambda *a, **k: pytest.fail("regenerated"))
    assert generate_answers(model, tokenizer, _questions(), cache=cache, **kw) == fresh
    # other settings or other prompts are other results
    monkeypatch.setattr(ev, "_generate", real)
    generate_answers(model, tokenizer, _questions(), cache=cache, **{**kw, "batch_size": 3})
    generate_answers(model, tokenizer, _questions(4), cache=cache, **kw)
    assert len(list((tmp_path / "base").glob("answers-*.json"))) == 3


def test_a_damaged_or_foreign_file_is_recomputed(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    cache = BaseCache(tiny_for(tokenizer), tokenizer)
    assert cache.get("answers", {"x": 1}, lambda: ["a"]) == ["a"]
    (path,) = (tmp_path / "base").glob("answers-*.json")
    for damage in ("{\"format\": \"meft-base", json.dumps({**json.loads(path.read_text()),
                                                          "model": "another"})):
        path.write_text(damage)
        assert cache.get("answers", {"x": 1}, lambda: ["b"]) == ["b"]
        assert json.loads(path.read_text())["value"] == ["b"]  # rewritten whole
        path.write_text(json.dumps({**json.loads(path.read_text()), "value": ["a"]}))


def test_an_unwritable_cache_costs_the_cache_not_the_run(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MEFT_CACHE", str(blocker / "cache"))  # a directory under a file
    cache = BaseCache(tiny_for(tokenizer), tokenizer)
    assert cache.get("answers", {"x": 1}, lambda: ["a"]) == ["a"]
    assert cache.get("answers", {"x": 2}, lambda: ["b"]) == ["b"]
    assert list(tmp_path.iterdir()) == [blocker]
    assert capsys.readouterr().err.count("base-model results not cached") == 1  # said once


def test_the_general_loss_is_cached_exactly(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    model = tiny_for(tokenizer)
    cache = BaseCache(model, tokenizer)
    fresh = general_loss(model, tokenizer)
    assert general_loss(model, tokenizer, cache=cache) == fresh
    assert general_loss(model, tokenizer, cache=cache) == fresh  # read back: the same float


def test_a_second_train_asks_the_base_model_nothing(
        model_dir: Path, data_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation before training, the retention probe and the background text come from the
    cache on the second run: only the trained model generates, and the results are equal."""
    monkeypatch.setenv("MEFT_CACHE", str(tmp_path / "cache"))
    import meft.evaluation.evaluate as ev

    real, calls = ev._generate, []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[7] if len(args) > 7 else kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "_generate", counting)
    flags = ["--model", str(model_dir), "--data", str(data_file), "--steps", "2",
             "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--no-plots",
             *TINY]
    assert main(["train", *flags, "--output", str(tmp_path / "a")]) == 0
    first, calls[:] = list(calls), []
    assert main(["train", *flags, "--output", str(tmp_path / "b")]) == 0
    assert {"eval before", "retention probe", "background text"} <= set(first)
    assert not {"eval before", "retention probe", "background text"} & set(calls)
    assert set(calls) == set(first) - {"eval before", "retention probe", "background text"}
    for name in ("eval_before.json", "retention_probe.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    runs = [json.loads((tmp_path / r / "run.json").read_text()) for r in "ab"]
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["scores"] == runs[1]["scores"]


@pytest.mark.slow
def test_the_shipped_results_are_the_embedded_models() -> None:
    """Every shipped file recomputed from its own inputs on the embedded model."""
    from meft.adapter.loading import load_model_and_tokenizer
    from meft.data.records import Encoded
    from meft.evaluation.evaluate import _generate, answer_loss
    from meft.training.protection import Background

    files = shipped_files()
    assert files, "no shipped base-model results"
    model, tokenizer, _ = load_model_and_tokenizer(None)
    assert {json.loads(f.read_text())["model"] for f in files} == {fingerprint(model, tokenizer)}
    cache = BaseCache(model, tokenizer)
    for path in files:
        record = json.loads(path.read_text())
        kind, inputs = record["kind"], record["inputs"]
        assert path.name == f"{kind}-{cache.key(kind, inputs)}.json"
        if kind == "answers":
            with torch.no_grad():
                fresh = _generate(model, tokenizer, inputs["prompts"], inputs["pad"],
                                  inputs["max_new_tokens"], inputs["batch_size"], False, "check")
            assert fresh == record["value"], path.name
        elif kind == "general_loss":
            windows = [Encoded(ids, labels, False) for ids, labels in inputs["windows"]]
            fresh = answer_loss(model, windows, inputs["pad"])
            assert fresh == pytest.approx(record["value"], rel=1e-5), path.name
        else:
            assert kind == "replay_targets"
            targets = Background({}, {}, 0)
            targets.examples = [Encoded(ids, labels, False) for ids, labels in inputs["examples"]]
            targets.keep_distributions(model, inputs["pad"], batch_size=inputs["batch_size"])
            assert targets.top_ids is not None and targets.top_p is not None
            assert targets.top_ids.tolist() == record["value"]["ids"], path.name
            assert torch.allclose(targets.top_p, torch.tensor(record["value"]["p"]),
                                  rtol=1e-4, atol=1e-7), path.name


def test_replay_targets_of_a_fresh_adapter_are_cached_exactly(
        tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from meft.config import TrainConfig
    from meft.training.protection import protection

    monkeypatch.setenv("MEFT_CACHE", str(tmp_path))
    base = tiny_for(tokenizer)
    model = get_meft_model(base, MeftConfig(neurons=64, top_k=4, n_probe=2))
    cache = BaseCache(base, tokenizer)
    plain = protection(model, tokenizer, config=TrainConfig(), progress=False)
    for _ in range(2):  # computed, then read back
        got = protection(model, tokenizer, config=TrainConfig(), progress=False, cache=cache)
        assert got.background is not None and plain.background is not None
        assert torch.equal(got.background.top_ids, plain.background.top_ids)  # type: ignore[arg-type]
        assert torch.equal(got.background.top_p, plain.background.top_p)  # type: ignore[arg-type]
    assert len(list((tmp_path / "base").glob("replay_targets-*.json"))) == 1
    with torch.no_grad():  # a trained adapter is not the base model: not cached, not read
        model.stores[0].values[0] += 1.0
    trained = protection(model, tokenizer, config=TrainConfig(), progress=False, cache=cache)
    assert trained.background is not None
    assert not torch.equal(trained.background.top_p, plain.background.top_p)  # type: ignore[arg-type]
