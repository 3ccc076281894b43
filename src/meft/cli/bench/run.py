"""One method of ``meft bench``: train it through the one Trainer, measure it, score it.

Measured per run: median step time (the Trainer's, steps after the first two) and tokens/s;
peak host RSS (VmHWM, reset before the run); device-resident bytes = the frozen base weights +
trainable device tensors with their gradients and two AdamW moments + the staged rows (and
their gradients) at the peak of a step (activations excluded; on CUDA,
``torch.cuda.max_memory_allocated`` is recorded too); bytes moved per step each way; trainable
parameters; the loss of every step (and, with ``--eval-every S``, the validation answer loss
every S steps: the curve that shows whether a budget of steps has plateaued); exact match /
F1 / contains on the validation questions (which choose the rate) and on the test questions
(which are reported); retention and the general-text loss change (:mod:`meft.evaluation.probe`)
against a probe built from the base model; for meft, how much general text reaches the rows
training wrote (``written_rows``, ``untouched_tokens``, ``exact_windows``:
:mod:`meft.evaluation.exactness`) and the share of the retention probe's kept questions whose
prompts reach none (``exact_questions``, ``exact_questions_adjacent``: bitwise the base model
there). On the built-in sets, also what was stored: ``facts``
(distinct facts trained), ``seen_em`` (exact match on each fact's first training phrasing),
``bits_recalled`` (the summed answer bits of the facts recalled there,
:mod:`meft.data.synthetic`; with ``--max-eval``, of those asked, scaled to all facts) and
``bits_per_param`` (those over the trainable parameters).

Each method runs in its own process (``python -m meft.cli.bench.run``) so its peak RSS is its own;
:func:`run_method` is the same thing in-process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft.cli.bench.methods import Method, build, parse_method
from meft.config import BenchJob
from meft.data.records import Encoded, Sample, encode_all, load_samples, prompt_ids
from meft.errors import UserError
from meft.evaluation.evaluate import evaluate
from meft.evaluation.exactness import reach
from meft.evaluation.metrics import exact_match
from meft.evaluation.probe import RetentionProbe
from meft.sysinfo import peak_rss_bytes, reset_peak_rss
from meft.training.protection import Retainer
from meft.training.trainer import Trainer


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def recalled_bits(samples: Sequence[Sample], predictions: Sequence[str],
                  bits: dict[str, float]) -> float:
    """The summed answer bits (``bits``: source -> bits) of the samples answered exactly."""
    return sum(bits.get(s.source, 0.0) for s, p in zip(samples, predictions, strict=True)
               if exact_match(p, s.answers) == 1.0)


def run_method(method: Method, base: nn.Module, tokenizer: Any, train: Sequence[Encoded],
               validation: Sequence[Sample], test: Sequence[Sample], job: BenchJob,
               device: torch.device, *, lr: float | None = None,
               probe: RetentionProbe | None = None, copy_base: bool = True,
               background: Sequence[Sample] | None = None, seen: Sequence[Sample] = (),
               facts: dict[str, Any] | None = None,
               sets: Sequence[tuple[Sequence[Encoded], Sequence[Sample]]] = ()
               ) -> dict[str, Any]:
    """Train one method for the job's steps at ``lr`` (None: the job's or the method's rate),
    evaluate it, return its metrics.

    ``copy_base=False`` trains ``base`` itself (a worker process that owns it); a
    ``+retain`` method replays from ``background``. ``seen``: the
    training phrasings asked back; ``facts``: ``{"facts": n, "bits": {source: bits}}``.
    ``sets`` (continual learning, ``meft bench --sets``): (encoded training examples, test
    questions) of each fact set, learned one after another instead of ``train``, the job's
    steps each, through a Trainer of its own (fresh optimizer and schedule; with ``+retain``
    a Retainer of its own, whose replay targets are the model's as the set starts; the novelty
    gate is fitted on the first set); after each set, the test questions of every set so far
    are scored (:func:`continual_fields`). ``validation``, ``test`` and ``seen`` are then
    every set's, scored at the end."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tconfig = job.train_config(lr if lr is not None else method.default_lr)
    torch.manual_seed(tconfig.seed)
    model = copy.deepcopy(base) if copy_base else base
    base_params = list(model.parameters())
    base_bytes = _bytes(base_params)
    trainable = build(method, model, job, device)
    if not method.retain:  # meft:N is meft without protection; meft:N+retain adds it
        tconfig = dataclasses.replace(tconfig, retain="off")
    else:
        if background is None:
            raise ValueError(f"{method.name} needs background samples")
        tconfig = dataclasses.replace(tconfig, retain="on", **method.retain_overrides())
    curve = (encode_all(list(validation), tokenizer, tconfig.max_length, "validation")
             if tconfig.eval_every and validation and not sets else None)
    gen: dict[str, Any] = {"max_new_tokens": job.run.max_new_tokens,
                           "batch_size": job.run.eval_batch_size,
                           "progress": tconfig.progress}
    stages = list(sets) or [(train, test)]
    history: list[dict[str, Any]] = []
    learned: list[list[float]] = []  # continual: after set s, the test EM of sets 0..s
    retainer = None
    for s, (stage_train, _) in enumerate(stages):
        if method.retain:  # per set: its replay targets are the model's as the set starts
            # meft's tables when it has them (rows earlier sets wrote are then held); any
            # other model gets replay alone (meft.training.protection)
            protected = trainable.adapter if trainable.adapter is not None else trainable.model
            # (a novelty gate: fitted on the first set, kept for the later ones)
            retainer = Retainer.from_config(protected, tconfig, background, tokenizer,
                                            train=stage_train)
        with tempfile.TemporaryDirectory(prefix="meft-bench-run-") as tmp:
            trainer = Trainer(trainable, stage_train, tconfig, tmp,
                              pad_id=tokenizer.pad_token_id, eval_encoded=curve,
                              retainer=retainer)
            trainer.desc = (method.name if len(stages) == 1
                            else f"{method.name} set {s + 1}/{len(stages)}")
            history += trainer.train().history
        if sets and job.bench.eval:
            learned.append([evaluate(trainable.model, tokenizer, list(t)[: job.run.max_eval],
                                     desc=f"set {j + 1} after {s + 1} {method.name}",
                                     **gen)["exact_match"]
                            for j, (_, t) in enumerate(stages[:s + 1])])
    times = [r["step_time_s"] for r in history]
    step_time = statistics.median(times[2:] if len(times) > 2 else times)
    staged = max(int(r["staged_mb"] * 1e6) for r in history)
    # gradients + two AdamW moments of the trainable device tensors, and the tensors
    # themselves unless they are base weights (counted in base_bytes: full fine-tuning)
    in_base = {id(p) for p in base_params}
    trainable_device = sum((3 if id(t) in in_base else 4) * _bytes([t])
                           for t in trainable.device_tensors())
    tokens = [r["tokens"] for r in history]
    adapter = trainable.adapter.meft_config.to_dict() if trainable.adapter is not None else None
    result: dict[str, Any] = {
        "method": method.name,
        "kind": method.kind,
        "neurons": method.neurons or None,
        "rank": method.rank or None,
        "steps": len(history),
        "lr": tconfig.lr,
        "seed": tconfig.seed,
        "train_config": asdict(tconfig),
        "adapter_config": adapter,
        "losses": [r["loss"] for r in history],
        "validation_losses": [[r["step"], r["eval_loss"]] for r in history if "eval_loss" in r],
        "step_times_s": times,
        "step_time_s": step_time,
        "tokens_per_s": statistics.mean(tokens) / step_time,
        "tokens_per_step": statistics.mean(tokens),
        "final_loss": statistics.mean(r["loss"] for r in history[-5:]),
        "device_bytes": base_bytes + trainable_device + staged,
        "device_bytes_trainable": trainable_device,
        "device_bytes_staged_peak": staged,
        "device_bytes_base": base_bytes,
        "cuda_max_memory_allocated": (torch.cuda.max_memory_allocated(device)
                                      if device.type == "cuda" else None),
        "moved_bytes_h2d_per_step": statistics.mean(r["mb_h2d"] * 1e6 for r in history),
        "moved_bytes_d2h_per_step": statistics.mean(r["mb_d2h"] * 1e6 for r in history),
        "union_mean": statistics.mean(r["union_mean"] for r in history),
        # the host's own seconds per step (routing, staging, the host optimizer update):
        # what a GPU can wait on while they are not overlapped with its compute
        "host_s_per_step": statistics.median(
            r.get("route_s", 0.0) + r.get("stage_s", 0.0) + r.get("update_s", 0.0)
            for r in (history[2:] if len(history) > 2 else history)),
        # of which the device waited for the host worker's gradient rows (engine.pipeline)
        "wait_s_per_step": statistics.median(
            r.get("wait_s", 0.0) for r in (history[2:] if len(history) > 2 else history)),
        "retained_rows_mean": (statistics.mean(statistics.mean(r["retained_rows_per_layer"])
                                               for r in history)
                               if retainer and trainable.adapter is not None else None),
        "trainable_params": trainable.count(),
        # tables + their AdamW state as configured (--host-dtype, --optim-state), exact
        "host_state_bytes": (trainable.adapter.meft_config.host_bytes_per_layer(
            trainable.adapter.stores[0].dim) * len(trainable.adapter.stores)
            if trainable.adapter is not None else None),
    }
    if device.type == "cuda":  # measured, not accounted
        result["device_bytes"] = result["cuda_max_memory_allocated"]
    result["moved_bytes_per_step"] = (result["moved_bytes_h2d_per_step"]
                                      + result["moved_bytes_d2h_per_step"])
    result.update(continual_fields(learned))
    seen_scores = None
    for split, samples in (("validation", validation), ("test", test), ("seen", seen)):
        asked = list(samples)[: job.run.max_eval]
        scores = (evaluate(trainable.model, tokenizer, asked, desc=f"{split} {method.name}",
                           **gen) if job.bench.eval and samples else None)
        for key in ("exact_match", "f1", "contains"):
            short = {"exact_match": "em"}.get(key, key)
            result[f"{split}_{short}"] = None if scores is None else scores[key]
        result[f"{split}_n"] = 0 if scores is None else scores["n"]
        if split == "seen" and scores is not None:
            seen_scores = (asked, scores["predictions"])
    bits = (facts or {}).get("bits") or {}
    result["facts"] = (facts or {}).get("facts")
    result["bits_recalled"] = result["bits_per_param"] = None
    if seen_scores is not None and bits:  # what the trained phrasings recall, in bits
        recalled = recalled_bits(seen_scores[0], [p["prediction"] for p in seen_scores[1]],
                                 bits)
        # with --max-eval only some facts are asked: the rest recall as those asked do
        recalled *= len(seen) / len(seen_scores[0])
        result["bits_recalled"] = recalled
        result["bits_per_param"] = recalled / max(1, result["trainable_params"])
    measured = (probe.measure(trainable.model, tokenizer, **gen)
                if probe is not None and job.bench.eval else None)
    for key in ("retention", "retention_seen_kinds", "retention_adjacent", "general_loss_delta",
                "forgotten", "forgotten_seen_kinds", "forgotten_adjacent", "retained", "kept",
                "retained_seen_kinds", "kept_seen_kinds", "retained_adjacent", "kept_adjacent",
                "probe"):
        result[key] = None if measured is None else measured.get(key)
    # meft only: how much general text reaches the rows training wrote (evaluation.exactness)
    reached = (reach(trainable.adapter, tokenizer)
               if trainable.adapter is not None and job.bench.eval else None)
    for key in ("written_rows", "untouched_token_layers", "untouched_tokens", "exact_windows"):
        result[key] = None if reached is None else reached[key]
    # and how many of the retention probe's kept questions reach none (their prompts are then
    # bitwise the base model's: a forgotten question must reach one)
    for key, asked in zip(("exact_questions", "exact_questions_adjacent"),
                          probe.kept_questions() if reached is not None and probe is not None
                          else ([], []), strict=True):
        on = (reach(trainable.adapter, tokenizer,
                    windows=[prompt_ids(q, tokenizer) for q in asked]) if asked else None)
        result[key] = None if on is None else on["exact_windows"]
    result["host_bytes"] = result["host_peak_rss_bytes"] = peak_rss_bytes()
    return result


