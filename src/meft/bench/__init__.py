"""``meft bench``: meft against LoRA, a dense adapter and a dense offloaded adapter.

Every method trains the same base model on the same examples, in the same order, for the same
number of steps, through the same :class:`~meft.trainer.Trainer` that ``meft train`` uses
(loss, schedule, clipping, weight decay, micro-batching, divergence check); only the trainable
part differs (:mod:`meft.bench.methods`). ``meft bench --methods meft:N`` and ``meft train
--neurons N`` with the same settings give the same loss at every step.

    methods.py   parse method names, build each as a Trainable
    run.py       train, measure and score one method (in its own process)
    report.py    one JSON per run, the table, the plots, the targets

The package imports the trainer and the components, never the recipes or the CLI.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meft.bench.methods import DEFAULT_METHODS, QUICK_METHODS, check_method, parse_method
from meft.bench.report import (
    evaluate_targets,
    markdown_table,
    plot_results,
    read_results,
    write_result,
)
from meft.config import BenchJob
from meft.console import say
from meft.loading import load_model, load_tokenizer, resolve_model, save_plain_copy
from meft.sysinfo import environment, pick_device

__all__ = ["compare"]


def compare(job: BenchJob) -> dict[str, Any]:
    """Run every method of ``job`` (each in its own process); write one JSON per run, the
    table and the plots over every run in the output directory; return them."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    bench = job.bench
    names = bench.methods or (QUICK_METHODS if bench.quick else DEFAULT_METHODS)
    methods = [parse_method(m) for m in names]
    for method in methods:
        check_method(method, job)
    device = pick_device(job.run.device)
    source = resolve_model(job.run.model)
    output = Path(bench.output or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S"))
    output.mkdir(parents=True, exist_ok=True)
    config = job.to_dict()
    fresh = []
    with tempfile.TemporaryDirectory(prefix="meft-bench-") as tmp:
        # every method loads this copy of the base model, saved once as safetensors (fast
        # to load, unlike de-quantising a GGUF)
        say(f"bench: preparing {source.name} -> {output}")
        load_tokenizer(source, trust_remote_code=job.run.trust_remote_code).save_pretrained(tmp)
        save_plain_copy(load_model(source, trust_remote_code=job.run.trust_remote_code), tmp)
        for method in methods:
            say(f"bench: {method.name} ({bench.steps} steps of {bench.batch_size} examples)")
            result_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "meft.bench.run", "--method", method.name,
                   "--model-dir", tmp, "--job", json.dumps(config), "--result",
                   str(result_path), "--device", str(device)]
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0:
                why = ("killed: out of memory?" if proc.returncode == -9
                       else f"exit {proc.returncode}")
                say(f"  {method.name} failed ({why}); skipped")
                continue
            result = json.loads(result_path.read_text())
            result["model"] = source.name
            result["data"] = "built-in synthetic facts"
            path = write_result(result, output, config, str(device))
            fresh.append(result["method"])
            em = result["exact_match"]
            say(f"  {result['step_time_s']:.2f} s/step, {result['tokens_per_s']:.0f} tok/s, "
                f"EM {'-' if em is None else f'{100 * em:.1f}%'} -> {path}")
    results = read_results(output)
    table = markdown_table(results)
    targets = evaluate_targets(results)
    lines = [f"{'PASS' if t['passed'] else 'SKIP' if t['passed'] is None else 'FAIL'} "
             f"{t['target']}: {t['detail']}" for t in targets]
    env = environment(device)
    header = (f"{source.name}, built-in synthetic facts, {bench.steps} steps x "
              f"{bench.batch_size} examples, seed {job.seed}; {env['cpu']}, {env['threads']} "
              f"threads, torch {env['torch']}, commit {str(env['git_commit'])[:10]}")
    (output / "table.md").write_text(f"{header}\n\n{table}\n\n" + "\n".join(lines) + "\n")
    plots = plot_results(results, output)
    print(f"{header}\n\n{table}\n")
    print("\n".join(lines))
    return {"output": str(output), "fresh": fresh, "results": results, "targets": targets,
            "plots": [str(p) for p in plots]}
