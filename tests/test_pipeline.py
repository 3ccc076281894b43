"""The host worker (meft.engine.pipeline): gradient rows accumulated on a host thread give
bitwise what the synchronous path gives, and every reader waits for them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from helpers import Case, make_inputs
from meft.engine.offload import OffloadedSparseAdapter
from meft.engine.optim import RowSparseAdamW
from meft.engine.pipeline import HostWorker
from meft.engine.store import HostStore, RowSparseGrad

CASE = Case(tokens=24, dim=16, neurons=256, experts=16, top_k=8, n_probe=3)


def test_queued_adds_equal_adds_in_order() -> None:
    """Fresh random (ids, rows) with repeats, some queued and some added directly: the sums
    and the first-touched order are the synchronous ones, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (20,), generator=gen), torch.randn(20, 8, generator=gen))
               for _ in range(12)]
    sync, queued = RowSparseGrad(50, 8), RowSparseGrad(50, 8)
    worker = HostWorker()
    waits: list[float] = []
    queued.on_wait = waits.append
    for i, (ids, rows) in enumerate(batches):
        sync.add(ids, rows.clone())
        if i % 4 == 3:
            queued.add(ids, rows.clone())  # waits for what is queued, then adds here
        else:
            queued.add_later(worker, ids, rows.clone())
    assert torch.equal(queued.ids, sync.ids) and torch.equal(queued.rows, sync.rows)
    # a wait is counted when rows are still queued as they are read (none: the worker was
    # ahead, which timing decides)
    assert torch.equal(queued.to_dense(), sync.to_dense()) and all(w >= 0 for w in waits)


def test_a_failing_job_raises_where_the_rows_are_read() -> None:
    worker = HostWorker()
    acc = RowSparseGrad(10, 4)
    acc.add_later(worker, torch.tensor([1, 2]), torch.ones(3, 4))  # wrong shape
    with pytest.raises(ValueError, match="expected ids"):
        acc.rows  # noqa: B018
    acc.add_later(worker, torch.tensor([1, 2]), torch.ones(2, 4))  # the worker goes on
    assert torch.equal(acc.rows, torch.ones(2, 4))


def _blocked(worker: HostWorker) -> threading.Event:
    """Hold ``worker`` until the returned event is set (jobs queue behind it)."""
    release = threading.Event()
    worker.submit(lambda: release.wait(10))
    return release


@pytest.mark.parametrize("dtype,state", [(torch.float32, "fp32"), (torch.bfloat16, "8bit"),
                                         (torch.float32, "factored")])
def test_the_deferred_update_equals_the_inline_one_bit_for_bit(dtype: torch.dtype,
                                                                state: str) -> None:
    """Fresh random row gradients over several steps, the rate changed after every step
    while the deferred update is still queued: tables, moments and stats' rows equal the
    inline update's, bit for bit; a reader waits for the table it reads, and no longer."""
    gen = torch.Generator().manual_seed(4)
    stores = [HostStore(torch.randn(50, 8, generator=gen).to(dtype),
                        torch.randn(50, 8, generator=gen).to(dtype)) for _ in range(2)]
    twins = [HostStore(s.keys.clone(), s.values.clone()) for s in stores]
    worker = HostWorker()
    inline = RowSparseAdamW([t for s in stores for t in s.tables], lr=1e-2, weight_decay=0.1,
                            state_format=state, seed=3)
    queued = RowSparseAdamW([t for s in twins for t in s.tables], lr=1e-2, weight_decay=0.1,
                            state_format=state, seed=3, worker=worker)
    for step in range(5):
        for a, b in zip(inline.tables, queued.tables, strict=True):
            ids = torch.randint(0, 50, (12,), generator=gen)
            rows = torch.randn(12, 8, generator=gen)
            a.grad.add(ids, rows.clone())
            b.grad.add_later(worker, ids, rows.clone())
        release = _blocked(worker)
        inline.step()
        inline.zero_grad()
        queued.step()  # queued behind the block: nothing has run yet
        queued.zero_grad()
        assert not any(t.ready.is_set() for t in queued.tables)
        inline.lr = queued.lr = 1e-2 / (step + 2)  # the next step's rate: not the queued one's
        release.set()
        twins[0].settle_tables()  # the first layer's tables, as the next forward reads them
        for a, b in zip(stores[0].tables, twins[0].tables, strict=True):
            assert torch.equal(a.data, b.data)
        assert twins[0].stats.touched_rows == stores[0].stats.touched_rows > 0
        assert twins[0].stats.update_s > 0 and twins[0].stats.wait_s >= 0
    queued.settle()
    for a, b in zip(inline.tables, queued.tables, strict=True):
        assert torch.equal(a.data, b.data) and len(b.grad) == 0
        sa, sb = inline.state[a.data], queued.state[b.data]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_reader_waits_for_the_queued_update_and_counts_the_wait() -> None:
    gen = torch.Generator().manual_seed(5)
    store = HostStore(torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen))
    worker = HostWorker()
    opt = RowSparseAdamW(store.tables, lr=1e-2, worker=worker)
    store.value_grad.add(torch.tensor([3]), torch.ones(1, 4))
    before = store.values[3].clone()
    release = _blocked(worker)
    opt.step()
    threading.Timer(0.05, release.set).start()
    store.settle_tables()
    assert not torch.equal(store.values[3], before)  # the update ran before the read
    assert store.stats.wait_s >= 0.04


