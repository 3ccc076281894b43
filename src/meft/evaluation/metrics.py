"""Answer scoring: SQuAD-style exact match and token F1, plus "answer contained in output".

All three metrics compare a model's generated text with a list of reference aliases after the
SQuAD v1.1 evaluation script's normalisation (:func:`normalize_answer`): lower case, drop ASCII
punctuation, drop the articles a/an/the, collapse whitespace. Each metric takes the best score
over the aliases.

* ``exact_match``: the normalised prediction equals a normalised alias.
* ``f1``: token-level F1 between the normalised token lists, counting common tokens with
  multiplicity (``Counter`` intersection), as in the SQuAD script. Two empty token lists score
  1.0; exactly one empty list scores 0.0 (the SQuAD v2 convention for unanswerable questions).
* ``contains``: a non-empty normalised alias occurs in the normalised prediction as a run of
  whole words (``f" {alias} " in f" {pred} "``). This is the MEFT paper's "EM": a generation
  such as "He was born in Teluvia." counts as correct for the answer "Teluvia". Aliases that
  normalise to the empty string never match.

An empty alias list scores 0.0 on every metric.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, remove articles, collapse whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 of the normalised prediction, maximised over the aliases."""
    pred_tokens = normalize_answer(prediction).split()
    return max((_f1(pred_tokens, normalize_answer(a).split()) for a in answers), default=0.0)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a non-empty normalised alias occurs in the prediction as whole words, else 0.0."""
    padded = f" {normalize_answer(prediction)} "
    for a in answers:
        alias = normalize_answer(a)
        if alias and f" {alias} " in padded:
            return 1.0
    return 0.0


def score_predictions(predictions: Sequence[str],
                      answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ``exact_match``, ``f1`` and ``contains`` over the examples, plus their count ``n``.

    ``answers[i]`` holds the aliases of example i. An empty input scores 0.0 with n = 0.
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"got {len(predictions)} predictions for {len(answers)} reference answer lists"
        )
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "contains": 0.0, "n": 0}
    pairs = list(zip(predictions, answers, strict=True))
    return {
        "exact_match": sum(exact_match(p, a) for p, a in pairs) / n,
        "f1": sum(f1_score(p, a) for p, a in pairs) / n,
        "contains": sum(contains(p, a) for p, a in pairs) / n,
        "n": n,
    }
