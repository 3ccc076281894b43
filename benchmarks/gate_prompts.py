"""Which tokens of the retention probe's prompts pass the one-decision gate (issue 37)?

``--retain-gate-once`` keeps a prompt bitwise the base model unless one of its tokens passes
the deciding layer's gate. This fits that gate exactly as training does (the built-in set's
training examples against the replay pool: :func:`meft.training.gate.fit_novelty_gate`, on a
fresh adapter, so on the base model) and asks, for every prompt of the probe's unseen kinds,
its adjacent kinds and the test phrasings, tokenized as generation sees them
(:func:`meft.data.records.prompt_ids`, chat template and system prompt included): how many
of its tokens pass, whether none does (``exact``: the prompt is then the base model's at
every layer), and which tokens pass most often (position from the prompt's end, token text).
Both thresholds are reported: the bare (1 - share) quantile of the background's
projections, and the one the gate uses (:func:`meft.training.gate.threshold`: raised by
``TIE`` standard deviations, so tokens every example shares fall on one side together).

    python benchmarks/gate_prompts.py --output DIR [--first 15] [--share 0.01]

Writes ``gate_prompts.json`` (with the machine) and prints it. Minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import get_meft_model
from meft.config import MeftConfig
from meft.data.adjacent import real_people_questions
from meft.data.general import unseen_questions
from meft.data.records import encode, prompt_ids
from meft.data.synthetic import make_knowledge_set
from meft.sysinfo import environment
from meft.training.background import model_background, replay_pool
from meft.training.gate import TIE, _projections, fit_novelty_gate
from meft.training.protection import REPLAY_TOKENS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--first", type=int, default=15, help="the first adapted (deciding) layer")
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument("--people", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    base, tokenizer, source = load_model_and_tokenizer(None)
    background = model_background(base, tokenizer, progress=False, questions_only=True)
    num_layers = base.config.num_hidden_layers
    model = get_meft_model(base, MeftConfig(layers=list(range(args.first, num_layers))))
    ks = make_knowledge_set(args.people, seed=0)
    pad = tokenizer.pad_token_id or 0
    train = [encode(s, tokenizer, 256) for s in ks.train]
    pool = [encode(background[i], tokenizer, 256).first_targets(REPLAY_TOKENS)
            for i in replay_pool(background)]
    layer = next(iter(model.adapters))  # the deciding one
    gates = fit_novelty_gate(model, train, pool, args.share, pad_id=pad)
    w, b = gates[layer][:-1], gates[layer][-1]
    projected = _projections(model, pool, {k: g[:-1].double() for k, g in gates.items()}, 8,
                             pad)[layer]
    thresholds = {"tolerant": float(b), "bare": float(b) - TIE * float(projected.std())}
    adapter = model.adapter_modules[0]
    caught: list[torch.Tensor] = []
    hook = adapter.register_forward_pre_hook(lambda m, a: caught.append(a[0].detach()))
    out: dict[str, dict[str, object]] = {}
    for name, questions in (("unseen", unseen_questions()),
                            ("adjacent", real_people_questions()), ("test", ks.eval)):
        for rule, t in thresholds.items():
            counts: collections.Counter[tuple[int, str]] = collections.Counter()
            exact = passing = tokens = 0
            for q in questions:
                ids = prompt_ids(q, tokenizer)
                caught.clear()
                with torch.no_grad():
                    model(input_ids=torch.tensor([ids]))
                x = caught[0].reshape(-1, caught[0].shape[-1]).float()
                passed = (x @ w) > t  # (T,)
                exact += int(not bool(passed.any()))
                passing += int(passed.sum())
                tokens += len(ids)
                for i in passed.nonzero().flatten().tolist():
                    counts[(i - len(ids), tokenizer.decode([ids[i]]))] += 1
            out[f"{name}_{rule}"] = {
                "prompts": len(questions), "exact": exact / len(questions),
                "tokens_passing": passing / tokens,
                "background_passing": float((projected > t).double().mean()),
                "most_passing": [[pos, text, n] for (pos, text), n in counts.most_common(12)]}
            print(name, rule, json.dumps(out[f"{name}_{rule}"]), flush=True)
    hook.remove()
    args.output.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/gate_prompts.py " + " ".join(sys.argv[1:]),
              "model": source.name, "first_layer": args.first, "share": args.share,
              "tie": TIE, "thresholds": thresholds, "results": out,
              "example_prompt": tokenizer.decode(prompt_ids(unseen_questions()[0], tokenizer)),
              "environment": environment("cpu")}
    (args.output / "gate_prompts.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
