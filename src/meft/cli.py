"""Command line: ``meft`` (parse and dispatch only; the work lives in the components)."""

from __future__ import annotations

import argparse
import sys

from meft import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meft",
        description="Fine-tune LLMs with very large sparse adapters kept in host memory.",
    )
    parser.add_argument("--version", action="version", version=f"meft {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
