"""The novelty gate (experimental, ``--retain-gate``): route only tokens that look like the
training data.

meft is exactly the base model on every token whose K rows are all unwritten, but after a
few steps every general-text token reaches written rows at every layer, so that exactness
protects nothing. The gate puts the exactness back where it can: per adapted layer a
direction w (d,) and a threshold b; a token whose adapter input x has x.w > b is routed, every
other one gets exactly zero adapter output, like padding (:mod:`meft.engine.offload`).

Fitting, once before training (values zero: the adapter adds nothing yet), from the adapter
inputs of the real tokens of two sets, the training examples and background examples:

    per class c in (train, bg), in float64:  n_c, mu_c, scatter_c = sum (x - mu_c)(x - mu_c)^T
    S = (scatter_train + scatter_bg) / (n_train + n_bg - 2)              pooled covariance (d, d)
    w = solve(S + shrink * mean(diag S) * I, mu_train - mu_bg)           shrunken LDA (d,)
    b = the (1 - share) quantile of the background tokens' x.w          (a second pass)

so ``share`` of the background tokens pass. A measurement on the base model found such a
direction separates ~43% of training tokens at 4-5% false positives on unseen general
questions, and a nearest-neighbour rule no more (benchmarks/results/novelty-routing); what it
does to forgetting and learning is not measured yet. The protection fits it first
(:meth:`meft.training.protection.Retainer.from_config`), before it measures anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meft.adapter.model import MeftModel
from meft.console import say
from meft.data.records import Encoded, collate
from meft.errors import ConfigError

MAX_PROJECTIONS = 16_000_000  # background projections per layer torch.quantile is given at most


def fit_novelty_gate(model: MeftModel, train: Sequence[Encoded], background: Sequence[Encoded],
                     share: float, *, shrink: float = 0.1, batch_size: int = 8,
                     pad_id: int = 0, surprise: float = 0.0) -> dict[str, Tensor]:
    """Per layer id, the gate (d+1,) fp32, w then b (module doc), fitted on the adapter inputs
    of ``train`` and ``background``'s real tokens; ``share`` of the background tokens pass.
    ``surprise`` > 0: the new side is only the training tokens whose next-token loss under
    the model exceeds ``surprise`` nats, the others join the background side (its share and
    threshold included)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    new, *rest = _moments(model, train, batch_size, pad_id, surprise)
    ordinary = rest[0] if rest else None  # with surprise: the unsurprising training tokens
    old = _moments(model, background, batch_size, pad_id)[0]
    gates = {}
    for layer in model.adapters:
        (n_t, sum_t, outer_t), (n_b, sum_b, outer_b) = new[layer], old[layer]
        if ordinary is not None:  # the unsurprising training tokens are background here
            n_o, sum_o, outer_o = ordinary[layer]
            n_b, sum_b, outer_b = n_b + n_o, sum_b + sum_o, outer_b + outer_o
        if n_t < 2:
            raise ConfigError(f"--retain-gate-surprise {surprise:g}: no training token is "
                              "that surprising to the model; lower it")
        mu_t, mu_b = sum_t / n_t, sum_b / n_b  # (d,) each
        scatter = (outer_t - n_t * torch.outer(mu_t, mu_t)) + (outer_b - n_b * torch.outer(
            mu_b, mu_b))  # (d, d)
        s = scatter / (n_t + n_b - 2)
        ridge = shrink * s.diagonal().mean() * torch.eye(s.shape[0], dtype=s.dtype)
        gates[layer] = torch.linalg.solve(s + ridge, mu_t - mu_b)  # (d,) float64
    projections = _projections(model, background, gates, batch_size, pad_id)
    if surprise:
        more = _projections(model, train, gates, batch_size, pad_id, surprise, False)
        projections = {k: torch.cat([v, more[k]]) for k, v in projections.items()}
    return {layer: torch.cat([w, torch.quantile(_subsample(projections[layer]), 1 - share,
                                                interpolation="linear").reshape(1)]).float()
            for layer, w in gates.items()}


def set_novelty_gate(model: MeftModel, train: Sequence[Encoded],
                     background: Sequence[Encoded], share: float, *, pad_id: int = 0,
                     surprise: float = 0.0, sticky: bool = False) -> None:
    """``--retain-gate share``: fit the gate on the training examples and ``background`` (the
    replay pool's short general questions, :meth:`meft.training.protection.Retainer.from_config`
    calls it before it measures anything, so the background statistics count only the tokens
    the gate routes), set it in ``model`` and say how many tokens of each pass. (The Retainer
    keeps it in its checkpoint tensors: a resumed run gets it back from there, not fitted
    again.)"""
    if model.parallel is not None:
        raise ConfigError("--retain-gate is for one process (not a distributed run)")
    if not background:
        raise ConfigError("--retain-gate is fitted on the background's short general "
                          "questions (the replay pool), and the background has none")
    model.set_novelty_gate(fit_novelty_gate(model, train, background, share, pad_id=pad_id,
                                            surprise=surprise), sticky=sticky)
    passed = {name: _passing(model, examples, pad_id)
              for name, examples in (("training", train), ("background", background))}
    say("novelty gate: " + ", ".join(f"{100 * p:.0f}% of {name} tokens"
                                      for name, p in passed.items())
        + " routed, over the layers (the others get no adapter output)")


