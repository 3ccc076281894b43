"""Answer scoring: hand-worked SQuAD examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meft.evaluation.metrics import (
    contains,
    exact_match,
    f1_score,
    normalize_answer,
    score_predictions,
)


def test_normalize_answer_case_punctuation_articles_whitespace() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("  An apple, a Pear and THE plum.\n") == "apple pear and plum"
    # articles only as whole words
    assert normalize_answer("Theatre anthem") == "theatre anthem"
    assert normalize_answer("a") == ""


def test_exact_match() -> None:
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris France", ["paris"]) == 0.0
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert exact_match("anything", []) == 0.0


def test_f1_partial_overlap_by_hand() -> None:
    # "the big red dog" -> [big, red, dog]; "red dog" -> [red, dog]: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("the big red dog", ["red dog"]) == pytest.approx(0.8)
    # common tokens are counted with multiplicity: pred [red, red, dog], gold [red, dog, dog]
    # share one red and one dog: P = R = 2/3
    assert f1_score("red red dog", ["red dog dog"]) == pytest.approx(2 / 3)
    assert f1_score("blue cat", ["red dog"]) == 0.0


def test_f1_takes_best_alias_and_handles_empty() -> None:
    # [red, cat] vs [big, dog]: no common token -> 0; vs [red]: P = 1/2, R = 1 -> 2/3
    assert f1_score("red cat", ["big dog", "red"]) == pytest.approx(2 / 3)
    assert f1_score("the", ["a"]) == 1.0  # both normalise to nothing
    assert f1_score("the", ["dog"]) == 0.0
    assert f1_score("dog", ["an"]) == 0.0
    assert f1_score("dog", []) == 0.0


def test_contains_is_whole_word() -> None:
    assert contains("It is Paris.", ["Paris"]) == 1.0
    assert contains("Paris", ["Par"]) == 0.0
    assert contains("He was born in New York City in 1957", ["new york"]) == 1.0
    assert contains("Newyork", ["new york"]) == 0.0
    assert contains("nothing", ["London", "nothing"]) == 1.0
    assert contains("the", ["a"]) == 0.0  # an alias that normalises to nothing never matches
    assert contains("x", []) == 0.0


def test_score_predictions_means() -> None:
    preds = ["Paris", "It is London, I think", "red dog", "no idea"]
    refs = [["paris"], ["London"], ["the big red dog"], ["Rome"]]
    got = score_predictions(preds, refs)
    assert got["n"] == 4
    assert got["exact_match"] == pytest.approx(1 / 4)
    assert got["contains"] == pytest.approx(2 / 4)
    # f1 per example: 1; [it, is, london, i, think] vs [london]: P = 1/5, R = 1 -> 1/3;
    # [red, dog] vs [big, red, dog]: P = 1, R = 2/3 -> 0.8; 0
    assert got["f1"] == pytest.approx((1 + 1 / 3 + 0.8 + 0) / 4)


def test_score_predictions_empty_and_mismatch() -> None:
    assert score_predictions([], []) == {"exact_match": 0.0, "f1": 0.0, "contains": 0.0, "n": 0}
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_predictions(["a", "b"], [["a"]])


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
words = st.text(alphabet="abcdefghij ,.!", max_size=30)


@given(texts)
def test_exact_match_of_itself(x: str) -> None:
    assert exact_match(x, [x]) == 1.0
    assert f1_score(x, [x]) == 1.0
    if normalize_answer(x):
        assert contains(x, [x]) == 1.0


@given(st.one_of(texts, words), st.lists(st.one_of(texts, words), max_size=4))
def test_metric_ranges_and_order(pred: str, answers: list[str]) -> None:
    em, f1, c = exact_match(pred, answers), f1_score(pred, answers), contains(pred, answers)
    assert 0.0 <= f1 <= 1.0
    assert em in (0.0, 1.0) and c in (0.0, 1.0)
    assert em <= f1
    if em and normalize_answer(pred):
        assert c == 1.0
