"""General knowledge shipped with meft, to measure what fine-tuning makes a model forget.

Three things, none of which any training set of meft's contains:

* :func:`unseen_questions`: the headline probe, 277 short questions in 7 domains (grammar:
  irregular plurals and comparatives; landmarks: the city or country of a famous place;
  materials: what a thing is made of or from; currencies; units: unit symbols and
  conversions; the body: what we do with which part, which organ does what; abbreviations).
  Each is a template of :data:`UNSEEN_TEMPLATES` (two at most per domain, one ``{}`` slot)
  filled with one item. Forgetting protection replays short general questions
  (:func:`meft.training.background.general_prompts`); none of these templates or domains is among
  them, so this set measures what a model keeps of what replay never trains: the
  ``retention`` of :mod:`meft.evaluation.probe`. SmolLM2-135M-Instruct (the embedded default)
  answers 166 of them, 15 or more in every domain.
* :func:`general_questions`: the seen kinds, 215 short questions in 7 domains (capitals,
  chemical symbols, arithmetic, calendar order, opposites, languages, science and the world).
  Replay trains on other questions from the same templates (other countries, elements, words,
  sums, trivia), so their score is reported apart as ``retention_seen_kinds``: it tells how
  well replay protects the kinds it trains, and would flatter replay as the headline.
* :data:`GENERAL_TEXT`: a few paragraphs of plain encyclopedic prose written for meft; the
  change of a model's mean token loss on it measures drift on ordinary text.

A retention probe (:mod:`meft.evaluation.probe`) keeps the questions a base model answers correctly
and asks them again after training. Each question comes with the aliases that count as
correct, the first the canonical answer (spelling variants, digits and words for numbers).
Arithmetic questions are drawn from ``random.Random(0)``, so the sets are the same everywhere.
No alias is a word a model says when it does not know ("I": iodine is left out; "US", "won",
"real" and "more" neither), and none appears in its own question, since an answer counts when
an alias appears in it.
"""

from __future__ import annotations

import random

from meft.data.records import Sample

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


