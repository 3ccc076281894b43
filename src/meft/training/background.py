"""Background text for forgetting protection: what the model should keep doing as it did.

:mod:`meft.training.protection` scores each step's rows against how often background text uses them,
and may replay it. The background must be text the user does not train on, in the form the model
is used in. By default it is the base model's own greedy answers to
:func:`background_prompts`, generated once per base model and cached (:mod:`meft.evaluation.cache`;
the embedded model's ship with meft): 480 prompts on everyday topics (80 topics x 6
instructions, written for meft; two ask for a one-line answer) and 192 short general-knowledge
questions of the kinds the retention probe asks (capitals, chemical symbols, languages,
opposites, sums, the calendar, the world: :func:`general_prompts`), none of the probe's own
questions and none about its countries, elements or words, so the probe stays a held-out
measurement of what was kept. The answers are whatever the base model said, right or wrong:
replay keeps behaviour, not truth. ``--background FILE`` gives the user's own (any format
``meft train`` reads).

Replay draws from the general questions only (:func:`replay_pool`) when the background holds
them: the topic prompts' long answers protected nothing the probe asks, and one replayed
question per step keeps about what two drawn from the whole background did (91.4% of the
probe against 92.4% over five seeds, learning one point less) at half the extra rows
(benchmarks/results/forgetting-protection/default-seeds). A background of the user's own that has
none of them is replayed whole.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meft.data.records import Sample, load_samples
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import generate_answers

TOPICS = [
    "bicycles", "bread", "the moon", "ponds", "pianos", "chess", "coffee", "rain",
    "volcanoes", "libraries", "lanterns", "football", "trains", "gardens", "cheese", "kites",
    "glaciers", "umbrellas", "lighthouses", "dolphins", "marathons", "candles", "bridges",
    "deserts", "owls", "tea", "windmills", "sailing", "mushrooms", "thunderstorms",
    "recycling", "dinosaurs", "telescopes", "yoga", "camping", "penguins", "chocolate",
    "earthquakes", "guitars", "museums", "forests", "rice", "birthdays", "clocks", "tigers",
    "skiing", "maps", "soap", "elephants", "snow", "origami", "cars", "the internet",
    "batteries", "dreams", "friendship", "bookbinding", "the alphabet", "newspapers",
    "hospitals", "pizza", "rainbows", "submarines", "the violin", "coral reefs", "wolves",
    "post offices", "solar panels", "cooking pasta", "learning a language", "swimming",
    "fireworks", "farms", "robots", "airplanes", "tides", "the Olympic Games", "knitting",
    "vaccines", "video games",
]
INSTRUCTIONS = [
    "Write two sentences about {t}.",
    "What is interesting about {t}? Answer briefly.",
    "Give one useful tip about {t}.",
    "How would you explain {t} to a child?",
    "Describe {t} in one short sentence.",
    "Answer in a few words: where would you find {t}?",
]
# Short general-knowledge questions of the probe's kinds (meft.data.general), none of its
# questions: other countries, elements, words and sums; the calendar asked backwards.
COUNTRIES = [
    "Nigeria", "Ghana", "Morocco", "Algeria", "Tunisia", "Ethiopia", "Colombia", "Venezuela",
    "Ecuador", "Bolivia", "Uruguay", "Paraguay", "New Zealand", "the Philippines", "Malaysia",
    "Pakistan", "Bangladesh", "Nepal", "Saudi Arabia", "Syria", "Jordan", "Lebanon",
    "Ukraine", "Romania", "Bulgaria", "Serbia", "Croatia", "Slovakia", "Estonia", "Latvia",
    "Lithuania", "Iceland", "Mongolia", "Afghanistan", "Cambodia", "Uganda", "Senegal",
    "Qatar", "Jamaica", "Panama",
]
MORE_ELEMENTS = [
    "boron", "beryllium", "manganese", "cobalt", "titanium", "bromine", "barium", "strontium",
    "arsenic", "selenium", "krypton", "xenon", "radon", "tungsten", "bismuth", "cesium",
    "gallium", "germanium", "vanadium", "cadmium", "palladium", "iridium", "plutonium",
    "radium", "iodine",
]
SPOKEN_IN = [
    "Colombia", "Venezuela", "Ecuador", "Bolivia", "Uruguay", "Morocco", "Algeria", "Ukraine",
    "Romania", "Bulgaria", "Serbia", "Croatia", "Slovakia", "Estonia", "Latvia", "Lithuania",
    "Iceland", "Saudi Arabia", "Ethiopia", "Pakistan",
]
MORE_WORDS = [
    "near", "clean", "quiet", "sweet", "cheap", "brave", "wide", "deep", "sharp", "smooth",
    "awake", "friend", "begin", "buy", "give", "laugh", "above", "arrive", "accept",
    "ancient", "polite", "tight", "dark", "remember", "male",
]
MORE_WORLD = [
    "How many legs does a dog have?", "What color is grass?",
    "What is the largest desert in the world?", "Which animal has a trunk?",
    "What do cows drink?", "What is the hardest natural substance?",
    "How many wheels does a bicycle have?", "Which planet do we live on?",
    "What is the main ingredient of guacamole?", "Which bird is a symbol of peace?",
    "How many strings does a standard guitar have?", "What is the fastest land animal?",
    "Which instrument has 88 keys?", "What do caterpillars turn into?",
    "How many players are on a football team on the field?",
    "How many hearts does an octopus have?", "Which ocean lies between Europe and America?",
    "What is the capital city of the state of New York?", "Who wrote Don Quixote?",
    "Who discovered penicillin?", "Which metal is liquid at room temperature?",
    "What is the largest bone in the human body?",
    "How many teeth does an adult human usually have?",
    "Which country is home to the kangaroo?", "What shape has four equal sides?",
]
DAY_NAMES = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTH_NAMES = ["January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December"]
MAX_NEW_TOKENS = 48


def general_prompts() -> list[str]:
    """192 short questions of the probe's kinds, none of its own (module doc)."""
    out = [f"What is the capital of {c}?" for c in COUNTRIES]
    out += [f"What is the chemical symbol for {e}?" for e in MORE_ELEMENTS]
    out += [f"What language is mainly spoken in {c}?" for c in SPOKEN_IN]
    out += [f"What is the opposite of {w}?" for w in MORE_WORDS]
    out += list(MORE_WORLD)
    rng = random.Random(1)  # the probe draws its sums from Random(0) in 2..40
    sums = {(rng.randint(41, 90), rng.randint(2, 40)) for _ in range(20)}
    out += [f"What is {a} plus {b}?" for a, b in sorted(sums)]
    out += [f"What is {a} minus {b}?" for a, b in sorted(sums)[:10]]
    out += [f"What is {a} times {b}?" for a, b in ((11, 3), (12, 4), (10, 7), (11, 5),
                                                   (12, 6), (10, 9), (11, 8), (12, 2))]
    out += [f"Which day of the week comes before {d}?" for d in DAY_NAMES]
    out += [f"Which month comes before {m}?" for m in MONTH_NAMES]
    return out


