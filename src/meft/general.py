"""General knowledge shipped with meft, to measure what fine-tuning makes a model forget.

Two things, neither of which any training set of meft's contains:

* :func:`general_questions`: 215 short questions in 7 domains (capitals, chemical symbols,
  arithmetic, calendar order, opposites, languages, science and the world), each with the
  aliases that count as correct. A retention probe (:mod:`meft.retention`) keeps those a base
  model answers correctly and asks them again after training.
* :data:`GENERAL_TEXT`: a few paragraphs of plain encyclopedic prose written for meft; the
  change of a model's mean token loss on it measures drift on ordinary text.

Arithmetic questions are drawn from ``random.Random(0)``, so the set is the same everywhere. No
alias is a word a model says when it does not know ("I": iodine is left out), since an answer
counts when an alias appears in it.
"""

from __future__ import annotations

import random

from meft.data import Sample

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("the United Kingdom", "London"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("India", "New Delhi|Delhi"), ("Brazil", "Brasília|Brasilia"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
]
ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"),
    ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("potassium", "K"),
    ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("tin", "Sn"), ("neon", "Ne"),
    ("argon", "Ar"), ("uranium", "U"), ("nickel", "Ni"), ("lithium", "Li"),
    ("fluorine", "F"), ("chromium", "Cr"), ("platinum", "Pt"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
OPPOSITES = [
    ("hot", "cold"), ("big", "small|little"), ("up", "down"), ("day", "night"),
    ("black", "white"), ("old", "young|new"), ("fast", "slow"), ("happy", "sad|unhappy"),
    ("open", "closed|close|shut"), ("left", "right"), ("wet", "dry"), ("hard", "soft|easy"),
    ("early", "late"), ("full", "empty"), ("high", "low"), ("long", "short"),
    ("strong", "weak"), ("rich", "poor"), ("push", "pull"), ("win", "lose"),
    ("good", "bad|evil"), ("yes", "no"), ("in", "out"), ("thick", "thin"),
    ("heavy", "light"), ("love", "hate"), ("true", "false"), ("inside", "outside"),
    ("first", "last"), ("north", "south"),
]
LANGUAGES = [
    ("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"),
    ("Japan", "Japanese"), ("China", "Chinese|Mandarin|Mandarin Chinese"),
    ("Russia", "Russian"), ("Portugal", "Portuguese"), ("Brazil", "Portuguese"),
    ("Greece", "Greek"), ("the Netherlands", "Dutch"), ("Sweden", "Swedish"),
    ("Poland", "Polish"), ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("Mexico", "Spanish"),
    ("Argentina", "Spanish"), ("Finland", "Finnish|Finnish and Swedish"),
    ("Norway", "Norwegian"), ("Denmark", "Danish"), ("South Korea", "Korean"),
    ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("Hungary", "Hungarian"),
    ("Israel", "Hebrew"),
]
WORLD = [
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("At what temperature in degrees Celsius does water freeze?", "0|zero|0 degrees Celsius"),
    ("At what temperature in degrees Celsius does water boil?",
     "100|100 degrees Celsius|one hundred"),
    ("How many legs does a spider have?", "8|eight"),
    ("How many legs does an insect have?", "6|six"),
    ("How many days are there in a week?", "7|seven"),
    ("How many months are there in a year?", "12|twelve"),
    ("How many hours are there in a day?", "24|twenty-four|twenty four"),
    ("How many minutes are there in an hour?", "60|sixty"),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide|CO2"),
    ("What is the largest ocean on Earth?", "Pacific|Pacific Ocean"),
    ("What is the tallest mountain in the world?", "Mount Everest|Everest"),
    ("What is the longest river in Africa?", "Nile|Nile River|River Nile"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare|Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci|da Vinci|Leonardo"),
    ("What is the largest mammal?", "blue whale|whale"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("How many continents are there?", "7|seven"),
    ("What is the square root of 81?", "9|nine"),
    ("Which animal is known as the king of the jungle?", "lion|the lion"),
    ("What is the currency of Japan?", "yen|Japanese yen"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the smallest prime number?", "2|two"),
    ("How many sides does a triangle have?", "3|three"),
    ("How many sides does a hexagon have?", "6|six"),
    ("What is the chemical formula of water?", "H2O"),
]

GENERAL_TEXT = """\
Water moves between the sea, the air and the land in a cycle that has no beginning and no end. \
The sun warms the surface of oceans and lakes, and some of the water evaporates into the air as \
vapour. As warm air rises it cools, and the vapour condenses into tiny droplets that gather as \
clouds. When the droplets grow heavy enough they fall as rain or snow. Some of that water runs \
off into rivers and back to the sea, some soaks into the ground and feeds springs and wells, and \
some is taken up by plants and released again through their leaves.

The solar system formed about four and a half billion years ago from a cloud of gas and dust. \
At its centre is the Sun, a star that holds more than ninety-nine percent of the system's mass. \
Four small rocky planets orbit close to it: Mercury, Venus, Earth and Mars. Beyond them lies a \
belt of asteroids, and further out four giant planets made mostly of gas and ice: Jupiter, \
Saturn, Uranus and Neptune. Light from the Sun takes a little more than eight minutes to reach \
the Earth.

Green plants make their own food through photosynthesis. Inside their leaves, a pigment called \
chlorophyll captures energy from sunlight. The plant uses that energy to combine carbon dioxide \
from the air with water drawn up from its roots, producing sugar and releasing oxygen. Nearly \
all the oxygen in the atmosphere comes from this process, and almost every food chain on land \
begins with it.

Before printing, books were copied by hand, which made them rare and expensive. In the middle \
of the fifteenth century, printers in Europe began to use movable metal type, a press adapted \
from those used to make wine, and an oil-based ink. A single workshop could now produce \
hundreds of identical copies of a text in the time a scribe needed for one. Within fifty years \
presses were working in more than two hundred cities, and ideas travelled faster than ever \
before.

The human heart is a muscle about the size of a fist. It beats around seventy times a minute at \
rest, pumping blood through a network of vessels that would stretch many thousands of \
kilometres if laid end to end. Blood carries oxygen from the lungs to every cell of the body and \
brings carbon dioxide back to be breathed out. Regular exercise strengthens the heart, much as \
it strengthens other muscles.

Trade has linked distant peoples for thousands of years. Caravans crossed deserts carrying silk, \
spices and salt, and ships followed the seasonal winds across the Indian Ocean. Markets grew \
where routes met, and with goods came languages, religions, recipes and inventions. Many \
everyday words in European languages, such as sugar, coffee and orange, arrived along these \
routes from Arabic, Persian and other languages of the East.
"""


def _qa(question: str, aliases: str, domain: str) -> Sample:
    answers = tuple(aliases.split("|"))
    return Sample("qa", ({"role": "user", "content": question},
                         {"role": "assistant", "content": answers[0]}), "", answers,
                  f"general:{domain}")


def general_questions() -> list[Sample]:
    """The probe's 215 questions, in a fixed order (``source`` names each one's domain)."""
    out = [_qa(f"What is the capital of {c}?", a, "capitals") for c, a in CAPITALS]
    out += [_qa(f"What is the chemical symbol for {e}?", s, "elements") for e, s in ELEMENTS]
    rng = random.Random(0)
    sums: dict[tuple[int, int], None] = {}
    while len(sums) < 30:
        sums[rng.randint(2, 40), rng.randint(2, 40)] = None
    products: dict[tuple[int, int], None] = {}
    while len(products) < 10:
        products[rng.randint(2, 9), rng.randint(2, 9)] = None
    out += [_qa(f"What is {a} plus {b}?", str(a + b), "arithmetic") for a, b in sums]
    out += [_qa(f"What is {a} times {b}?", str(a * b), "arithmetic") for a, b in products]
    out += [_qa(f"Which day of the week comes after {d}?", DAYS[(i + 1) % 7], "calendar")
            for i, d in enumerate(DAYS)]
    out += [_qa(f"Which month comes after {m}?", MONTHS[(i + 1) % 12], "calendar")
            for i, m in enumerate(MONTHS)]
    out += [_qa(f"What is the opposite of {w}?", o, "opposites") for w, o in OPPOSITES]
    out += [_qa(f"What language is mainly spoken in {c}?", lang, "languages")
            for c, lang in LANGUAGES]
    out += [_qa(q, a, "world") for q, a in WORLD]
    return out


def general_text_samples() -> list[Sample]:
    """:data:`GENERAL_TEXT` as ``text`` samples, one per paragraph."""
    return [Sample("text", (), p.strip(), (), f"general:text {i}")
            for i, p in enumerate(GENERAL_TEXT.split("\n\n")) if p.strip()]
