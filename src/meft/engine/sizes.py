"""The adapter's sizes and their rules, without torch: N neurons, E experts, K kept per token,
P probed per token, the gate (letters as in :mod:`meft.engine.routing`). The configs, the op
and the module all check them here, and the command line reads them without loading torch."""

from __future__ import annotations

GATES = ("product", "none")


def check_routing_sizes(n_neurons: int, n_experts: int, *, top_k: int, n_probe: int,
                        gate: str) -> None:
    """Validate N, E, K, P and the gate; shared by the op, the module and the configs."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if n_neurons < 1 or n_experts < 1:
        raise ValueError(f"need at least one neuron and one expert, got N={n_neurons}, "
                         f"E={n_experts}")
    if n_neurons % n_experts != 0:
        raise ValueError(f"experts E={n_experts} must divide neurons N={n_neurons}")
    if not 1 <= n_probe <= n_experts:
        raise ValueError(f"n_probe={n_probe} must be in [1, E={n_experts}]")
    candidates = n_probe * (n_neurons // n_experts)
    if not 1 <= top_k <= candidates:
        raise ValueError(
            f"top_k={top_k} must be in [1, n_probe * N // E = {candidates}] "
            f"(n_probe={n_probe}, N={n_neurons}, E={n_experts})"
        )


def default_experts(n_neurons: int) -> int:
    """The divisor of N closest to 4*sqrt(N) (the paper's choice), ties to the smaller one."""
    if n_neurons < 1:
        raise ValueError(f"neurons must be positive, got {n_neurons}")
    target = 4.0 * n_neurons**0.5
    small = [e for e in range(1, int(n_neurons**0.5) + 1) if n_neurons % e == 0]
    divisors = small + [n_neurons // e for e in small]
    return min(divisors, key=lambda e: (abs(e - target), e))