# The headline set (unseen_questions): kinds of question the replay pool never asks. One list
# of (slot, aliases) per template of UNSEEN_TEMPLATES, in the same order.
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("woman", "women"), ("tooth", "teeth"),
    ("foot", "feet"), ("goose", "geese"), ("person", "people|persons"), ("knife", "knives"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("life", "lives"), ("shelf", "shelves"),
    ("thief", "thieves"), ("cactus", "cacti|cactuses"), ("ox", "oxen"), ("crisis", "crises"),
    ("analysis", "analyses"), ("phenomenon", "phenomena"), ("criterion", "criteria"),
    ("fungus", "fungi|funguses"), ("nucleus", "nuclei"), ("radius", "radii|radiuses"),
    ("louse", "lice"), ("dwarf", "dwarfs|dwarves"), ("lady", "ladies"), ("fox", "foxes"),
    ("index", "indices|indexes"),
]
COMPARATIVES = [
    ("good", "better"), ("bad", "worse"), ("far", "farther|further"), ("big", "bigger"),
    ("happy", "happier"), ("small", "smaller"), ("tall", "taller"), ("easy", "easier"),
    ("hot", "hotter"),
]
NEW_YORK = "New York|New York City|NYC"
USA = "United States|USA|America|United States of America"
LANDMARK_CITIES = [
    ("the Eiffel Tower", "Paris"), ("the Colosseum", "Rome"), ("Big Ben", "London"),
    ("the Statue of Liberty", NEW_YORK), ("the Golden Gate Bridge", "San Francisco"),
    ("the Kremlin", "Moscow"), ("the Brandenburg Gate", "Berlin"), ("the Acropolis", "Athens"),
    ("the Taj Mahal", "Agra"), ("the Sagrada Familia", "Barcelona"), ("the Burj Khalifa", "Dubai"),
    ("the Christ the Redeemer statue", "Rio de Janeiro|Rio"), ("the Space Needle", "Seattle"),
    ("the Forbidden City", "Beijing|Peking"),
    ("the White House", "Washington|Washington DC|Washington, D.C.|Washington D.C."),
    ("the Petronas Towers", "Kuala Lumpur"), ("the Alhambra", "Granada"),
    ("Red Square", "Moscow"), ("the Trevi Fountain", "Rome"), ("Westminster Abbey", "London"),
    ("the Hagia Sophia", "Istanbul|Constantinople"), ("the Prado Museum", "Madrid"),
    ("the Rijksmuseum", "Amsterdam"), ("the Uffizi Gallery", "Florence|Firenze"),
    ("St Mark's Basilica", "Venice|Venezia"), ("the Hollywood sign", "Los Angeles|LA"),
]
LANDMARK_COUNTRIES = [
    ("Machu Picchu", "Peru"), ("the Great Wall", "China"),
    ("Stonehenge", "England|United Kingdom|UK|Britain|Great Britain"),
    ("Angkor Wat", "Cambodia"), ("Petra", "Jordan"), ("Chichen Itza", "Mexico"),
    ("Mount Fuji", "Japan"), ("the Taj Mahal", "India"), ("Uluru", "Australia"),
    ("Table Mountain", "South Africa"), ("Mount Kilimanjaro", "Tanzania"),
    ("the Grand Canyon", USA), ("Easter Island", "Chile"),
    ("Neuschwanstein Castle", "Germany"), ("the Leaning Tower of Pisa", "Italy"),
    ("Mount Everest", "Nepal|China|Tibet"), ("Christ the Redeemer", "Brazil"),
    ("the Blue Mosque", "Turkey|Türkiye"), ("the Great Barrier Reef", "Australia"),
    ("Loch Ness", "Scotland|United Kingdom|UK|Britain|Great Britain"),
    ("Mount Vesuvius", "Italy"), ("the Suez Canal", "Egypt"),
]
MADE_OF = [
    ("a window pane", "glass"), ("a candle", "wax|paraffin|paraffin wax|beeswax"),
    ("a car tyre", "rubber"), ("a brick", "clay"), ("a wedding ring", "gold|platinum"),
    ("a pencil lead", "graphite"), ("a pair of jeans", "denim|cotton"),
    ("a cricket bat", "willow|wood"), ("a teacup", "porcelain|ceramic|clay"),
    ("a nail", "steel|iron|metal"), ("an igloo", "snow|ice"),
    ("a bar of soap", "fat|fats|oil|oils|lye"), ("a tennis ball", "rubber"),
    ("a pencil", "wood|graphite"), ("an envelope", "paper"), ("a balloon", "rubber|latex"),
    ("a sail", "canvas|cloth|fabric|sailcloth|nylon|polyester"),
    ("a horseshoe", "iron|steel|metal"), ("a banknote", "paper|cotton|polymer|plastic"),
]
MADE_FROM = [
    ("cheese", "milk"), ("bread", "flour|wheat|dough"), ("butter", "milk|cream"),
    ("wine", "grapes|grape"), ("glass", "sand|silica"),
    ("chocolate", "cocoa|cocoa beans|cacao|cacao beans"),
    ("beer", "barley|malt|hops|grain|grains|wheat"), ("popcorn", "corn|maize"),
    ("tofu", "soybeans|soybean|soy|soya|soya beans|soy beans"), ("cider", "apples|apple"),
    ("ketchup", "tomatoes|tomato"), ("a raisin", "grape|grapes"),
    ("wool", "sheep|fleece|hair"), ("silk", "silkworms|silkworm|cocoons|silkworm cocoons"),
    ("leather", "animal skin|animal skins|skin|skins|hides"), ("steel", "iron"),
    ("honey", "nectar"), ("pasta", "flour|wheat|durum wheat|semolina"),
    ("maple syrup", "sap|maple sap"), ("charcoal", "wood"),
    ("paper", "wood|wood pulp|pulp|trees|cellulose"), ("bronze", "copper|tin"),
    ("flour", "wheat|grain|grains|cereal"),
    ("sugar", "sugar cane|sugarcane|sugar beet|sugar beets|beet|beets|cane"),
    ("an omelette", "eggs|egg"), ("hummus", "chickpeas|chickpea|garbanzo beans"),
    ("marmalade", "oranges|orange|citrus|citrus fruit|citrus fruits|Seville oranges"),
    ("tequila", "agave|blue agave"), ("sake", "rice"), ("a pickle", "cucumber|cucumbers"),
    ("sauerkraut", "cabbage"), ("concrete", "cement|sand|gravel"),
]
EURO = "euro|euros"
CURRENCIES = [
    ("Mexico", "peso|Mexican peso|pesos"),
    ("the United States", "dollar|US dollar|United States dollar|dollars"),
    ("the United Kingdom", "pound|pound sterling|British pound|sterling|pounds"),
    ("India", "rupee|Indian rupee|rupees"), ("China", "yuan|renminbi|Chinese yuan|RMB"),
    ("Russia", "ruble|rouble|Russian ruble|Russian rouble|rubles|roubles"),
    ("Germany", EURO), ("France", EURO), ("the Netherlands", EURO), ("Greece", EURO),
    ("Switzerland", "franc|Swiss franc|francs"),
    ("South Korea", "South Korean won|Korean won"), ("Brazil", "Brazilian real|reais"),
    ("South Africa", "rand|South African rand"), ("Canada", "Canadian dollar|dollar|dollars"),
    ("Australia", "Australian dollar|dollar|dollars"),
    ("Sweden", "krona|Swedish krona|kronor"), ("Norway", "krone|Norwegian krone|kroner"),
    ("Denmark", "krone|Danish krone|kroner"), ("Poland", "zloty|złoty|Polish zloty"),
    ("Turkey", "lira|Turkish lira"), ("Israel", "shekel|new shekel|Israeli new shekel|shekels"),
    ("Thailand", "baht|Thai baht"), ("Vietnam", "dong|Vietnamese dong"),
    ("Indonesia", "rupiah|Indonesian rupiah"), ("Egypt", "Egyptian pound|pound|pounds"),
    ("Argentina", "peso|Argentine peso|pesos"), ("Hungary", "forint|Hungarian forint"),
    ("the Czech Republic", "koruna|Czech koruna|Czech crown|crown"),
    ("Saudi Arabia", "riyal|Saudi riyal"), ("the Philippines", "peso|Philippine peso|pesos"),
    ("Chile", "peso|Chilean peso|pesos"), ("Pakistan", "rupee|Pakistani rupee|rupees"),
    ("Nigeria", "naira|Nigerian naira"), ("Malaysia", "ringgit|Malaysian ringgit"),
    ("Kenya", "shilling|Kenyan shilling|shillings"), ("Iran", "rial|Iranian rial"),
    ("Morocco", "dirham|Moroccan dirham"),
    ("Iceland", "krona|króna|Icelandic krona|Icelandic króna"),
]
UNIT_SYMBOLS = [
    ("km", "kilometre|kilometer|kilometres|kilometers"),
    ("kg", "kilogram|kilograms|kilogramme|kilogrammes"),
    ("cm", "centimetre|centimeter|centimetres|centimeters"),
    ("mm", "millimetre|millimeter|millimetres|millimeters"),
    ("ml", "millilitre|milliliter|millilitres|milliliters"),
    ("mg", "milligram|milligrams|milligramme|milligrammes"),
    ("mph", "miles per hour|mile per hour"),
    ("kWh", "kilowatt hour|kilowatt-hour|kilowatt hours|kilowatt-hours"),
    ("Hz", "hertz"), ("lb", "pound|pounds"), ("oz", "ounce|ounces"), ("ft", "foot|feet"),
    ("mi", "mile|miles"), ("yd", "yard|yards"), ("W", "watt|watts"), ("V", "volt|volts"),
    ("J", "joule|joules"), ("N", "newton|newtons"), ("Pa", "pascal|pascals"),
    ("GB", "gigabyte|gigabytes"), ("MB", "megabyte|megabytes"),
]
HUNDRED = "100|one hundred|a hundred"
THOUSAND = "1000|1,000|one thousand|a thousand"
CONVERSIONS = [
    ("centimetres are in one metre", HUNDRED), ("grams are in one kilogram", THOUSAND),
    ("metres are in one kilometre", THOUSAND), ("millimetres are in one centimetre", "10|ten"),
    ("millilitres are in one litre", THOUSAND), ("seconds are in one minute", "60|sixty"),
    ("inches are in one foot", "12|twelve"), ("feet are in one yard", "3|three"),
    ("ounces are in one pound", "16|sixteen"),
    ("days are in a leap year", "366|three hundred and sixty-six|three hundred sixty-six"),
    ("years are in a century", HUNDRED), ("years are in a decade", "10|ten"),
    ("years are in a millennium", THOUSAND), ("weeks are in a year", "52|fifty-two|fifty two"),
    ("cents are in one dollar", HUNDRED), ("bits are in a byte", "8|eight"),
]
BODY_USES = [
    ("see", "eyes|eye"), ("hear", "ears|ear"), ("smell", "nose"), ("taste", "tongue|mouth"),
    ("walk", "legs|feet|leg|foot"), ("think", "brain|head"), ("breathe", "lungs|nose|mouth"),
    ("kick a ball", "foot|feet|leg|legs"), ("hold a pen", "hand|hands|fingers"),
    ("nod", "head|neck"), ("blink", "eyes|eyelids|eye|eyelid"), ("clap", "hands|hand"),
    ("whistle", "lips|mouth"), ("kneel", "knees|knee"),
]
ORGANS = [
    ("pumps blood around the body", "heart"), ("controls thinking", "brain"),
    ("filters blood to make urine", "kidneys|kidney"), ("makes insulin", "pancreas"),
    ("cleans poisons from the blood", "liver|kidneys|kidney"),
    ("stores bile", "gallbladder|gall bladder"), ("covers the outside of the body", "skin"),
    ("takes oxygen from the air we breathe", "lungs|lung"),
    ("digests food after we swallow it", "stomach"), ("stores urine", "bladder|urinary bladder"),
    ("carries food from the mouth to the stomach", "oesophagus|esophagus|gullet"),
    ("holds a baby during pregnancy", "uterus|womb"),
]
ABBREVIATIONS = [
    ("UN", "United Nations"), ("NASA", "National Aeronautics and Space Administration"),
    ("DNA", "deoxyribonucleic acid"), ("CEO", "chief executive officer"),
    ("ATM", "automated teller machine|automatic teller machine"), ("EU", "European Union"),
    ("NATO", "North Atlantic Treaty Organization|North Atlantic Treaty Organisation"),
    ("FBI", "Federal Bureau of Investigation"), ("BBC", "British Broadcasting Corporation"),
    ("TV", "television"), ("PC", "personal computer"),
    ("FAQ", "frequently asked questions|frequently asked question"),
    ("ASAP", "as soon as possible"), ("UFO", "unidentified flying object"),
    ("CIA", "Central Intelligence Agency"),
    ("WHO", "World Health Organization|World Health Organisation"),
    ("GPS", "Global Positioning System"), ("CPU", "central processing unit"),
    ("USB", "Universal Serial Bus"), ("PDF", "Portable Document Format"),
    ("HTML", "HyperText Markup Language"), ("URL", "Uniform Resource Locator"),
    ("WWW", "World Wide Web"), ("AI", "artificial intelligence"),
    ("VIP", "very important person"), ("DIY", "do it yourself|do-it-yourself"),
    ("IQ", "intelligence quotient"), ("PIN", "personal identification number"),
    ("LED", "light-emitting diode|light emitting diode|light-emitting diodes|"
            "light emitting diodes"),
    ("NBA", "National Basketball Association"), ("PhD", "Doctor of Philosophy"),
    ("ICU", "intensive care unit"),
    ("DVD", "digital versatile disc|digital video disc|digital versatile disk|"
            "digital video disk"),
    ("RAM", "random access memory|random-access memory"),
    ("USSR", "Union of Soviet Socialist Republics"), ("UAE", "United Arab Emirates"),
    ("UNESCO", "United Nations Educational, Scientific and Cultural Organization|"
               "United Nations Educational, Scientific and Cultural Organisation"),
    ("NHS", "National Health Service"), ("IT", "information technology"),
    ("ISS", "International Space Station"),
]
UNSEEN_TEMPLATES: dict[str, list[str]] = {
    "grammar": ["What is the plural of {}?", "What is the comparative form of {}?"],
    "landmarks": ["In which city is {}?", "In which country is {}?"],
    "materials": ["What is {} usually made of?", "What is {} usually made from?"],
    "currencies": ["Which currency is used in {}?"],
    "units": ["What does the unit symbol {} stand for?", "Unit conversion: how many {}?"],
    "body": ["Which part of the body do you use to {}?", "Name the organ that {}."],
    "abbreviations": ["What does the abbreviation {} stand for?"],
}
_UNSEEN_ITEMS: dict[str, list[list[tuple[str, str]]]] = {
    "grammar": [PLURALS, COMPARATIVES],
    "landmarks": [LANDMARK_CITIES, LANDMARK_COUNTRIES],
    "materials": [MADE_OF, MADE_FROM],
    "currencies": [CURRENCIES],
    "units": [UNIT_SYMBOLS, CONVERSIONS],
    "body": [BODY_USES, ORGANS],
    "abbreviations": [ABBREVIATIONS],
}

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


def unseen_questions() -> list[Sample]:
    """The headline probe's questions, in a fixed order: each domain of
    :data:`UNSEEN_TEMPLATES`, each template's items in turn (``source`` names the domain)."""
    out = []
    for domain, templates in UNSEEN_TEMPLATES.items():
        for template, items in zip(templates, _UNSEEN_ITEMS[domain], strict=True):
            out += [_qa(template.format(slot), aliases, domain) for slot, aliases in items]
    return out


def general_text_samples() -> list[Sample]:
    """:data:`GENERAL_TEXT` as ``text`` samples, one per paragraph."""
    return [Sample("text", (), p.strip(), (), f"general:text {i}")
            for i, p in enumerate(GENERAL_TEXT.split("\n\n")) if p.strip()]