def _moments(model: MeftModel, examples: Sequence[Encoded], batch_size: int, pad_id: int,
             surprise: float = 0.0) -> list[dict[str, tuple[int, Tensor, Tensor]]]:
    """Per layer: count, sum (d,) and sum of outer products (d, d) of the adapter inputs of
    ``examples``' real tokens, in float64; one pass. ``surprise`` > 0: two such sets, the
    tokens whose next-token loss is above ``surprise`` nats, then the others."""
    d = model.adapter_modules[0].store.dim
    parts = 2 if surprise else 1
    count = [dict.fromkeys(model.adapters, 0) for _ in range(parts)]
    total = [{layer: torch.zeros(d, dtype=torch.float64) for layer in model.adapters}
             for _ in range(parts)]
    outer = [{layer: torch.zeros(d, d, dtype=torch.float64) for layer in model.adapters}
             for _ in range(parts)]
    for layer, x, novel in _inputs(model, examples, batch_size, pad_id, surprise):
        for i, xs in enumerate([x] if novel is None else [x[novel], x[~novel]]):
            xs = xs.double()  # (T', d)
            count[i][layer] += xs.shape[0]
            total[i][layer] += xs.sum(0)
            outer[i][layer] += xs.T @ xs
    return [{layer: (count[i][layer], total[i][layer], outer[i][layer])
             for layer in model.adapters} for i in range(parts)]


def _projections(model: MeftModel, examples: Sequence[Encoded], gates: dict[str, Tensor],
                 batch_size: int, pad_id: int, surprise: float = 0.0,
                 surprising: bool | None = None) -> dict[str, Tensor]:
    """Per layer, x.w (T_all,) float64 of ``examples``' real tokens (``surprising``: as
    :func:`_moments`)."""
    out: dict[str, list[Tensor]] = {layer: [] for layer in gates}
    for layer, x, novel in _inputs(model, examples, batch_size, pad_id, surprise):
        if surprising is not None:
            assert novel is not None
            x = x[novel if surprising else ~novel]
        out[layer].append(x.double() @ gates[layer])
    return {layer: torch.cat(p) for layer, p in out.items()}


def _passing(model: MeftModel, examples: Sequence[Encoded], pad_id: int) -> float:
    """The share of (real token, layer) pairs of ``examples`` the model's gates route."""
    adapters = dict(zip(model.adapters, model.adapter_modules, strict=True))
    routed = total = 0
    for layer, x, _ in _inputs(model, examples, 8, pad_id):
        routed += int(adapters[layer].novel(x.to(model.device_)).sum())
        total += x.shape[0]
    return routed / max(1, total)


def _subsample(values: Tensor) -> Tensor:
    """``values`` (n,), or at most MAX_PROJECTIONS of them, evenly spaced (deterministic)."""
    if values.numel() <= MAX_PROJECTIONS:
        return values
    return values[torch.linspace(0, values.numel() - 1, MAX_PROJECTIONS).long()]


def _inputs(model: MeftModel, examples: Sequence[Encoded], batch_size: int, pad_id: int,
            surprise: float = 0.0) -> Iterator[tuple[str, Tensor, Tensor | None]]:
    """(layer id, the adapter inputs (T', d) of the real tokens, and with ``surprise`` > 0
    which of them (T',) bool the model finds surprising: -log p(token | the tokens before it)
    above ``surprise`` nats, a sequence's first token never) of every layer and batch of
    ``examples``, from the model as it is, in eval mode under no_grad."""
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(examples), batch_size):
            batch = collate(examples[lo:lo + batch_size], pad_id)
            real = batch["attention_mask"].bool().reshape(-1)  # (T,)
            seen: list[tuple[str, Tensor]] = []
            with torch.no_grad(), _captured(model, seen):
                out = model(input_ids=batch["input_ids"].to(model.device_),
                            attention_mask=batch["attention_mask"].to(model.device_))
            novel = None
            if surprise:
                ids = batch["input_ids"]  # (B, L)
                nll = torch.zeros(ids.shape, dtype=torch.float32)
                nll[:, 1:] = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2).cpu(),
                                             ids[:, 1:], reduction="none")
                novel = (nll > surprise).reshape(-1)[real]  # (T',)
            for layer, x in seen:
                yield layer, x.reshape(-1, x.shape[-1])[real.to(x.device)].cpu(), novel
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _captured(model: MeftModel, seen: list[tuple[str, Tensor]]) -> Iterator[None]:
    """Append (layer id, input (B, S, d)) of every adapter call inside to ``seen``."""

    def hook_of(layer: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append((layer, args[0].detach()))
        return hook

    handles = [a.register_forward_pre_hook(hook_of(layer)) for layer, a in model.adapters.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
