"""Where meft's host memory goes: the state it keeps, and what a training step adds on top.

    python benchmarks/host_memory.py --neurons 16384 --host-dtype bfloat16 --optim-state rowwise \
        --output DIR [--steps 6] [--batch-size 12]

Loads the embedded model, builds meft's adapter and its optimizer on the built-in synthetic
set, trains ``--steps`` steps, and records the process's resident memory (VmRSS) and its peak
(VmHWM) after each stage:

    base loaded          the model and tokenizer
    adapter built        + the host tables
    optimizer built      + the AdamW moments (allocated eagerly)
    after step i         + what a step keeps: staging buffers, row-gradient buffers, and what
                           the allocator holds on to after freeing
    after malloc_trim    what glibc gives back when asked (freed memory it had kept)

and the sizes it can name: the host state as ``MeftConfig.host_bytes_per_layer`` counts it,
the staging pool's buffers and the row-gradient buffers. The state per adapter parameter is
(optimizer built - base loaded) / parameters; the step's working set is peak - optimizer built.
On a CPU-only machine the "device" is the host, so staged rows and activations count here too.
Writes DIR/host_memory.json (fresh directory only).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meft.adapter.loading import load_model_and_tokenizer
from meft.adapter.model import get_meft_model
from meft.config import MeftConfig, TrainConfig
from meft.data.records import encode_all
from meft.data.synthetic import make_knowledge_set
from meft.engine.optim import STATE_FORMATS
from meft.sysinfo import environment
from meft.training.trainer import Trainer


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--neurons", type=int, default=16384)
    ap.add_argument("--host-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--optim-state", default="fp32", choices=STATE_FORMATS)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        print(f"host_memory: {args.output} is not empty; choose a fresh directory",
              file=sys.stderr)
        return 2
    stages: list[dict[str, Any]] = []

    def record(stage: str, **extra: Any) -> None:
        gc.collect()
        row = {"stage": stage, "rss_bytes": _status("VmRSS"), "peak_bytes": _status("VmHWM"),
               **extra}
        stages.append(row)
        print(f"{stage:24s} rss {row['rss_bytes'] / 1e9:6.3f} GB   peak "
              f"{row['peak_bytes'] / 1e9:6.3f} GB", flush=True)

    record("start")
    model, tokenizer, _ = load_model_and_tokenizer(None)
    train = encode_all(make_knowledge_set(30).train, tokenizer, 256, "train")
    record("base loaded")
    cfg = MeftConfig(neurons=args.neurons, host_dtype=args.host_dtype,
                     optim_state=args.optim_state)
    meft = get_meft_model(model, cfg)
    record("adapter built")
    with tempfile.TemporaryDirectory(prefix="meft-host-memory-") as tmp:
        trainer = Trainer(meft, train, TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                                   lr=3e-3, progress=False),
                          tmp, pad_id=tokenizer.pad_token_id)
        record("optimizer built")
        batches = trainer._batches()
        for i in range(args.steps):
            start = time.perf_counter()
            trainer.train_step(next(batches))
            record(f"after step {i + 1}", step_s=time.perf_counter() - start)
    pool = sum(entry[0].numel() * entry[0].element_size() for a in meft.adapter_modules
               for entries in a._staging._entries.values() for entry in entries)
    grads = sum(g._rows.numel() * g._rows.element_size() + g._slot.numel() * 8
                for s in meft.stores for g in (s.key_grad, s.value_grad))
    trimmed = bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    record("after malloc_trim", trimmed=trimmed)
    by = {s["stage"]: s for s in stages}
    params = sum(s.keys.numel() + s.values.numel() for s in meft.stores)
    layers = len(meft.stores)
    state = cfg.host_bytes_per_layer(model.config.hidden_size) * layers
    built = by["optimizer built"]["rss_bytes"] - by["base loaded"]["rss_bytes"]
    peak = max(s["peak_bytes"] for s in stages)
    summary = {
        "adapter_params": params,
        "host_state_bytes": state,
        "host_state_bytes_per_param": state / params,
        "state_rss_growth_bytes": built,
        "state_rss_growth_bytes_per_param": built / params,
        "step_working_set_bytes": peak - by["optimizer built"]["rss_bytes"],
        "peak_growth_bytes_per_param": (peak - by["base loaded"]["rss_bytes"]) / params,
        "staging_pool_bytes": pool,
        "row_grad_buffer_bytes": grads,
        "allocator_returned_bytes": (by[f"after step {args.steps}"]["rss_bytes"]
                                     - by["after malloc_trim"]["rss_bytes"]),
    }
    for k, v in summary.items():
        print(f"{k:36s} {v:,.3f}" if isinstance(v, float) else f"{k:36s} {v:,}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "host_memory.json").write_text(json.dumps(
        {"command": " ".join(["python", "benchmarks/host_memory.py", *(argv or sys.argv[1:])]),
         "config": vars(args) | {"output": str(args.output)}, "stages": stages,
         "summary": summary, "environment": environment()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
