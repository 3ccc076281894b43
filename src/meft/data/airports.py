"""A built-in set of real facts: which city an airport serves, from the ``airportsdata`` package.

The synthetic set proves an adapter can store facts no model could know; this one asks for
real facts a small model mostly does not know. ``airportsdata`` (an optional extra:
``pip install 'meft[data]'``) lists the world's airports with their IATA codes and cities.
Each chosen airport gives two facts, both answered by its city:

    code   "Which city is served by the airport with IATA code KEF?"      -> Reykjavik
    name   "In which city is Keflavik International Airport?"             -> Reykjavik

Airports are those with an IATA code, a city, a name that does not contain the city (else the
question answers itself) and a city of at most three words, drawn by ``seed``. Each fact has
five phrasings, split as in the synthetic set (3 train, 1 validation, 1 test, by rotation).
A fact's ``bits`` are log2 of the number of distinct cities among the chosen airports' (the
answers it is told apart from). Facts the base model already answers are removed by the caller
(:func:`meft.data.datasets.drop_known`), so what remains is new to that model.
"""

from __future__ import annotations

import math
import random
from typing import Any

from meft.data.synthetic import KnowledgeSet, split_phrasings
from meft.errors import ConfigError

AIRPORTS = 450  # airports drawn (two facts each) before removing what the model knows
TEMPLATES: dict[str, tuple[str, ...]] = {
    "code": (
        "Which city is served by the airport with IATA code {code}?",
        "The airport code {code} belongs to which city?",
        "In which city is the airport {code}?",
        "Name the city of the airport whose IATA code is {code}.",
        "{code} is the IATA code of an airport in which city?",
    ),
    "name": (
        "In which city is {name}?",
        "Which city does {name} serve?",
        "{name} is located in which city?",
        "Name the city where {name} is.",
        "Where is {name}? Give the city.",
    ),
}


def _load() -> dict[str, dict[str, Any]]:
    try:
        import airportsdata
    except ImportError:
        raise ConfigError("the airports set needs the airportsdata package: pip install "
                          "'meft[data]' (or pip install airportsdata)") from None
    return {code: dict(row) for code, row in airportsdata.load("IATA").items()}


def make_airports_set(n_airports: int = AIRPORTS, *, seed: int = 0,
                      train_phrasings: int = 3) -> KnowledgeSet:
    """``n_airports`` airports, two facts each, split into phrasings (module doc)."""
    table = _load()
    eligible = sorted(
        (a for a in table.values()
         if a["iata"] and a["city"] and a["name"]
         and a["city"].lower() not in a["name"].lower() and len(a["city"].split()) <= 3),
        key=lambda a: a["iata"])
    rng = random.Random(seed)
    chosen = rng.sample(eligible, min(n_airports, len(eligible)))
    facts = [{"code": a["iata"], "name": a["name"], "city": a["city"],
              "country": a["country"]} for a in chosen]
    phrased = [(TEMPLATES[relation], {"code": f["code"], "name": f["name"]}, f["city"],
                f"airports:{f['code']} {relation}", i + r)
               for i, f in enumerate(facts) for r, relation in enumerate(TEMPLATES)]
    city_bits = math.log2(len({f["city"] for f in facts}))
    return split_phrasings(phrased, facts, train_phrasings,
                           {source: city_bits for *_, source, _ in phrased})
