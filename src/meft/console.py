"""What meft tells the person at the terminal: messages on stderr, results on stdout.

Progress bars (tqdm) and :func:`say`'s messages go to stderr; stdout carries only results
(:func:`result`: ``meft train``'s closing table; ``meft eval``'s JSON, ``meft generate``'s text,
``meft info``), so ``meft train > result.txt`` keeps the table and a terminal still shows the
progress.
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


def result(message: str) -> None:
    """A line of a command's result, on stdout."""
    if not _quiet:
        print(message, flush=True)
