"""``meft plan``: what a meft run needs and how long a step takes, before running it.

Only shapes are needed: the model is built on the meta device from its config (a hub id, a
local directory, a config.json or a GGUF; no weights are read). Notation: L adapter layers of
a model with L_m decoder layers, hidden size d, N neurons, K per token, E experts, P probed,
T tokens per micro-batch, U rows per layer per micro-batch (the union of the T*K choices).

    device   base weights      n_base * bytes(--dtype)
             activations       T * d * L_m * A * bytes, A = 34 (a decoder block's saved
                               activations without recomputation, in units of T*d: an
                               assumption, shown)
             routers           E * d * L * 16 (fp32 weight, gradient, two AdamW moments)
             staged rows       L * 2 * U * d * 4 + 2 * U * d * 4 (every layer's key and value
                               rows, and one layer's row gradients at a time)
    host     tables + moments  L * MeftConfig.host_bytes_per_layer(d) (exact: what the
                               optimizer allocates), + pinned staging L * 2 * U * d * 4;
                               with --store disk they are on disk and RAM holds the pages
                               one step touches (meft.engine.disk unmaps them after each step):
                               the key blocks of the experts routing probes, L * E_p * B * d
                               * bytes, E_p = E * (1 - (1 - P/E)^T) distinct experts under
                               uniform routing (skewed routing probes fewer), and the U rows
                               of the values and of every per-row state array
    moved    host -> device    L * (2 * U * d * 4 + index bytes)            per micro-batch
             device -> host    L * (T * d * 4 + T * P * (8 + s) + 2 * U * d * 4)  (hidden
                               states, probe ids and scores, row gradients: TransferStats'
                               terms; s = 2 with bf16 tables, which probe in bf16, else 4)
    time     compute           6 * n_base * T / (tflops * mfu)   (forward + backward)
             host              routing T * P * (N/E) * d * 2 flops / host flops, plus
                               gathering and updating U rows (bytes / host GB/s)
             transfer          moved bytes / link GB/s
             step              their sum: an upper bound (on CUDA the host worker overlaps
                               the gradient rows' accumulation and the optimizer update with
                               the device's compute; the plan does not count that yet)

U is not knowable from shapes: routing is skewed. Unless ``--union`` gives it, U =
min(N, 0.044 * T * K), the ratio measured with the embedded model at N=16384 on the built-in
facts (benchmarks/results/tuned-comparison-synthetic, meft:16384: U 1,551 at T ~549, K 64).
Hardware comes from a named profile (:data:`PROFILES`, stated numbers, not measurements) with
any field overridden by a flag; host rates from ``meft plan --calibrate`` on this machine
(cached) or conservative defaults.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meft.config import MeftConfig
from meft.engine.routing import routing_dtype
from meft.errors import ConfigError, ModelLoadError

ACTIVATION_FACTOR = 34
UNION_RATIO = 0.044
PROFILES: dict[str, dict[str, float]] = {  # vendor datasheet numbers (dense bf16 TFLOPS)
    "a10-24g": {"gpu_memory": 24e9, "gpu_tflops": 125.0, "pcie_gbps": 25.0},
    "l4-24g": {"gpu_memory": 24e9, "gpu_tflops": 121.0, "pcie_gbps": 25.0},
    "rtx4090-24g": {"gpu_memory": 24e9, "gpu_tflops": 165.0, "pcie_gbps": 25.0},
    "a100-40g": {"gpu_memory": 40e9, "gpu_tflops": 312.0, "pcie_gbps": 25.0},
    "a100-80g": {"gpu_memory": 80e9, "gpu_tflops": 312.0, "pcie_gbps": 25.0},
    "h100-80g": {"gpu_memory": 80e9, "gpu_tflops": 989.0, "pcie_gbps": 50.0},  # SXM, PCIe 5
}
DEFAULT_HOST = {"host_gflops": 200.0, "host_gbps": 10.0}  # a workstation CPU, conservative
MFU = 0.4  # fraction of peak a small-batch fine-tuning step reaches (assumption)


SIZE_HELP = ("a bare number counts GB (24 = 24G = 24GB = 24e9 bytes); K, M, G, T with or "
             "without B are powers of 1000, KiB, MiB, GiB, TiB powers of 1024")


def parse_bytes(text: str, *, flag: str = "size") -> float:
    """``24``, ``24G``, ``24GB``, ``128 GiB``, ``512MB`` -> bytes (:data:`SIZE_HELP`: a bare
    number is GB, as GPU and RAM sizes are spoken of)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?(?:I?B)?)\s*", text.upper())
    units = {"": 1e9, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
             "T": 1e12, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    try:
        assert m is not None
        value = float(m.group(1)) * units[m.group(2)]
        assert value > 0
        return value
    except (AssertionError, KeyError, ValueError):
        raise ConfigError(f"{flag}: expected a size like 24, 24GB or 128GiB ({SIZE_HELP}), "
                          f"got {text!r}") from None


def host_reserve(host_memory: float) -> float:
    """Host memory a plan leaves to the OS and everything else: 10%, at least 2 GB."""
    return max(2e9, 0.1 * host_memory)


@dataclass
class Shape:
    """What the plan needs of a model."""

    name: str
    n_params: int
    hidden_size: int
    num_layers: int


def model_shape(spec: str | None, *, trust_remote_code: bool = False) -> Shape:
    """The parameter count and sizes of a model, built on the meta device from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from meft.adapter.loading import from_hub_or_local, resolve_model

    try:
        if spec is not None and spec.endswith(".json"):
            data = json.loads(Path(spec).read_text())
            config = AutoConfig.for_model(data.pop("model_type"), **data)
            name = spec
        else:
            source = resolve_model(spec)
            kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if source.gguf:
                kwargs["gguf_file"] = source.gguf
            config = from_hub_or_local(source, AutoConfig.from_pretrained, **kwargs)
            name = source.name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"model {spec!r}: {str(err).splitlines()[0]}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Shape(name, sum(p.numel() for p in model.parameters()), text.hidden_size,
                 text.num_hidden_layers)


def union_rows(config: MeftConfig, tokens: int, union: int | None = None) -> int:
    """U: given, or the measured ratio (module doc), at most N."""
    if union is not None:
        return min(union, config.neurons)
    return min(config.neurons, round(UNION_RATIO * tokens * config.top_k))


def traffic(config: MeftConfig, d: int, layers: int, tokens: int, union: int) -> dict[str, int]:
    """Bytes each way per micro-batch, as :class:`~meft.engine.store.TransferStats` counts them."""
    rows = 2 * union * d * 4
    h2d = layers * (rows + (union + tokens * config.top_k) * 8)
    score = config.dtype.itemsize  # probes scored in its dtype
    d2h = layers * (tokens * d * 4 + tokens * config.n_probe * (8 + score) + rows)
    return {"h2d": h2d, "d2h": d2h}


def probed_experts(config: MeftConfig, tokens: int) -> float:
    """E_p: the distinct experts T tokens probe, P each, under uniform routing (module doc)."""
    e = config.n_experts
    return e * (1 - (1 - config.n_probe / e) ** tokens)


def plan(config: MeftConfig, shape: Shape, *, tokens: int, hardware: dict[str, float],
         host_rates: dict[str, Any], dtype_bytes: int = 2, union: int | None = None,
         store: str = "ram") -> dict[str, Any]:
    """Every number ``meft plan`` prints (module doc), in bytes and seconds."""
    d = shape.hidden_size
    layers = len(config.layers) if config.layers else shape.num_layers
    u = union_rows(config, tokens, union)
    moved = traffic(config, d, layers, tokens, u)
    staged = layers * 2 * u * d * 4 + 2 * u * d * 4
    device = {"base_weights": shape.n_params * dtype_bytes,
              "activations": tokens * d * shape.num_layers * ACTIVATION_FACTOR * dtype_bytes,
              "routers": config.n_experts * d * layers * 16,
              "staged_rows": staged}
    state = layers * config.host_bytes_per_layer(d)
    if store == "ram":
        host = {"tables_and_moments": state, "staging_buffers": layers * 2 * u * d * 4}
    else:  # on disk: RAM holds the pages one step touches (module doc) and staging
        keys = layers * config.neurons * d * config.dtype.itemsize
        host = {"probed_keys": round(keys * probed_experts(config, tokens) / config.n_experts),
                "touched_rows": (state - keys) * u // config.neurons,
                "staging_buffers": layers * 2 * u * d * 4}
    b = config.neurons // config.n_experts
    compute = 6 * shape.n_params * tokens / (hardware["gpu_tflops"] * 1e12 * MFU)
    routing = tokens * config.n_probe * b * d * 2 * layers / (host_rates["host_gflops"] * 1e9)
    rows_work = layers * u * 2 * d * (4 * 2 + 4 * 4) / (host_rates["host_gbps"] * 1e9)
    transfer = (moved["h2d"] + moved["d2h"]) / (hardware["pcie_gbps"] * 1e9)
    reserve = host_reserve(hardware["host_memory"])
    return {
        "model": shape.name, "base_parameters": shape.n_params, "hidden_size": d,
        "adapter_layers": layers, "neurons": config.neurons, "top_k": config.top_k,
        "experts": config.n_experts, "probe": config.n_probe,
        "adapter_parameters": 2 * config.neurons * d * layers,
        "host_dtype": config.host_dtype, "optim_state": config.optim_state,
        "routing_dtype": str(routing_dtype(config.dtype)).removeprefix("torch."),
        "tokens": tokens, "union": u, "union_assumed": union is None,
        "device_bytes": device, "device_total": sum(device.values()),
        "host_bytes": host, "host_total": sum(host.values()),
        "store": store, "disk_bytes": 0 if store == "ram" else state,
        "moved_bytes": moved,
        "seconds": {"compute": compute, "host": routing + rows_work, "transfer": transfer,
                    "step": compute + routing + rows_work + transfer},
        "hardware": hardware, "host_rates": host_rates,
        "host_reserve": reserve,
        "fits": {"device": sum(device.values()) <= hardware["gpu_memory"],
                 "host": sum(host.values()) <= hardware["host_memory"] - reserve},
    }


def fit_neurons(config: MeftConfig, shape: Shape, *, step: int = 1024, **kw: Any) -> int:
    """The largest N (a multiple of ``step``) whose plan fits device and host; 0 if none."""
    def fits(n: int) -> bool:
        c = MeftConfig(**{**config.to_dict(), "neurons": n, "experts": None})
        return all(plan(c, shape, **kw)["fits"].values())

    lo, hi = 0, step
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 26:
            break
    while hi - lo > step:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def calibrate(path: Path, *, d: int = 576, rows: int = 8192) -> dict[str, Any]:
    """Measure this machine's host rates (matmul GFLOPS as routing uses it, row-touching
    GB/s as gathering and the row-sparse optimizer use it) and cache them as JSON."""
    from meft.engine.optim import RowSparseAdamW
    from meft.engine.store import HostTable, RowSparseGrad

    x, k = torch.randn(512, d), torch.randn(d, 256)
    torch.mm(x, k)
    start, reps = time.perf_counter(), 200
    for _ in range(reps):
        torch.mm(x, k)
    gflops = 2 * 512 * d * 256 * reps / (time.perf_counter() - start) / 1e9
    n = 8 * rows
    table = HostTable("t", torch.randn(n, d), RowSparseGrad(n, d))
    opt = RowSparseAdamW([table], lr=1e-3)
    ids = torch.randperm(n)[:rows]
    start = time.perf_counter()
    for _ in range(5):
        table.grad.add(ids, torch.randn(rows, d))
        table.data.index_select(0, ids)
        opt.step()
        opt.zero_grad()
    seconds = (time.perf_counter() - start) / 5
    rates = {"host_gflops": round(gflops, 1),
             "host_gbps": round(rows * d * (4 * 2 + 4 * 4) / seconds / 1e9, 2),
             "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
             "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rates, indent=2) + "\n")
    return rates


def describe(p: dict[str, Any]) -> str:
    """The plan as text."""
    gb = 1e9
    hw, hr = p["hardware"], p["host_rates"]
    lines = [
        f"{p['model']}: {p['base_parameters'] / 1e6:.0f}M parameters, d={p['hidden_size']}; "
        f"adapter N={p['neurons']} K={p['top_k']} E={p['experts']} P={p['probe']} on "
        f"{p['adapter_layers']} layers: {p['adapter_parameters'] / 1e9:.2f}B parameters "
        f"({p['host_dtype']} tables, {p['optim_state']} moments)",
        *([f"routing {p['host_dtype']} tables route in {p['routing_dtype']} on this CPU "
           + ("(native half matmuls)" if p["routing_dtype"] == p["host_dtype"] else
              "(no native half matmul here: converted as gathered; MEFT_HALF_MATMUL=native "
              "forces half)")] if p["host_dtype"] in ("bf16", "bfloat16", "fp16", "float16")
          else []),
        f"per micro-batch of {p['tokens']} tokens: U = {p['union']} rows per layer"
        + (" (assumed: 0.044 T K, measured on the embedded model; --union to set)"
           if p["union_assumed"] else ""),
        f"device  {p['device_total'] / gb:7.2f} GB of {hw['gpu_memory'] / gb:.0f} GB  "
        + ", ".join(f"{k.replace('_', ' ')} {v / gb:.2f}" for k, v in p["device_bytes"].items())
        + ("" if p["fits"]["device"] else "   DOES NOT FIT"),
        f"host    {p['host_total'] / gb:7.2f} GB of {hw['host_memory'] / gb:.0f} GB "
        f"({p['host_reserve'] / gb:.0f} GB left to the rest)  "
        + ", ".join(f"{k.replace('_', ' ')} {v / gb:.2f}" for k, v in p["host_bytes"].items())
        + ("" if p["fits"]["host"] else "   DOES NOT FIT"),
        *([f"disk    {p['disk_bytes'] / gb:7.2f} GB  tables and moments (--store disk)"]
          if p["disk_bytes"] else []),
        f"moved   {p['moved_bytes']['h2d'] / 1e6:.0f} MB host->device, "
        f"{p['moved_bytes']['d2h'] / 1e6:.0f} MB device->host per micro-batch",
        f"step    {p['seconds']['step']:.3f} s = compute {p['seconds']['compute']:.3f} + host "
        f"{p['seconds']['host']:.3f} + transfer {p['seconds']['transfer']:.3f} (summed: an "
        "upper bound)",
        f"assumed {hw['gpu_tflops']:g} TFLOPS at {MFU:.0%} use, link {hw['pcie_gbps']:g} GB/s, "
        f"host {hr['host_gflops']:g} GFLOPS and {hr['host_gbps']:g} GB/s"
        + (" (calibrated)" if "measured" in hr else " (defaults; meft plan --calibrate)")
        + f", activations {ACTIVATION_FACTOR} T d per layer",
    ]
    return "\n".join(lines)
