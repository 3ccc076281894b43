"""Can an adapter tell the tokens of new facts from ordinary tokens by their hidden state alone?

The premise of routing new knowledge to rows ordinary text never reads (issue 37): if, at an
adapted layer, the MLP inputs of the training tokens are separable from those of general
inputs, tokens on the general side could be routed to rows that stay zero (exactly the base
model there). This measures it on the base model, before any training.

    python benchmarks/separability.py --output DIR

Per layer of ``--layers``: the MLP inputs of the built-in training questions (``--people``
invented people, seed 0) against background: the shipped general text and general questions
(the kinds replay trains). A shrunken LDA direction w = (S + s I)^-1 (mu_train - mu_bg) is
fitted on every other token of each, the threshold set at the 99th percentile of the fitted
background's projections (1% of it above). Reported on the other tokens: the share of training
tokens above (``train_tpr``), of the test phrasings' tokens (``test_tpr``), of the held-out
background tokens (``background_fpr``), and of the general questions of kinds the background
never contains (``unseen_kinds_fpr``: the honest false-positive rate). Writes
``separability.json`` (with the machine) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from meft.adapter.loading import load_model_and_tokenizer
from meft.data.adjacent import real_people_questions
from meft.data.general import general_questions, general_text_samples, unseen_questions
from meft.data.records import IGNORE_INDEX, Sample, encode
from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment


def mlp_inputs(model: object, tokenizer: object, samples: list[Sample],
               layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    """Per layer the MLP inputs of every token (T_all, d); every token's surprisal under the
    model (T_all,): -log p(token | the tokens before it), 0 for a sequence's first; the
    surprisal of the token after each one (T_all,), 0 for a sequence's last; and which
    positions predict an answer token (T_all,) bool: those whose next token carries loss."""
    caught: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    surprisal: list[torch.Tensor] = []
    following: list[torch.Tensor] = []
    answering: list[torch.Tensor] = []
    blocks = model.model.layers  # type: ignore[attr-defined]
    handles = [blocks[i].mlp.register_forward_pre_hook(
        lambda mod, inp, i=i: caught[i].append(inp[0][0].detach())) for i in layers]
    try:
        with torch.no_grad():
            for s in samples:
                enc = encode(s, tokenizer, 256)
                ids = torch.tensor([enc.input_ids])
                logits = model(input_ids=ids).logits[0]  # type: ignore[operator]
                nll = F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none")
                surprisal.append(torch.cat([torch.zeros(1), nll]))
                following.append(torch.cat([nll, torch.zeros(1)]))
                answering.append(torch.tensor([y != IGNORE_INDEX for y in enc.labels[1:]]
                                              + [False]))
    finally:
        for h in handles:
            h.remove()
    return ({i: torch.cat(caught[i]) for i in layers}, torch.cat(surprisal),
            torch.cat(following), torch.cat(answering))


def _lengths(tokenizer: object, samples: list[Sample]) -> list[int]:
    """Each sample's token count as :func:`mlp_inputs` encodes it."""
    return [len(encode(s, tokenizer, 256).input_ids) for s in samples]


def lda(a: torch.Tensor, b: torch.Tensor, shrink: float) -> torch.Tensor:
    """The shrunken LDA direction (S + s I)^-1 (mu_a - mu_b), S the pooled covariance."""
    centred = torch.cat([a - a.mean(0), b - b.mean(0)])
    cov = torch.cov(centred.T)
    cov += shrink * cov.diagonal().mean() * torch.eye(cov.shape[0])
    return torch.linalg.solve(cov, a.mean(0) - b.mean(0))


NN_POINTS = 4000  # tokens per side the nearest-neighbour rule keeps, and queries scored


def _sub(x: torch.Tensor, n: int = NN_POINTS) -> torch.Tensor:
    """At most ``n`` rows of ``x``, evenly spaced (deterministic)."""
    return x if x.shape[0] <= n else x[torch.linspace(0, x.shape[0] - 1, n).long()]


