"""The machine: what it is (for result files), its memory, and the compute device.

Everything meft reads from ``/proc`` is read here: the CPU model and total memory for
:func:`environment` (which every result file and run.json embeds, so a number can be traced
to the hardware, thread count, torch version and commit that produced it), ``MemAvailable``
for the host-memory check before tables are allocated, and ``VmHWM`` (peak resident set) for
the benchmarks, which reset it per method through ``/proc/self/clear_refs``. Off Linux the
readers return None.

Half-precision matmuls on the host: many CPUs have no native bf16 or fp16 arithmetic (AMD
before Zen 4, Intel before Cooper Lake / Sapphire Rapids), and there torch's half matmul is
emulated, 60x slower than fp32 on a 2-core Zen 2-era EPYC ((128x576)@(576x1024): 139 ms
against 2.3 ms). :func:`half_matmul_native` decides once per process and dtype, from
``MEFT_HALF_MATMUL`` (``native`` or ``fp32``) if set, else a micro-benchmark (a (64x576)@(576x512)
product in each dtype, best of 3 after a warm-up: native when the half one takes at most twice
the fp32 one's time; well under a second even where it is slow). Routing uses it
(:func:`meft.engine.routing.routing_dtype`), and ``meft plan`` says which path the machine takes.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from meft.errors import ConfigError

_HALF_NATIVE: dict[torch.dtype, bool] = {}  # the decision per dtype, once per process


def half_matmul_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16, fp16) matrices at native speed (module
    doc); decided once per process."""
    if dtype not in _HALF_NATIVE:
        forced = os.environ.get("MEFT_HALF_MATMUL", "").strip().lower()
        if forced in ("native", "fp32"):
            _HALF_NATIVE[dtype] = forced == "native"
        elif forced:
            raise ConfigError(f"MEFT_HALF_MATMUL={forced!r}: use native or fp32 (or unset it "
                              "to measure)")
        else:
            _HALF_NATIVE[dtype] = _half_time(dtype) <= 2.0 * _half_time(torch.float32)
    return _HALF_NATIVE[dtype]


def _half_time(dtype: torch.dtype) -> float:
    """Best of 3 seconds for a (64x576)@(576x512) product in ``dtype``, after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 576, generator=gen).to(dtype)
    b = torch.randn(576, 512, generator=gen).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def _proc_field(path: str, prefix: str) -> str | None:
    """The value after ``prefix:`` on the first matching line of a /proc file."""
    try:
        with open(path) as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(prefix)),
                        None)
    except OSError:
        return None


def _kib(value: str | None) -> int | None:
    return int(value.split()[0]) * 1024 if value else None


def available_host_bytes() -> int | None:
    """MemAvailable (Linux), or None where unknown."""
    return _kib(_proc_field("/proc/meminfo", "MemAvailable"))


def total_host_bytes() -> int | None:
    """MemTotal (Linux), or None where unknown."""
    return _kib(_proc_field("/proc/meminfo", "MemTotal"))


def peak_rss_bytes() -> int | None:
    """Peak resident set of this process since start or :func:`reset_peak_rss`."""
    return _kib(_proc_field("/proc/self/status", "VmHWM"))


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU, threads, memory, torch, python, commit, date (and device): for result files."""
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "mem_total_bytes": _kib(_proc_field("/proc/meminfo", "MemTotal")),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuda": cuda,
        "device": None if device is None else str(device),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def pick_device(device: str | None) -> torch.device:
    """``None``: cuda if available, else cpu; otherwise the named device, checked."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device}: CUDA is not available on this machine")
    return dev
