"""Recipes: the main jobs behind the CLI, as plain functions over the components.

``train``        load model + data, attach adapters, evaluate, train, evaluate, save, plot
``evaluate_cli`` score a model (+ adapter) on question/answer data
``generate_cli`` greedy generation from one prompt
``info_cli``     describe a saved adapter: shapes, host bytes, expected traffic per step

A run directory holds ``adapter/`` (the final adapter), ``checkpoints/``, ``metrics.jsonl``
(one line per step), ``eval.json`` (before/after scores and predictions), ``run.json`` (the
configuration, environment and summary) and the PNG plots.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from meft._version import __version__
from meft.checkpoint import list_checkpoints
from meft.config import ConfigError, MeftConfig
from meft.data import DataError, Encoded, Sample, encode, load_samples
from meft.evaluate import evaluate
from meft.loading import (
    ModelLoadError,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model,
)
from meft.model import AdapterMismatchError, MeftModel, UnsupportedModelError, get_meft_model
from meft.serialization import SerializationError
from meft.synthetic import make_knowledge_set
from meft.trainer import TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelLoadError, AdapterMismatchError, UnsupportedModelError,
    SerializationError, TrainingDiverged, FileExistsError, ValueError,
)
DEMO_PEOPLE = 30


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev


def prepare_output(output: Path | None, overwrite: bool) -> Path:
    if output is None:
        output = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {output} exists and is not empty; pass --overwrite "
                              "or choose another directory")
    output.mkdir(parents=True, exist_ok=True)
    return output


def encode_all(samples: Sequence[Sample], tokenizer: Any, max_length: int, what: str
               ) -> list[Encoded]:
    encoded, truncated, dropped = [], 0, 0
    for sample in samples:
        enc = encode(sample, tokenizer, max_length)
        truncated += enc.truncated
        if all(y == -100 for y in enc.labels):
            dropped += 1
            continue
        encoded.append(enc)
    if truncated:
        say(f"warning: {truncated} {what} example(s) longer than --max-length {max_length} "
            "were truncated")
    if dropped:
        say(f"warning: {dropped} {what} example(s) lost every answer token to truncation and "
            "were dropped")
    return encoded


def load_data(data: str | None, eval_data: str | None, seed: int
              ) -> tuple[list[Sample], list[Sample], list[Sample], str]:
    """(train, held-out eval, seen-phrasing eval, description)."""
    if data is None:
        ks = make_knowledge_set(DEMO_PEOPLE, seed=seed)
        held = load_samples(eval_data) if eval_data else ks.eval
        return ks.train, held, ks.eval_seen, (
            f"built-in synthetic knowledge set: {len(ks.facts)} fictional people, "
            f"{len(ks.train)} training questions, {len(held)} held-out phrasings")
    train = load_samples(data)
    if eval_data:
        return train, load_samples(eval_data), [], f"{data} ({len(train)} examples)"
    if len(train) >= 10:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = min(200, max(1, len(train) // 10))
        held = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        return train, held, [], (f"{data}: {len(train)} training examples, {len(held)} held "
                                 "out for evaluation (pass --eval-data to choose)")
    return train, [], [], f"{data} ({len(train)} examples; too few to hold some out)"


RUN_CONFIG = "run_config.json"
RESUME_OVERRIDES = ("steps", "stop_after", "progress", "plots", "device")
RUN_KEYS = {"model", "data", "eval_data", "steps", "epochs", "batch_size", "micro_batch_size",
            "neurons", "top_k", "experts", "probe", "gate", "layers", "lr", "router_lr",
            "weight_decay", "warmup_ratio", "max_grad_norm", "max_length", "seed",
            "eval_every", "save_every", "keep_checkpoints", "max_new_tokens",
            "eval_batch_size", "max_eval", "eval_before", "device", "trust_remote_code",
            "progress", "plots"}


def resume_options(directory: Path, explicit: dict[str, Any]) -> dict[str, Any]:
    """The options of the run in ``directory``, with the few a resume may change."""
    path = directory / RUN_CONFIG
    if not path.is_file():
        raise FileExistsError(f"--resume {directory}: no {RUN_CONFIG} (not a meft run "
                              "directory?)")
    try:
        options: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    if not list_checkpoints(directory / "checkpoints"):
        raise FileExistsError(f"--resume {directory}: no complete checkpoint in "
                              f"{directory / 'checkpoints'}")
    missing = sorted(RUN_KEYS - set(options))
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)} (written by another version?)")
    unsupported = sorted(k for k in explicit if k not in (*RESUME_OVERRIDES, "resume"))
    if unsupported:
        raise ConfigError(f"--resume continues the run as configured; only --steps, "
                          f"--stop-after, --device and display flags may change (got "
                          f"{', '.join('--' + k.replace('_', '-') for k in unsupported)})")
    options.update({k: v for k, v in explicit.items() if k in RESUME_OVERRIDES})
    options["resume"] = directory
    options["output"] = str(directory)
    return options


def train(**o: Any) -> dict[str, Any]:
    """The main job. Options are the CLI's train flags (see ``meft train --help``).

    With ``resume=DIR`` the run in DIR continues from its newest complete checkpoint, up to
    ``steps`` total steps; the result is bit for bit what an uninterrupted run gives."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    torch.manual_seed(o["seed"])
    resume = o.get("resume")
    checkpoint = None
    if resume is not None:
        output = Path(resume)
        found = list_checkpoints(output / "checkpoints")
        if not found:
            raise FileExistsError(f"--resume {output}: no complete checkpoint in "
                                  f"{output / 'checkpoints'}")
        checkpoint = found[-1]
    else:
        output = prepare_output(Path(o["output"]) if o["output"] is not None else None,
                                o["overwrite"])
        saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in o.items()
                 if k not in ("resume", "stop_after")}
        (output / RUN_CONFIG).write_text(json.dumps(saved, indent=2) + "\n")
    device = pick_device(o["device"])
    config = MeftConfig(neurons=o["neurons"], top_k=o["top_k"], experts=o["experts"],
                        n_probe=o["probe"], gate=o["gate"], layers=o["layers"], lr=o["lr"],
                        weight_decay=o["weight_decay"], seed=o["seed"])
    tconfig = TrainConfig(steps=o["steps"], epochs=o["epochs"], batch_size=o["batch_size"],
                          micro_batch_size=o["micro_batch_size"], lr=o["lr"],
                          router_lr=o["router_lr"], warmup_ratio=o["warmup_ratio"],
                          max_grad_norm=o["max_grad_norm"], eval_every=o["eval_every"],
                          save_every=o["save_every"], keep_checkpoints=o["keep_checkpoints"],
                          seed=o["seed"], progress=o["progress"])

    source = resolve_model(o["model"])  # fail fast on a bad --model, before any work
    train_samples, eval_samples, seen_samples, data_desc = load_data(
        o["data"], o["eval_data"], o["seed"])
    if o["max_eval"]:
        eval_samples = eval_samples[: o["max_eval"]]
        seen_samples = seen_samples[: o["max_eval"]]
    say(f"data: {data_desc}")
    say("loading model ...")
    tokenizer = load_tokenizer(source, trust_remote_code=o["trust_remote_code"])
    model = load_model(source, trust_remote_code=o["trust_remote_code"])
    model.to(device)
    say(f"model: {source.name} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) on {device}")
    train_enc = encode_all(train_samples, tokenizer, o["max_length"], "training")
    if not train_enc:
        raise DataError("no training example has an answer token left to learn")
    eval_qa = [s for s in eval_samples if s.answers]
    eval_enc = encode_all(eval_samples, tokenizer, o["max_length"], "evaluation")

    config.base_model = source.name
    meft_model = get_meft_model(model, config, device=device)
    counts = meft_model.parameter_counts()
    host_gb = sum(s.nbytes for s in meft_model.stores) * 2 / 1e9  # tables + AdamW moments
    say(f"adapter: N={config.neurons} K={config.top_k} E={config.n_experts} P={config.n_probe} "
        f"on {len(meft_model.layer_ids)} layers: {counts['host'] / 1e6:.1f}M host parameters "
        f"({100 * counts['host'] / counts['base']:.0f}% of the base), {host_gb:.2f} GB host "
        f"memory with optimizer state; routers {counts['device'] / 1e6:.2f}M on {device}")

    gen_kw = {"max_new_tokens": o["max_new_tokens"], "batch_size": o["eval_batch_size"],
              "progress": o["progress"]}
    results: dict[str, Any] = {}
    before_path = output / "eval_before.json"
    if checkpoint is not None and before_path.is_file():
        results["before"] = json.loads(before_path.read_text())
    elif o["eval_before"] and eval_qa:
        results["before"] = evaluate(meft_model, tokenizer, eval_qa, desc="eval before",
                                     **gen_kw)
        before_path.write_text(json.dumps(results["before"]) + "\n")
        say(f"before training: {_fmt(results['before'])}")

    trainer = Trainer(meft_model, train_enc, tconfig, output, pad_id=tokenizer.pad_token_id,
                      eval_encoded=eval_enc)
    trainer.stop_after = o.get("stop_after")
    if checkpoint is not None:
        trainer.restore(checkpoint)
        say(f"resuming from {checkpoint} (step {trainer.step} of {trainer.total})")
    say(f"training {trainer.total} steps of {tconfig.batch_size} examples "
        f"({len(train_enc)} examples, {trainer.total * tconfig.batch_size / len(train_enc):.1f}"
        f" epochs), lr {trainer.lr:g} -> {output}")
    try:
        result = trainer.train()
    except TrainingInterrupted as stop:
        say(f"{'interrupted' if stop.by_signal else 'stopped'} at step {stop.step}; "
            f"checkpoint saved to {stop.checkpoint}; continue with: meft train --resume "
            f"{output} --steps {trainer.total}")
        raise
    except TrainingDiverged:
        kept = list_checkpoints(output / "checkpoints")
        if kept:
            say(f"the last good checkpoint is {kept[-1]}")
        raise
    trainer.save_checkpoint()
    meft_model.save_pretrained(output / "adapter")

    if eval_qa:
        results["after"] = evaluate(meft_model, tokenizer, eval_qa, desc="eval after",
                                    **gen_kw)
    if seen_samples:
        results["after_seen_phrasing"] = evaluate(meft_model, tokenizer, seen_samples,
                                                  desc="eval seen", **gen_kw)
    (output / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = []
    if o["plots"]:
        from meft.plots import plot_run

        plots = [str(p) for p in plot_run(result.history, output,
                                          layer_ids=meft_model.layer_ids,
                                          title=f"meft on {source.name}")]
    total_s = time.perf_counter() - started
    summary = {
        "meft_version": __version__,
        "model": source.name,
        "data": data_desc,
        "adapter_config": config.to_dict(),
        "train_config": asdict(tconfig),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "total_seconds": total_s,
        "tokens": result.tokens,
        "final_loss": result.final_loss,
        "scores": {k: {m: v[m] for m in ("exact_match", "f1", "contains", "n")}
                   for k, v in results.items()},
        "plots": plots,
        "environment": environment(device),
    }
    (output / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(results, result.seconds, total_s, output)
    return summary


def _fmt(scores: dict[str, Any]) -> str:
    return (f"exact match {100 * scores['exact_match']:.1f}%, F1 {100 * scores['f1']:.1f}%, "
            f"contains {100 * scores['contains']:.1f}% (n={scores['n']})")


def _report(results: dict[str, Any], train_s: float, total_s: float, output: Path) -> None:
    say("")
    names = {"before": "held-out, before", "after": "held-out, after",
             "after_seen_phrasing": "seen phrasing, after"}
    width = max(len(v) for v in names.values())
    say(f"{'':{width}}  exact match    F1  contains     n")
    for key, scores in results.items():
        say(f"{names.get(key, key):{width}}  {100 * scores['exact_match']:10.1f}% "
            f"{100 * scores['f1']:5.1f}% {100 * scores['contains']:8.1f}% {scores['n']:5d}")
    say(f"\ntrained in {train_s / 60:.1f} min (total {total_s / 60:.1f} min); adapter: "
        f"{output / 'adapter'}; metrics, plots, eval.json in {output}")


def environment(device: torch.device) -> dict[str, Any]:
    from meft.bench import environment as machine

    return {**machine(), "machine": platform.machine(), "device": str(device)}


def _load_adapted(model: str | None, adapter: Path | None, device: str | None,
                  trust_remote_code: bool) -> tuple[Any, Any, Any]:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dev = pick_device(device)
    base, tokenizer, source = load_model_and_tokenizer(model,
                                                       trust_remote_code=trust_remote_code)
    base.to(dev)
    wrapped = MeftModel.from_pretrained(base, adapter, device=dev) if adapter else base
    return wrapped, tokenizer, source


def evaluate_cli(*, model: str | None, adapter: Path | None, data: str | None,
                 max_new_tokens: int, batch_size: int, max_eval: int | None,
                 predictions: Path | None, device: str | None,
                 trust_remote_code: bool) -> dict[str, Any]:
    samples = (load_samples(data) if data else make_knowledge_set(DEMO_PEOPLE).eval)
    samples = [s for s in samples if s.answers][:max_eval]
    if not samples:
        raise DataError(f"{data}: no examples with reference answers to evaluate")
    wrapped, tokenizer, _ = _load_adapted(model, adapter, device, trust_remote_code)
    scores = evaluate(wrapped, tokenizer, samples, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, progress=sys.stderr.isatty())
    if predictions is not None:
        predictions.write_text(json.dumps(scores["predictions"], indent=2) + "\n")
    return {k: scores[k] for k in ("exact_match", "f1", "contains", "n")}


def generate_cli(*, model: str | None, adapter: Path | None, prompt: str,
                 max_new_tokens: int, raw: bool, device: str | None,
                 trust_remote_code: bool) -> str:
    wrapped, tokenizer, _ = _load_adapted(model, adapter, device, trust_remote_code)
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=raw)
    dev = next(wrapped.parameters()).device
    with torch.no_grad():
        out = wrapped.generate(input_ids=enc.input_ids.to(dev),
                               attention_mask=enc.attention_mask.to(dev),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
               ).strip()


def info_cli(adapter: Path, *, tokens: int, as_json: bool) -> str:
    from meft.serialization import load_tensors

    config = MeftConfig.load(adapter)
    tensors = load_tensors(adapter, "adapter_model")
    d = config.hidden_size or 0
    layers = config.layers or []
    table_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                      if k.endswith((".keys", ".values")))
    # expected union at T tokens: N (1 - (1 - K/N)^T) if choices were uniform
    n, k = config.neurons, config.top_k
    union = n * (1 - (1 - k / n) ** tokens)
    per_layer = {"hidden_d2h": tokens * d * 4, "rows_h2d": 2 * union * d * 4,
                 "grads_d2h": 2 * union * d * 4}
    info = {
        "adapter": str(adapter), "base_model": config.base_model,
        "neurons": n, "top_k": k, "experts": config.n_experts, "n_probe": config.n_probe,
        "gate": config.gate, "hidden_size": d, "layers": len(layers),
        "parameters": sum(t.numel() for t in tensors.values()),
        "host_table_bytes": table_bytes,
        "host_bytes_with_adamw": table_bytes * 2,
        "tokens_per_micro_batch": tokens,
        "expected_union_if_uniform": round(union),
        "expected_bytes_per_layer": {k2: round(v) for k2, v in per_layer.items()},
        "expected_mb_per_step_all_layers": round(
            sum(per_layer.values()) * len(layers) / 1e6, 1),
        "dense_offload_mb_per_step_all_layers": round(4 * n * d * 4 * len(layers) / 1e6, 1),
    }
    if as_json:
        return json.dumps(info, indent=2)
    lines = [f"{key}: {value}" for key, value in info.items()]
    return "\n".join(lines)


