"""One method of ``meft bench``: train it through the one Trainer, measure it, score it.

Measured per run: median step time (the Trainer's, steps after the first two) and tokens/s;
peak host RSS (VmHWM, reset before the run); device-resident bytes = the frozen base weights +
trainable device tensors with their gradients and two AdamW moments + the staged rows (and
their gradients) at the peak of a step (activations excluded; on CUDA,
``torch.cuda.max_memory_allocated`` is recorded too); bytes moved per step each way; trainable
parameters; the loss of every step; exact match / F1 / contains on held-out questions.

Each method runs in its own process (``python -m meft.bench.run``) so its peak RSS is its own;
:func:`run_method` is the same thing in-process.
"""

from __future__ import annotations

import argparse
import copy
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

from meft.bench.methods import Method, build, parse_method
from meft.config import BenchJob
from meft.data import Encoded, Sample, encode_all
from meft.evaluate import evaluate
from meft.sysinfo import peak_rss_bytes, reset_peak_rss
from meft.trainer import Trainer


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_method(method: Method, base: nn.Module, tokenizer: Any, train: Sequence[Encoded],
               eval_samples: Sequence[Sample], job: BenchJob, device: torch.device, *,
               copy_base: bool = True) -> dict[str, Any]:
    """Train one method for the job's steps, evaluate it, return its metrics.

    ``copy_base=False`` trains ``base`` itself (a worker process that owns it)."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tconfig = job.train_config(method.default_lr)
    torch.manual_seed(tconfig.seed)
    model = copy.deepcopy(base) if copy_base else base
    base_params = list(model.parameters())
    base_bytes = _bytes(base_params)
    trainable = build(method, model, job, device)
    with tempfile.TemporaryDirectory(prefix="meft-bench-run-") as tmp:
        trainer = Trainer(trainable, train, tconfig, tmp, pad_id=tokenizer.pad_token_id)
        trainer.desc = method.name
        history = trainer.train().history
    times = [r["step_time_s"] for r in history]
    step_time = statistics.median(times[2:] if len(times) > 2 else times)
    staged = max(int(r["staged_mb"] * 1e6) for r in history)
    # gradients + two AdamW moments of the trainable device tensors, and the tensors
    # themselves unless they are base weights (counted in base_bytes: full fine-tuning)
    in_base = {id(p) for p in base_params}
    trainable_device = sum((3 if id(t) in in_base else 4) * _bytes([t])
                           for t in trainable.device_tensors())
    tokens = [r["tokens"] for r in history]
    adapter = trainable.adapter.config.to_dict() if trainable.adapter is not None else None
    result: dict[str, Any] = {
        "method": method.name,
        "kind": method.kind,
        "neurons": method.neurons or None,
        "rank": method.rank or None,
        "steps": len(history),
        "lr": tconfig.lr,
        "train_config": asdict(tconfig),
        "adapter_config": adapter,
        "losses": [r["loss"] for r in history],
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
        "trainable_params": trainable.count(),
    }
    result["moved_bytes_per_step"] = (result["moved_bytes_h2d_per_step"]
                                      + result["moved_bytes_d2h_per_step"])
    if job.bench.evaluate and eval_samples:
        samples = list(eval_samples)[: job.run.max_eval]
        scores = evaluate(trainable.model, tokenizer, samples,
                          max_new_tokens=job.run.max_new_tokens,
                          batch_size=job.run.eval_batch_size,
                          progress=trainer.config.progress, desc=f"eval {method.name}")
        result.update({k: scores[k] for k in ("exact_match", "f1", "contains")})
        result["eval_n"] = scores["n"]
    else:
        result.update(exact_match=None, f1=None, contains=None, eval_n=0)
    result["host_peak_rss_bytes"] = peak_rss_bytes()
    return result


def worker(argv: Sequence[str] | None = None) -> int:
    """One method in a fresh process: ``python -m meft.bench.run``."""
    from meft.loading import ModelSource, load_model, load_tokenizer
    from meft.synthetic import builtin_set

    ap = argparse.ArgumentParser(prog="python -m meft.bench.run")
    ap.add_argument("--method", required=True)
    ap.add_argument("--model-dir", required=True, help="a plain copy of the base model")
    ap.add_argument("--job", required=True, help="the BenchJob as JSON")
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    job = BenchJob.from_dict(json.loads(args.job))
    source = ModelSource(args.model_dir, None, args.model_dir)
    tokenizer = load_tokenizer(source)
    base = load_model(source)
    method = parse_method(args.method)
    data = builtin_set(job.seed)
    train = encode_all(data.train, tokenizer, job.train_config(method.default_lr).max_length,
                       "training")
    reset_peak_rss()
    result = run_method(method, base, tokenizer, train, data.eval, job,
                        torch.device(args.device), copy_base=False)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(worker())
