"""Adapter configuration: what a MEFT adapter is, validated, serialised as adapter_config.json.

``MeftConfig`` carries everything needed to rebuild an adapter's shapes and semantics next to
its weights (as PEFT's ``adapter_config.json`` does): neurons per layer N, neurons per token K,
experts E (``None`` = auto: the divisor of N nearest 4*sqrt(N)), experts probed P, the gate,
which decoder layers get an adapter, the initialisation, the storage dtype of the host tables,
and the adapter's optimiser settings (learning rate, weight decay). The fields ``base_model``,
``hidden_size`` and ``num_layers`` are filled when the adapter is attached, so a saved adapter
can refuse a base model it does not fit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from meft._version import __version__
from meft.routing import GATES, check_routing_sizes, default_experts

CONFIG_NAME = "adapter_config.json"
STORAGE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
ROUTER_INITS = ("normal", "key_mean")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the value."""


@dataclass
class MeftConfig:
    """Shape and semantics of a MEFT adapter (one per chosen decoder layer)."""

    neurons: int = 4096
    top_k: int = 64
    experts: int | None = None
    n_probe: int = 8
    gate: str = "product"
    layers: list[int] | None = None  # None: every decoder layer
    router_init: str = "normal"
    init_std: float = 0.02
    lr: float = 1e-4
    weight_decay: float = 0.0
    storage_dtype: str = "float32"
    seed: int = 0
    base_model: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    meft_version: str = field(default="")

    def __post_init__(self) -> None:
        for name in ("neurons", "top_k", "n_probe"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.experts is None:
            self.experts = default_experts(self.neurons)
        elif isinstance(self.experts, bool) or not isinstance(self.experts, int):
            raise ConfigError(f"experts must be a positive integer or null, got {self.experts!r}")
        try:
            check_routing_sizes(self.neurons, self.experts, top_k=self.top_k,
                                n_probe=self.n_probe, gate=self.gate)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.gate not in GATES:  # pragma: no cover - check_routing_sizes covers it
            raise ConfigError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not self.layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ConfigError(f"layers must be null or a non-empty list of integers, "
                                  f"got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers has duplicates: {self.layers}")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"router_init must be one of {ROUTER_INITS}, "
                              f"got {self.router_init!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ConfigError(f"init_std must be positive, got {self.init_std!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, "
                              f"got {self.storage_dtype!r}")
        if not self.meft_version:
            self.meft_version = __version__

    @property
    def n_experts(self) -> int:
        assert self.experts is not None
        return self.experts

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage_dtype]

    def host_bytes_per_layer(self, hidden_size: int) -> int:
        """Keys + values + two AdamW moments, in the storage dtype."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return 4 * self.neurons * hidden_size * item

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> MeftConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MeftConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (not a meft adapter directory?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))
