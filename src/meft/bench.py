"""The comparison benchmark: meft against LoRA, a dense adapter and a dense offloaded adapter.

Every method trains the same base model on the same examples, in the same order, for the same
number of steps, with the same loss (answer-token cross-entropy), schedule (warmup + linear
decay) and global clipping; only the trainable part differs:

    lora:qv:R / lora:all:R   peft LoRA of rank R on q,v projections / on all linear layers
    dense:N                  the parallel adapter with every neuron active, on the device
    offload:N                the same, stored on the host, moved whole each step, dense
                             AdamW on the host (DeepSpeed-style offload)
    meft:N                   meft, experts E = default_experts(N), P = 8, K = 64
    meft-noexperts:N         meft with a single expert: every key scored (no Key-Experts)

Measured per run: median step time (steps after the first two) and tokens/s; peak host RSS
(VmHWM, reset before each run); device-resident bytes = the frozen base weights + trainable
parameters, their gradients and AdamW state on the device + the staged rows (and their
gradients) of every layer at the peak of a step (activations excluded; on CUDA,
``torch.cuda.max_memory_allocated`` is recorded too); bytes moved per step each way;
trainable parameters; exact match / F1 / contains on held-out questions after training.
Each run writes one JSON (config, metrics, environment) into the output directory; the
summary is a Markdown table and two plots (exact match vs device bytes, step time vs N).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meft.baselines import DenseOffloadAdapter, attach_dense
from meft.config import MeftConfig
from meft.data import Encoded, Sample, collate, iterate_batches
from meft.evaluate import evaluate, token_loss_sum
from meft.model import MeftModel, get_meft_model
from meft.optim import RowSparseAdamW, clip_grad_norm_
from meft.trainer import lr_multiplier

KINDS = ("lora", "dense", "offload", "meft", "meft-noexperts")
DEFAULT_METHODS = ["lora:qv:8", "lora:qv:16", "lora:all:16", "dense:1024", "dense:16384",
                   "offload:16384", "meft:1024", "meft:4096", "meft:16384", "meft:65536",
                   "meft-noexperts:16384"]
QUICK_METHODS = ["lora:qv:16", "dense:1024", "offload:1024", "meft:1024", "meft:4096"]


@dataclass(frozen=True)
class Method:
    kind: str
    neurons: int = 0
    rank: int = 0
    targets: str = ""

    @property
    def name(self) -> str:
        if self.kind == "lora":
            return f"lora:{self.targets}:{self.rank}"
        return f"{self.kind}:{self.neurons}"


def parse_method(text: str) -> Method:
    parts = text.split(":")
    try:
        if parts[0] == "lora" and len(parts) == 3 and parts[1] in ("qv", "all"):
            return Method("lora", rank=int(parts[2]), targets=parts[1])
        if parts[0] in KINDS[1:] and len(parts) == 2:
            return Method(parts[0], neurons=int(parts[1]))
    except ValueError:
        pass
    raise ValueError(f"method {text!r}: expected lora:qv:R, lora:all:R, dense:N, offload:N, "
                     "meft:N or meft-noexperts:N")


@dataclass
class BenchConfig:
    steps: int = 60
    batch_size: int = 11  # ~512 tokens per step on the built-in data
    seed: int = 0
    lora_lr: float = 1e-3
    adapter_lr: float = 3e-3
    top_k: int = 64
    n_probe: int = 8
    max_eval: int | None = None
    max_new_tokens: int = 16
    evaluate: bool = True


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Setup:
    """A method attached to a fresh copy of the base model, ready to train."""

    def __init__(self, method: Method, base: torch.nn.Module, cfg: BenchConfig,
                 device: torch.device, *, copy_base: bool = True) -> None:
        self.method = method
        self.meft: MeftModel | None = None
        self.offload: list[DenseOffloadAdapter] = []
        model = copy.deepcopy(base) if copy_base else base
        self.base_bytes = _tensor_bytes(list(model.parameters()))
        host_params: list[torch.nn.Parameter] = []
        self.model: Any
        if method.kind == "lora":
            from peft import LoraConfig, get_peft_model

            targets = ["q_proj", "v_proj"] if method.targets == "qv" else "all-linear"
            self.model = get_peft_model(model, LoraConfig(
                r=method.rank, lora_alpha=2 * method.rank, lora_dropout=0.0,
                target_modules=targets))
            lr = cfg.lora_lr
        elif method.kind in ("dense", "offload"):
            adapters, _ = attach_dense(model, method.neurons, offload=method.kind == "offload",
                                       seed=cfg.seed, device=device)
            self.model = model
            self.adapter_params = [p for a in adapters for p in a.parameters()]
            if method.kind == "offload":
                self.offload = [a for a in adapters if isinstance(a, DenseOffloadAdapter)]
                host_params = [p for a in self.offload for p in a.tables.parameters()]
            lr = cfg.adapter_lr
        else:
            experts = 1 if method.kind == "meft-noexperts" else None
            config = MeftConfig(neurons=method.neurons, top_k=cfg.top_k, experts=experts,
                                n_probe=1 if experts == 1 else cfg.n_probe,
                                gate="none" if experts == 1 else "product", seed=cfg.seed,
                                lr=cfg.adapter_lr)
            self.meft = get_meft_model(model, config, device=device)
            self.model = self.meft
            lr = cfg.adapter_lr
        self.lr = lr
        self.model.to(device)
        if self.meft is not None:
            self.device_params = self.meft.router_parameters()
            self.host_opt: torch.optim.Optimizer | None = RowSparseAdamW(
                [t for s in self.meft.stores for t in s.tables], lr=lr)
            self.trainable = self.meft.parameter_counts()["trainable"]
        else:
            self.device_params = [p for p in self.model.parameters() if p.requires_grad]
            self.device_params += getattr(self, "adapter_params", [])
            self.host_opt = torch.optim.AdamW(host_params, lr=lr) if host_params else None
            self.trainable = sum(p.numel() for p in self.device_params) + sum(
                p.numel() for p in host_params)
        self.host_params = host_params
        self.device_opt = (torch.optim.AdamW(self.device_params, lr=lr)
                           if self.device_params else None)

    def set_lr(self, mult: float) -> None:
        for opt in (self.host_opt, self.device_opt):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = self.lr * mult

    def clip_and_step(self, max_norm: float = 1.0) -> None:
        if self.meft is not None:
            host = [g for s in self.meft.stores for g in (s.key_grad, s.value_grad)]
            clip_grad_norm_(self.device_params, host, max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.device_params + self.host_params, max_norm)
        for opt in (self.host_opt, self.device_opt):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    def moved_and_staged(self) -> tuple[int, int, int]:
        """(bytes host->device, bytes device->host, peak staged bytes on device) this step."""
        if self.meft is not None:
            stats = self.meft.transfer_stats()
            h2d = sum(s.bytes_h2d for s in stats)
            d2h = sum(s.bytes_d2h for s in stats)
            rows = [s.row_bytes_h2d // max(1, s.forwards) for s in stats]
            staged = sum(rows) + max(rows, default=0)  # all layers' rows + one layer's grads
            for s in stats:
                s.reset()
            return h2d, d2h, staged
        if self.offload:
            h2d = sum(a.tables.bytes_h2d for a in self.offload)
            d2h = sum(a.tables.bytes_d2h for a in self.offload)
            per_layer = 2 * self.offload[0].tables.keys.numel() * 4
            for a in self.offload:
                a.tables.bytes_h2d = a.tables.bytes_d2h = 0
            return h2d, d2h, per_layer * len(self.offload) + per_layer
        return 0, 0, 0


def run_method(method: Method, base: torch.nn.Module, tokenizer: Any,
               train: Sequence[Encoded], eval_samples: Sequence[Sample], cfg: BenchConfig,
               device: torch.device, *, progress: bool = True, copy_base: bool = True
               ) -> dict[str, Any]:
    """Train one method for cfg.steps steps, evaluate it, return its metrics.

    ``copy_base=False`` trains ``base`` itself (a worker process that owns it)."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    setup = _Setup(method, base, cfg, device, copy_base=copy_base)
    warmup = max(1, round(0.02 * cfg.steps))
    order = (idx for epoch in range(10**6)
             for idx in iterate_batches(train, cfg.batch_size, seed=cfg.seed, epoch=epoch))
    times, tokens, losses = [], [], []
    moved_h2d, moved_d2h, staged = [], [], []
    setup.model.train()
    for step in tqdm(range(cfg.steps), desc=method.name, unit="step", disable=not progress,
                     leave=False):
        idx = next(order)
        examples = [train[i] for i in idx]
        labelled = sum(e.target_tokens for e in examples)
        start = time.perf_counter()
        setup.set_lr(lr_multiplier(step, cfg.steps, warmup))
        loss_sum, _ = token_loss_sum(setup.model, collate(examples, tokenizer.pad_token_id))
        (loss_sum / max(1, labelled)).backward()
        setup.clip_and_step()
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(e.input_ids) for e in examples))
        losses.append(float(loss_sum.detach()) / max(1, labelled))
        h2d, d2h, st = setup.moved_and_staged()
        moved_h2d.append(h2d)
        moved_d2h.append(d2h)
        staged.append(st)
    steady = times[2:] if len(times) > 2 else times
    step_time = statistics.median(steady)
    device_params = setup.device_params
    # parameters + gradients + two AdamW moments of the trainable device tensors
    trainable_device = 4 * _tensor_bytes(device_params)
    device_bytes = setup.base_bytes + trainable_device + max(staged)
    result: dict[str, Any] = {
        "method": method.name,
        "kind": method.kind,
        "neurons": method.neurons or None,
        "rank": method.rank or None,
        "steps": cfg.steps,
        "step_time_s": step_time,
        "tokens_per_s": statistics.mean(tokens) / step_time,
        "tokens_per_step": statistics.mean(tokens),
        "final_loss": statistics.mean(losses[-5:]),
        "device_bytes": device_bytes,
        "device_bytes_trainable": trainable_device,
        "device_bytes_staged_peak": max(staged),
        "device_bytes_base": setup.base_bytes,
        "cuda_max_memory_allocated": (torch.cuda.max_memory_allocated(device)
                                      if device.type == "cuda" else None),
        "moved_bytes_per_step": statistics.mean(moved_h2d) + statistics.mean(moved_d2h),
        "moved_bytes_h2d_per_step": statistics.mean(moved_h2d),
        "moved_bytes_d2h_per_step": statistics.mean(moved_d2h),
        "trainable_params": setup.trainable,
        "lr": setup.lr,
    }
    if cfg.evaluate and eval_samples:
        scores = evaluate(setup.model, tokenizer, list(eval_samples)[: cfg.max_eval],
                          max_new_tokens=cfg.max_new_tokens, batch_size=32,
                          progress=progress, desc=f"eval {method.name}")
        result.update({k: scores[k] for k in ("exact_match", "f1", "contains")})
        result["eval_n"] = scores["n"]
    else:
        result.update(exact_match=None, f1=None, contains=None, eval_n=0)
    result["host_peak_rss_bytes"] = peak_rss_bytes()
    del setup
    return result


