"""Recipes: the jobs behind the CLI, as plain functions over the components.

``train``          load model + data, attach adapters, evaluate, train, evaluate, save, plot
``resume_job``     the recorded job of a run directory, with what a resume may change
``evaluate_cli``   score a model (+ adapter) on question/answer data
``generate_cli``   greedy generation from one prompt
``info_cli``       describe a saved adapter: shapes, host bytes, expected traffic per step
``bench``          the comparison (:mod:`meft.cli.bench`)

A run directory holds ``run_config.json`` (the resolved configuration, written first, read by
``--resume``), ``adapter/`` (the final adapter), ``checkpoints/``, ``metrics.jsonl`` (one line
per step), ``eval.json`` (before/after scores and predictions), ``run.json`` (configuration,
environment and summary) and the PNG plots.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from meft._version import __version__
from meft.adapter.checkpoint import list_checkpoints, read_trainer_state
from meft.adapter.loading import (
    adapter_base,
    hide_library_bars,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    recorded_name,
    resolve_model,
)
from meft.adapter.model import MeftModel, get_meft_model, read_adapter
from meft.adapter.serialization import prepare_output
from meft.config import (
    BenchJob,
    ConfigError,
    EvalConfig,
    GenerateConfig,
    InfoConfig,
    MeftConfig,
    PlanConfig,
    RunConfig,
    TrainConfig,
    TrainJob,
)
from meft.console import quiet, result, say
from meft.data.datasets import drop_known, load_splits
from meft.data.records import Encoded, Sample, encode_all, load_samples
from meft.engine.disk import INDEX as DISK_INDEX
from meft.engine.disk import DiskArrays
from meft.engine.distributed import DataParallel, world_size
from meft.engine.optim import ROW_LOCAL_STATE
from meft.errors import DataError, RunDirectoryError, SerializationError, TrainingDiverged
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import answered, evaluate
from meft.evaluation.probe import PROBE_FILE, RetentionProbe, headline_of
from meft.evaluation.probe import describe as describe_retention
from meft.sysinfo import environment, pick_device, total_host_bytes
from meft.training.protection import Retainer, protection
from meft.training.trainer import Trainer, TrainingInterrupted, TrainResult

RUN_CONFIG = "run_config.json"
# the flat option keys meft 0.1 recorded in run_config.json (still resumable)
LEGACY_RUN_KEYS = {
    "model", "data", "eval_data", "steps", "epochs", "batch_size", "micro_batch_size",
    "neurons", "top_k", "experts", "probe", "gate", "layers", "lr", "router_lr",
    "weight_decay", "warmup_ratio", "max_grad_norm", "max_length", "seed", "eval_every",
    "save_every", "keep_checkpoints", "max_new_tokens", "eval_batch_size", "max_eval",
    "eval_before", "device", "trust_remote_code", "progress", "plots"}


def resume_job(directory: Path, explicit: dict[str, Any]) -> TrainJob:
    """The job recorded in run directory ``directory``, with the explicitly given options a
    resume may change (anything else that differs is refused, by name)."""
    path = directory / RUN_CONFIG
    if not path.is_file():
        raise RunDirectoryError(f"--resume {directory}: no {RUN_CONFIG} (not a meft run "
                                "directory?)")
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    newest = _newest_checkpoint(directory)
    _check_steps(directory, newest, explicit.get("steps"))
    if set(recorded) != {"adapter", "train", "run"}:  # meft 0.1's flat options
        missing = sorted(LEGACY_RUN_KEYS - set(recorded))
        if missing:
            raise ConfigError(f"{path}: missing {', '.join(missing)} (written by another "
                              "version?)")
    job = TrainJob.from_dict(recorded, source=str(path))
    resumed = job.resume(explicit, source=str(path))
    resumed.run.output = str(directory)
    return resumed


def train(job: TrainJob) -> dict[str, Any]:
    """The main job (``meft train``).

    With ``job.run.resume`` the run in that directory continues from its newest complete
    checkpoint, up to ``steps`` total steps; the result is bit for bit what an uninterrupted
    run gives."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config, tconfig, run = job.adapter, job.train, job.run
    if not tconfig.progress:
        hide_library_bars()
    started = time.perf_counter()
    torch.manual_seed(tconfig.seed)
    device = pick_device(run.device)
    parallel = _join(run, tconfig, device, config.optim_state)
    if parallel is not None and device.type == "cuda":
        device = torch.device("cuda", parallel.local_rank)
        torch.cuda.set_device(device)
    main = parallel is None or parallel.is_main
    output, checkpoint = _open_run(job, parallel)

    source = resolve_model(run.model)  # fail fast on a bad --model, before any work
    splits = load_splits(run.data, run.eval_data, seed=tconfig.seed, people=run.people,
                         dataset=run.dataset, train_phrasings=run.train_phrasings)
    if run.eval_data is not None and not any(s.answers for s in splits.test):
        raise DataError(f"--eval-data {run.eval_data}: no examples with reference answers to "
                        "evaluate (question/answer records; text has none)")
    say("loading model ...")
    timings: dict[str, float] = {}  # seconds per phase of the job (run.json, printed at the end)
    clock = time.perf_counter()
    tokenizer = load_tokenizer(source, trust_remote_code=run.trust_remote_code)
    model = load_model(source, trust_remote_code=run.trust_remote_code)
    model.to(device)
    cache = BaseCache(model, tokenizer)  # base-model results, computed once (evaluation.cache)
    say(f"model: {source.name} ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) on {device}")
    gen_kw: dict[str, Any] = {"max_new_tokens": run.max_new_tokens,
                              "batch_size": run.eval_batch_size, "progress": tconfig.progress}
    if run.data is None and run.dataset == "airports":  # keep only what the model lacks
        splits = drop_known(splits, answered(model, tokenizer, splits.test,
                                             desc="known facts", cache=cache, **gen_kw))
    train_samples, eval_samples, seen_samples = splits.train, splits.test, splits.seen
    data_desc = splits.description
    if run.max_eval:
        eval_samples = eval_samples[: run.max_eval]
        seen_samples = seen_samples[: run.max_eval]
    say(f"data: {data_desc}")
    train_enc = encode_all(train_samples, tokenizer, tconfig.max_length, "training")
    if not train_enc:
        raise DataError("no training example has an answer token left to learn")
    eval_qa = [s for s in eval_samples if s.answers]
    eval_enc = encode_all(eval_samples, tokenizer, tconfig.max_length, "evaluation")
    clock = _lap(timings, "load", clock)

    if run.adapter is not None:  # go on from a saved adapter: its shape, its rows
        meft_model = MeftModel.from_pretrained(model, run.adapter, device=device,
                                               parallel=parallel)
        config = job.adapter = meft_model.meft_config
        if checkpoint is None and main:  # record the shape the run really has
            (output / RUN_CONFIG).write_text(json.dumps(job.to_dict(), indent=2) + "\n")
        say(f"starting from the adapter in {run.adapter}")
    else:
        config.base_model = recorded_name(source)
        meft_model = get_meft_model(model, config, device=device,
                                    arrays=_disk_store(run, resumed=checkpoint is not None),
                                    parallel=parallel)
        if checkpoint is not None and meft_model.arrays is not None:
            # the store is at its last committed step: continue from that step's checkpoint
            match = output / "checkpoints" / f"step-{meft_model.arrays.step:08d}"
            checkpoint = match if match.is_dir() else checkpoint
    counts = meft_model.parameter_counts()
    host_gb = (config.host_bytes_per_layer(meft_model.stores[0].dim)  # tables + moments
               * len(meft_model.stores) / 1e9)
    say(f"adapter: N={config.neurons} K={config.top_k} E={config.n_experts} P={config.n_probe} "
        f"on {len(meft_model.layer_ids)} layers: {counts['host'] / 1e6:.1f}M host parameters "
        f"({100 * counts['host'] / counts['base']:.0f}% of the base), {host_gb:.2f} GB "
        + (f"on disk in {meft_model.arrays.dir}" if meft_model.arrays is not None
           else "host memory")
        + f" with optimizer state; routers {counts['device'] / 1e6:.2f}M on {device}")
    if parallel is not None:
        say(f"distributed: {parallel.world} processes, each holding 1/{parallel.world} of the "
            f"host tables ({host_gb / parallel.world:.2f} GB); global batch "
            f"{tconfig.batch_size}")

    results: dict[str, Any] = {}
    before_path = output / "eval_before.json"
    if checkpoint is not None and before_path.is_file():
        results["before"] = json.loads(before_path.read_text())
    elif run.eval_before and eval_qa:
        if run.adapter is None:  # a fresh adapter adds exactly 0: the base model's answers
            with meft_model.disable_adapter():
                results["before"] = evaluate(meft_model, tokenizer, eval_qa,
                                             desc="eval before", cache=cache, **gen_kw)
        else:
            results["before"] = evaluate(meft_model, tokenizer, eval_qa, desc="eval before",
                                         **gen_kw)
        if main:
            before_path.write_text(json.dumps(results["before"]) + "\n")
        say(f"before training: {_fmt(results['before'])}")
    clock = _lap(timings, "eval_before", clock)

    probe = _retention_probe(meft_model, tokenizer, run, output, resumed=checkpoint is not None,
                             cache=cache, adjacent=splits.adjacent,
                             **gen_kw) if run.retention else None
    clock = _lap(timings, "probe", clock)

    retainer = _retainer(meft_model, tokenizer, tconfig, run, resumed=checkpoint is not None,
                         cache=cache, train=train_enc)
    clock = _lap(timings, "protection", clock)
    trainer = Trainer(meft_model, train_enc, tconfig, output, pad_id=tokenizer.pad_token_id,
                      eval_encoded=eval_enc, retainer=retainer)
    trainer.stop_after = run.stop_after
    if checkpoint is not None:
        trainer.restore(checkpoint)
        say(f"resuming from {checkpoint} (step {trainer.step} of {trainer.total})")
    say(f"training {trainer.total} steps of {tconfig.batch_size} examples "
        f"({len(train_enc)} examples, {trainer.total * tconfig.batch_size / len(train_enc):.1f}"
        f" epochs), lr {tconfig.lr:g} -> {output}")
    result = _train_or_explain(trainer)
    trainer.save_checkpoint()
    # with a disk store the adapter files hold the routers and name the store (committed at
    # this step by the checkpoint): an adapter bigger than RAM is not copied a second time
    meft_model.save_pretrained(output / "adapter", tables=meft_model.arrays is None)
    clock = _lap(timings, "training", clock)

    if eval_qa:
        results["after"] = evaluate(meft_model, tokenizer, eval_qa, desc="eval after",
                                    **gen_kw)
    if seen_samples:
        results["after_seen_phrasing"] = evaluate(meft_model, tokenizer, seen_samples,
                                                  desc="eval seen", **gen_kw)
    clock = _lap(timings, "eval_after", clock)
    if probe is not None:
        results["retention"] = probe.measure(meft_model, tokenizer, **gen_kw)
    clock = _lap(timings, "retention", clock)
    if not main:  # rank 0 writes the results
        assert parallel is not None
        parallel.close()
        return {}
    (output / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = []
    if run.plots:
        from meft.cli.plots import plot_run

        plots = [str(p) for p in plot_run(result.history, output,
                                          layer_ids=meft_model.layer_ids,
                                          title=f"meft on {source.name}")]
    total_s = time.perf_counter() - started
    summary = {
        "meft_version": __version__,
        "model": source.name,
        "data": data_desc,
        "config": job.to_dict(),
        "steps": result.steps,
        "train_seconds": result.seconds,
        "total_seconds": total_s,
        "timings": timings,
        "tokens": result.tokens,
        "final_loss": result.final_loss,
        "losses": [r["loss"] for r in result.history],
        "scores": {k: {m: v[m] for m in ("exact_match", "f1", "contains", "n")}
                   for k, v in results.items() if k != "retention"},
        "retention": ({k: v for k, v in results["retention"].items()
                       if not k.startswith("forgotten")}
                      if "retention" in results else None),
        "plots": plots,
        "environment": environment(device),
        "world_size": parallel.world if parallel is not None else 1,
    }
    (output / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(results, result.seconds, total_s, output, timings)
    if parallel is not None:
        parallel.close()
    return summary


def _retention_probe(model: MeftModel, tokenizer: Any, run: RunConfig, output: Path, *,
                     resumed: bool, cache: BaseCache, adjacent: list[Sample],
                     **gen_kw: Any) -> RetentionProbe:
    """The probe of the base model: built now (adapter off) or, on resume, the run's own;
    ``adjacent``: questions of the training data's own kinds (the built-in sets')."""
    path = output / PROBE_FILE
    if resumed and path.is_file():
        return RetentionProbe.load(path)
    headline = headline_of(run.probe)
    with model.disable_adapter():  # every process builds it (the same): no collectives
        probe = RetentionProbe.build(model, tokenizer, cache=cache, adjacent=adjacent,
                                     **headline, **gen_kw)
    if model.parallel is None or model.parallel.is_main:
        probe.save(path)
    say(f"retention probe: {probe.summary()}")
    return probe


def _disk_store(run: RunConfig, *, resumed: bool) -> DiskArrays | None:
    """The run's disk store (``--store disk:DIR``): new, or on resume the run's own, opened
    at its last committed step (an interrupted step is undone)."""
    if run.store == "ram":
        return None
    path = Path(run.store[5:])
    if not resumed and (path / DISK_INDEX).is_file():
        raise RunDirectoryError(f"--store {run.store}: the directory holds another run's "
                                "store; resume that run or choose an empty directory")
    arrays = DiskArrays(path)
    if arrays.recovered:
        say(f"store {path}: the step in progress when the run stopped was undone; the store "
            f"is at step {arrays.step}")
    return arrays


def _retainer(model: MeftModel, tokenizer: Any, tconfig: TrainConfig, run: RunConfig, *,
              resumed: bool, cache: BaseCache, train: list[Encoded]) -> Retainer | None:
    """Forgetting protection if asked for: its replay targets kept now, or on resume read
    from the checkpoint (the ones the run started with); with ``--retain-gate`` the
    novelty gate fitted now on ``train`` and the background (on resume: the checkpoint's)."""
    if tconfig.retain != "on":
        return None
    retainer = (Retainer.from_config(model, tconfig, None, tokenizer) if resumed
                else protection(model, tokenizer, run.background, config=tconfig,
                                progress=tconfig.progress, rehearse=run.rehearse,
                                cache=cache, train=train))
    say(retainer.summary())
    return retainer


def _join(run: RunConfig, tconfig: TrainConfig, device: torch.device,
          optim_state: str) -> DataParallel | None:
    """This process's place in a torchrun run (None alone); the others than rank 0 go quiet."""
    if world_size() == 1:
        return None
    if run.store != "ram":
        raise ConfigError(f"--store {run.store}: a distributed run keeps its tables in RAM "
                          "(disk stores are for one process)")
    if tconfig.retain == "on" and tconfig.retain_gate:  # checked again by MeftModel
        raise ConfigError("--retain-gate is for one process (not a distributed run)")
    if tconfig.retain == "on" and tconfig.retain_subject:
        raise ConfigError("--retain-subject is for one process (not a distributed run)")
    if optim_state not in ROW_LOCAL_STATE:  # checked again by MeftModel; here before joining
        raise ConfigError(f"--optim-state {optim_state} is for one process (a distributed run "
                          f"shards rows; use {', '.join(ROW_LOCAL_STATE)})")
    parallel = DataParallel.from_env(device, timeout_s=run.dist_timeout)
    if parallel is not None and not parallel.is_main:
        quiet()
        tconfig.progress = False
    return parallel


def _open_run(job: TrainJob, parallel: DataParallel | None = None
              ) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from): a new directory recording the resolved
    job, or the resumed run's with its newest complete checkpoint. In a distributed run
    rank 0 makes the directory and tells the others (or its error)."""
    if job.run.resume is None and parallel is not None:
        text = ""
        if parallel.is_main:
            try:
                text = "ok:" + str(_open_run(job)[0])
            except RunDirectoryError as err:
                text = f"error:{err}"
        text = parallel.broadcast_text(text)
        if text.startswith("error:"):
            raise RunDirectoryError(text[6:])
        return Path(text[3:]), None
    if job.run.resume is None:
        output = prepare_output(job.run.output, overwrite=job.run.overwrite)
        (output / RUN_CONFIG).write_text(json.dumps(job.to_dict(), indent=2) + "\n")
        return output, None
    output = Path(job.run.resume)
    return output, _newest_checkpoint(output)


def _check_steps(run_dir: Path, checkpoint: Path, steps: int | None) -> None:
    """Refuse a ``--resume --steps`` that cannot mean what it says (fewer steps than the run
    has done); say what a changed total does to the learning-rate schedule (an unfinished
    run's ends elsewhere; a finished run's, spent, rises again)."""
    try:
        state = read_trainer_state(checkpoint)
        done, total = int(state["step"]), int(state["total_steps"])
    except (SerializationError, ValueError, KeyError, TypeError):
        return  # the trainer reads it again and names what is wrong
    if steps is None or steps == total:
        return
    if steps < done:
        raise ConfigError(f"--resume {run_dir} --steps {steps}: the run is already at step "
                          f"{done}; --steps is the total to reach (its schedule ends at "
                          f"{total})")
    if done >= total:  # allowed (several tools extend runs so), but not silently
        say(f"--steps {steps}: the run finished its {total} steps with its learning rate "
            f"decayed to 0; its schedule now ends at step {steps} instead, so the rate rises "
            f"again to {100 * (steps - done) / steps:.0f}% of its peak and decays over the "
            f"{steps - done} new steps (for a fresh schedule: meft train --adapter "
            f"{run_dir / 'adapter'})")
        return
    say(f"--steps {steps}: the learning-rate schedule of this run now ends at step {steps} "
        f"instead of {total}")


def _newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory, or a RunDirectoryError."""
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise RunDirectoryError(f"--resume {run_dir}: no complete checkpoint in "
                                f"{run_dir / 'checkpoints'}")
    return found[-1]


def _train_or_explain(trainer: Trainer) -> TrainResult:
    """Train; on a stop, say how to resume; on divergence, name the last good checkpoint."""
    try:
        return trainer.train()
    except TrainingInterrupted as stop:
        say(f"{'interrupted' if stop.by_signal else 'stopped'} at step {stop.step}; "
            f"checkpoint saved to {stop.checkpoint}; continue with: meft train --resume "
            f"{trainer.output} --steps {trainer.total}")
        raise
    except TrainingDiverged:
        kept = list_checkpoints(trainer.output / "checkpoints")
        if kept:
            say(f"the last good checkpoint is {kept[-1]}")
        raise


def _fmt(scores: dict[str, Any]) -> str:
    return (f"exact match {100 * scores['exact_match']:.1f}%, F1 {100 * scores['f1']:.1f}%, "
            f"contains {100 * scores['contains']:.1f}% (n={scores['n']})")


def _lap(timings: dict[str, float], phase: str, since: float) -> float:
    """Add the seconds since ``since`` to ``phase``; return now."""
    now = time.perf_counter()
    timings[phase] = timings.get(phase, 0.0) + now - since
    return now


def _report(results: dict[str, Any], train_s: float, total_s: float, output: Path,
            timings: dict[str, float]) -> None:
    result("")
    names = {"before": "held-out, before", "after": "held-out, after",
             "after_seen_phrasing": "seen phrasing, after"}
    width = max(len(v) for v in names.values())
    result(f"{'':{width}}  exact match    F1  contains     n")
    for key, scores in results.items():
        if key == "retention":
            continue
        result(f"{names.get(key, key):{width}}  {100 * scores['exact_match']:10.1f}% "
               f"{100 * scores['f1']:5.1f}% {100 * scores['contains']:8.1f}% "
               f"{scores['n']:5d}")
    if "retention" in results:
        result(describe_retention(results["retention"]))
    result(f"\ntrained in {train_s / 60:.1f} min (total {total_s / 60:.1f} min); adapter: "
           f"{output / 'adapter'}; metrics, plots, eval.json in {output}")
    result("time: " + ", ".join(f"{name.replace('_', ' ')} {seconds:.0f} s"
                                for name, seconds in timings.items()))


def _load_adapted(run: RunConfig, adapter: str | None) -> tuple[Any, Any]:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # as the evaluation's own bar: none in a log file
        hide_library_bars()
    dev = pick_device(run.device)
    spec = run.model
    if spec is None and adapter:  # the model the adapter was trained on
        spec = adapter_base(MeftConfig.load(adapter).base_model, adapter)
    base, tokenizer, _ = load_model_and_tokenizer(spec, trust_remote_code=run.trust_remote_code)
    base.to(dev)
    wrapped = MeftModel.from_pretrained(base, adapter, device=dev) if adapter else base
    return wrapped, tokenizer


def evaluate_cli(run: RunConfig, ev: EvalConfig) -> dict[str, Any]:
    """``meft eval``: exact match, F1 and contains (JSON-able)."""
    samples = load_samples(ev.data) if ev.data else load_splits(None, None).test
    samples = [s for s in samples if s.answers][:run.max_eval]
    if not samples:
        raise DataError(f"{ev.data}: no examples with reference answers to evaluate")
    wrapped, tokenizer = _load_adapted(run, ev.adapter)
    scores = evaluate(wrapped, tokenizer, samples, max_new_tokens=run.max_new_tokens,
                      batch_size=run.eval_batch_size, progress=sys.stderr.isatty())
    if ev.predictions is not None:
        Path(ev.predictions).write_text(json.dumps(scores["predictions"], indent=2) + "\n")
    return {k: scores[k] for k in ("exact_match", "f1", "contains", "n")}


def generate_cli(run: RunConfig, gen: GenerateConfig) -> str:
    """``meft generate``: the greedy completion of one prompt."""
    wrapped, tokenizer = _load_adapted(run, gen.adapter)
    if not gen.raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": gen.prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = gen.prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=gen.raw)
    dev = next(wrapped.parameters()).device
    with torch.no_grad():
        out = wrapped.generate(input_ids=enc.input_ids.to(dev),
                               attention_mask=enc.attention_mask.to(dev),
                               max_new_tokens=gen.max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
               ).strip()


def info_cli(info: InfoConfig) -> str:
    """``meft info``: sizes, host bytes and expected traffic of a saved adapter."""
    config, tensors = read_adapter(info.adapter)
    d = config.hidden_size or 0
    layers = config.layers or []
    from meft.cli.plan import traffic, union_rows

    item = config.dtype.itemsize
    table_bytes = 2 * config.neurons * d * item * len(layers)
    n, k, tokens = config.neurons, config.top_k, info.tokens
    union = union_rows(config, tokens)  # meft plan's assumption
    moved = traffic(config, d, 1, tokens, union)
    out = {
        "adapter": str(info.adapter), "base_model": config.base_model,
        "neurons": n, "top_k": k, "experts": config.n_experts, "n_probe": config.n_probe,
        "gate": config.gate, "hidden_size": d, "layers": len(layers),
        "parameters": (2 * n + config.n_experts) * d * len(layers),
        "tables": (f"in the disk store {config.tables_store} (step {config.tables_step})"
                   if config.tables_store is not None and not any(
                       k.endswith(".keys") for k in tensors) else "in the adapter files"),
        "host_table_bytes": table_bytes,
        "host_bytes_with_adamw": config.host_bytes_per_layer(d) * len(layers),
        "tokens_per_micro_batch": tokens,
        "expected_union": union,
        "expected_bytes_per_layer": moved,
        "expected_mb_per_step_all_layers": round(sum(moved.values()) * len(layers) / 1e6, 1),
        "dense_offload_mb_per_step_all_layers": round(4 * n * d * 4 * len(layers) / 1e6, 1),
    }
    if info.json:
        return json.dumps(out, indent=2)
    return "\n".join(f"{key}: {value}" for key, value in out.items())


def bench(job: BenchJob, command: str = "(called from Python)") -> dict[str, Any]:
    """``meft bench``: see :func:`meft.cli.bench.compare` (``command`` is recorded in table.md)."""
    from meft.cli.bench import compare

    return compare(job, command)


def plan_cli(adapter: MeftConfig, options: PlanConfig) -> str:
    """``meft plan``: the plan of one run (or of the largest N that fits, with --fit)."""
    from meft.cli.plan import (
        DEFAULT_HOST,
        PROFILES,
        calibrate,
        describe,
        fit_neurons,
        model_shape,
        parse_bytes,
        plan,
    )
    from meft.evaluation.cache import cache_dir

    calibration = cache_dir() / "calibration.json"
    if options.calibrate:
        say(f"calibrating host rates -> {calibration}")
        rates = calibrate(calibration)
    elif calibration.is_file():
        rates = json.loads(calibration.read_text())
    else:
        rates = dict(DEFAULT_HOST)
    hardware = dict(PROFILES[options.profile])
    if options.gpu_memory is not None:
        hardware["gpu_memory"] = parse_bytes(options.gpu_memory, flag="--gpu-memory")
    for key in ("gpu_tflops", "pcie_gbps"):
        if getattr(options, key) is not None:
            hardware[key] = getattr(options, key)
    machine = total_host_bytes()
    if options.host_memory is None and machine is None:
        raise ConfigError("this machine's memory is unknown (no /proc/meminfo): pass "
                          "--host-memory")
    hardware["host_memory"] = (parse_bytes(options.host_memory, flag="--host-memory")
                               if options.host_memory is not None else float(machine or 0))
    shape = model_shape(options.model, trust_remote_code=options.trust_remote_code)
    kw: dict[str, Any] = {"tokens": options.tokens, "hardware": hardware, "host_rates": rates,
                          "dtype_bytes": 2 if options.dtype == "bf16" else 4,
                          "union": options.union, "store": options.store}
    if options.fit:
        n = fit_neurons(adapter, shape, **kw)
        if not n:
            raise ConfigError("no N fits: the base model alone exceeds the device memory")
        adapter = MeftConfig(**{**adapter.to_dict(), "neurons": n, "experts": None})
    result = plan(adapter, shape, **kw)
    if options.json:
        return json.dumps(result, indent=2)
    return ("largest N that fits: " if options.fit else "") + describe(result)
