"""Dense baselines: the dense adapter is the sparse one with every neuron kept; the offloaded
dense adapter computes the same thing and counts 2*N*d each way."""

from __future__ import annotations

import torch

from helpers import logits, tiny
from meft.adapter.baselines import (
    DenseHostTables,
    DenseOffloadAdapter,
    DenseParallelAdapter,
    attach_dense,
)
from meft.engine.functional import sparse_adapter_reference


def test_dense_adapter_is_sparse_adapter_with_every_neuron() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, e = 48, 8, 4
    dense = DenseParallelAdapter(n, d, generator=gen).double()
    with torch.no_grad():
        dense.values.normal_(generator=gen)
    x = torch.randn(10, d, dtype=torch.float64, generator=gen, requires_grad=True)
    y = dense(x)
    dy = torch.randn_like(y)
    gx, gk, gv = torch.autograd.grad(y, (x, dense.keys, dense.values), dy)
    keys = dense.keys.detach().clone().requires_grad_(True)
    values = dense.values.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    router = torch.randn(e, d, dtype=torch.float64, generator=gen)
    y2 = sparse_adapter_reference(x2, keys, values, router, top_k=n, n_probe=e, gate="none")
    rx, rk, rv = torch.autograd.grad(y2, (x2, keys, values), dy)
    for a, b in ((y, y2), (gx, rx), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_offloaded_dense_adapter_equals_device_one_and_counts_bytes() -> None:
    n, d = 32, 8
    device_ad = DenseParallelAdapter(n, d, generator=torch.Generator().manual_seed(1))
    host = DenseHostTables(n, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        device_ad.values.normal_(generator=torch.Generator().manual_seed(2))
        host.values.copy_(device_ad.values)
    offload = DenseOffloadAdapter(host)
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(6, d, generator=torch.Generator().manual_seed(4))
    y1 = device_ad(x)
    y1.backward(dy)
    y2 = offload(x)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(device_ad.keys.grad, host.keys.grad)
    torch.testing.assert_close(device_ad.values.grad, host.values.grad)
    assert host.bytes_h2d == 2 * n * d * 4 and host.bytes_d2h == 2 * n * d * 4


def test_attached_dense_adapters_start_as_identity() -> None:
    base = tiny("llama")
    want = logits(base)
    adapters, handles = attach_dense(base, 16, offload=False)
    assert len(adapters) == 3
    assert torch.equal(logits(base), want)
    with torch.no_grad():  # a trained adapter changes the output...
        adapters[0].values.normal_(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(base), want)
    for h in handles:  # ...and removing the hooks restores the base model exactly
        h.remove()
    assert torch.equal(logits(base), want)
