"""A simulation, on the base model, of routing decided once per sequence at its subject (issue 37).

`benchmarks/name_novelty.py` found that a middle layer's state at a name tells invented
people from known ones. A data-agnostic rule built on that, simulated here before it is
built: at a deciding layer L, a shrunken LDA direction between the training tokens the base
model finds surprising (token surprise -log p(token | prefix) above ``tau`` nats: in the
built-in set mostly the invented names) and the background's tokens (the replay pool and the
contrast's questions with the model's answers, as ``--retain-gate-contrast people`` has
them); the threshold where ``share`` of the background tokens pass; a position is routed
when it or any earlier position of its sequence passes (a cumulative decision, made on the
base model's states, so a pre-pass through layers 0..L-1 would give it to every layer).
Reported, per (L, tau, share): the share of prompts with a routed position (test phrasings,
invented people of another set, the adjacent kinds, the unseen kinds, the replay pool), and
the share of training answer positions and training tokens routed.

    python benchmarks/subject_routing.py --output DIR

Writes ``subject_routing.json`` (with the machine). Minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import find_mlp, get_meft_model
from meft.config import MeftConfig
from meft.data.adjacent import real_people_questions
from meft.data.general import unseen_questions
from meft.data.records import IGNORE_INDEX, Encoded, encode, prompt_ids
from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment
from meft.training.background import model_background, replay_pool
from meft.training.gate import TIE, contrast_examples
from meft.training.protection import REPLAY_TOKENS

LAYERS = (9, 11, 13, 15)  # deciding layers tried
TAUS = (4.0, 8.0)  # surprise (nats) above which a training token is on the new side
SHARES = (0.01, 0.001)  # background tokens passing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    base, tok, source = load_model_and_tokenizer(None)
    base.eval()
    background = model_background(base, tok, progress=False, questions_only=True)
    model = get_meft_model(base, MeftConfig(neurons=1024, layers=[0]))  # for its generation
    ks = make_knowledge_set(30, seed=0)
    train = [encode(s, tok, 256) for s in ks.train]
    pool = [encode(background[i], tok, 256).first_targets(REPLAY_TOKENS)
            for i in replay_pool(background)]
    contrast = contrast_examples(model, tok, "people", max_length=256, progress=False)
    caught: dict[int, Tensor] = {}
    for layer in LAYERS:
        mlp = find_mlp(base.model.layers[layer])
        assert mlp is not None
        mlp.register_forward_pre_hook(
            lambda m, a, layer=layer: caught.__setitem__(layer, a[0][0].detach().float()))

    def run(ids: list[int]) -> tuple[dict[int, Tensor], Tensor]:
        """Per deciding layer the MLP inputs (T, d), and each token's surprise (T,)."""
        caught.clear()
        with torch.no_grad(), model.disable_adapter():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        surprise = torch.zeros(len(ids))
        surprise[1:] = -F.log_softmax(logits[:-1], -1).gather(
            1, torch.tensor(ids[1:])[:, None])[:, 0]
        return dict(caught), surprise

    trained = [run(e.input_ids) for e in train]
    old = [run(e.input_ids)[0] for e in pool + contrast]
    answers = [_predicts_answer(e) for e in train]
    prompts = {"test": ks.eval, "other_invented": make_knowledge_set(30, seed=1).eval,
               "adjacent": real_people_questions(), "unseen": unseen_questions()}
    states = {k: [run(prompt_ids(q, tok))[0] for q in qs] for k, qs in prompts.items()}
    states["pool"] = [run(e.input_ids)[0] for e in pool]
    results = {}
    for layer in LAYERS:
        for tau in TAUS:
            new = torch.cat([s[layer][sur > tau] for s, sur in trained])
            w = _lda(new, torch.cat([s[layer] for s in old]))
            projected = torch.cat([s[layer] @ w for s in old]).double()
            for share in SHARES:
                b = float(torch.quantile(projected, 1 - share) + TIE * projected.std())
                out: dict[str, float] = {"new_tokens": len(new)}
                for name, per_prompt in states.items():
                    out[name] = _rate(torch.tensor([bool(((s[layer] @ w) > b).any())
                                                    for s in per_prompt]))
                routed = [torch.cummax(((s[layer] @ w) > b).int(), 0).values.bool()
                          for s, _ in trained]
                out["train_answer_routed"] = _rate(torch.cat(
                    [r[m] for r, m in zip(routed, answers, strict=True)]))
                out["train_tokens_routed"] = _rate(torch.cat(routed))
                results[f"L{layer}_tau{tau}_share{share}"] = out
                print(layer, tau, share, out, flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/subject_routing.py " + " ".join(sys.argv[1:]),
              "model": source.name, "results": results, "environment": environment("cpu")}
    (args.output / "subject_routing.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _predicts_answer(e: Encoded) -> Tensor:
    """(T,) bool: the positions whose next token is an answer token."""
    labels = torch.tensor(e.labels)
    out = torch.zeros(len(labels), dtype=torch.bool)
    out[:-1] = labels[1:] != IGNORE_INDEX
    return out


def _lda(a: Tensor, b: Tensor, shrink: float = 1.0) -> Tensor:
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