def environment() -> dict[str, Any]:
    try:
        commit: str | None = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       None)
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| method | trainable | step s | tok/s | device MB | moved MB/step | host peak GB "
            "| EM | F1 | contains |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    for r in results:
        rss = r.get("host_peak_rss_bytes")
        rows.append(
            f"| {r['method']} | {r['trainable_params'] / 1e6:.1f}M | {r['step_time_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['device_bytes'] / 1e6:.0f} | "
            f"{r['moved_bytes_per_step'] / 1e6:.0f} | "
            f"{'–' if rss is None else f'{rss / 1e9:.2f}'} | {pct(r['exact_match'])} | "
            f"{pct(r['f1'])} | {pct(r['contains'])} |")
    return "\n".join(rows)


def plot_results(results: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    scored = [r for r in results if r["exact_match"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in scored:
            ax.scatter(r["device_bytes"] / 1e6, 100 * r["exact_match"], s=30)
            ax.annotate(r["method"], (r["device_bytes"] / 1e6, 100 * r["exact_match"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("device-resident MB (base weights + trainable state + staged rows)")
        ax.set_ylabel("exact match on held-out questions (%)")
        ax.set_title("quality vs device memory")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(directory / "em_vs_device_bytes.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("meft", "meft-noexperts", "dense", "offload"):
        pts = sorted((r["neurons"], r["step_time_s"]) for r in results if r["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=kind)
    for r in results:
        if r["kind"] == "lora":
            ax.axhline(r["step_time_s"], ls="--", lw=0.8, color="gray")
            ax.annotate(r["method"], (ax.get_xlim()[0], r["step_time_s"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter neurons per layer N")
    ax.set_ylabel("median step time (s)")
    ax.set_title("step time vs N (dashed: LoRA)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "step_time_vs_n.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_result(result: dict[str, Any], cfg: BenchConfig, directory: Path,
                 extra: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path: Path = directory / (str(result["method"]).replace(":", "_") + ".json")
    payload = {"config": {**asdict(cfg), **extra}, "metrics": result,
               "environment": environment(), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _find(results: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in results if r["method"] == name), None)


def evaluate_targets(results: Sequence[dict[str, Any]], neurons: int = 16384
                     ) -> list[dict[str, Any]]:
    """The issue's targets for meft at ``neurons``; each PASS, FAIL or SKIP with numbers."""
    out: list[dict[str, Any]] = []
    meft = _find(results, f"meft:{neurons}")
    lora = _find(results, "lora:qv:16")
    dense = _find(results, f"dense:{neurons}")
    offload = _find(results, f"offload:{neurons}")

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"target": name, "passed": ok, "detail": detail})

    if meft and lora:
        ratio = meft["step_time_s"] / lora["step_time_s"]
        add("meft step time <= 1.25x LoRA r=16", ratio <= 1.25, f"{ratio:.2f}x "
            f"({meft['step_time_s']:.2f} s vs {lora['step_time_s']:.2f} s)")
    else:
        add("meft step time <= 1.25x LoRA r=16", None, "needs meft and lora:qv:16")
    if meft and dense:
        speed = dense["step_time_s"] / meft["step_time_s"]
        add("meft >= 3x faster than dense, same N", speed >= 3, f"{speed:.2f}x")
    else:
        add("meft >= 3x faster than dense, same N", None, f"needs dense:{neurons}")
    if meft and offload:
        frac = meft["moved_bytes_per_step"] / offload["moved_bytes_per_step"]
        add("meft bytes moved <= 0.3x dense offload", frac <= 0.3, f"{frac:.3f}x "
            f"({meft['moved_bytes_per_step'] / 1e6:.0f} MB vs "
            f"{offload['moved_bytes_per_step'] / 1e6:.0f} MB)")
    else:
        add("meft bytes moved <= 0.3x dense offload", None, f"needs offload:{neurons}")
    if meft and dense and meft["exact_match"] is not None and dense["exact_match"] is not None:
        gap = 100 * (meft["exact_match"] - dense["exact_match"])
        add("meft EM >= dense EM - 3 points", gap >= -3, f"{gap:+.1f} points")
    else:
        add("meft EM >= dense EM - 3 points", None, "needs evaluated meft and dense runs")
    loras = [r for r in results if r["kind"] == "lora" and r["exact_match"] is not None]
    if meft and loras and meft["exact_match"] is not None:
        near = min(loras, key=lambda r: abs(r["device_bytes"] - meft["device_bytes"]))
        gap = 100 * (meft["exact_match"] - near["exact_match"])
        add("meft EM >= LoRA (nearest device bytes) + 10 points", gap >= 10,
            f"{gap:+.1f} points vs {near['method']} ({near['device_bytes'] / 1e6:.0f} MB "
            f"vs {meft['device_bytes'] / 1e6:.0f} MB)")
    else:
        add("meft EM >= LoRA (nearest device bytes) + 10 points", None, "needs evaluated runs")
    return out


def worker(argv: Sequence[str] | None = None) -> int:
    """One method in a fresh process (so its peak RSS is its own): ``python -m meft.bench``."""
    import argparse

    from meft.loading import ModelSource, load_model, load_tokenizer
    from meft.recipes import encode_all
    from meft.synthetic import make_knowledge_set

    ap = argparse.ArgumentParser(prog="python -m meft.bench")
    ap.add_argument("--method", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--config", required=True, help="BenchConfig as JSON")
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    cfg = BenchConfig(**json.loads(args.config))
    source = ModelSource(args.model_dir, None, args.model_dir)
    tokenizer = load_tokenizer(source)
    base = load_model(source)
    ks = make_knowledge_set(args.people, seed=cfg.seed)
    train = encode_all(ks.train, tokenizer, 256, "training")
    reset_peak_rss()
    result = run_method(parse_method(args.method), base, tokenizer, train, ks.eval, cfg,
                        torch.device(args.device), progress=args.progress, copy_base=False)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(worker())
