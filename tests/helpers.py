"""Shared test helpers: random adapter inputs and tie-aware comparison against the reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Case:
    tokens: int
    dim: int
    neurons: int
    experts: int
    top_k: int
    n_probe: int


def make_inputs(case: Case, dtype: torch.dtype, seed: int, *, value_std: float = 1.0,
                lead: tuple[int, ...] = ()) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (*lead, T, d), keys, values (N, d), router (E, d), dy like x; fresh from ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    x = rnd(*lead, case.tokens, case.dim)
    keys = rnd(case.neurons, case.dim)
    values = rnd(case.neurons, case.dim, std=value_std)
    router = rnd(case.experts, case.dim)
    dy = rnd(*lead, case.tokens, case.dim)
    return x, keys, values, router, dy


def ambiguous_tokens(x: Tensor, keys: Tensor, router: Tensor, *, top_k: int, n_probe: int,
                     gate: str, rel_tol: float) -> Tensor:
    """(T,) bool: tokens whose probe or top-K choice is within rel_tol of a tie.

    Computed in float64 from the given (already rounded) values. Where a token's choice is that
    close to a tie, two correct implementations may round their way to different choices.
    """
    x2 = x.reshape(-1, x.shape[-1]).double()
    keys, router = keys.double(), router.double()
    n, e = keys.shape[0], router.shape[0]
    b = n // e
    g = x2 @ router.T  # (T, E)
    a = x2 @ keys.T  # (T, N)
    expert_of = torch.arange(n) // b
    s = g[:, expert_of] * a if gate == "product" else a
    scale_s = s.abs().amax(1).clamp_min(1e-12)

    def near_tie(upper: Tensor, lower: Tensor) -> Tensor:
        return (upper - lower) <= rel_tol * torch.maximum(upper.abs(), lower.abs())

    bad = torch.zeros(x2.shape[0], dtype=torch.bool)
    gs = g.sort(dim=1, descending=True).values
    if n_probe < e:
        bad |= near_tie(gs[:, n_probe - 1], gs[:, n_probe])
    probe = g.topk(n_probe, dim=1).indices
    probed = torch.zeros_like(g, dtype=torch.bool).scatter_(1, probe, True)[:, expert_of]
    cand = s.masked_fill(~probed, float("-inf")).sort(dim=1, descending=True).values
    if top_k < n_probe * b:
        bad |= near_tie(cand[:, top_k - 1], cand[:, top_k])
    # a selected score within summation-order noise of 0 may flip ReLU's gradient mask
    bad |= (cand[:, :top_k].abs() < 1e-4 * scale_s.unsqueeze(1)).any(1)
    return bad


def grads_of(fn, x: Tensor, keys: Tensor, values: Tensor, router: Tensor, dy: Tensor,
             **kw: object) -> list[Tensor]:
    """[y, dx, dkeys, dvalues, drouter] with dense (materialised) gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, keys, values, router)]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True)
    return [y.detach(), *[g.to_dense() if g.is_sparse else g for g in grads]]
