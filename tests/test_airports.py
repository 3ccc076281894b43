"""The real-fact set (airports -> cities) and the removal of facts the model already knows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import meft.evaluation.evaluate as evaluate
from meft.cli.commands import main
from meft.data.airports import AIRPORTS, make_airports_set
from meft.data.datasets import drop_known, load_splits

pytest.importorskip("airportsdata")


def test_airports_set_has_two_real_facts_per_airport_in_five_phrasings() -> None:
    ks = make_airports_set(seed=0)
    assert len(ks.facts) == AIRPORTS and len(ks.eval) == 2 * AIRPORTS >= 600
    assert len(ks.train) == 3 * len(ks.eval) and len(ks.validation) == len(ks.eval)
    trained = {s.messages[0]["content"] for s in ks.train}
    for fact in ks.facts:
        assert fact["city"].lower() not in fact["name"].lower()
    for val, test in zip(ks.validation, ks.eval, strict=True):
        assert val.answers == test.answers and val.source == test.source
        assert val.messages[0]["content"] != test.messages[0]["content"]
        assert not {val.messages[0]["content"], test.messages[0]["content"]} & trained
    assert make_airports_set(seed=0) == ks and make_airports_set(seed=1).facts != ks.facts
    kef = next((f for f in ks.facts if f["code"] == "KEF"), None)
    assert kef is None or kef["city"] == "Reykjavik"


def test_known_facts_leave_every_split() -> None:
    splits = load_splits(None, None, dataset="airports")
    known_sources = {s.source for s in splits.test[::3]}
    kept = drop_known(splits, [s.source in known_sources for s in splits.test])
    for part in (kept.train, kept.validation, kept.test, kept.seen):
        assert part and not {s.source for s in part} & known_sources
    assert len(kept.test) == len(splits.test) - len(known_sources)
    assert set(kept.bits) == {s.source for s in kept.test}  # bits follow the facts kept
    # the facts the model knew become the probe of the same kind (retention_adjacent)
    assert kept.adjacent == [s for s in splits.test if s.source in known_sources]
    cities = {f["city"] for f in make_airports_set(seed=0).facts}
    assert set(kept.bits.values()) == {math.log2(len(cities))}
    assert f"{len(known_sources)} facts the base model already answered removed" in \
        kept.description


def test_meft_train_on_airports_removes_what_the_base_model_answers(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    known = {s.messages[0]["content"]
             for s in load_splits(None, None, dataset="airports").test[:10]}

    def fake(model, tokenizer, samples, **kw):  # type: ignore[no-untyped-def]
        return [s.answers[0] if s.messages[0]["content"] in known else "no idea"
                for s in samples]

    monkeypatch.setattr(evaluate, "generate_answers", fake)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "airports", "--model", str(model_dir), "--steps", "1",
                 "--max-eval", "4", "--no-progress", "--no-plots", "--no-eval-before",
                 "--no-retention", "--neurons", "64", "--top-k", "4", "--n-probe", "2",
                 "--output", str(out)]) == 0
    assert "10 facts the base model already answered removed, 890 left" in \
        capsys.readouterr().err
    assert json.loads((out / "run_config.json").read_text())["run"]["dataset"] == "airports"
