"""The retention probe: what the base model answers is kept, asked again after training, and
scored; the general text's loss change; the built-in question set itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import meft.evaluation.evaluate as evaluate
from helpers import tiny_for
from meft.cli.commands import main
from meft.data.general import general_questions, general_text_samples
from meft.evaluation.probe import RetentionProbe, describe


def test_the_builtin_set_has_200_questions_in_6_domains() -> None:
    qs = general_questions()
    assert len(qs) >= 200
    assert len({q.source for q in qs}) >= 6
    texts = [q.messages[0]["content"] for q in qs]
    assert len(set(texts)) == len(texts)  # no question twice
    assert all(q.answers and all(a.strip() for a in q.answers) for q in qs)
    assert general_questions() == qs  # the same everywhere (arithmetic is seeded)
    assert len(general_text_samples()) >= 5


def _answering(correct: set[int], headline: list | None = None):  # type: ignore[no-untyped-def]
    """A stand-in for greedy generation that knows exactly the questions in ``correct``:
    indices into ``headline`` (default: the shipped unseen kinds) as they are, and into
    general_questions() as 1000 + index."""
    from meft.data.general import unseen_questions

    heads = headline if headline is not None else unseen_questions()
    index = {q.messages[0]["content"]: i for i, q in enumerate(heads)}
    index.update({q.messages[0]["content"]: 1000 + i for i, q in enumerate(general_questions())})

    def fake(model, tokenizer, samples, **kw):  # type: ignore[no-untyped-def]
        return [f"Surely {s.answers[-1]}." if index.get(s.messages[0]["content"]) in correct
                else "I do not know." for s in samples]

    return fake


def _mine() -> list:  # type: ignore[type-arg]
    from meft.data.records import Sample

    return [Sample("qa", ({"role": "user", "content": f"What is thing {i}?"},
                          {"role": "assistant", "content": f"thing{i}"}), "",
                   (f"thing{i}", f"t{i}"), f"mine:{i}") for i in range(6)]


def test_probe_keeps_what_the_base_answers_and_scores_what_survives(
        tokenizer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two sets: the headline (here the user's own) and the kinds replay trains; each keeps
    what the base model answers and is scored on those alone."""
    model = tiny_for(tokenizer)
    mine = _mine()
    knows = {0, 3, 4, 1000, 1041, 1214}
    monkeypatch.setattr(evaluate, "generate_answers", _answering(knows, mine))
    probe = RetentionProbe.build(model, tokenizer, progress=False, questions=mine,
                                 source="mine.jsonl")
    assert probe.kept_headline == [0, 3, 4] and probe.kept == [0, 41, 214]
    assert probe.asked == len(general_questions()) and len(probe.questions) == 6
    probe.save(tmp_path / "probe.json")
    assert RetentionProbe.load(tmp_path / "probe.json") == probe
    assert probe.headline() == mine  # the questions ride in the probe (sources aside)

    monkeypatch.setattr(evaluate, "generate_answers", _answering({3, 1000, 1041, 1007}, mine))
    result = probe.measure(model, tokenizer, progress=False)
    assert (result["retained"], result["kept"]) == (1, 3) and result["retention"] == 1 / 3
    assert (result["retained_seen_kinds"], result["kept_seen_kinds"]) == (2, 3)
    assert result["retention_seen_kinds"] == 2 / 3
    assert result["forgotten"] == ["What is thing 0?", "What is thing 4?"]
    qs = general_questions()
    assert result["forgotten_seen_kinds"] == [qs[214].messages[0]["content"]]
    assert result["general_loss_delta"] == 0.0  # the model did not change
    assert result["general_loss"] == probe.base_general_loss > 0
    line = describe(result)
    assert line.startswith("retention on the questions of mine.jsonl: 33.3% (1 of the 3")
    assert "on the kinds replay trains: 66.7% (2 of the 3" in line


