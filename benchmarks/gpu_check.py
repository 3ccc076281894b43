"""The GPU check: everything meft needs to know from a GPU, in one command of at most 8 minutes.

A GPU machine is lent for minutes, with nothing to download and no time to debug, so this
script builds every model from a config (no hub, no GGUF), imports only what the image has
(torch, transformers, peft, numpy, safetensors) and runs from the source tree:

    PYTHONPATH=src python benchmarks/gpu_check.py --output benchmarks/results/gpu/COMMIT
    python benchmarks/gpu_check.py --dry-run --output /tmp/x     # the same code on CPU, toy sizes

It prints one JSON line and writes it to ``--output``/result.json:

- ``tests``: ``pytest -m cuda`` (counts; skipped with ``--dry-run``, where nothing has CUDA);
- ``same_on_cpu``: a tiny Llama with a meft adapter trained 4 steps on the device and on the
  CPU from the same initialisation and data: the largest relative loss difference (target
  1e-4) and the largest difference of the adapter's value rows;
- ``op``: the sparse adapter's forward + backward against the dense masked reference
  (:func:`meft.sparse_adapter_reference`) at N = 65,536 (dry run: 1,024), median ms of each,
  and the largest output difference;
- ``steps``: a randomly initialised Llama of TinyLlama-1.1B's shape (dry run: a tiny one),
  bf16 on the GPU, batch 8 x 512 tokens (dry run: 2 x 32), trained through meft's one loop
  (:func:`meft.cli.bench.run.run_method`) with LoRA all:16, meft:65536 and meft:262144 with
  compact host state (dry run: meft:1024 and meft:4096 compact): median step time after
  warm-up, peak device memory (``torch.cuda.max_memory_allocated``), bytes moved each way per
  step, and the host's seconds per step (routing, staging, optimizer update: the time the GPU
  can wait on the host until the pipeline overlaps them), each with ``meft plan``'s prediction
  for the same configuration beside it (``plan``).

Targets the numbers are read against (docs/scaling.md): meft:65536's step at most 1.15x LoRA
all:16's, the GPU waiting on the host under 10% of the step, device memory at most LoRA's plus
the staged rows, meft:262144 trained from compact host state, the correctness checks within
their tolerances. ``--dry-run`` is part of the test suite (tests/test_gpu_check.py), so the
script cannot rot between loans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from meft import MeftConfig, get_meft_model, sparse_adapter, sparse_adapter_reference
from meft.cli.bench.methods import parse_method
from meft.cli.bench.run import run_method
from meft.cli.plan import DEFAULT_HOST, PROFILES, Shape, plan
from meft.config import BenchJob, TrainConfig
from meft.data.records import Encoded
from meft.sysinfo import environment
from meft.training.trainer import Trainer

# TinyLlama-1.1B's shape (the ~1B model of the check), and the dry run's toy one
LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4}
LLAMA_TOY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
FULL = {"shape": LLAMA_1B, "batch": 8, "length": 512, "steps": 8, "op_neurons": 65536,
        "methods": ["lora:all:16", "meft:65536", "meft:262144:bf16:rowwise"]}
DRY = {"shape": LLAMA_TOY, "batch": 2, "length": 32, "steps": 4, "op_neurons": 1024,
       "methods": ["lora:all:16", "meft:1024", "meft:4096:bf16:rowwise"]}


def llama(shape: dict[str, int], dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2))
    return model.to(dtype)


def random_examples(n: int, length: int, vocab: int, seed: int = 0) -> list[Encoded]:
    """Token sequences whose second half is labelled (as answers are)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * (length // 2) + ids[length // 2:], False))
    return out


def pytest_cuda(dry: bool) -> dict[str, Any]:
    if dry:
        return {"skipped": "dry run (no CUDA)"}
    # only the modules that hold CUDA tests: the others may import what the GPU image lacks
    # (hypothesis, airportsdata, datasets, trl), and collecting them would fail
    root = Path(__file__).resolve().parents[1]
    files = sorted(str(f) for f in (root / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in f.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", *files], capture_output=True, text=True,
                          timeout=240, cwd=root)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": proc.returncode, "summary": tail[0], "files": len(files)}


def same_on_cpu(device: torch.device, steps: int = 4) -> dict[str, Any]:
    """A tiny Llama + meft trained ``steps`` steps on ``device`` and on the CPU."""
    data = random_examples(16, 24, LLAMA_TOY["vocab_size"], seed=1)
    runs = {}
    for label, where in (("device", device), ("cpu", torch.device("cpu"))):
        model = get_meft_model(llama(LLAMA_TOY, torch.float32),
                               MeftConfig(neurons=256, top_k=8, n_probe=2, seed=0),
                               device=where)
        model.to(where)
        tconfig = TrainConfig(steps=steps, batch_size=4, lr=1e-2, save_every=0,
                              progress=False, retain="off", seed=0)
        with tempfile_dir() as tmp:
            history = Trainer(model, data, tconfig, tmp, pad_id=0).train().history
        runs[label] = (
            [r["loss"] for r in history], torch.cat([s.values for s in model.stores]))
    (dev_loss, dev_values), (cpu_loss, cpu_values) = runs["device"], runs["cpu"]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dev_loss, cpu_loss, strict=True))
    return {"losses_device": dev_loss, "losses_cpu": cpu_loss, "loss_max_rel_diff": rel,
            "values_max_abs_diff": float((dev_values - cpu_values).abs().max()),
            "passed": rel <= 1e-4}


