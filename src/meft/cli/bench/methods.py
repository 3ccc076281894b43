"""The methods ``meft bench`` compares, each built as a :class:`~meft.training.trainer.Trainable`.

    lora:qv:R / lora:all:R   peft LoRA of rank R (alpha 2R, no dropout) on the q,v projections
                             / on all linear layers
    dense:N                  the parallel adapter with every neuron active, on the device
    offload:N                the same, stored on the host, moved whole each step, dense
                             AdamW on the host (DeepSpeed-style offload)
    meft:N                   meft with the adapter flags given (E, P, K, gate ...)
    meft:N:bf16:8bit         the same with compact host state, overriding --host-dtype and
                             --optim-state for this method: bf16 tables, 8bit, rowwise or
                             factored moments (:mod:`meft.engine.optim`), so one comparison holds
                             all stores
    meft-noexperts:N         meft with a single expert: every key scored (no Key-Experts)
    METHOD+retain            any method with forgetting protection
                             (:mod:`meft.training.protection`), set by the --retain-* flags,
                             against --background (default: the base model's own answers to
                             the shipped prompts): replay, the same examples, order, targets
                             and weight for every method; meft also keeps rows written
                             before and may use the novelty gate. Settings may follow,
                             overriding the flags for this method: ``+retain:rep4:repw0.5:
                             answers:whole`` (examples replayed per step, their loss weight,
                             replay towards the kept distributions or the answers:
                             distill|answers, drawn from the general questions or the whole
                             background), so one comparison can sweep them
    full                     full fine-tuning: every base weight trained (the upper anchor for
                             learning and for forgetting)

All of them then train through the one :class:`~meft.training.trainer.Trainer`, so they share
the loss, schedule, clipping, weight decay and data order; only the trainable part differs.
Each method kind has its own default learning rate (LoRA's from :data:`meft.config.LORA_LR`,
by rank, as the tuned comparison found them; full fine-tuning's :data:`meft.config.FULL_LR`;
the others ``meft train``'s), overridden for all by ``--lr``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meft.adapter.baselines import DenseOffloadAdapter, DenseParallelAdapter, attach_dense
from meft.adapter.model import get_meft_model
from meft.config import (
    FULL_LR,
    LORA_HIGH_RANK,
    LORA_LR,
    LORA_LR_HIGH_RANK,
    BenchJob,
    MeftConfig,
    TrainConfig,
    parse_floats,
)
from meft.errors import ConfigError
from meft.training.protection import sparse_only
from meft.training.trainer import StepTraffic, Trainable

KINDS = ("lora", "dense", "offload", "meft", "meft-noexperts", "full")
DEFAULT_METHODS = ["lora:qv:8", "lora:qv:16", "lora:all:16", "dense:1024", "dense:16384",
                   "offload:16384", "meft:1024", "meft:4096", "meft:16384", "meft:65536",
                   "meft-noexperts:16384", "full"]
QUICK_METHODS = ["lora:qv:16", "dense:1024", "offload:1024", "meft:1024", "meft:4096"]


@dataclass(frozen=True)
class Method:
    kind: str
    neurons: int = 0
    rank: int = 0
    targets: str = ""
    retain: bool = False
    retain_settings: tuple[str, ...] = ()  # as written after +retain, e.g. ("kl", "256")
    state: tuple[str, ...] = ()  # compact host state after meft:N, e.g. ("bf16", "8bit")

    @property
    def name(self) -> str:
        protection = ":".join(("+retain", *self.retain_settings)) if self.retain else ""
        if self.kind == "lora":
            return f"lora:{self.targets}:{self.rank}{protection}"
        if self.kind == "full":
            return f"full{protection}"
        state = "".join(f":{token}" for token in self.state)
        return f"{self.kind}:{self.neurons}{state}{protection}"

    @property
    def sparse(self) -> bool:
        """Whether the method has meft's sparse tables (protection beyond replay needs them)."""
        return self.kind.startswith("meft")

    @property
    def base_name(self) -> str:
        """The method without its protection: ``lora:all:16+retain`` -> ``lora:all:16``."""
        return dataclasses.replace(self, retain=False, retain_settings=()).name

    def state_overrides(self) -> dict[str, Any]:
        """The MeftConfig fields this method's state tokens (``:bf16``, ``:8bit`` ...) set."""
        return dict(STATE_SETTINGS[token] for token in self.state)

    def retain_overrides(self) -> dict[str, Any]:
        """The TrainConfig fields this method's ``+retain:...`` settings set."""
        out: dict[str, Any] = {}
        for token in self.retain_settings:
            setting = _retain_setting(token)
            if setting is None:  # parse_method refuses these; a hand-built Method may not
                raise ValueError(f"unknown protection setting {token!r}")
            out[setting[0]] = setting[1]
        return out

    @property
    def default_lr(self) -> float:
        if self.kind == "lora":
            return LORA_LR if self.rank < LORA_HIGH_RANK else LORA_LR_HIGH_RANK
        return FULL_LR if self.kind == "full" else TrainConfig.lr


RETAIN_WORDS: dict[str, tuple[str, Any]] = {
    "distill": ("retain_replay_target", "distill"),
    "answers": ("retain_replay_target", "answers"),
    "questions": ("retain_replay_pool", "questions"), "whole": ("retain_replay_pool", "whole")}

STATE_SETTINGS = {"bf16": ("host_dtype", "bfloat16"), "8bit": ("optim_state", "8bit"),
                  "rowwise": ("optim_state", "rowwise"), "factored": ("optim_state", "factored")}


