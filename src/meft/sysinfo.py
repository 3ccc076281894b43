"""The machine: what it is (for result files), its memory, and the compute device.

Everything meft reads from ``/proc`` is read here: the CPU model and total memory for
:func:`environment` (which every result file and run.json embeds, so a number can be traced
to the hardware, thread count, torch version and commit that produced it), ``MemAvailable``
for the host-memory check before tables are allocated, and ``VmHWM`` (peak resident set) for
the benchmarks, which reset it per method through ``/proc/self/clear_refs``. Off Linux the
readers return None.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from meft.errors import ConfigError


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