def save_plain_copy(model: Any, directory: str) -> None:
    """config.json + model.safetensors of a loaded model, including one loaded from GGUF
    (which ``save_pretrained`` refuses: transformers marks it as quantized)."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_model(model, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def bench_cli(*, methods: list[str] | None, steps: int | None, batch_size: int,
              quick: bool, max_eval: int | None, output: Path, seed: int, model: str | None,
              lora_lr: float, adapter_lr: float, no_eval: bool, device: str | None,
              progress: bool) -> dict[str, Any]:
    """``meft bench``: train every method the same way; JSON per run, table, plots."""
    from meft import bench

    logging.getLogger("transformers").setLevel(logging.ERROR)
    names = methods or (bench.QUICK_METHODS if quick else bench.DEFAULT_METHODS)
    parsed = [bench.parse_method(m) for m in names]
    cfg = bench.BenchConfig(steps=steps or (20 if quick else 60), batch_size=batch_size,
                            seed=seed, lora_lr=lora_lr, adapter_lr=adapter_lr,
                            max_eval=max_eval if max_eval is not None else (24 if quick
                                                                             else None),
                            evaluate=not no_eval)
    dev = pick_device(device)
    source = resolve_model(model)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="meft-bench-") as tmp:
        # each method runs in its own process (its own peak RSS); they load this copy of the
        # base model, saved once as safetensors (fast to load, unlike de-quantising a GGUF)
        say(f"bench: preparing {source.name} ...")
        load_tokenizer(source).save_pretrained(tmp)
        save_plain_copy(load_model(source), tmp)
        for method in parsed:
            say(f"bench: {method.name} ({cfg.steps} steps of {cfg.batch_size} examples)")
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "meft.bench", "--method", method.name, "--model-dir",
                   tmp, "--config", json.dumps(asdict(cfg)), "--people", str(DEMO_PEOPLE),
                   "--result", str(result_path), "--device", str(dev)]
            if not progress:
                cmd.append("--no-progress")
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                why = ("killed: out of memory?" if proc.returncode == -9
                       else f"exit {proc.returncode}")
                say(f"  {method.name} failed ({why}); skipped")
                continue
            result = json.loads(result_path.read_text())
            path = bench.write_result(result, cfg, output, {"model": source.name,
                                                            "data": "built-in synthetic"})
            results.append(result)
            em = result["exact_match"]
            say(f"  {result['step_time_s']:.2f} s/step, {result['tokens_per_s']:.0f} tok/s, "
                f"EM {'-' if em is None else f'{100 * em:.1f}%'} -> {path}")
    # the table covers every run in the directory, so methods can be added a few at a time
    fresh = {r["method"] for r in results}
    for path in sorted(output.glob("*.json")):
        try:
            earlier = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(earlier, dict) and earlier.get("method") and \
                earlier["method"] not in fresh and "step_time_s" in earlier:
            results.append(earlier)
    order = {m: i for i, m in enumerate(bench.DEFAULT_METHODS)}
    results.sort(key=lambda r: (order.get(r["method"], len(order)), r["method"]))
    table = bench.markdown_table(results)
    targets = bench.evaluate_targets(results)
    lines = [f"{'PASS' if t['passed'] else 'SKIP' if t['passed'] is None else 'FAIL'} "
             f"{t['target']}: {t['detail']}" for t in targets]
    env = bench.environment()
    header = (f"{source.name}, built-in synthetic facts, {cfg.steps} steps x {cfg.batch_size} "
              f"examples, seed {seed}; {env['cpu']}, {env['threads']} threads, torch "
              f"{env['torch']}, commit {str(env['git_commit'])[:10]}")
    (output / "table.md").write_text(f"{header}\n\n{table}\n\n" + "\n".join(lines) + "\n")
    plots = bench.plot_results(results, output)
    print(f"{header}\n\n{table}\n")
    print("\n".join(lines))
    return {"results": results, "targets": targets, "plots": [str(p) for p in plots]}