def test_the_shipped_headline_is_the_unseen_kinds(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from meft.data.general import unseen_questions

    monkeypatch.setattr(evaluate, "generate_answers", _answering({1, 2, 1005}))
    probe = RetentionProbe.build(tiny_for(tokenizer), tokenizer, progress=False)
    assert probe.source == "shipped" and probe.headline() == unseen_questions()
    assert probe.kept_headline == [1, 2] and probe.kept == [5]
    assert "2 of " in probe.summary() and "kinds replay never trains" in probe.summary()


def test_a_model_that_answered_nothing_has_no_retention(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(evaluate, "generate_answers", _answering(set()))
    probe = RetentionProbe.build(tiny_for(tokenizer), tokenizer, progress=False)
    result = probe.measure(tiny_for(tokenizer), tokenizer, progress=False)
    assert probe.kept == probe.kept_headline == [] and result["retention"] is None
    assert result["retention_seen_kinds"] is None
    assert "n/a" in describe(result)


def test_probe_questions_refuse_what_is_not_a_question(tmp_path: Path) -> None:
    from meft.errors import DataError
    from meft.evaluation.probe import probe_questions

    with pytest.raises(DataError, match=r"--probe 8: no such file; .* --n-probe"):
        probe_questions("8")
    text = tmp_path / "text.jsonl"
    text.write_text('{"question": "Q?", "answer": ["a", "b"]}\n{"text": "prose"}\n')
    with pytest.raises(DataError, match=r"text\.jsonl:2: a retention question needs"):
        probe_questions(text)


def test_meft_train_reports_retention_and_can_skip_it(model_dir: Path, data_file: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"question": s.messages[0]["content"],
                                        "answer": list(s.answers)}) + "\n" for s in _mine()))
    monkeypatch.setattr(evaluate, "generate_answers",
                        _answering({0, 1, 1001, 1002, 1003, 1004}, _mine()))
    common = ["train", "--model", str(model_dir), "--data", str(data_file), "--steps", "1",
              "--no-progress", "--no-plots", "--no-eval-before", "--max-new-tokens", "2",
              "--neurons", "64", "--top-k", "4", "--n-probe", "2"]
    out = tmp_path / "run"
    assert main([*common, "--output", str(out), "--probe", str(mine)]) == 0
    captured = capsys.readouterr()
    assert (f"retention probe: the base model answers 2 of 6 questions of {mine} and 4 of "
            "215" in captured.err)
    assert f"retention on the questions of {mine}: 100.0% (2 of the 2" in captured.out
    assert json.loads((out / "eval.json").read_text())["retention"]["kept_seen_kinds"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["retention"]["retention"] == 1.0 and "forgotten" not in run["retention"]
    assert run["retention"]["retention_seen_kinds"] == 1.0
    assert RetentionProbe.load(out / "retention_probe.json").kept == [1, 2, 3, 4]
    skipped = tmp_path / "skipped"
    assert main([*common, "--output", str(skipped), "--no-retention"]) == 0
    assert "retention" not in json.loads((skipped / "eval.json").read_text())
    assert not (skipped / "retention_probe.json").exists()
    assert main([*common, "--output", str(tmp_path / "both"), "--no-retention", "--probe",
                 str(mine)]) == 2
    assert "--probe gives retention questions and --no-retention" in capsys.readouterr().err


def test_adjacent_kinds_are_kept_and_scored_apart(tokenizer, monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The training data's own kinds (real people for the synthetic set) form a third set:
    what the base model answers of them is kept and asked again, apart from the others; a
    probe file written before them loads with none."""
    import json

    from meft.data.adjacent import real_people_questions

    near = real_people_questions()[:5]
    by_q = {q.messages[0]["content"]: i for i, q in enumerate(near)}

    def knows(indices: set[int]):  # type: ignore[no-untyped-def]
        plain = _answering({1000})

        def fake(model, tokenizer, samples, **kw):  # type: ignore[no-untyped-def]
            return [f"It is {s.answers[0]}." if by_q.get(s.messages[0]["content"]) in indices
                    else p for s, p in zip(samples, plain(model, tokenizer, samples),
                                           strict=True)]
        return fake

    monkeypatch.setattr(evaluate, "generate_answers", knows({0, 2, 3}))
    probe = RetentionProbe.build(tiny_for(tokenizer), tokenizer, progress=False, adjacent=near)
    assert probe.kept_adjacent == [0, 2, 3] and probe.kept == [0]
    assert "3 of 5 of the training data's own kinds" in probe.summary()
    probe.save(tmp_path / "probe.json")
    assert RetentionProbe.load(tmp_path / "probe.json") == probe
    monkeypatch.setattr(evaluate, "generate_answers", knows({2}))
    result = probe.measure(tiny_for(tokenizer), tokenizer, progress=False)
    assert result["retention_adjacent"] == 1 / 3 and result["kept_adjacent"] == 3
    assert result["forgotten_adjacent"] == [near[0].messages[0]["content"],
                                            near[3].messages[0]["content"]]
    assert result["retention_seen_kinds"] == 1.0  # the seen kind still answered, apart
    assert "training data's own kinds the base model knew: 33.3% (1 of the 3" in describe(result)
    old = json.loads((tmp_path / "probe.json").read_text())
    del old["adjacent"], old["kept_adjacent"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = RetentionProbe.load(tmp_path / "old.json")
    assert loaded.adjacent == [] and loaded.kept_adjacent == []
    result = loaded.measure(tiny_for(tokenizer), tokenizer, progress=False)
    assert result["retention_adjacent"] is None and "own kinds" not in describe(result)
