"""``meft bench``: meft against LoRA, a dense adapter and a dense offloaded adapter.

Every method trains the same base model on the same examples, in the same order, for the same
number of steps, through the same :class:`~meft.training.trainer.Trainer` that ``meft train`` uses
(loss, schedule, clipping, weight decay, micro-batching, divergence check); only the trainable
part differs (:mod:`meft.cli.bench.methods`). ``meft bench --methods meft:N`` and ``meft train
--neurons N`` with the same settings give the same loss at every step.

    methods.py   parse method names, build each as a Trainable
    run.py       train, measure and score one method (in its own process)
    report.py    one JSON per run, the table, the plots

The package imports the trainer and the components, never the recipes or the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from meft.adapter.loading import (
    hide_library_bars,
    load_model,
    load_tokenizer,
    resolve_model,
    save_plain_copy,
)
from meft.adapter.serialization import prepare_output
from meft.cli.bench.methods import DEFAULT_METHODS, QUICK_METHODS, check_method, parse_entry
from meft.cli.bench.report import pct, read_results, run_name, write_report, write_result
from meft.config import BenchJob
from meft.console import say
from meft.data.datasets import drop_known, load_splits, split_sets
from meft.data.records import write_jsonl
from meft.errors import DataError, RunDirectoryError
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import answered
from meft.evaluation.probe import RetentionProbe, headline_of
from meft.sysinfo import pick_device
from meft.training.background import load_background

__all__ = ["compare"]


def compare(job: BenchJob, command: str = "(called from Python)") -> dict[str, Any]:
    """Run every (method, rate) of ``job``, each in its own process; choose each method's rate
    on validation; write one JSON per run, summary.json, table.md and the plots (over every
    run in the output directory); return them."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    bench, run = job.bench, job.run
    if bench.report_only:  # nothing trains: the tables and plots of the runs already there
        if bench.output is None or not read_results(Path(bench.output)):
            raise RunDirectoryError(f"--report-only needs --output DIR holding run files "
                                    f"(<method>@<lr>.json); {bench.output or 'no --output'} "
                                    "has none")
        return {"fresh": [], **write_report(Path(bench.output), command,
                                            matched_em=bench.matched_em)}
    names = bench.methods or (QUICK_METHODS if bench.quick else DEFAULT_METHODS)
    entries = [parse_entry(m) for m in names]
    for method, _ in entries:
        check_method(method, job)
    device = pick_device(run.device)
    source = resolve_model(run.model)
    seeds = bench.seeds or [job.seed]
    # the seed draws the built-in facts, the data order and the adapter's initialisation
    # with --sets S: S x --people people, cut into S disjoint sets learned one after another
    splits = {seed: load_splits(run.data, run.eval_data, bench.validation_data, seed=seed,
                                people=run.people * bench.sets, dataset=run.dataset,
                                train_phrasings=run.train_phrasings) for seed in seeds}
    if job.chooses_rates and not splits[seeds[0]].validation:
        raise DataError("choosing rates (--lr-grid, method@rates) needs validation questions; "
                        "the data has none (pass --validation-data)")
    output = prepare_output(bench.output, overwrite=bench.overwrite or bench.skip_done,
                            prefix="bench-",
                            hint=" to add runs to it,")
    progress = job.train.get("progress", True)
    if not progress:
        hide_library_bars()
    fresh = []
    with tempfile.TemporaryDirectory(prefix="meft-bench-") as tmp:
        # every run loads this copy of the base model, saved once as safetensors (fast to
        # load, unlike de-quantising a GGUF), and its seed's splits
        say(f"bench: {splits[seeds[0]].description}"
            + (f" (seeds {','.join(map(str, seeds))})" if bench.seeds else "")
            + (f", learned as {bench.sets} sets one after another" if bench.sets > 1 else ""))
        say(f"bench: preparing {source.name} -> {output}")
        tokenizer = load_tokenizer(source, trust_remote_code=run.trust_remote_code)
        base = load_model(source, trust_remote_code=run.trust_remote_code)
        cache = BaseCache(base, tokenizer)  # base-model results kept (meft.evaluation.cache)
        for seed in seeds:
            if run.data is None and run.dataset == "airports":  # only what the model lacks
                splits[seed] = drop_known(splits[seed], answered(
                    base, tokenizer, splits[seed].test, max_new_tokens=run.max_new_tokens,
                    batch_size=run.eval_batch_size, desc="known facts",
                    progress=progress, cache=cache))
                say(f"bench: seed {seed}: {splits[seed].description}")
            sets = split_sets(splits[seed], bench.sets) if bench.sets > 1 else []
            for where, part in [("", splits[seed]), *((f"set-{i}/", p)
                                                      for i, p in enumerate(sets))]:
                for name in ("train", "validation", "test", "seen"):
                    write_jsonl(getattr(part, name),
                                Path(tmp) / f"data-{seed}" / f"{where}{name}.jsonl")
            (Path(tmp) / f"data-{seed}" / "facts.json").write_text(json.dumps(
                {"facts": len({s.source for s in splits[seed].train}),
                 "bits": splits[seed].bits}))
        tokenizer.save_pretrained(tmp)
        save_plain_copy(base, tmp)
        worker_args: list[str] = []
        if run.retention and bench.eval:
            # the first seed's adjacent kinds (real people; airports: the facts it knew)
            probe = RetentionProbe.build(base, tokenizer, max_new_tokens=run.max_new_tokens,
                                         batch_size=run.eval_batch_size, progress=progress,
                                         cache=cache, adjacent=splits[seeds[0]].adjacent,
                                         **headline_of(run.probe))
            probe.save(Path(tmp) / "probe.json")
            worker_args = ["--probe", str(Path(tmp) / "probe.json")]
            say(f"bench: retention probe: {probe.summary()}")
        if any(method.retain for method, _ in entries):
            # replay alone draws only the short general questions: generate only those
            # unless a method replays it whole
            configs = [dataclasses.replace(job.train_config(m.default_lr),
                                           **m.retain_overrides())
                       for m, _ in entries if m.retain]
            samples, desc = load_background(
                run.background, base, tokenizer, progress=progress, cache=cache,
                questions_only=not any(c.retain_replay_pool == "whole" for c in configs))
            write_jsonl(samples, Path(tmp) / "background.jsonl")
            worker_args += ["--background", str(Path(tmp) / "background.jsonl")]
            say(f"bench: background for +retain: {desc}")
        del base
        grid: list[float | None] = list(bench.lr_grid or []) or [None]
        runs = [(seed, method, lr) for seed in seeds for method, own in entries
                for lr in (list(own) if own else grid)]
        for i, (seed, method, lr) in enumerate(runs):
            rate = lr if lr is not None else bench.lr or method.default_lr
            say(f"bench [{i + 1}/{len(runs)}]: {method.name}, lr {rate:g}"
                + (f", seed {seed}" if bench.seeds else "")
                + f" ({bench.steps} steps of {bench.batch_size} examples"
            + (f" per set, {bench.sets} sets)" if bench.sets > 1 else ")"))
            done = output / f"{run_name(method.name, rate, seed if bench.seeds else None)}.json"
            if bench.skip_done and done.is_file():
                say(f"  already in {done}; skipped (--skip-done)")
                continue
            config = job.with_seed(seed).to_dict()
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "meft.cli.bench.run", "--method", method.name,
                   "--model-dir", tmp, "--job", json.dumps(config),
                   "--data", str(Path(tmp) / f"data-{seed}"),
                   "--result", str(result_path), "--device", str(device), *worker_args]
            if lr is not None:
                cmd += ["--lr", repr(lr)]
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                why = ("killed: out of memory?" if proc.returncode == -9
                       else f"exit {proc.returncode}")
                say(f"  {method.name} failed ({why}); skipped")
                continue
            result = json.loads(result_path.read_text())
            data = splits[seed].description + (
                f"; learned as {bench.sets} sets of {run.people} people, one after another"
                if bench.sets > 1 else "")
            result.update(model=source.name, data=data, command=command)
            path = write_result(result, output, config, str(device),
                                with_seed=bench.seeds is not None)
            fresh.append(path.stem)
            say(f"  {result['step_time_s']:.2f} s/step, {result['tokens_per_s']:.0f} "
                f"tok/s, validation EM {pct(result['validation_em'], '%')}, test EM "
                f"{pct(result['test_em'], '%')}, retention {pct(result['retention'], '%')} -> "
                f"{path}")
    report = write_report(output, command, matched_em=bench.matched_em)
    return {"fresh": fresh, **report}