def _retain_setting(token: str) -> tuple[str, Any] | None:
    """One ``+retain:`` setting as (TrainConfig field, value); None if it is not one."""
    if token in RETAIN_WORDS:
        return RETAIN_WORDS[token]
    for prefix, field, ok, kind in (
            ("repw", "retain_replay_weight", lambda v: v > 0, float),
            ("rep", "retain_replay", lambda v: v >= 0 and v == int(v), int)):
        if token.startswith(prefix):
            try:
                value = float(token[len(prefix):])
            except ValueError:
                return None
            return (field, kind(value)) if ok(value) else None
    return None


def parse_method(text: str) -> Method:
    base, plus, settings = text.partition("+retain")
    if plus and (not settings or settings.startswith(":")):
        method = parse_method(base)
        tokens = tuple(settings.split(":")[1:])
        bad = [t for t in tokens if _retain_setting(t) is None]
        if bad:
            raise ConfigError(f"method {text!r}: unknown protection setting {bad[0]!r} "
                              f"(expected repR to replay R background examples per step, "
                              f"repwW to weigh their loss W, distill or answers for what "
                              f"they are trained towards, questions or whole for what they "
                              f"are drawn from)")
        return dataclasses.replace(method, retain=True, retain_settings=tokens)
    parts = text.split(":")
    if text == "full":
        return Method("full")
    try:
        if parts[0] == "lora" and len(parts) == 3 and parts[1] in ("qv", "all"):
            method = Method("lora", rank=int(parts[2]), targets=parts[1])
            if method.rank > 0:
                return method
        if parts[0] in KINDS[1:5] and len(parts) == 2 and int(parts[1]) > 0:
            return Method(parts[0], neurons=int(parts[1]))
        state = tuple(parts[2:])
        if (parts[0] == "meft" and len(parts) > 2 and int(parts[1]) > 0
                and all(t in STATE_SETTINGS for t in state)
                and len({STATE_SETTINGS[t][0] for t in state}) == len(state)):
            return Method("meft", neurons=int(parts[1]), state=state)
    except ValueError:
        pass
    raise ConfigError(f"method {text!r}: expected lora:qv:R, lora:all:R, dense:N, offload:N, "
                      "meft:N, meft:N:bf16:8bit (bf16, 8bit, rowwise or factored, each at "
                      "most once), meft-noexperts:N, any of them +retain (R, N positive integers) "
                      "or full")


def parse_entry(text: str) -> tuple[Method, list[float] | None]:
    """A ``--methods`` entry: ``meft:16384`` (the rates of --lr-grid, --lr or the method's own
    default) or ``meft:16384@1e-3,3e-3`` (this method's own rates to choose from)."""
    name, at, rates = text.partition("@")
    method = parse_method(name)
    if not at:
        return method, None
    try:
        values = parse_floats(rates)
    except ConfigError:
        values = []
    if not values or not all(0 < v < math.inf for v in values):
        raise ConfigError(f"method {text!r}: expected positive rates after @, like "
                          f"{name}@1e-3,3e-3")
    return method, values


def check_method(method: Method, job: BenchJob) -> None:
    """Refuse, before any work, a meft method whose adapter flags do not fit its N, and
    protection a method without meft's tables cannot have (``--retain-gate`` ... given
    for every method)."""
    if method.sparse:
        meft_config(method, job)
    elif method.retain:
        tconfig = dataclasses.replace(job.train_config(method.default_lr), retain="on",
                                      **method.retain_overrides())
        flags = sparse_only(tconfig)
        if flags:
            raise ConfigError(f"{method.name}: {flags[0]} is protection only meft's sparse "
                              f"tables have; {method.base_name} takes replay (--retain-replay"
                              f"*) only: drop {flags[0]} or run it in a comparison of meft "
                              f"methods")


def meft_config(method: Method, job: BenchJob) -> MeftConfig:
    if method.kind == "meft-noexperts":
        return job.adapter_config(method.neurons, experts=1, n_probe=1, gate="none")
    return job.adapter_config(method.neurons, **method.state_overrides())


def build(method: Method, model: nn.Module, job: BenchJob, device: torch.device
          ) -> Trainable:
    """Attach ``method`` to ``model`` (trained in place) and say what trains."""
    layers = job.adapter.get("layers")
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        model.to(device)
        return Trainable(model, params=dict(model.named_parameters()))
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(
            r=method.rank, lora_alpha=2 * method.rank, lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"] if method.targets == "qv" else "all-linear",
            layers_to_transform=layers))
        peft_model.to(device)
        return Trainable(peft_model, params={n: p for n, p in peft_model.named_parameters()
                                             if p.requires_grad})
    if method.kind in ("dense", "offload"):
        adapters, _ = attach_dense(model, method.neurons, offload=method.kind == "offload",
                                   seed=job.seed, layers=layers, device=device)
        model.to(device)
        if method.kind == "dense":
            dense = [a for a in adapters if isinstance(a, DenseParallelAdapter)]
            return Trainable(model, params={f"{j}.{name}": p for j, a in enumerate(dense)
                                            for name, p in a.named_parameters()})
        offload = [a for a in adapters if isinstance(a, DenseOffloadAdapter)]

        def traffic() -> StepTraffic:
            tables = [a.tables for a in offload]
            per_layer = 2 * tables[0].keys.numel() * tables[0].keys.element_size()
            out = StepTraffic(bytes_h2d=sum(t.bytes_h2d for t in tables),
                              bytes_d2h=sum(t.bytes_d2h for t in tables),
                              staged_bytes=per_layer * (len(tables) + 1))
            for t in tables:
                t.bytes_h2d = t.bytes_d2h = 0
            return out

        return Trainable(model, offload={f"{j}.{name}": p for j, a in enumerate(offload)
                                         for name, p in (("keys", a.tables.keys),
                                                         ("values", a.tables.values))},
                         traffic=traffic)
    meft = get_meft_model(model, meft_config(method, job), device=device)
    meft.to(device)
    return Trainable.of_meft(meft)
