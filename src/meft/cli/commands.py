"""Command line: ``meft train | eval | generate | bench | info`` (parse and dispatch only).

Every flag is generated from the config dataclasses (:mod:`meft.config`): its name, type,
choices, help text and the default shown in ``--help`` come from the field's declaration, so a
default is written once. Parsers leave unset flags out of the namespace, so a YAML file
(``--config``) and a resumed run can tell what the user actually typed. The work lives in
:mod:`meft.cli.recipes`; a :class:`~meft.errors.UserError` becomes one line on stderr and exit
status 2, anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meft._version import __version__
from meft.config import (
    BenchJob,
    EvalConfig,
    GenerateConfig,
    InfoConfig,
    MeftConfig,
    PlanConfig,
    RunConfig,
    Section,
    TrainJob,
    cli_fields,
    flag_of,
    kind_of,
    parse_floats,
    parse_layers,
    split_options,
)
from meft.errors import ConfigError, UserError

EVAL_SECTIONS = (Section("run", RunConfig, only=("model", "max_new_tokens", "eval_batch_size",
                                                 "max_eval", "device", "trust_remote_code")),
                 Section("eval", EvalConfig))
GENERATE_SECTIONS = (Section("run", RunConfig, only=("model", "device", "trust_remote_code")),
                     Section("generate", GenerateConfig))
INFO_SECTIONS = (Section("info", InfoConfig),)
PLAN_SECTIONS = (Section("adapter", MeftConfig), Section("plan", PlanConfig))


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A config parser as an argparse type (its ConfigError becomes a usage error)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


_TYPES = {"int": int, "float": float, "str": str, "list[int]": _argtype(parse_layers),
          "list[str]": str, "list[float]": _argtype(parse_floats)}


def _shown(f: Any) -> str:
    text = f.metadata["default_text"]
    if text is not None:
        return str(text)
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


TITLES = {"adapter": "adapter (the MEFT adapter's shape)", "train": "training",
          "run": "model, data, evaluation, output", "bench": "comparison"}


# the flags most runs need, listed first in --help; the rest go under "advanced" groups
COMMON: dict[str, tuple[str, ...]] = {
    "train": ("model", "data", "eval_data", "output", "neurons", "top_k", "lr", "epochs",
              "steps", "batch_size", "retain", "adapter", "resume", "device", "seed",
              "progress"),
    "bench": ("methods", "quick", "model", "data", "dataset", "steps", "batch_size", "lr_grid",
              "seeds", "probe", "output", "skip_done", "report_only", "device"),
}


def add_section(parser: argparse.ArgumentParser, section: Section,
                common: tuple[str, ...] = (), common_group: Any = None) -> None:
    """One flag per user-settable field of the section's dataclass, in one help group (with
    ``common``: those fields in ``common_group``, the others in an "advanced" one)."""
    title = TITLES.get(section.name, section.name)
    group = parser.add_argument_group(f"advanced: {title}" if common else title)
    for f in section.fields():
        _add_flag(common_group if f.name in common else group, f)


def _add_flag(group: Any, f: Any) -> None:
    """The flag of field ``f`` in ``group``: its type, choices, help and shown default."""
    kind, _ = kind_of(f)
    help_text = f"{f.metadata['help']} (default: {_shown(f)})".replace("%", "%%")
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text,
                          "metavar": flag_of(f)[2:].upper().replace("-", "_")}
    if f.metadata["required"]:
        kw.update(required=True, help=f.metadata["help"])
    if kind == "bool":
        del kw["metavar"]
        kw["action"] = "store_false" if f.default else "store_true"
        text = f.metadata["help"].replace("%", "%%")
        kw["help"] = (f"turn off: {text} (on by default)" if f.default
                      else f"{text} (default: off)")
    else:
        kw["type"] = _TYPES[kind]
        if f.metadata["choices"] is not None:
            kw["choices"] = f.metadata["choices"]
            kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        if kind == "list[str]":
            kw["nargs"] = "+"
    group.add_argument(flag_of(f), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meft",
        description="Fine-tune LLMs with very large sparse adapters kept in host memory "
                    "(MEFT). Run `meft train` with no arguments for the built-in demo.")
    parser.add_argument("--version", action="version", version=f"meft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: list[tuple[str, str, str, Sequence[Section], bool]] = [
        ("train", "train an adapter (no arguments: the built-in demo)",
         "Train a MEFT adapter on a causal LM. With no arguments: SmolLM2-135M-Instruct on "
         "the built-in synthetic facts.", TrainJob.SECTIONS, True),
        ("eval", "evaluate a model (with an adapter) on QA data; prints JSON",
         "Greedy generation on question/answer data, scored by exact match, F1 and contains.",
         EVAL_SECTIONS, False),
        ("generate", "greedy generation from a prompt", "Greedy generation from one prompt.",
         GENERATE_SECTIONS, False),
        ("bench", "compare meft with LoRA, a dense adapter and dense offload",
         "Train every method on the same model, data, steps and loop; one JSON per run, a "
         "table and plots.", BenchJob.SECTIONS, True),
        ("info", "describe a saved adapter: sizes, host bytes, transfer",
         "Describe a saved adapter.", INFO_SECTIONS, False),
        ("plan", "what a run needs (device, host, traffic, step time) before running it",
         "Plan a meft run from the model's config and a hardware profile: device and host "
         "memory, bytes moved and predicted step time; --fit finds the largest N that fits.",
         PLAN_SECTIONS, False),
    ]
    for name, short, description, sections, yaml_config in commands:
        common = COMMON.get(name, ())
        p = sub.add_parser(name, help=short, description=description,
                           usage=f"meft {name} [options]" if common else None)
        common_group = p.add_argument_group("common options") if common else None
        if yaml_config:
            p.add_argument("--config", type=Path, help="YAML file whose keys are these flags "
                           "(dashes or underscores); command-line flags override it")
        for section in sections:
            add_section(p, section, common, common_group)
    return parser


def _read_yaml(path: Path, sections: Sequence[Section]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag: value")
    split_options(sections, data, source=f"--config {path}")  # unknown keys, named
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _options(args: argparse.Namespace, sections: Sequence[Section]) -> dict[str, Any]:
    """YAML values (if --config) under the flags the user typed."""
    typed = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    config = getattr(args, "config", None)
    return {**(_read_yaml(config, sections) if config is not None else {}), **typed}


def _split(args: argparse.Namespace, sections: Sequence[Section]) -> dict[str, dict[str, Any]]:
    return split_options(sections, _options(args, sections), source="options")


COMMAND_SECTIONS: dict[str, Sequence[Section]] = {
    "train": TrainJob.SECTIONS, "bench": BenchJob.SECTIONS, "eval": EVAL_SECTIONS,
    "generate": GENERATE_SECTIONS, "info": INFO_SECTIONS, "plan": PLAN_SECTIONS}


def _as_flags(message: str, sections: Sequence[Section]) -> str:
    """A config error in the words a person typed: ``top_k=99 must ...`` -> ``--top-k 99
    must ...``, ``batch_size must ...`` -> ``--batch-size must ...`` (the checks name fields,
    being shared with the Python API)."""
    flags = {f.name: flag_of(f) for section in sections for f in section.fields()
             if not flag_of(f).startswith("--no-")}
    if not flags:
        return message
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    message = re.sub(rf"(?<![\w.-])({names})=", lambda m: f"{flags[m.group(1)]} ", message)
    return re.sub(rf"(?<![\w.-])({names})(?= must)", lambda m: flags[m.group(1)], message)


def _dashes(argv: Sequence[str]) -> list[str]:
    """``--top_k 8`` as ``--top-k 8``: flags take underscores as YAML keys do (values and
    everything after a bare ``--`` are left as typed)."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return [*out, *argv[i:]]
        name, eq, value = token.partition("=")
        out.append(name.replace("_", "-") + eq + value if token.startswith("--") else token)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_dashes(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 0
    from meft.cli import recipes  # heavy imports (torch, transformers) only when needed
    from meft.training.trainer import TrainingInterrupted

    try:
        if args.command == "train":
            options = _options(args, TrainJob.SECTIONS)
            shape = split_options(TrainJob.SECTIONS, options, source="options")["adapter"]
            if options.get("adapter") is not None and shape:
                flag = flag_of(next(f for f in cli_fields(MeftConfig) if f.name in shape))
                raise ConfigError(f"--adapter {options['adapter']} fixes the adapter's shape; "
                                  f"drop {flag}")
            if options.get("resume") is not None:
                recipes.train(recipes.resume_job(Path(options["resume"]), options))
            else:
                recipes.train(TrainJob.from_options(options))
        elif args.command == "bench":
            typed = sys.argv[1:] if argv is None else argv
            recipes.bench(BenchJob.from_options(_options(args, BenchJob.SECTIONS)),
                          command=shlex.join(["meft", *typed]))
        elif args.command == "eval":
            parts = _split(args, EVAL_SECTIONS)
            result = recipes.evaluate_cli(RunConfig(**parts["run"]),
                                          EvalConfig(**parts["eval"]))
            print(json.dumps(result))
        elif args.command == "generate":
            parts = _split(args, GENERATE_SECTIONS)
            print(recipes.generate_cli(RunConfig(**parts["run"]),
                                       GenerateConfig(**parts["generate"])))
        elif args.command == "info":
            print(recipes.info_cli(InfoConfig(**_split(args, INFO_SECTIONS)["info"])))
        elif args.command == "plan":
            parts = _split(args, PLAN_SECTIONS)
            print(recipes.plan_cli(MeftConfig(**parts["adapter"]), PlanConfig(**parts["plan"])))
    except KeyboardInterrupt:
        print("meft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (meft info --json | head): no traceback
        with contextlib.suppress(OSError, ValueError):  # nor one when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command killed by SIGPIPE
    except TrainingInterrupted as stop:
        return 130 if stop.by_signal else 0
    except UserError as err:
        print(f"meft: error: {_as_flags(str(err), COMMAND_SECTIONS.get(args.command, ()))}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
