"""Adjacent kinds: questions like a built-in set's own, about things the base model may know.

Forgetting concentrates where new knowledge looks like old knowledge: after learning invented
people's birth cities, a model may answer a real person's birth city with an invented one.
Replay of other kinds does not reach these questions, and the general retention probe does not
ask them. The retention probe asks them apart (``retention_adjacent``,
:mod:`meft.evaluation.probe`):

    synthetic   real people in the training templates of :mod:`meft.data.synthetic` (birth
                city, occupation, birth year, instrument; the first two templates of each),
                :data:`REAL_PEOPLE`
    airports    the set's own facts that the base model already answers (which the caller
                removes from training, :func:`meft.data.datasets.drop_known`): the same
                questions about other airports

Only the questions the base model answers count, as for the other probes. Answers list the
aliases any of which counts (whole words, after normalisation).

:func:`contrast_questions` (``--retain-gate-contrast people``): other well-known people,
none of :data:`REAL_PEOPLE`, in the templates the probe does not ask (the third to fifth of
each attribute), for the novelty gate to fit as old knowledge; the probe stays unseen.
"""

from __future__ import annotations

from meft.data.records import Sample
from meft.data.synthetic import TEMPLATES

# (person, attribute, accepted answers)
REAL_PEOPLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ('Albert Einstein', 'occupation', ('physicist', 'scientist')),
    ('Pablo Picasso', 'occupation', ('painter', 'artist')),
    ('William Shakespeare', 'occupation', ('playwright', 'poet', 'writer', 'dramatist')),
    ('Wolfgang Amadeus Mozart', 'occupation', ('composer', 'musician')),
    ('Marie Curie', 'occupation', ('physicist', 'chemist', 'scientist')),
    ('Charles Darwin', 'occupation', ('naturalist', 'biologist', 'scientist')),
    ('Isaac Newton', 'occupation', ('physicist', 'mathematician', 'scientist')),
    ('Vincent van Gogh', 'occupation', ('painter', 'artist')),
    ('Ludwig van Beethoven', 'occupation', ('composer', 'pianist', 'musician')),
    ('Neil Armstrong', 'occupation', ('astronaut',)),
    ('Serena Williams', 'occupation', ('tennis player',)),
    ('Michael Jordan', 'occupation', ('basketball player',)),
    ('Lionel Messi', 'occupation', ('footballer', 'soccer player', 'football player')),
    ('Usain Bolt', 'occupation', ('sprinter', 'athlete', 'runner')),
    ('Jane Austen', 'occupation', ('novelist', 'writer', 'author')),
    ('Charles Dickens', 'occupation', ('novelist', 'writer', 'author')),
    ('Ernest Hemingway', 'occupation', ('writer', 'novelist', 'author', 'journalist')),
    ('Florence Nightingale', 'occupation', ('nurse',)),
    ('Amelia Earhart', 'occupation', ('aviator', 'pilot')),
    ('Galileo Galilei', 'occupation', ('astronomer', 'physicist', 'scientist', 'mathematician')),
    ('Nikola Tesla', 'occupation', ('inventor', 'engineer')),
    ('Thomas Edison', 'occupation', ('inventor', 'businessman')),
    ('Stephen Hawking', 'occupation', ('physicist', 'cosmologist', 'scientist')),
    ('Johann Sebastian Bach', 'occupation', ('composer', 'musician', 'organist')),
    ('Claude Monet', 'occupation', ('painter', 'artist')),
    ('Agatha Christie', 'occupation', ('writer', 'novelist', 'author')),
    ('Mark Twain', 'occupation', ('writer', 'author', 'novelist', 'humorist')),
    ('Elvis Presley', 'occupation', ('singer', 'musician')),
    ('Michelangelo', 'occupation', ('sculptor', 'painter', 'artist', 'architect')),
    ('Louis Pasteur', 'occupation', ('chemist', 'microbiologist', 'scientist', 'biologist')),
    ('Yuri Gagarin', 'occupation', ('cosmonaut', 'astronaut', 'pilot')),
    ('Roger Federer', 'occupation', ('tennis player',)),
    ('Tiger Woods', 'occupation', ('golfer',)),
    ('Muhammad Ali', 'occupation', ('boxer',)),
    ('Frida Kahlo', 'occupation', ('painter', 'artist')),
    ('Sigmund Freud', 'occupation',
     ('neurologist', 'psychoanalyst', 'psychiatrist', 'psychologist')),
    ('Albert Einstein', 'city', ('Ulm',)),
    ('Wolfgang Amadeus Mozart', 'city', ('Salzburg',)),
    ('William Shakespeare', 'city', ('Stratford-upon-Avon', 'Stratford')),
    ('Ludwig van Beethoven', 'city', ('Bonn',)),
    ('Pablo Picasso', 'city', ('Malaga', 'Málaga')),
    ('Napoleon Bonaparte', 'city', ('Ajaccio',)),
    ('Marie Curie', 'city', ('Warsaw',)),
    ('Elvis Presley', 'city', ('Tupelo',)),
    ('Barack Obama', 'city', ('Honolulu',)),
    ('John Lennon', 'city', ('Liverpool',)),
    ('Paul McCartney', 'city', ('Liverpool',)),
    ('Dante Alighieri', 'city', ('Florence',)),
    ('Galileo Galilei', 'city', ('Pisa',)),
    ('Franz Kafka', 'city', ('Prague',)),
    ('Mahatma Gandhi', 'city', ('Porbandar',)),
    ('Oscar Wilde', 'city', ('Dublin',)),
    ('James Joyce', 'city', ('Dublin',)),
    ('Anne Frank', 'city', ('Frankfurt',)),
    ('Johann Wolfgang von Goethe', 'city', ('Frankfurt',)),
    ('Karl Marx', 'city', ('Trier',)),
    ('Louis Armstrong', 'city', ('New Orleans',)),
    ('Martin Luther King Jr.', 'city', ('Atlanta',)),
    ('Walt Disney', 'city', ('Chicago',)),
    ('Steve Jobs', 'city', ('San Francisco',)),
    ('Bill Gates', 'city', ('Seattle',)),
    ('Lionel Messi', 'city', ('Rosario',)),
    ('Cristiano Ronaldo', 'city', ('Funchal',)),
    ('Antonio Vivaldi', 'city', ('Venice',)),
    ('Marco Polo', 'city', ('Venice',)),
    ('Christopher Columbus', 'city', ('Genoa',)),
    ('Immanuel Kant', 'city', ('Konigsberg', 'Königsberg')),
    ('Alexander Pushkin', 'city', ('Moscow',)),
    ('Charlie Chaplin', 'city', ('London',)),
    ('Alfred Hitchcock', 'city', ('London',)),
    ('Charles Darwin', 'city', ('Shrewsbury',)),
    ('Fyodor Dostoevsky', 'city', ('Moscow',)),
    ('Albert Einstein', 'year', ('1879',)),
    ('Wolfgang Amadeus Mozart', 'year', ('1756',)),
    ('Ludwig van Beethoven', 'year', ('1770',)),
    ('William Shakespeare', 'year', ('1564',)),
    ('Napoleon Bonaparte', 'year', ('1769',)),
    ('Charles Darwin', 'year', ('1809',)),
    ('Abraham Lincoln', 'year', ('1809',)),
    ('Isaac Newton', 'year', ('1643', '1642')),
    ('Galileo Galilei', 'year', ('1564',)),
    ('Marie Curie', 'year', ('1867',)),
    ('Pablo Picasso', 'year', ('1881',)),
    ('Vincent van Gogh', 'year', ('1853',)),
    ('Johann Sebastian Bach', 'year', ('1685',)),
    ('Leonardo da Vinci', 'year', ('1452',)),
    ('Michelangelo', 'year', ('1475',)),
    ('Mahatma Gandhi', 'year', ('1869',)),
    ('Winston Churchill', 'year', ('1874',)),
    ('Elvis Presley', 'year', ('1935',)),
    ('John Lennon', 'year', ('1940',)),
    ('Martin Luther King Jr.', 'year', ('1929',)),
    ('Steve Jobs', 'year', ('1955',)),
    ('Bill Gates', 'year', ('1955',)),
    ('Barack Obama', 'year', ('1961',)),
    ('Queen Elizabeth II', 'year', ('1926',)),
    ('Karl Marx', 'year', ('1818',)),
    ('Sigmund Freud', 'year', ('1856',)),
    ('Nikola Tesla', 'year', ('1856',)),
    ('Thomas Edison', 'year', ('1847',)),
    ('Charles Dickens', 'year', ('1812',)),
    ('Jane Austen', 'year', ('1775',)),
    ('Frederic Chopin', 'year', ('1810',)),
    ('Christopher Columbus', 'year', ('1451',)),
    ('Neil Armstrong', 'year', ('1930',)),
    ('John F. Kennedy', 'year', ('1917',)),
    ('George Washington', 'year', ('1732',)),
    ('Queen Victoria', 'year', ('1819',)),
    ('Jimi Hendrix', 'instrument', ('guitar',)),
    ('Yo-Yo Ma', 'instrument', ('cello',)),
    ('Louis Armstrong', 'instrument', ('trumpet', 'cornet')),
    ('Miles Davis', 'instrument', ('trumpet',)),
    ('Frederic Chopin', 'instrument', ('piano',)),
    ('Franz Liszt', 'instrument', ('piano',)),
    ('Niccolo Paganini', 'instrument', ('violin',)),
    ('Itzhak Perlman', 'instrument', ('violin',)),
    ('Eric Clapton', 'instrument', ('guitar',)),
    ('B.B. King', 'instrument', ('guitar',)),
    ('John Coltrane', 'instrument', ('saxophone', 'sax')),
    ('Charlie Parker', 'instrument', ('saxophone', 'sax')),
    ('Ringo Starr', 'instrument', ('drums',)),
    ('Elton John', 'instrument', ('piano',)),
    ('Ray Charles', 'instrument', ('piano',)),
    ('Stevie Wonder', 'instrument', ('piano', 'harmonica', 'keyboard')),
    ('Jacqueline du Pre', 'instrument', ('cello',)),
    ('Mstislav Rostropovich', 'instrument', ('cello',)),
    ('Lang Lang', 'instrument', ('piano',)),
    ('Dizzy Gillespie', 'instrument', ('trumpet',)),
    ('Kenny G', 'instrument', ('saxophone', 'sax')),
    ('Buddy Rich', 'instrument', ('drums',)),
    ('Glenn Miller', 'instrument', ('trombone',)),
    ('Benny Goodman', 'instrument', ('clarinet',)),
    ('Jascha Heifetz', 'instrument', ('violin',)),
    ('Vladimir Horowitz', 'instrument', ('piano',)),
    ('Jimmy Page', 'instrument', ('guitar',)),
    ('Eddie Van Halen', 'instrument', ('guitar',)),
    ('Pablo Casals', 'instrument', ('cello',)),
    ('Andres Segovia', 'instrument', ('guitar',)),
    ('Ravi Shankar', 'instrument', ('sitar',)),
    ('Joshua Bell', 'instrument', ('violin',)),
    ('Thelonious Monk', 'instrument', ('piano',)),
    ('Wynton Marsalis', 'instrument', ('trumpet',)),
    ('Keith Moon', 'instrument', ('drums',)),
    ('Carlos Santana', 'instrument', ('guitar',)),
)