def tempfile_dir():  # type: ignore[no-untyped-def]
    import tempfile

    return tempfile.TemporaryDirectory(prefix="meft-gpu-check-")


def median_ms(fn: Any, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def op_check(device: torch.device, neurons: int, tokens: int = 512, d: int = 1024
             ) -> dict[str, Any]:
    """The sparse op and its dense reference, forward + backward, on ``device``."""
    gen = torch.Generator().manual_seed(0)
    experts = 4 * int(neurons ** 0.5)
    while neurons % experts:
        experts -= 1
    x = torch.randn(tokens, d, generator=gen).to(device)
    keys = (torch.randn(neurons, d, generator=gen) * 0.02).to(device)
    values = (torch.randn(neurons, d, generator=gen) * 0.02).to(device)
    router = (torch.randn(experts, d, generator=gen) * 0.02).to(device)
    kw = {"top_k": 64, "n_probe": 8}

    def run(op: Any) -> torch.Tensor:
        tensors = [t.clone().requires_grad_(True) for t in (x, keys, values, router)]
        y = op(*tensors, **kw)
        y.square().sum().backward()
        return y.detach()

    fast = median_ms(lambda: run(sparse_adapter), device)
    dense = median_ms(lambda: run(sparse_adapter_reference), device)
    diff = float((run(sparse_adapter) - run(sparse_adapter_reference)).abs().max())
    return {"neurons": neurons, "experts": experts, "tokens": tokens, "hidden": d,
            "sparse_ms": fast, "dense_reference_ms": dense, "speedup": dense / fast,
            "max_abs_diff": diff}


def step_checks(device: torch.device, cfg: dict[str, Any], dtype: torch.dtype,
                deadline: float) -> list[dict[str, Any]]:
    """Each method trained ``cfg['steps']`` steps through meft's loop on the ~1B model; a
    method that would start after ``deadline`` (perf_counter seconds) is skipped, so the
    check ends in its time even when a step is slower than planned."""
    shape = cfg["shape"]
    data = random_examples(cfg["batch"] * cfg["steps"], cfg["length"], shape["vocab_size"])
    job = BenchJob.from_options({"steps": cfg["steps"], "batch_size": cfg["batch"],
                                 "micro_batch_size": cfg["batch"], "eval": False,
                                 "progress": False, "retention": False,
                                 "max_length": cfg["length"]}, source="gpu check")
    tokenizer = types.SimpleNamespace(pad_token_id=0)
    base = llama(shape, dtype)
    # the lent machine: an H100 (the profile's datasheet numbers) and 128 GB of host memory
    hardware = {**PROFILES["h100-80g"], "host_memory": 128e9}
    out = []
    for name in cfg["methods"]:
        if time.perf_counter() > deadline:
            out.append({"method": name, "skipped": "out of time"})
            continue
        method = parse_method(name)
        result = run_method(method, base, tokenizer, data, [], [], job, device)
        times = result["step_times_s"][2:] or result["step_times_s"]
        row = {k: result.get(k) for k in (
            "method", "step_time_s", "tokens_per_s", "cuda_max_memory_allocated",
            "device_bytes", "moved_bytes_h2d_per_step", "moved_bytes_d2h_per_step",
            "union_mean", "host_s_per_step", "wait_s_per_step", "trainable_params",
            "host_state_bytes",
            "final_loss")}
        row["step_times_s"] = times
        if method.kind == "meft":
            config = job.adapter_config(method.neurons, **method.state_overrides())
            n_params = sum(p.numel() for p in base.parameters())
            predicted = plan(config, Shape(name, n_params, shape["hidden_size"],
                                           shape["num_hidden_layers"]),
                             tokens=cfg["batch"] * cfg["length"], hardware=hardware,
                             host_rates=dict(DEFAULT_HOST),
                             dtype_bytes=torch.finfo(dtype).bits // 8,
                             union=round(result["union_mean"]) or None)
            row["plan"] = {"seconds": predicted["seconds"],
                           "device_total": predicted["device_total"],
                           "moved_bytes": predicted["moved_bytes"],
                           "host_total": predicted["host_total"]}
        out.append(row)
    lora = next((r for r in out if r["method"].startswith("lora")), None)
    for r in out:
        if lora is not None and r.get("step_time_s") and lora.get("step_time_s"):
            r["step_vs_lora"] = r["step_time_s"] / lora["step_time_s"]
        if r.get("step_time_s") and r.get("host_s_per_step") is not None:
            r["host_share_of_step"] = r["host_s_per_step"] / r["step_time_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="the same code on CPU at toy sizes (under two minutes)")
    ap.add_argument("--output", type=Path, help="directory for result.json")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds after which no further method starts (default 420)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to run the same code on CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = DRY if args.dry_run else FULL
    started = time.perf_counter()
    record: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(device)}
    record["tests"] = pytest_cuda(args.dry_run)
    record["same_on_cpu"] = same_on_cpu(device)
    record["op"] = op_check(device, cfg["op_neurons"], *((64, 64) if args.dry_run else ()))
    record["steps"] = step_checks(device, cfg, torch.float32 if args.dry_run
                                  else torch.bfloat16, started + args.budget)
    record["seconds"] = time.perf_counter() - started
    line = json.dumps(record)
    print(line)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