def continual_fields(learned: Sequence[Sequence[float]]) -> dict[str, Any]:
    """From ``learned`` (after set s, the test exact match of sets 0..s; empty when not
    continual): ``continual_test_em`` (that triangle), ``continual_kept`` (per earlier set j,
    its exact match after the last set over its exact match right after set j; None when it
    had learned nothing), and their mean and minimum (``continual_kept_mean``,
    ``continual_kept_min``; None without an earlier set)."""
    if not learned:
        return {"continual_test_em": None, "continual_kept": None, "continual_kept_mean": None,
                "continual_kept_min": None}
    kept = [learned[-1][j] / learned[j][j] if learned[j][j] > 0 else None
            for j in range(len(learned) - 1)]
    known = [k for k in kept if k is not None]
    return {"continual_test_em": [list(row) for row in learned], "continual_kept": kept,
            "continual_kept_mean": statistics.mean(known) if known else None,
            "continual_kept_min": min(known) if known else None}


def worker(argv: Sequence[str] | None = None) -> int:
    """One (method, rate) run in a fresh process: ``python -m meft.cli.bench.run``."""
    from meft.adapter.loading import ModelSource, load_model, load_tokenizer

    ap = argparse.ArgumentParser(prog="python -m meft.cli.bench.run")
    ap.add_argument("--method", required=True)
    ap.add_argument("--lr", type=float, help="the rate (default: the job's or the method's)")
    ap.add_argument("--model-dir", required=True, help="a plain copy of the base model")
    ap.add_argument("--job", required=True, help="the BenchJob as JSON")
    ap.add_argument("--data", required=True, type=Path,
                    help="directory with train.jsonl, validation.jsonl, test.jsonl")
    ap.add_argument("--probe", type=Path, help="the retention probe of the base model")
    ap.add_argument("--background", type=Path, help="background text for +retain methods")
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    job = BenchJob.from_dict(json.loads(args.job))
    source = ModelSource(args.model_dir, None, args.model_dir)
    tokenizer = load_tokenizer(source)
    base = load_model(source)
    method = parse_method(args.method)
    splits = {name: load_samples(args.data / f"{name}.jsonl") if
              (args.data / f"{name}.jsonl").is_file()
              and (args.data / f"{name}.jsonl").stat().st_size else []
              for name in ("train", "validation", "test", "seen")}
    facts_file = args.data / "facts.json"
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else None
    max_length = job.train_config(method.default_lr).max_length
    train = encode_all(splits["train"], tokenizer, max_length, "training")
    sets: list[tuple[list[Encoded], list[Sample]]] = []  # --sets: data/set-<i>/ has set i
    while (args.data / f"set-{len(sets)}" / "train.jsonl").is_file():
        part = args.data / f"set-{len(sets)}"
        sets.append((encode_all(load_samples(part / "train.jsonl"), tokenizer, max_length,
                                "training"),
                     load_samples(part / "test.jsonl")))
    probe = RetentionProbe.load(args.probe) if args.probe is not None else None
    reset_peak_rss()
    background = load_samples(args.background) if args.background is not None else None
    result = run_method(method, base, tokenizer, train, splits["validation"], splits["test"],
                        job, torch.device(args.device), lr=args.lr, probe=probe,
                        copy_base=False, background=background, seen=splits["seen"],
                        facts=facts, sets=sets)
    args.result.write_text(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """:func:`worker`, with a user error (a method that does not fit this machine, bad data)
    as one line on stderr and exit 2, as the CLI does; ``meft bench`` then skips the run."""
    try:
        return worker(argv)
    except UserError as err:
        print(f"meft: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
