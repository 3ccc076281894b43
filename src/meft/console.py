"""What meft tells the person at the terminal: one function, lines on stderr.

Progress bars (tqdm) and these messages go to stderr; stdout carries only results a script
may parse (``meft eval``'s JSON, ``meft generate``'s text, ``meft info``).
"""

from __future__ import annotations

import sys

_quiet = False


def say(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def quiet() -> None:
    """Say nothing from now on (the other processes of a distributed run: rank 0 speaks)."""
    global _quiet
    _quiet = True
