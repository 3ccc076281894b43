"""Which examples a job trains, chooses and is scored on: the built-in set or the user's files.

:func:`load_splits` returns four lists of samples:

    train        what the model trains on
    validation   held-out questions for choosing settings (``meft bench --lr-grid``); never
                 the test questions
    test         held-out questions the reported scores come from
    seen         training phrasings asked back (memorisation, for comparison; built-in only)
    adjacent     questions like the set's own about what the base model may know, for the
                 retention probe (:mod:`meft.data.adjacent`; built-in only: real people for
                 the synthetic set, for airports the facts :func:`drop_known` removes)

With no data file: a built-in set, ``train_phrasings`` (default 3) training phrasings, 1
validation and 1 test phrasing per fact, and each fact's ``bits`` (the information in its
answer, by source): ``dataset="synthetic"`` (:mod:`meft.data.synthetic`, ``people`` invented
people x 4 facts) or ``dataset="airports"`` (:mod:`meft.data.airports`, real airports and their
cities; the caller then removes the facts its base model already answers with
:func:`drop_known`). With
``data``: that file; ``eval_data`` is the test set, or else 10% of ``data`` (at most 200,
chosen by ``seed``) is held out as the test set; ``validation_data`` is the validation set, or
else there is none.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from meft.data.adjacent import real_people_questions
from meft.data.airports import make_airports_set
from meft.data.records import Sample, load_samples
from meft.data.synthetic import make_knowledge_set


@dataclass
class Splits:
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    seen: list[Sample]
    description: str
    bits: dict[str, float] = field(default_factory=dict)  # built-in: source -> answer bits
    adjacent: list[Sample] = field(default_factory=list)


DATASETS = ("synthetic", "airports")


def load_splits(data: str | None, eval_data: str | None, validation_data: str | None = None,
                *, seed: int = 0, people: int = 30, dataset: str = "synthetic",
                train_phrasings: int = 3) -> Splits:
    validation = load_samples(validation_data) if validation_data else None
    if data is None:
        if dataset == "airports":
            ks = make_airports_set(seed=seed, train_phrasings=train_phrasings)
            what = f"built-in airports set: {len(ks.eval)} real facts (airport -> city)"
        else:
            ks = make_knowledge_set(people, seed=seed, train_phrasings=train_phrasings)
            what = (f"built-in synthetic knowledge set: {len(ks.facts)} fictional people, "
                    f"{len(ks.eval)} facts")
        test = load_samples(eval_data) if eval_data else ks.eval
        val = validation if validation is not None else ks.validation
        return Splits(ks.train, val, test, ks.eval_seen, (
            f"{what}, {len(ks.train)} training questions, {len(val)} validation and "
            f"{len(test)} held-out test phrasings"), ks.bits,
            real_people_questions() if dataset != "airports" else [])
    train = load_samples(data)
    val = validation or []
    if eval_data:
        return Splits(train, val, load_samples(eval_data), [],
                      f"{data} ({len(train)} examples)")
    if len(train) >= 10:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = min(200, max(1, len(train) // 10))
        held = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        return Splits(train, val, held, [], (
            f"{data}: {len(train)} training examples, {len(held)} held out for evaluation "
            "(pass --eval-data to choose)"))
    return Splits(train, val, [], [], f"{data} ({len(train)} examples; too few to hold some "
                                       "out)")


def drop_known(splits: Splits, known: list[bool]) -> Splits:
    """Remove, from every split, each fact whose test question the model already answers
    (``known``, aligned with ``splits.test``; a fact is identified by its samples' ``source``);
    their test questions join ``adjacent``: facts of the same kind the model knows."""
    gone = {s.source for s, k in zip(splits.test, known, strict=True) if k}

    def keep(samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if s.source not in gone]

    return Splits(keep(splits.train), keep(splits.validation), keep(splits.test),
                  keep(splits.seen), f"{splits.description}; {len(gone)} facts the base "
                  f"model already answered removed, {len(splits.test) - len(gone)} left",
                  {k: v for k, v in splits.bits.items() if k not in gone},
                  [*splits.adjacent, *(s for s in splits.test if s.source in gone)])


def split_sets(splits: Splits, parts: int) -> list[Splits]:
    """``splits`` cut into ``parts`` disjoint fact sets of equal size, for continual learning
    (``meft bench --sets``): the facts in the order of ``splits.test`` (the built-in set: person
    by person, so a person's facts stay in one set), the i-th consecutive run of
    ``len(test) / parts`` facts is set i; every split keeps only its set's facts (``adjacent``
    is shared)."""
    sources = list(dict.fromkeys(s.source for s in splits.test))
    if parts < 1 or len(sources) % parts:
        raise ValueError(f"{len(sources)} facts do not split into {parts} sets of equal size")
    size = len(sources) // parts
    out = []
    for i in range(parts):
        mine = set(sources[i * size:(i + 1) * size])

        def keep(samples: list[Sample], mine: set[str] = mine) -> list[Sample]:
            return [s for s in samples if s.source in mine]

        out.append(Splits(keep(splits.train), keep(splits.validation), keep(splits.test),
                          keep(splits.seen), f"set {i + 1} of {parts}: {size} facts",
                          {k: v for k, v in splits.bits.items() if k in mine},
                          splits.adjacent))
    return out
