"""Baselines for the comparison benchmark: the same adapter without sparsity, two ways.

Both compute the plain parallel adapter beside every chosen FFN, with every neuron active:

    y = ReLU(x K^T) V          x (T, d), K and V (N, d), y (T, d)

``DenseParallelAdapter``: K and V are ordinary ``nn.Parameter``s on the compute device,
trained with ``torch.optim.AdamW``: the "Parallel Adapter" rows of the paper's table.

``DenseOffloadAdapter``: K and V live on the host (a :class:`DenseHostTables`) and are moved
whole to the compute device at every forward (2*N*d), their full gradients come back
(2*N*d), and a dense ``torch.optim.AdamW`` runs on the host: what DeepSpeed-style offload of
the same adapter does. It counts its traffic like MEFT's module does (``bytes_h2d`` /
``bytes_d2h``), so the two can be compared byte for byte.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meft.adapter.model import attach_beside_mlp, find_decoder_layers, hidden_size_of


def _init_keys(n: int, d: int, gen: torch.Generator, std: float = 0.02) -> Tensor:
    return torch.empty(n, d).normal_(0.0, std, generator=gen)


class DenseParallelAdapter(nn.Module):
    """Every neuron, all on the compute device."""

    def __init__(self, neurons: int, dim: int, *, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.keys = nn.Parameter(_init_keys(neurons, dim, generator).to(device))
        self.values = nn.Parameter(torch.zeros(neurons, dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.keys.to(x.dtype).T) @ self.values.to(x.dtype)


class DenseHostTables:
    """Host-resident K and V of one layer, as leaf tensors a host AdamW can update."""

    def __init__(self, neurons: int, dim: int, *, generator: torch.Generator) -> None:
        self.keys = nn.Parameter(_init_keys(neurons, dim, generator))
        self.values = nn.Parameter(torch.zeros(neurons, dim))
        self.bytes_h2d = 0
        self.bytes_d2h = 0

    def parameters(self) -> list[nn.Parameter]:
        return [self.keys, self.values]


class DenseOffloadAdapter(nn.Module):
    """Every neuron; tables on the host, moved whole each forward, gradients back whole."""

    def __init__(self, tables: DenseHostTables, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.tables = tables
        self.device = torch.device(device)

    def forward(self, x: Tensor) -> Tensor:
        t = self.tables
        k = t.keys.detach().to(self.device, x.dtype, copy=True).requires_grad_(True)
        v = t.values.detach().to(self.device, x.dtype, copy=True).requires_grad_(True)
        t.bytes_h2d += k.numel() * k.element_size() + v.numel() * v.element_size()
        if torch.is_grad_enabled():
            k.register_hook(self._sink(t.keys))
            v.register_hook(self._sink(t.values))
        return torch.relu(x @ k.T) @ v

    def _sink(self, host: nn.Parameter):  # type: ignore[no-untyped-def]
        tables = self.tables

        def hook(grad: Tensor) -> None:
            back = grad.to("cpu", host.dtype, copy=True)
            tables.bytes_d2h += back.numel() * back.element_size()
            host.grad = back if host.grad is None else host.grad + back

        return hook


def attach_dense(model: nn.Module, neurons: int, *, offload: bool, seed: int = 0,
                 layers: list[int] | None = None, device: torch.device | str = "cpu"
                 ) -> tuple[list[nn.Module], list[torch.utils.hooks.RemovableHandle]]:
    """Freeze ``model`` and put a dense adapter beside the MLP of each chosen layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = find_decoder_layers(model)
    d = hidden_size_of(model)
    gen = torch.Generator().manual_seed(seed)
    adapters: list[nn.Module] = []
    handles = []
    for i in layers if layers is not None else range(len(blocks)):
        adapter: nn.Module
        if offload:
            adapter = DenseOffloadAdapter(DenseHostTables(neurons, d, generator=gen),
                                          device=device)
        else:
            adapter = DenseParallelAdapter(neurons, d, generator=gen, device=device)
        adapters.append(adapter)
        handles.extend(attach_beside_mlp(blocks[i], adapter))
    return adapters, handles