def nearest_margin(a: torch.Tensor, b: torch.Tensor) -> Any:
    """The nearest-neighbour rule: x -> max cos(x, a_j) - max cos(x, b_j), with a, b at most
    NN_POINTS rows each (a token closer to some training token than to any background one is
    on the new side; nonlinear, unlike the LDA direction)."""
    a, b = (F.normalize(_sub(t), dim=1) for t in (a, b))

    def margin(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        return (x @ a.T).amax(1) - (x @ b.T).amax(1)

    return margin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--layers", default="2,8,15,22,28")
    ap.add_argument("--shrink", type=float, default=0.1)
    ap.add_argument("--surprise", type=float, default=4.0,
                    help="nats above which a training token counts as surprising")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    model, tokenizer, source = load_model_and_tokenizer(None)
    model.eval()
    ks = make_knowledge_set(args.people, seed=0)
    train, train_nll, train_next, train_ans = mlp_inputs(model, tokenizer, ks.train, layers)
    test, test_nll, _, test_ans = mlp_inputs(model, tokenizer, ks.eval, layers)
    text, *_ = mlp_inputs(model, tokenizer, general_text_samples(), layers)
    questions, _, _, questions_ans = mlp_inputs(model, tokenizer, general_questions(), layers)
    unseen, _, _, unseen_ans = mlp_inputs(model, tokenizer, unseen_questions(), layers)
    adjacent, _, _, adjacent_ans = mlp_inputs(model, tokenizer, real_people_questions(),
                                              layers)
    # the surprising tokens: what the base model could not predict (an invented name, a new
    # answer); the rest of a training question is as ordinary as any question
    novel = train_nll > args.surprise  # (T_train,)
    # anticipation: the positions whose NEXT token is surprising (where the base model's
    # prediction is wrong: an invented name's pieces, a new answer); the adapter output at a
    # position changes the prediction of the token after it, so these are the positions
    # that must route for the model to learn, and a question the base model answers has
    # none of them at its answer positions
    ahead = train_next > args.surprise  # (T_train,)
    # one decision per token (--retain-gate-once): a prompt stays the base model when none of
    # its tokens passes the deciding layer's gate; each prompt's token count, to group by
    unseen_lengths = _lengths(tokenizer, unseen_questions())
    adjacent_lengths = _lengths(tokenizer, real_people_questions())
    rows = []
    for i in layers:
        a, b = train[i], torch.cat([text[i], questions[i]])
        a_fit, a_out, b_fit, b_out = a[::2], a[1::2], b[::2], b[1::2]
        w = lda(a_fit, b_fit, args.shrink)
        threshold = torch.quantile(b_fit @ w, 0.99)

        def above(x: torch.Tensor, w: torch.Tensor = w, t: torch.Tensor = threshold) -> float:
            return float(((x @ w) > t).float().mean())

        # surprise: positives the surprising training tokens, negatives the background and
        # the unsurprising training tokens
        n_fit = novel[::2]
        ws = lda(a_fit[n_fit], torch.cat([b_fit, a_fit[~n_fit]]), args.shrink)
        ts = torch.quantile(torch.cat([b_fit, a_fit[~n_fit]]) @ ws, 0.99)

        def above_s(x: torch.Tensor, w: torch.Tensor = ws, t: torch.Tensor = ts) -> float:
            return float(((x @ w) > t).float().mean())

        surprising_test = test[i][test_nll > args.surprise]

        # answers against answers: the training positions that predict an answer (what the
        # model does not know) against the general questions' (what it does), so the
        # direction is about the answer, not about being a question
        qa = questions[i][questions_ans]
        wq = lda(train[i][train_ans][::2], qa[::2], args.shrink)
        tq = torch.quantile(qa[::2] @ wq, 0.99)

        def above_q(x: torch.Tensor, w: torch.Tensor = wq, t: torch.Tensor = tq) -> float:
            return float(((x @ w) > t).float().mean())

        def exact(x: torch.Tensor, lengths: list[int], w: torch.Tensor = w,
                  t: torch.Tensor = threshold) -> float:
            """The share of prompts (whole sequences here) none of whose tokens passes."""
            passed = ((x @ w) > t).split(lengths)
            return float(sum(not bool(p.any()) for p in passed) / len(lengths))

        a_fit_ahead = ahead[::2]
        wa = lda(a_fit[a_fit_ahead], torch.cat([b_fit, a_fit[~a_fit_ahead]]), args.shrink)
        ta = torch.quantile(torch.cat([b_fit, a_fit[~a_fit_ahead]]) @ wa, 0.99)

        def above_a(x: torch.Tensor, w: torch.Tensor = wa, t: torch.Tensor = ta) -> float:
            return float(((x @ w) > t).float().mean())

        margin = nearest_margin(a_fit, b_fit)
        m = torch.quantile(margin(_sub(b_out)), 0.99)

        def closer(x: torch.Tensor, margin: Any = margin, m: torch.Tensor = m) -> float:
            return float((margin(_sub(x)) > m).float().mean())

        rows.append({"layer": i, "train_tpr": above(a_out), "test_tpr": above(test[i]),
                     "background_fpr": above(b_out), "unseen_kinds_fpr": above(unseen[i]),
                     "nn_test_tpr": closer(test[i]), "nn_background_fpr": 0.01,
                     "nn_unseen_kinds_fpr": closer(unseen[i]),
                     "adjacent_fpr": above(adjacent[i]),
                     "surprising_test_tpr": above(surprising_test),
                     "surprise_test_tpr": above_s(test[i]),
                     "surprise_surprising_test_tpr": above_s(surprising_test),
                     "surprise_unseen_kinds_fpr": above_s(unseen[i]),
                     "surprise_adjacent_fpr": above_s(adjacent[i]),
                     "surprising_share_of_train": float(novel.float().mean()),
                     "test_answer_tpr": above(test[i][test_ans]),
                     "unseen_answer_fpr": above(unseen[i][unseen_ans]),
                     "adjacent_answer_fpr": above(adjacent[i][adjacent_ans]),
                     "surprise_test_answer_tpr": above_s(test[i][test_ans]),
                     "surprise_adjacent_answer_fpr": above_s(adjacent[i][adjacent_ans]),
                     "ahead_test_tpr": above_a(test[i]),
                     "ahead_test_answer_tpr": above_a(test[i][test_ans]),
                     "ahead_unseen_kinds_fpr": above_a(unseen[i]),
                     "ahead_unseen_answer_fpr": above_a(unseen[i][unseen_ans]),
                     "ahead_adjacent_fpr": above_a(adjacent[i]),
                     "ahead_adjacent_answer_fpr": above_a(adjacent[i][adjacent_ans]),
                     "ahead_share_of_train": float(ahead.float().mean()),
                     "answers_test_answer_tpr": above_q(test[i][test_ans]),
                     "answers_questions_answer_fpr": above_q(qa[1::2]),
                     "answers_unseen_answer_fpr": above_q(unseen[i][unseen_ans]),
                     "answers_adjacent_answer_fpr": above_q(adjacent[i][adjacent_ans]),
                     "once_exact_unseen": exact(unseen[i], unseen_lengths),
                     "once_exact_adjacent": exact(adjacent[i], adjacent_lengths),
                     "train_tokens": a.shape[0], "background_tokens": b.shape[0],
                     "unseen_tokens": unseen[i].shape[0]})
        print(json.dumps(rows[-1]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    out = {"command": "python benchmarks/separability.py " + " ".join(sys.argv[1:]),
           "model": source.name, "people": args.people, "shrink": args.shrink,
           "surprise": args.surprise,
           "layers": rows, "environment": environment("cpu")}
    (args.output / "separability.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
