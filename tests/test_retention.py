"""The retention probe: what the base model answers is kept, asked again after training, and
scored; the general text's loss change; the built-in question set itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import meft.evaluate as evaluate
from helpers import tiny_for
from meft.cli import main
from meft.general import general_questions, general_text_samples
from meft.retention import RetentionProbe, describe


def test_the_builtin_set_has_200_questions_in_6_domains() -> None:
    qs = general_questions()
    assert len(qs) >= 200
    assert len({q.source for q in qs}) >= 6
    texts = [q.messages[0]["content"] for q in qs]
    assert len(set(texts)) == len(texts)  # no question twice
    assert all(q.answers and all(a.strip() for a in q.answers) for q in qs)
    assert general_questions() == qs  # the same everywhere (arithmetic is seeded)
    assert len(general_text_samples()) >= 5


def _answering(correct: set[int]):  # type: ignore[no-untyped-def]
    """A stand-in for greedy generation that knows exactly the questions in ``correct``."""
    index = {q.messages[0]["content"]: i for i, q in enumerate(general_questions())}

    def fake(model, tokenizer, samples, **kw):  # type: ignore[no-untyped-def]
        return [f"Surely {s.answers[-1]}." if index.get(s.messages[0]["content"]) in correct
                else "I do not know." for s in samples]

    return fake


def test_probe_keeps_what_the_base_answers_and_scores_what_survives(
        tokenizer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_for(tokenizer)
    knows = {0, 3, 41, 100, 150, 214}
    monkeypatch.setattr(evaluate, "generate_answers", _answering(knows))
    probe = RetentionProbe.build(model, tokenizer, progress=False)
    assert probe.kept == sorted(knows) and probe.asked == len(general_questions())
    probe.save(tmp_path / "probe.json")
    assert RetentionProbe.load(tmp_path / "probe.json") == probe

    monkeypatch.setattr(evaluate, "generate_answers", _answering({0, 41, 150, 7, 8}))
    result = probe.measure(model, tokenizer, progress=False)
    assert (result["retained"], result["kept"]) == (3, 6) and result["retention"] == 0.5
    qs = general_questions()
    assert result["forgotten"] == [qs[i].messages[0]["content"] for i in (3, 100, 214)]
    assert result["general_loss_delta"] == 0.0  # the model did not change
    assert result["general_loss"] == probe.base_general_loss > 0
    assert describe(result).startswith("retention 50.0% (3 of the 6 general questions")


def test_a_model_that_answered_nothing_has_no_retention(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(evaluate, "generate_answers", _answering(set()))
    probe = RetentionProbe.build(tiny_for(tokenizer), tokenizer, progress=False)
    result = probe.measure(tiny_for(tokenizer), tokenizer, progress=False)
    assert probe.kept == [] and result["retention"] is None
    assert "n/a" in describe(result)


def test_meft_train_reports_retention_and_can_skip_it(model_dir: Path, data_file: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    monkeypatch.setattr(evaluate, "generate_answers", _answering({1, 2, 3, 4}))
    common = ["train", "--model", str(model_dir), "--data", str(data_file), "--steps", "1",
              "--no-progress", "--no-plots", "--no-eval-before", "--max-new-tokens", "2",
              "--neurons", "64", "--top-k", "4", "--probe", "2"]
    out = tmp_path / "run"
    assert main([*common, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "retention probe: the base model answers 4 of 215" in err
    assert "retention 100.0% (4 of the 4 general questions" in err
    assert json.loads((out / "eval.json").read_text())["retention"]["kept"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["retention"]["retention"] == 1.0 and "forgotten" not in run["retention"]
    assert RetentionProbe.load(out / "retention_probe.json").kept == [1, 2, 3, 4]
    skipped = tmp_path / "skipped"
    assert main([*common, "--output", str(skipped), "--no-retention"]) == 0
    assert "retention" not in json.loads((skipped / "eval.json").read_text())
    assert not (skipped / "retention_probe.json").exists()