def background_prompts() -> list[str]:
    """The shipped prompts, in a fixed order: 480 on everyday topics, then the short
    general questions."""
    return [i.format(t=t) for t in TOPICS for i in INSTRUCTIONS] + general_prompts()


def model_background(model: Any, tokenizer: Any, *, batch_size: int = 32,
                     progress: bool = True, questions_only: bool = False,
                     cache: BaseCache | None = None) -> list[Sample]:
    """The base model's own greedy answers to the shipped prompts (cached:
    :mod:`meft.evaluation.cache`; ``cache`` for ``model``, made here when not given).
    ``questions_only``: the short general questions alone (all that replay draws from,
    :func:`replay_pool`), not the topic prompts whose long answers only replay of the whole
    background (``--retain-replay-pool whole``) reads."""
    prompts = background_prompts()
    first = len(prompts) - len(general_prompts()) if questions_only else 0
    asked = [Sample("prompt", ({"role": "user", "content": p},
                               {"role": "assistant", "content": ""}), "", ("",),
                    f"background:{i}") for i, p in enumerate(prompts) if i >= first]
    answers = generate_answers(model, tokenizer, asked, max_new_tokens=MAX_NEW_TOKENS,
                               batch_size=batch_size, progress=progress, desc="background text",
                               cache=cache if cache is not None else BaseCache(model, tokenizer))
    return answered(asked, answers)


def answered(samples: Sequence[Sample], answers: Sequence[str]) -> list[Sample]:
    """``samples`` (chat turns ending in an assistant turn) with that last turn and their
    reference replaced by ``answers`` (a model's own; "..." where it gave none)."""
    return [Sample(s.kind, (*s.messages[:-1], {"role": "assistant", "content": a or "..."}),
                   "", (a or "...",), s.source)
            for s, a in zip(samples, answers, strict=True)]


def replay_pool(samples: Sequence[Sample]) -> list[int]:
    """Indices of the background ``samples`` replay draws from (module doc): those whose
    prompt is one of :func:`general_prompts`, or all of them when none is."""
    general = set(general_prompts())
    pool = [i for i, s in enumerate(samples)
            if s.messages and s.messages[0].get("content") in general]
    return pool or list(range(len(samples)))


def load_background(path: str | Path | None, model: Any, tokenizer: Any, *,
                    progress: bool = True, questions_only: bool = False,
                    cache: BaseCache | None = None) -> tuple[list[Sample], str]:
    """The background samples and a description: the user's file, or the model's own
    (:func:`model_background`)."""
    if path is not None:
        samples = load_samples(path)
        return samples, f"{len(samples)} records of {path}"
    samples = model_background(model, tokenizer, progress=progress,
                               questions_only=questions_only, cache=cache)
    return samples, f"the base model's answers to {len(samples)} shipped prompts"
