"""What meft tells the person at the terminal: one function, lines on stderr.

Progress bars (tqdm) and these messages go to stderr; stdout carries only results a script
may parse (``meft eval``'s JSON, ``meft generate``'s text, ``meft info``).
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
