"""The offloaded sparse adapter: big tables on the host, only the rows in use on the device.

Per forward of one layer, for x (T, d) on the compute device:

    device  g = x W_g^T (T, E); probe the top-P experts        router is a device Parameter
    d -> h  x (T*d), probe ids and gate values (T*P each)
    host    select each token's K neurons among the P*B candidates   (meft.routing.select)
            U, local = unique(ids)                                    (U,), (T, K)
    h -> d  key rows and value rows of U (2*U*d), U ids, local (T, K)
    device  y = sparse_rows(x, gsel, ku, vu, local)                  exact, differentiable

and in backward the (U, d) gradients of ku and vu go device -> host (2*U*d) and are added to the
store's row-sparse accumulators; several micro-batches accumulate. The host tables are never
module parameters or buffers, so ``model.to(device)`` and ``state_dict()`` leave them alone; the
trainer builds the :class:`~meft.store.HostStore` objects and the optimizer and passes them in.

On CUDA the staged rows are gathered straight into pinned host buffers and copied with
``non_blocking=True``; a buffer is reused only after the event recorded behind its last copy has
completed. On CPU (device == host) the same code runs with plain copies, so results are identical
and every byte the real system would move is still counted in ``store.stats``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from meft.kernels import sparse_rows
from meft.routing import check_routing_sizes, probe, select
from meft.store import HostStore, RowSparseGrad, router_init

_HOST = torch.device("cpu")


class _PinnedStaging:
    """Growable pinned host buffers, one per name, each guarded by the event of its last copy."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self._events: dict[str, torch.cuda.Event] = {}

    def to_device(self, name: str, src: Tensor, rows: Tensor | None, device: torch.device,
                  dtype: torch.dtype) -> Tensor:
        """Copy ``src[rows]`` (or src) as ``dtype`` to ``device`` through a pinned buffer."""
        n = rows.shape[0] if rows is not None else src.shape[0]
        shape = (n, *src.shape[1:])
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.shape[0] < n or buf.shape[1:] != shape[1:]:
            buf = torch.empty((max(n, 1), *shape[1:]), dtype=dtype, pin_memory=True)
            self._bufs[name] = buf
        elif name in self._events:
            self._events[name].synchronize()
        out = buf[:n]
        if rows is not None and src.dtype == dtype:
            torch.index_select(src, 0, rows, out=out)
        else:
            out.copy_(src.index_select(0, rows) if rows is not None else src)
        moved = out.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[name] = event
        return moved


class OffloadedSparseAdapter(nn.Module):
    """MEFT adapter for one layer: y = adapter(x) with x (..., d), to be added to the FFN output.

    ``store`` holds keys and values (N, d) on the host; ``n_experts`` E must divide N. The router
    (E, d) is a Parameter on ``device``. Gradients for keys and values land in
    ``store.key_grad`` / ``store.value_grad``; the router's in ``router.grad``.
    """

    def __init__(
        self,
        store: HostStore,
        *,
        n_experts: int,
        top_k: int = 64,
        n_probe: int = 8,
        gate: str = "product",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router: Tensor | None = None,
        router_scheme: str = "normal",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_routing_sizes(store.n_neurons, n_experts, top_k=top_k, n_probe=n_probe, gate=gate)
        self.store = store
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_probe = n_probe
        self.gate = gate
        self.device = torch.device(device) if device is not None else _HOST
        dtype = dtype or store.keys.dtype
        if router is None:
            router = router_init(store.keys, n_experts, scheme=router_scheme, generator=generator)
        if router.shape != (n_experts, store.dim):
            raise ValueError(f"router must be ({n_experts}, {store.dim}), got "
                             f"{tuple(router.shape)}")
        self.router = nn.Parameter(router.to(self.device, dtype))
        self._staging = _PinnedStaging() if self.device.type == "cuda" else None

    @property
    def n_neurons(self) -> int:
        return self.store.n_neurons

    def extra_repr(self) -> str:
        return (f"neurons={self.n_neurons}, dim={self.store.dim}, experts={self.n_experts}, "
                f"top_k={self.top_k}, n_probe={self.n_probe}, gate={self.gate!r}, "
                f"device={self.device}")

    def _to_device(self, name: str, src: Tensor, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
        if self._staging is not None:
            return self._staging.to_device(name, src, rows, self.device, dtype)
        out = src.index_select(0, rows) if rows is not None else src
        return out.to(self.device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        d = self.store.dim
        if x.shape[-1] != d:
            raise ValueError(f"adapter input must have last dimension {d}, got {tuple(x.shape)}")
        stats = self.store.stats
        x2 = x.reshape(-1, d)  # (T, d)
        t = x2.shape[0]
        g = x2 @ self.router.to(x.dtype).T  # (T, E)
        probe_scores, probe_ids = probe(g.detach(), self.n_probe)  # (T, P) each

        start = time.perf_counter()
        x_host = x2.detach().to(_HOST, self.store.keys.dtype)
        ids = select(
            x_host, self.store.keys, probe_scores.to(_HOST, self.store.keys.dtype),
            probe_ids.to(_HOST), self.n_experts, top_k=self.top_k, gate=self.gate,
        )  # (T, K) on host
        uniq, local = torch.unique(ids, return_inverse=True)  # (U,), (T, K)
        routed = time.perf_counter()

        ku = self._to_device("keys", self.store.keys, uniq, x.dtype)  # (U, d)
        vu = self._to_device("values", self.store.values, uniq, x.dtype)  # (U, d)
        uniq_dev = uniq.to(self.device)
        local_dev = local.to(self.device)
        stats.stage_s += time.perf_counter() - routed
        stats.route_s += routed - start

        u = uniq.shape[0]
        item = x.element_size()
        stats.forwards += 1
        stats.tokens += t
        stats.union_rows += u
        stats.hidden_bytes_d2h += t * d * item
        stats.index_bytes_d2h += probe_ids.numel() * probe_ids.element_size()
        stats.index_bytes_d2h += probe_scores.numel() * probe_scores.element_size()
        stats.row_bytes_h2d += 2 * u * d * item
        stats.index_bytes_h2d += (uniq.numel() + local.numel()) * uniq.element_size()

        if torch.is_grad_enabled():
            ku.requires_grad_(True)
            vu.requires_grad_(True)
            ku.register_post_accumulate_grad_hook(self._grad_sink(self.store.key_grad, uniq))
            vu.register_post_accumulate_grad_hook(self._grad_sink(self.store.value_grad, uniq))

        b = self.n_neurons // self.n_experts
        gsel = g.gather(1, uniq_dev[local_dev] // b) if self.gate == "product" else None
        y = sparse_rows(x2, gsel, ku, vu, local_dev)
        return y.reshape(x.shape)

    def _grad_sink(self, acc: RowSparseGrad, uniq: Tensor) -> Callable[[Tensor], None]:
        stats = self.store.stats

        def hook(rows: Tensor) -> None:
            grad = rows.grad
            if grad is None:
                return
            rows.grad = None
            acc.add(uniq, grad.to(_HOST, acc.rows.dtype), adopt=True)
            stats.grad_bytes_d2h += grad.numel() * grad.element_size()

        return hook