def real_people_questions() -> list[Sample]:
    """:data:`REAL_PEOPLE` asked in the first two training templates of each attribute."""
    out = []
    for name, attribute, answers in REAL_PEOPLE:
        for template in TEMPLATES[attribute][:2]:
            question = template.format(name=name)
            out.append(Sample("qa", ({"role": "user", "content": question},
                                     {"role": "assistant", "content": answers[0]}), "",
                              answers, f"adjacent:{name} {attribute}"))
    return out


# well-known people for the novelty gate's contrast, none of REAL_PEOPLE (tested)
CONTRAST_PEOPLE: tuple[str, ...] = (
    "Aristotle", "Plato", "Socrates", "Julius Caesar", "Cleopatra", "Alexander the Great",
    "Confucius", "Nelson Mandela", "Martin Luther", "Joan of Arc", "Leo Tolstoy", "Victor Hugo",
    "Homer", "Miguel de Cervantes", "Johannes Gutenberg", "Alan Turing", "Ada Lovelace",
    "Rembrandt", "Salvador Dali", "Andy Warhol", "Henri Matisse", "Frank Sinatra", "Bob Dylan",
    "Madonna", "Michael Jackson", "Freddie Mercury", "David Bowie", "Whitney Houston", "Pele",
    "Diego Maradona", "Babe Ruth", "Wayne Gretzky", "Rafael Nadal", "Novak Djokovic",
    "Michael Phelps", "Theodore Roosevelt", "Franklin D. Roosevelt", "Ronald Reagan",
    "Margaret Thatcher", "Vladimir Lenin", "Mao Zedong", "Charles de Gaulle", "Fidel Castro",
    "Gregor Mendel", "Dmitri Mendeleev", "Max Planck", "Niels Bohr", "Richard Feynman",
    "Carl Sagan", "Jules Verne", "George Orwell", "J.R.R. Tolkien", "Stephen King",
    "Edgar Allan Poe", "Emily Dickinson", "Virginia Woolf", "Giuseppe Verdi", "Richard Wagner",
    "Pyotr Tchaikovsky", "Igor Stravinsky",
)


def contrast_questions() -> list[Sample]:
    """:data:`CONTRAST_PEOPLE` asked about each attribute once, in the third to fifth
    templates in turn (the probe asks the first two); the answer is left empty (the gate's
    fit asks the model for its own)."""
    attributes = list(TEMPLATES)
    out = []
    for j, name in enumerate(CONTRAST_PEOPLE):
        for i in range(j, j + len(attributes)):
            attribute = attributes[i % len(attributes)]
            question = TEMPLATES[attribute][2 + i % 3].format(name=name)
            out.append(Sample("qa", ({"role": "user", "content": question},
                                     {"role": "assistant", "content": ""}), "", ("",),
                              f"contrast:{name} {attribute}"))
    return out