def test_a_failing_update_is_raised_at_settle(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store = HostStore(torch.randn(20, 4), torch.randn(20, 4))
    opt = RowSparseAdamW(store.tables, lr=1e-2, worker=HostWorker())
    store.value_grad.add(torch.tensor([3]), torch.ones(1, 4))

    def broken(*args: object) -> None:
        raise RuntimeError("update failed")

    monkeypatch.setattr(opt, "_update", broken)
    opt.step()
    store.settle_tables()  # the reader is not left waiting
    with pytest.raises(RuntimeError, match="update failed"):
        opt.settle()


def _module(seed: int, device: str = "cpu") -> OffloadedSparseAdapter:
    _, keys, values, router, _ = make_inputs(CASE, torch.float32, seed)
    return OffloadedSparseAdapter(HostStore(keys, values), n_experts=CASE.experts,
                                  top_k=CASE.top_k, n_probe=CASE.n_probe, router=router,
                                  device=device)


def test_the_worker_path_trains_like_the_synchronous_one_bit_for_bit() -> None:
    """Three optimizer steps of two fresh random micro-batches each, the rows' gradients added
    on the worker thread or inline: outputs, input gradients, tables and optimizer state equal
    bit for bit, and the time waited for the worker is counted."""
    runs = []
    for worker in (None, HostWorker()):
        mod = _module(5)
        mod.worker = worker
        opt = RowSparseAdamW(mod.store.tables, lr=1e-2, weight_decay=0.01)
        outs, waited = [], 0.0
        for step in range(3):
            for micro in range(2):
                x, _, _, _, dy = make_inputs(CASE, torch.float32, 60 + 2 * step + micro)
                x = x.requires_grad_(True)
                y = mod(x)
                y.backward(dy)
                outs += [y.detach(), x.grad]
            opt.step()
            opt.zero_grad()
            waited += mod.store.stats.wait_s
        runs.append((outs, mod.store.keys.clone(), mod.store.values.clone(),
                     [v.clone() for t in mod.store.tables for v in opt.state[t.data].values()],
                     waited))
    (a, ka, va, sa, wa), (b, kb, vb, sb, wb) = runs
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert len(sa) == len(sb) and all(torch.equal(p, q) for p, q in zip(sa, sb, strict=True))
    assert wa == 0.0 and wb >= 0.0  # > 0 only when the worker was behind (timing)


def test_meft_train_with_the_worker_equals_without(
        model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The whole job (micro-batches, clipping, forgetting protection's replay, checkpoints)
    with the worker on the CPU: the same losses and adapter files as inline, bit for bit."""
    from safetensors.torch import load_file

    import meft.adapter.model as model_module
    from helpers import TINY
    from meft.cli.commands import main

    flags = ["--model", str(model_dir), "--data", str(data_file), "--steps", "3",
             "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
             "--no-progress", "--no-eval-before", "--no-retention", "--no-plots", *TINY]
    original = model_module.MeftModel.use_host_worker
    jobs: list[int] = []
    submit = HostWorker.submit
    monkeypatch.setattr(HostWorker, "submit",
                        lambda self, job, **kw: (jobs.append(1), submit(self, job, **kw))[1])
    for name, on in (("inline", False), ("worker", True)):
        model_module.MeftModel.use_host_worker = (  # type: ignore[method-assign]
            lambda self, _on=True, force=on: original(self, force))
        try:
            assert main(["train", *flags, "--output", str(tmp_path / name)]) == 0
        finally:
            model_module.MeftModel.use_host_worker = original  # type: ignore[method-assign]
    runs = [json.loads((tmp_path / n / "run.json").read_text()) for n in ("inline", "worker")]
    assert runs[0]["losses"] == runs[1]["losses"]
    a, b = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors")
            for n in ("inline", "worker"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    waits = {n: [json.loads(x)["wait_s"] for x in (tmp_path / n / "metrics.jsonl").read_text()
                 .splitlines()] for n in ("inline", "worker")}
    # inline nothing is queued, so nothing is waited for; with the worker a step waits only
    # when its rows are still queued as they are read (0.0 when the worker was ahead)
    assert all(w == 0.0 for w in waits["inline"]) and all(w >= 0.0 for w in waits["worker"])


def test_routing_begun_before_the_mlp_equals_routing_in_the_hook(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The MLP's pre-hook begins each adapter's routing (prepare) so that on a GPU the host
    routes while the MLP computes; the logits, every gradient and the rows chosen are bitwise
    those of routing inside the MLP's forward hook, with padding (real tokens only)."""
    from helpers import meft_config, tiny_for
    from meft.adapter.model import get_meft_model

    runs = []
    for begin_early in (True, False):
        model = get_meft_model(tiny_for(tokenizer), meft_config())
        if not begin_early:
            for adapter in model.adapter_modules:
                adapter.prepare = lambda x: None  # type: ignore[method-assign]
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(3, len(tokenizer), (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding
        prepared = []
        for adapter in model.adapter_modules:
            original = adapter.forward
            adapter.forward = (  # type: ignore[method-assign]
                lambda x, a=adapter, f=original, seen=prepared: (
                    seen.append(a._prepared is not None), f(x))[1])
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.square().sum().backward()
        runs.append((logits.detach(), [r.grad.clone() for r in model.router_parameters()],
                     [a.store.key_grad.to_dense() for a in model.adapter_modules],
                     [a.store.value_grad.to_dense() for a in model.adapter_modules], prepared))
    (la, ra, ka, va, pa), (lb, rb, kb, vb, pb) = runs
    assert all(pa) and not any(pb)  # the early path was taken, and the other was not
    assert torch.equal(la, lb)
    for xs, ys in ((ra, rb), (ka, kb), (va, vb)):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))
    assert any(bool(v.abs().sum()) for v in va)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_overlapped_paths_equal_the_inline_ones() -> None:
    """On a GPU: routing begun before the MLP with non-blocking pinned copies, and gradient
    rows added on the host worker after their copies land, against the inline paths: the same
    outputs and the same host sums (the host arithmetic is the same; only when it runs moves)."""
    runs = []
    for overlap in (True, False):
        mod = _module(5, device="cuda")
        mod.worker = HostWorker() if overlap else None
        outs = []
        for micro in range(3):
            x, _, _, _, dy = make_inputs(CASE, torch.float32, 80 + micro)
            x, dy = x.cuda().requires_grad_(True), dy.cuda()
            if overlap:
                mod.prepare(x)
            y = mod(x)
            y.backward(dy)
            outs += [y.detach().cpu(), x.grad.cpu()]
        runs.append((outs, mod.store.key_grad.to_dense(), mod.store.value_grad.to_dense()))
    (a, ka, va), (b, kb, vb) = runs
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(ka, kb) and torch.equal(va, vb)
