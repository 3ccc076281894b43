"""The shipped question sets (meft.data.general): the headline set shares no template, domain or
question with what forgetting protection replays (meft.training.background.general_prompts)."""

from __future__ import annotations

import re
import string

from meft.data.general import UNSEEN_TEMPLATES, general_questions, unseen_questions
from meft.evaluation.metrics import normalize_answer
from meft.training.background import general_prompts

SEEN_DOMAINS = {"capitals", "elements", "arithmetic", "calendar", "opposites", "languages",
                "world"}
STRIP = string.whitespace + string.punctuation


def _question(sample) -> str:  # type: ignore[no-untyped-def]
    return str(sample.messages[0]["content"])


def _domain(sample) -> str:  # type: ignore[no-untyped-def]
    source = str(sample.source)
    assert source.startswith("general:")
    return source.removeprefix("general:")


def _fixed_text(template: str) -> str:
    """The longer side of the slot, lowercased, stripped of whitespace and punctuation."""
    sides = [side.strip(STRIP) for side in template.lower().split("{}")]
    return max(sides, key=lambda side: len(side.split()))


def _regex(template: str) -> re.Pattern[str]:
    before, after = template.split("{}")
    return re.compile(re.escape(before) + "(.+)" + re.escape(after), re.IGNORECASE)


def _shared_text(templates: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    """(template, prompt) pairs where the template's fixed text occurs inside the prompt."""
    lowered = [p.lower() for p in prompts]
    return [(t, p) for t in templates for p, low in zip(prompts, lowered, strict=True)
            if _fixed_text(t) in low]


def _produced(templates: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    """(template, prompt) pairs where the template, its slot filled, gives the prompt."""
    return [(t, p) for t in templates for p in prompts if _regex(t).fullmatch(p)]


def _all_templates() -> list[str]:
    return [t for templates in UNSEEN_TEMPLATES.values() for t in templates]


def test_the_unseen_set_is_large_varied_and_well_formed() -> None:
    qs = unseen_questions()
    assert len(qs) >= 240
    domains = {_domain(q) for q in qs}
    assert len(domains) >= 6
    assert domains == set(UNSEEN_TEMPLATES)
    texts = [_question(q) for q in qs]
    assert len(set(texts)) == len(texts)  # no question twice
    assert all(q.answers and all(a.strip() for a in q.answers) for q in qs)
    assert all(q.messages[1]["content"] == q.answers[0] for q in qs)  # the canonical answer
    assert unseen_questions() == qs  # a fixed order


def test_every_question_comes_from_a_template_of_its_domain() -> None:
    for template in _all_templates():
        assert template.count("{}") == 1, template
    for q in unseen_questions():
        templates = UNSEEN_TEMPLATES[_domain(q)]
        assert any(_regex(t).fullmatch(_question(q)) for t in templates), _question(q)


def test_no_alias_is_given_away_by_its_question_or_said_by_a_model_that_does_not_know() -> None:
    shrugs = {"i", "a", "an", "the", "no", "yes", "not", "it", "is", "us", "more", "none",
              "unknown", "sorry"}
    for q in unseen_questions():
        question = f" {normalize_answer(_question(q))} "
        for alias in q.answers:
            norm = normalize_answer(alias)
            assert norm, (alias, _question(q))
            assert norm not in shrugs, (alias, _question(q))
            assert f" {norm} " not in question, (alias, _question(q))


def test_no_unseen_template_shares_text_with_a_replayed_question() -> None:
    templates, prompts = _all_templates(), general_prompts()
    for template in templates:  # each has fixed text long enough to compare
        assert len(_fixed_text(template).split()) >= 3, template
    assert _shared_text(templates, prompts) == []
    assert _produced(templates, prompts) == []


def test_the_template_checks_catch_a_replay_template() -> None:
    """The two checks above can fail: the replay pool's own templates are caught."""
    replayed = ["What is the capital of {}?", "Which month comes before {}?",
                "What language is mainly spoken in {}?"]
    prompts = general_prompts()
    assert {t for t, _ in _shared_text(replayed, prompts)} == set(replayed)
    assert {t for t, _ in _produced(replayed, prompts)} == set(replayed)
    assert _produced(["How many {}?"], prompts)  # too general a template matches trivia
    assert _shared_text(["{}, which country is home to the kangaroo?"], prompts)


def test_unseen_domains_and_questions_are_not_the_seen_ones() -> None:
    seen = general_questions()
    assert len(seen) == 215  # the seen kinds, unchanged
    seen_domains = {_domain(q) for q in seen}
    assert seen_domains == SEEN_DOMAINS
    unseen = unseen_questions()
    assert not {_domain(q) for q in unseen} & seen_domains
    assert not set(UNSEEN_TEMPLATES) & seen_domains
    texts = {_question(q) for q in unseen}
    assert not texts & {_question(q) for q in seen}
    assert not texts & set(general_prompts())
