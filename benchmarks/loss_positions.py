"""The training loss with logits at labelled positions only, against logits at every position.

LoRA all-linear r=16 on the embedded model, one batch of 12 built-in synthetic training
examples: forward + backward of :func:`meft.evaluation.evaluate.token_loss_sum` (``logits_to_keep``
= the answer positions) and of the same loss over every position's logits, alternated, median over
repetitions after the first. Prints a JSON line with the environment.

    python benchmarks/loss_positions.py [--reps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from meft.adapter.loading import load_model_and_tokenizer
from meft.data.records import collate, encode
from meft.data.synthetic import make_knowledge_set
from meft.evaluation.evaluate import token_loss_sum
from meft.sysinfo import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, _ = load_model_and_tokenizer(None)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    train = make_knowledge_set(30).train
    batch = collate([encode(s, tokenizer, 256) for s in train[:12]], tokenizer.pad_token_id or 0)
    times: dict[str, list[float]] = {"labelled": [], "every": []}
    for _ in range(args.reps):
        for name, every in (("labelled", False), ("every", True)):
            start = time.perf_counter()
            loss, _ = token_loss_sum(model, batch, every_position=every)
            loss.backward()
            model.zero_grad()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(json.dumps({
        "command": "python " + " ".join(sys.argv),
        "tokens": int(batch["input_ids"].numel()),
        "labelled": int((batch["labels"] != -100).sum()),
        "median_s": medians, "ratio": medians["labelled"] / medians["every"],
        "times_s": times, "environment": environment("cpu")}))


if __name__ == "__main__":
    main()
