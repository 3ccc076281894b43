"""Generation with an adapter attached against the base model alone, in one process.

The main job generates a lot (evaluation after training, the retention probe), and every answer
pays the adapter's routing per new token. This measures it as a ratio: the embedded model
answers what ``meft eval`` asks on the default job, the 120 held-out questions of the built-in
set (seed 0), greedily (batch 32, 16 new tokens: meft's evaluation settings), or with
``--general`` the first 120 shipped general questions, alternately with the adapter off
(``disable_adapter``) and on, ``--rounds`` times after one warm-up of each; the adapter is meft
train's default shape with small random values (as after training: the routing cost does not
depend on them). Prints and writes one JSON record with the environment (commit, CPU, threads,
torch).

    python benchmarks/generation_speed.py --output benchmarks/results/generation-speed/COMMIT

"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import get_meft_model
from meft.config import MeftConfig
from meft.data.datasets import load_splits
from meft.data.general import general_questions
from meft.evaluation.evaluate import generate_answers
from meft.sysinfo import environment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--questions", type=int, default=120)
    ap.add_argument("--general", action="store_true",
                    help="the shipped general questions instead of the held-out ones")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--host-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the adapter tables' dtype (bfloat16: half the bytes read per token)")
    ap.add_argument("--output", type=Path, help="directory for result.json (fresh)")
    args = ap.parse_args()
    model, tokenizer, source = load_model_and_tokenizer(None)
    questions = (general_questions() if args.general
                 else load_splits(None, None, seed=0).test)[: args.questions]
    meft_model = get_meft_model(model, MeftConfig(host_dtype=args.host_dtype))
    gen = torch.Generator().manual_seed(0)
    for store in meft_model.stores:
        store.values.copy_(torch.randn(store.values.shape, generator=gen) * 1e-3)

    def seconds(adapter: bool) -> float:
        start = time.perf_counter()
        if adapter:
            generate_answers(meft_model, tokenizer, questions, max_new_tokens=args.new_tokens,
                             batch_size=args.batch_size, progress=False)
        else:
            with meft_model.disable_adapter():
                generate_answers(meft_model, tokenizer, questions,
                                 max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                                 progress=False)
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up
    base, adapter = [], []
    for _ in range(args.rounds):
        base.append(seconds(False))
        adapter.append(seconds(True))
    record = {
        "command": "python benchmarks/generation_speed.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("output", "general") and v is not None)
        + (" --general" if args.general else ""),
        "model": source.name, "adapter": meft_model.meft_config.to_dict(),
        "questions": len(questions), "batch_size": args.batch_size,
        "new_tokens": args.new_tokens, "base_s": base, "adapter_s": adapter,
        "ratio_median": statistics.median(a / b for a, b in zip(adapter, base, strict=True)),
        "environment": environment("cpu"),
    }
    print(json.dumps(record))
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=False)
        (args.output / "result.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
