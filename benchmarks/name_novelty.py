"""Does the model's hidden state at a name tell an invented person from a known one (issue 37)?

Every gate tried so far decides per token on what the token looks like, and at the answer
position a question about an invented person looks like the same question about a real one
(benchmarks/results/novelty-routing). Factual recall runs through the subject: a model's
middle layers enrich the last token of a name it knows. This asks whether that is linear
and general, on the base model, per layer, at the MLP input (what the adapter reads):

- fit: a shrunken LDA direction between the last name token of the built-in training
  questions (30 invented people, set seed 0) and of the contrast questions
  (:func:`meft.data.adjacent.contrast_questions`: 60 well-known people);
- held out on both sides: invented people of two other sets (seeds 1 and 2, their test
  phrasings) against the adjacent probe's real people (disjoint from the contrast);
- ``auc``: the chance that a held-out invented name projects above a held-out real one;
  ``adjacent_at_95``: the real names passing a threshold that 95% of the held-out invented
  ones pass (placed on held-out data: a measure of separability, not a fitted rule);
  ``adjacent_at_contrast_1pct``: passing the threshold 1% of the contrast names pass (a rule
  fitted without held-out data); ``background_tokens_at_95`` and ``background_prompts_at_95``:
  the replay pool's tokens, and its prompts with some token, passing the 95% threshold (how
  often ordinary text would look like an unknown name).

    python benchmarks/name_novelty.py --output DIR [--shrink 1.0]

Writes ``name_novelty.json`` (with the machine) and prints a row per layer. Minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import find_mlp
from meft.data.adjacent import (
    CONTRAST_PEOPLE,
    REAL_PEOPLE,
    contrast_questions,
    real_people_questions,
)
from meft.data.records import Sample, prompt_ids, prompt_text
from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment
from meft.training.background import model_background, replay_pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--shrink", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    base, tokenizer, source = load_model_and_tokenizer(None)
    base.eval()
    layers = len(base.model.layers)
    caught: dict[int, Tensor] = {}
    for i, block in enumerate(base.model.layers):
        mlp = find_mlp(block)
        assert mlp is not None
        mlp.register_forward_pre_hook(
            lambda m, a, i=i: caught.__setitem__(i, a[0][0].detach().float()))

    def states(ids: list[int]) -> Tensor:  # (L, T, d)
        caught.clear()
        with torch.no_grad():
            base(input_ids=torch.tensor([ids]))
        return torch.stack([caught[i] for i in range(layers)])

    def at_name(samples: list[Sample], names: list[str]) -> Tensor:  # (P, L, d)
        out = []
        for s in samples:
            name = next(n for n in names if n in s.messages[0]["content"])
            text = prompt_text(s, tokenizer)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            end = text.index(name) + len(name)
            last = max(i for i, (lo, _) in enumerate(enc["offset_mapping"]) if lo < end)
            out.append(states(enc["input_ids"])[:, last])
        return torch.stack(out)

    def invented(seed: int, split: str) -> Tensor:
        ks = make_knowledge_set(30, seed=seed)
        return at_name(getattr(ks, split), [f["name"] for f in ks.facts])

    fit_new, fit_known = invented(0, "train"), at_name(contrast_questions(), list(CONTRAST_PEOPLE))
    held_new = torch.cat([invented(1, "eval"), invented(2, "eval")])
    held_known = at_name(real_people_questions(), [n for n, _, _ in REAL_PEOPLE])
    background = model_background(base, tokenizer, progress=False, questions_only=True)
    pool = [states(prompt_ids(background[i], tokenizer)) for i in replay_pool(background)]

    rows = []
    for i in range(layers):
        w = _lda(fit_new[:, i], fit_known[:, i], args.shrink)
        new, known = held_new[:, i] @ w, held_known[:, i] @ w
        at_95 = torch.quantile(new, 0.05)
        at_1pct = torch.quantile(fit_known[:, i] @ w, 0.99)
        bg = [p[i] @ w for p in pool]
        rows.append({
            "layer": i, "auc": round(float((new[:, None] > known[None, :]).float().mean()), 4),
            "adjacent_at_95": _rate(known > at_95),
            "adjacent_at_contrast_1pct": _rate(known > at_1pct),
            "invented_at_contrast_1pct": _rate(new > at_1pct),
            "background_tokens_at_95": _rate(torch.cat(bg) > at_95),
            "background_prompts_at_95": _rate(torch.tensor([bool((b > at_95).any()) for b in bg]))})
        print(json.dumps(rows[-1]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/name_novelty.py " + " ".join(sys.argv[1:]),
              "model": source.name, "shrink": args.shrink,
              "counts": {"fit_invented": len(fit_new), "fit_known": len(fit_known),
                         "held_invented": len(held_new), "held_known": len(held_known),
                         "background_prompts": len(pool)},
              "layers": rows, "environment": environment("cpu")}
    (args.output / "name_novelty.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _lda(a: Tensor, b: Tensor, shrink: float) -> Tensor:
    """The shrunken LDA direction (d,) from b's mean to a's (as meft.training.gate fits it)."""
    centred = torch.cat([a - a.mean(0), b - b.mean(0)]).double()
    cov = centred.T @ centred / (len(centred) - 2)
    cov += shrink * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    direction: Tensor = torch.linalg.solve(cov, (a.mean(0) - b.mean(0)).double())
    return direction.float()


def _rate(passed: Tensor) -> float:
    return round(float(passed.float().mean()), 4)


if __name__ == "__main__":
    raise SystemExit(main())
