"""The built-in knowledge dataset: facts about invented people that no model can already know.

MEFT's claim is about knowledge-intensive fine-tuning: a large sparse adapter stores new facts.
Testing that on public QA data mixes what the adapter learned with what the base model already
knew. Here every person, and every city they are born in, is invented from random syllables, so
before training a model can only guess (occupations, years and instruments are plain words,
which bounds guessing at roughly one in twenty, one in a hundred and one in sixteen).

Each person has four attributes: birth city (an invented single word such as "Teluvia"),
occupation, birth year (1900-1999) and instrument. Each attribute has five question templates.
For each (person, attribute) fact, ``train_phrasings`` templates, chosen by a rotation that
shifts with the person and the attribute, become training questions; the next template in the
rotation, never seen in training, becomes the held-out ``eval`` question. Scoring the held-out
phrasing tests that the model learned the fact rather than a question string; ``eval_seen``
(the first training phrasing of each fact) measures plain memorisation for comparison.

Everything is drawn from ``random.Random(seed)``: the same seed gives identical sets.

``bits`` gives, per fact (by its samples' ``source``), the information its answer carries: the
log2 of the number of values its attribute is drawn from, uniformly (occupation 20, year 100,
instrument 16; the birth cities are distinct, so a city picks one of ``n_people``). A model that
recalls a set of facts stores at least the sum of their bits (the measure of Allen-Zhu and Li,
Physics of Language Models 3.3, who find about 2 bits per parameter at 1,000 exposures).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meft.data.records import Sample, write_jsonl

__all__ = ["ATTRIBUTES", "KnowledgeSet", "make_knowledge_set", "write_jsonl"]

_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ve", "nu", "to", "sa", "da", "ri", "mo", "le", "ta", "vi", "no",
    "ze", "ku", "ba", "fe", "li", "go", "ma", "ne", "ro", "su", "te", "pa", "ya", "zo", "vu",
)
_NAME_ENDINGS = ("", "", "", "n", "l", "r", "s", "th", "x", "nd")
_CITY_ENDINGS = ("via", "ria", "more", "ford", "holm", "grad", "dor", "wick", "mar", "lan")

OCCUPATIONS = (
    "baker", "pilot", "geologist", "carpenter", "nurse", "architect", "librarian", "chemist",
    "farmer", "sculptor", "surgeon", "journalist", "astronomer", "plumber", "translator",
    "botanist", "tailor", "engineer", "photographer", "veterinarian",
)
INSTRUMENTS = (
    "cello", "oboe", "violin", "trumpet", "harp", "clarinet", "flute", "piano", "accordion",
    "banjo", "bassoon", "trombone", "saxophone", "ukulele", "viola", "harmonica",
)

ATTRIBUTES = ("city", "occupation", "year", "instrument")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "Where was {name} born?",
        "In which city was {name} born?",
        "What is the birthplace of {name}?",
        "{name} was born in which city?",
        "Name the city where {name} was born.",
    ),
    "occupation": (
        "What is {name}'s occupation?",
        "What does {name} do for a living?",
        "What is {name}'s job?",
        "{name} works as what?",
        "What profession does {name} have?",
    ),
    "year": (
        "In what year was {name} born?",
        "When was {name} born?",
        "What is {name}'s year of birth?",
        "{name} was born in which year?",
        "Which year was {name} born in?",
    ),
    "instrument": (
        "What instrument does {name} play?",
        "Which instrument is played by {name}?",
        "{name} plays which instrument?",
        "What musical instrument does {name} play?",
        "Name the instrument {name} plays.",
    ),
}
N_TEMPLATES = 5


@dataclass(frozen=True)
class KnowledgeSet:
    """``train``: ``train_phrasings`` questions per fact; ``eval``: one held-out phrasing per
    fact (the test set); ``eval_seen``: the first training phrasing per fact; ``validation``:
    one more held-out phrasing per fact, distinct from the test one and trained on by nobody,
    for choosing settings (empty when ``train_phrasings`` leaves no fifth template);
    ``facts``: one dict per person (keys ``name`` and :data:`ATTRIBUTES`). All samples are of
    kind "qa", ordered by person then attribute."""

    train: list[Sample]
    eval: list[Sample]
    eval_seen: list[Sample]
    facts: list[dict[str, str]]
    validation: list[Sample] = field(default_factory=list)
    bits: dict[str, float] = field(default_factory=dict)  # source -> bits of its answer


def _word(rng: random.Random, n_syllables: tuple[int, int], endings: tuple[str, ...]) -> str:
    k = rng.randint(*n_syllables)
    return ("".join(rng.choice(_SYLLABLES) for _ in range(k)) + rng.choice(endings)).capitalize()


def _unique_words(rng: random.Random, n: int, make: Callable[[random.Random], str],
                  taken: set[str]) -> list[str]:
    """n words from ``make`` that are not in ``taken`` (which is updated)."""
    words: list[str] = []
    attempts = 0
    while len(words) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not invent {n} distinct names; use fewer people")
        w = make(rng)
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _qa(question: str, answer: str, source: str) -> Sample:
    return Sample("qa", ({"role": "user", "content": question},
                         {"role": "assistant", "content": answer}), "", (answer,), source)


def make_knowledge_set(n_people: int = 40, *, seed: int = 0,
                       train_phrasings: int = 3) -> KnowledgeSet:
    """Invent ``n_people`` people and split their 4 * n_people facts' questions (module doc)."""
    if n_people < 1:
        raise ValueError(f"n_people must be positive, got {n_people}")
    if not 1 <= train_phrasings <= N_TEMPLATES - 1:
        raise ValueError(f"train_phrasings must be in [1, {N_TEMPLATES - 1}] so that a phrasing "
                         f"is left for evaluation, got {train_phrasings}")
    rng = random.Random(seed)
    taken: set[str] = set()
    firsts = _unique_words(rng, n_people, lambda r: _word(r, (2, 3), _NAME_ENDINGS), taken)
    lasts = [_word(rng, (2, 3), _NAME_ENDINGS) for _ in range(n_people)]
    cities = _unique_words(rng, n_people, lambda r: _word(r, (1, 2), _CITY_ENDINGS), taken)
    facts = [
        {
            "name": f"{first} {last}",
            "city": city,
            "occupation": rng.choice(OCCUPATIONS),
            "year": str(rng.randint(1900, 1999)),
            "instrument": rng.choice(INSTRUMENTS),
        }
        for first, last, city in zip(firsts, lasts, cities, strict=True)
    ]
    phrased = [(TEMPLATES[attribute], {"name": fact["name"]}, fact[attribute],
                f"synthetic:person {p} {attribute}", p + a)
               for p, fact in enumerate(facts) for a, attribute in enumerate(ATTRIBUTES)]
    choices = {"city": n_people, "occupation": len(OCCUPATIONS), "year": 100,
               "instrument": len(INSTRUMENTS)}
    bits = {f"synthetic:person {p} {attribute}": math.log2(choices[attribute])
            for p in range(n_people) for attribute in ATTRIBUTES}
    return split_phrasings(phrased, facts, train_phrasings, bits)


def split_phrasings(phrased: list[tuple[tuple[str, ...], dict[str, str], str, str, int]],
                    facts: list[dict[str, str]], train_phrasings: int,
                    bits: dict[str, float] | None = None) -> KnowledgeSet:
    """Questions of each fact (templates, their fields, answer, source, rotation start) split
    into train / test / seen / validation phrasings by the rotation of the module doc."""
    train: list[Sample] = []
    held_out: list[Sample] = []
    seen: list[Sample] = []
    validation: list[Sample] = []
    for templates, fields_, answer, source, start in phrased:
        n = len(templates)
        order = [(start + j) % n for j in range(train_phrasings + 1)]
        questions = [templates[t].format(**fields_) for t in order]
        train += [_qa(q, answer, source) for q in questions[:-1]]
        held_out.append(_qa(questions[-1], answer, source))
        seen.append(_qa(questions[0], answer, source))
        if train_phrasings + 2 <= n:
            spare = templates[(start + train_phrasings + 1) % n]
            validation.append(_qa(spare.format(**fields_), answer, source))
    return KnowledgeSet(train=train, eval=held_out, eval_seen=seen, facts=facts,
                        validation=validation, bits=dict(bits or {}))

