"""The built-in knowledge set: determinism, sizes, held-out phrasings, answers, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from meft.data.records import Sample, load_samples
from meft.data.synthetic import ATTRIBUTES, KnowledgeSet, make_knowledge_set, write_jsonl


def question(s: Sample) -> str:
    return s.messages[0]["content"]


def by_fact(ks: KnowledgeSet) -> list[tuple[dict[str, str], str]]:
    """(person, attribute) for each fact, in the documented person-then-attribute order."""
    return [(f, a) for f in ks.facts for a in ATTRIBUTES]


@pytest.mark.parametrize("train_phrasings", [1, 3, 4])
def test_sizes(train_phrasings: int) -> None:
    ks = make_knowledge_set(7, seed=3, train_phrasings=train_phrasings)
    assert len(ks.facts) == 7
    assert len(ks.eval) == len(ks.eval_seen) == 7 * 4
    assert len(ks.train) == 7 * 4 * train_phrasings
    assert {s.kind for s in ks.train + ks.eval + ks.eval_seen} == {"qa"}


def test_same_seed_same_set_and_other_seed_differs() -> None:
    a, b = make_knowledge_set(12, seed=5), make_knowledge_set(12, seed=5)
    assert a == b
    assert [question(s) for s in a.train] == [question(s) for s in b.train]
    c = make_knowledge_set(12, seed=6)
    assert [f["name"] for f in c.facts] != [f["name"] for f in a.facts]


def test_names_and_cities_unique_and_well_formed() -> None:
    ks = make_knowledge_set(300, seed=1)
    names = [f["name"] for f in ks.facts]
    assert len(set(names)) == len(names)
    for f in ks.facts:
        first, last = f["name"].split(" ")
        assert first.isalpha() and last.isalpha() and first[0].isupper() and last[0].isupper()
        assert f["city"].isalpha() and " " not in f["city"]
        assert 1900 <= int(f["year"]) <= 1999
        assert f["occupation"].isalpha() and f["instrument"].isalpha()
    assert len({f["city"] for f in ks.facts}) == len(ks.facts)


@pytest.mark.parametrize("train_phrasings", [1, 2, 3, 4])
def test_held_out_phrasing_is_new_and_answers_match_facts(train_phrasings: int) -> None:
    ks = make_knowledge_set(9, seed=2, train_phrasings=train_phrasings)
    facts = by_fact(ks)
    for k, (person, attribute) in enumerate(facts):
        train = ks.train[k * train_phrasings : (k + 1) * train_phrasings]
        held, seen = ks.eval[k], ks.eval_seen[k]
        want = person[attribute]
        for s in [*train, held, seen]:
            assert s.answers == (want,)
            assert s.messages[1] == {"role": "assistant", "content": want}
            assert person["name"] in question(s)
        train_questions = {question(s) for s in train}
        assert len(train_questions) == train_phrasings
        assert question(held) not in train_questions
        assert question(seen) == question(train[0])
    # the rotation shifts: across people, each attribute's held-out phrasing varies
    held_templates = {question(s).replace(p["name"], "{}")
                      for s, (p, a) in zip(ks.eval, facts, strict=True) if a == "city"}
    assert len(held_templates) == 5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="train_phrasings"):
        make_knowledge_set(3, train_phrasings=5)
    with pytest.raises(ValueError, match="train_phrasings"):
        make_knowledge_set(3, train_phrasings=0)
    with pytest.raises(ValueError, match="n_people"):
        make_knowledge_set(0)


def test_write_jsonl_load_samples_round_trip(tmp_path: Path) -> None:
    ks = make_knowledge_set(6, seed=4)
    for part in (ks.train, ks.eval):
        path = tmp_path / "k.jsonl"
        write_jsonl(part, path)
        back = load_samples(path)
        assert back == part
        assert [s.answers for s in back] == [s.answers for s in part]
        assert back[0].source == f"{path}:1"


def test_validation_phrasing_is_held_out_and_distinct_from_the_test_phrasing() -> None:
    ks = make_knowledge_set(6, seed=3)
    n_facts = 4 * 6
    assert len(ks.validation) == len(ks.eval) == n_facts
    trained = {s.messages[0]["content"] for s in ks.train}
    for val, test in zip(ks.validation, ks.eval, strict=True):
        assert val.answers == test.answers and val.source == test.source
        assert val.messages[0]["content"] != test.messages[0]["content"]
        assert val.messages[0]["content"] not in trained
    assert make_knowledge_set(6, seed=3, train_phrasings=4).validation == []


@pytest.mark.parametrize("people", [1, 7, 30])
def test_every_fact_carries_the_bits_of_its_answer(people: int) -> None:
    """bits: log2 of the values an attribute is drawn from (cities: one of ``people``), one
    entry per fact, the same for all of a fact's phrasings."""
    import math

    from meft.data.synthetic import INSTRUMENTS, OCCUPATIONS

    ks = make_knowledge_set(people, seed=2)
    assert set(ks.bits) == {s.source for s in ks.train} == {s.source for s in ks.eval}
    expect = {"city": math.log2(people), "occupation": math.log2(len(OCCUPATIONS)),
              "year": math.log2(100), "instrument": math.log2(len(INSTRUMENTS))}
    for source, bits in ks.bits.items():
        assert bits == expect[source.rsplit(" ", 1)[1]]


def test_one_training_phrasing_still_leaves_validation_and_test() -> None:
    from meft.data.datasets import load_splits

    splits = load_splits(None, None, seed=1, people=5, train_phrasings=1)
    assert len(splits.train) == len(splits.test) == len(splits.validation) == 20
    assert [s.messages for s in splits.train] == [s.messages for s in splits.seen]
    assert splits.bits == make_knowledge_set(5, seed=1).bits
    from meft.data.adjacent import real_people_questions

    assert splits.adjacent == real_people_questions()  # the same kinds, about real people


def test_real_people_are_asked_in_the_training_templates() -> None:
    from meft.data.adjacent import REAL_PEOPLE, real_people_questions
    from meft.data.synthetic import TEMPLATES

    questions = real_people_questions()
    assert len(questions) == 2 * len(REAL_PEOPLE) >= 250
    assert {a for _, a, _ in REAL_PEOPLE} == set(ATTRIBUTES)
    for q, (name, attribute, answers) in zip(questions[::2], REAL_PEOPLE, strict=True):
        assert q.messages[0]["content"] == TEMPLATES[attribute][0].format(name=name)
        assert q.answers == answers and all(answers)
