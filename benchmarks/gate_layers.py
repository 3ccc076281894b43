"""Where, layer by layer, the per-layer novelty gate lets the answer through (issue 37).

With a gate per adapted layer (``--retain-gate``, all 30 layers), a prompt's answer comes
from its last position (the ``\\n`` after ``<|im_start|>assistant``): the adapter can change
the answer only at the layers where that position passes. This fits the gates exactly as
training does (:func:`meft.training.gate.fit_novelty_gate`: the built-in training examples
against the replay pool, plus the contrast when ``--contrast people``, base model, fresh
adapter) and reports, per layer and per share (the direction does not depend on the share;
each share's threshold is :func:`meft.training.gate.threshold` of the same background
projections):

- ``train_answer``: the training examples' positions whose next token is an answer token
  (where the adapter has to act to learn), and ``train_tokens``: all their real tokens;
- ``{test,adjacent,unseen}_last``: the last prompt position of the test phrasings, the
  adjacent kinds (the training templates asked about real people) and the unseen kinds, as
  generation tokenizes them (:func:`meft.data.records.prompt_ids`);
- ``*_last_any_layer``: the share of prompts whose last position passes at one layer or more.

    python benchmarks/gate_layers.py --output DIR [--contrast people] [--shares 0.01 0.002]

Writes ``gate_layers.json`` (with the machine) and ``gate_layers.png`` (the pass rates per layer)
and prints a summary. Minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import get_meft_model
from meft.config import MeftConfig
from meft.data.adjacent import real_people_questions
from meft.data.general import unseen_questions
from meft.data.records import IGNORE_INDEX, Encoded, Sample, encode, prompt_ids
from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment
from meft.training.background import model_background, replay_pool
from meft.training.gate import _inputs, _projections, contrast_examples, fit_novelty_gate, threshold
from meft.training.protection import REPLAY_TOKENS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--contrast", default=None, help="as --retain-gate-contrast (people)")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.002])
    ap.add_argument("--people", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    base, tokenizer, source = load_model_and_tokenizer(None)
    background = model_background(base, tokenizer, progress=False, questions_only=True)
    model = get_meft_model(base, MeftConfig())  # every layer, as the gate runs
    pad = tokenizer.pad_token_id or 0
    ks = make_knowledge_set(args.people, seed=0)
    train = [encode(s, tokenizer, 256) for s in ks.train]
    negatives = [encode(background[i], tokenizer, 256).first_targets(REPLAY_TOKENS)
                 for i in replay_pool(background)]
    if args.contrast:
        negatives += contrast_examples(model, tokenizer, args.contrast, max_length=256,
                                       progress=False)
    gates = fit_novelty_gate(model, train, negatives, args.shares[0], pad_id=pad)
    layers = list(gates)
    directions = {layer: g[:-1] for layer, g in gates.items()}
    background_proj = _projections(model, negatives, {k: w.double() for k, w in
                                                      directions.items()}, 8, pad)
    thresholds = {share: {layer: float(threshold(background_proj[layer], share))
                          for layer in layers} for share in args.shares}

    def projected(examples: list[Encoded]) -> list[torch.Tensor]:  # per example (L, T)
        out = []
        for lo in range(0, len(examples), 8):
            chunk = examples[lo:lo + 8]
            per_layer = {layer: (x.float() @ directions[layer]).split(
                [len(e.input_ids) for e in chunk]) for layer, x in _inputs(model, chunk, 8, pad)}
            out += [torch.stack([per_layer[layer][i] for layer in layers])
                    for i in range(len(chunk))]
        return out

    def prompts(questions: list[Sample]) -> list[Encoded]:  # as generation tokenizes them
        return [Encoded(ids, [IGNORE_INDEX] * len(ids), False)
                for ids in (prompt_ids(q, tokenizer) for q in questions)]

    last = {name: torch.stack([p[:, -1] for p in projected(prompts(questions))])  # (P, L)
            for name, questions in (("test", ks.eval), ("adjacent", real_people_questions()),
                                    ("unseen", unseen_questions()))}
    train_p = projected(train)
    answer_p = torch.cat([p[:, _predicts_answer(e)] for p, e in zip(train_p, train,
                                                                      strict=True)], 1)
    token_p = torch.cat(train_p, 1)  # (L, all tokens)

    results = {}
    for share, b in thresholds.items():
        bt = torch.tensor([b[layer] for layer in layers])  # (L,)
        r: dict[str, Any] = {
            "train_answer": [_rate(row) for row in answer_p > bt[:, None]],
            "train_tokens": [_rate(row) for row in token_p > bt[:, None]]}
        for name, proj in last.items():
            passed = proj > bt  # (prompts, L)
            r[f"{name}_last"] = [_rate(passed[:, i]) for i in range(len(layers))]
            r[f"{name}_last_any_layer"] = _rate(passed.any(1))
        results[str(share)] = r
        print(f"share {share}: " + ", ".join(
            f"{k} {100 * v:.1f}%" if not isinstance(v, list) else
            f"{k} {100 * sum(v) / len(v):.1f}% (mean over layers)" for k, v in r.items()),
            flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/gate_layers.py " + " ".join(sys.argv[1:]),
              "model": source.name, "layers": layers, "contrast": args.contrast,
              "training_examples": len(train), "background_examples": len(negatives),
              "thresholds": {str(s): t for s, t in thresholds.items()}, "results": results,
              "environment": environment("cpu")}
    (args.output / "gate_layers.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(args.output)
    return 0


def plot(directory: Path) -> None:
    """``gate_layers.png`` in ``directory`` from its ``gate_layers.json``: per share, the pass
    rate per layer of the training answers and of the three prompt sets' answer positions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((directory / "gate_layers.json").read_text())
    results = record["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), sharey=True,
                             squeeze=False)
    curves = (("train_answer", "training answers (positions predicting them)"),
              ("test_last", "test phrasings' answer position"),
              ("adjacent_last", "adjacent kinds' answer position"),
              ("unseen_last", "unseen kinds' answer position"))
    for ax, (share, r) in zip(axes[0], results.items(), strict=True):
        for key, label in curves:
            ax.plot([100 * v for v in r[key]], marker=".", label=label)
        ax.set_title(f"share {share}" + (" with contrast" if record["contrast"] else ""))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("passing the gate (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "gate_layers.png", dpi=120)
    plt.close(fig)


def _predicts_answer(e: Encoded) -> torch.Tensor:
    """(T,) bool: the positions whose next token is an answer token."""
    labels = torch.tensor(e.labels)
    out = torch.zeros(len(labels), dtype=torch.bool)
    out[:-1] = labels[1:] != IGNORE_INDEX
    return out


def _rate(passed: torch.Tensor) -> float:
    return round(float(passed.float().mean()), 4) if passed.numel() else 0.0


if __name__ == "__main__":
    raise SystemExit(main())
