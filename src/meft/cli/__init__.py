"""The command line: argument parsing and dispatch (commands), one recipe per command, the
planner, plots and meft bench. Nothing below imports it."""

from meft.cli.commands import main

__all__ = ["main"]
