"""The offloaded module: equal to the functional op, accumulates, counts bytes, stays on host."""

from __future__ import annotations

import pytest
import torch

from helpers import Case, make_inputs
from meft.engine.functional import sparse_adapter
from meft.engine.offload import OffloadedSparseAdapter
from meft.engine.optim import RowSparseAdamW, clip_grad_norm_
from meft.engine.routing import select
from meft.engine.store import HostStore

CASE = Case(tokens=24, dim=16, neurons=256, experts=16, top_k=8, n_probe=3)


def _module(dtype: torch.dtype, gate: str = "product", seed: int = 0,
            device: str = "cpu") -> OffloadedSparseAdapter:
    _, keys, values, router, _ = make_inputs(CASE, dtype, seed)
    store = HostStore(keys, values)
    return OffloadedSparseAdapter(store, n_experts=CASE.experts, top_k=CASE.top_k,
                                  n_probe=CASE.n_probe, gate=gate, router=router, device=device)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("gate", ["product", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_equals_functional(gate: str, dtype: torch.dtype, in_place: bool) -> None:
    mod = _module(dtype, gate)
    mod.read_in_place = in_place  # rows read in the tables, or staged (the reference)
    x, _, _, _, dy = make_inputs(CASE, dtype, 1, lead=(2,))
    x1 = x.clone().requires_grad_(True)
    y = mod(x1)
    y.backward(dy)
    keys = mod.store.keys.clone().requires_grad_(True)
    values = mod.store.values.clone().requires_grad_(True)
    router = mod.router.detach().clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y2 = sparse_adapter(x2, keys, values, router, top_k=CASE.top_k, n_probe=CASE.n_probe,
                        gate=gate)
    y2.backward(dy)
    # the same kernels on the same numbers: equal bit for bit
    assert torch.equal(y, y2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(mod.store.key_grad.to_dense(), keys.grad)
    assert torch.equal(mod.store.value_grad.to_dense(), values.grad)
    if gate == "product":
        assert torch.equal(mod.router.grad, router.grad)
    else:
        assert mod.router.grad is None


def test_micro_batches_accumulate() -> None:
    mod = _module(torch.float64)
    xs = [make_inputs(CASE, torch.float64, 10 + i)[0] for i in range(3)]
    dys = [make_inputs(CASE, torch.float64, 20 + i)[4] for i in range(3)]
    for x, dy in zip(xs, dys, strict=True):
        mod(x).backward(dy)
    keys = mod.store.keys.clone().requires_grad_(True)
    values = mod.store.values.clone().requires_grad_(True)
    router = mod.router.detach().clone().requires_grad_(True)
    for x, dy in zip(xs, dys, strict=True):
        sparse_adapter(x, keys, values, router, top_k=CASE.top_k, n_probe=CASE.n_probe
                       ).backward(dy)
    torch.testing.assert_close(mod.store.key_grad.to_dense(), keys.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod.store.value_grad.to_dense(), values.grad, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(mod.router.grad, router.grad, rtol=1e-12, atol=1e-12)
    assert mod.store.stats.forwards == 3


def test_byte_counters_equal_the_method_formula() -> None:
    """d->h: T*d hidden + 2*U*d gradients; h->d: 2*U*d rows; indices counted on their own."""
    mod = _module(torch.float32)
    stats = mod.store.stats
    total = {"t": 0, "u": 0, "h2d": 0, "d2h": 0, "idx_h2d": 0, "idx_d2h": 0}
    item, d, k, p = 4, CASE.dim, CASE.top_k, CASE.n_probe
    for tokens in [24, 7, 31]:
        x = torch.randn(tokens, d)
        mod.store.zero_grad()
        u_before = stats.union_rows
        mod(x).sum().backward()
        u = stats.union_rows - u_before
        assert CASE.top_k <= u <= min(tokens * k, CASE.neurons)
        assert len(mod.store.key_grad) == len(mod.store.value_grad) == u
        total["t"] += tokens
        total["u"] += u
        total["h2d"] += 2 * u * d * item
        total["d2h"] += tokens * d * item + 2 * u * d * item
        total["idx_h2d"] += (u + tokens * k) * 8
        total["idx_d2h"] += tokens * p * (8 + item)
    assert stats.tokens == total["t"] and stats.union_rows == total["u"]
    assert stats.row_bytes_h2d == total["h2d"]
    assert stats.hidden_bytes_d2h + stats.grad_bytes_d2h == total["d2h"]
    assert stats.index_bytes_h2d == total["idx_h2d"]
    assert stats.index_bytes_d2h == total["idx_d2h"]
    assert stats.bytes_h2d == total["h2d"] + total["idx_h2d"]
    assert stats.bytes_d2h == total["d2h"] + total["idx_d2h"]
    assert stats.route_s > 0 and stats.stage_s > 0


def test_no_grad_forward_moves_no_gradients() -> None:
    mod = _module(torch.float32)
    with torch.no_grad():
        y = mod(torch.randn(5, CASE.dim))
    assert y.shape == (5, CASE.dim)
    assert len(mod.store.key_grad) == 0 and mod.store.stats.grad_bytes_d2h == 0


def test_tables_are_not_module_state() -> None:
    mod = _module(torch.float32)
    names = [n for n, _ in mod.named_parameters()]
    assert names == ["router"]
    assert list(mod.state_dict()) == ["router"]
    keys = mod.store.keys
    mod.to(torch.float64)  # moving/casting the module never touches the host tables
    assert mod.store.keys is keys and keys.dtype == torch.float32


def test_zero_values_make_the_adapter_output_zero() -> None:
    store = HostStore.initialize(CASE.neurons, CASE.dim, generator=torch.Generator().manual_seed(0))
    mod = OffloadedSparseAdapter(store, n_experts=CASE.experts, top_k=CASE.top_k,
                                 n_probe=CASE.n_probe)
    x = torch.randn(9, CASE.dim)
    assert torch.equal(mod(x), torch.zeros_like(x))


def test_training_steps_fit_a_target_and_touch_only_selected_rows() -> None:
    """A few optimizer steps on a regression target lower the loss; rows never selected keep
    their initial values; the router learns through the product gate."""
    torch.manual_seed(0)
    store = HostStore.initialize(CASE.neurons, CASE.dim, generator=torch.Generator().manual_seed(1))
    mod = OffloadedSparseAdapter(store, n_experts=CASE.experts, top_k=CASE.top_k,
                                 n_probe=CASE.n_probe)
    host_opt = RowSparseAdamW(store.tables, lr=1e-2)
    dev_opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    x = torch.randn(32, CASE.dim)
    target = torch.randn(32, CASE.dim) * 0.1
    keys0, router0 = store.keys.clone(), mod.router.detach().clone()
    touched: set[int] = set()
    losses = []
    for _ in range(30):
        loss = (mod(x) - target).pow(2).mean()
        loss.backward()
        touched |= set(store.key_grad.ids.tolist())
        clip_grad_norm_(mod.parameters(), [store.key_grad, store.value_grad], 1.0)
        host_opt.step()
        dev_opt.step()
        host_opt.zero_grad()
        dev_opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    untouched = sorted(set(range(CASE.neurons)) - touched)
    assert untouched, "the test needs rows that were never selected"
    assert torch.equal(store.keys[untouched], keys0[untouched])
    assert not torch.equal(mod.router.detach(), router0)
    assert store.stats.update_s > 0


def test_bad_configuration_is_rejected() -> None:
    store = HostStore.initialize(100, 8)
    with pytest.raises(ValueError, match="must divide"):
        OffloadedSparseAdapter(store, n_experts=7, top_k=4, n_probe=2)
    with pytest.raises(ValueError, match="top_k"):
        OffloadedSparseAdapter(store, n_experts=10, top_k=30, n_probe=2)
    mod = OffloadedSparseAdapter(store, n_experts=10, top_k=4, n_probe=2)
    with pytest.raises(ValueError, match="last dimension 8"):
        mod(torch.randn(3, 9))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_equals_cpu_module() -> None:
    cpu = _module(torch.float64)
    gpu = _module(torch.float64, device="cuda")
    x, _, _, _, dy = make_inputs(CASE, torch.float64, 3)
    y_cpu = cpu(x)
    y_cpu.backward(dy)
    y_gpu = gpu(x.cuda())
    y_gpu.backward(dy.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.store.key_grad.to_dense(), cpu.store.key_grad.to_dense(),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpu.router.grad.cpu(), cpu.router.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("in_place", [True, False])
def test_two_live_graphs_do_not_share_staging_buffers(in_place: bool) -> None:
    """Two forwards before one backward (weight sharing, contrastive losses): each keeps its
    own staged rows, so the gradients equal the functional op's."""
    mod = _module(torch.float64)
    mod.read_in_place = in_place
    x1, _, _, _, dy1 = make_inputs(CASE, torch.float64, 30)
    x2, _, _, _, dy2 = make_inputs(CASE, torch.float64, 31)
    ((mod(x1) * dy1).sum() + (mod(x2) * dy2).sum()).backward()
    keys = mod.store.keys.clone().requires_grad_(True)
    values = mod.store.values.clone().requires_grad_(True)
    router = mod.router.detach().clone().requires_grad_(True)
    kw = dict(top_k=CASE.top_k, n_probe=CASE.n_probe)
    ((sparse_adapter(x1, keys, values, router, **kw) * dy1).sum()
     + (sparse_adapter(x2, keys, values, router, **kw) * dy2).sum()).backward()
    torch.testing.assert_close(mod.store.key_grad.to_dense(), keys.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod.store.value_grad.to_dense(), values.grad, rtol=1e-12,
                               atol=1e-12)


def test_staging_buffers_are_reused_once_the_graph_is_gone() -> None:
    mod = _module(torch.float32)
    mod.read_in_place = False
    x = torch.randn(CASE.tokens, CASE.dim)
    y = mod(x)
    first = mod._staging._entries["keys"][0][0].data_ptr()
    y.sum().backward()
    del y
    mod(x).sum().backward()
    assert [e[0].data_ptr() for e in mod._staging._entries["keys"]] == [first]


@pytest.mark.parametrize("gate", ["product", "none"])
def test_rows_read_in_place_train_like_staged_rows_bit_for_bit(gate: str) -> None:
    """Reading rows in the host tables (CPU, tables in the compute dtype) is the staged path
    without the copy: three optimizer steps of fresh random micro-batches give the same
    outputs, tables and optimizer state, bit for bit, and nothing is staged."""
    runs = []
    for in_place in (True, False):
        mod = _module(torch.float32, gate, seed=5)
        mod.read_in_place = in_place
        opt = RowSparseAdamW(mod.store.tables, lr=1e-2, weight_decay=0.01)
        outs = []
        for step in range(3):
            for micro in range(2):
                x, _, _, _, dy = make_inputs(CASE, torch.float32, 40 + 2 * step + micro)
                x = x.requires_grad_(True)
                y = mod(x)
                y.backward(dy)
                outs += [y.detach(), x.grad]
            opt.step()
            opt.zero_grad()
        assert ("keys" in mod._staging._entries) is not in_place
        runs.append((outs, mod.store.keys.clone(), mod.store.values.clone(),
                     [v.clone() for t in mod.store.tables for v in opt.state[t.data].values()]))
    (a, ka, va, sa), (b, kb, vb, sb) = runs
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert len(sa) == len(sb) and all(torch.equal(p, q) for p, q in zip(sa, sb, strict=True))


class _Ids:
    """An access counter that keeps the ids each forward chose."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        self.ids.append(ids.clone())


def test_half_tables_probe_in_half_and_keep_exact_gate_values() -> None:
    """bf16 tables route in bf16: the top-P experts of the router product in bf16 (the dtype
    of the candidate scores), the top-K neurons of the bf16 candidates; the output and all
    gradients are the definition's with the exact fp32 gate values of the chosen neurons
    (written out with autograd here). The router's rows come in near-equal pairs, equal in
    bf16, so probing in fp32 would choose other experts for some tokens: the test tells the
    two apart."""
    _, keys, values, router, _ = make_inputs(CASE, torch.float32, 0)
    router[1::2] = router[0::2] * (1 - 2.0**-12)  # pairs: one bf16 value, two fp32 ones
    mod = OffloadedSparseAdapter(HostStore(keys.bfloat16(), values.bfloat16()),
                                 n_experts=CASE.experts, top_k=CASE.top_k,
                                 n_probe=CASE.n_probe, router=router, dtype=torch.float32)
    mod.counter = seen = _Ids()
    x, _, _, _, dy = make_inputs(CASE, torch.float32, 1)
    x1 = x.clone().requires_grad_(True)
    y = mod(x1)
    y.backward(dy)

    b = CASE.neurons // CASE.experts
    half_scores, half_probes = (x.bfloat16() @ router.bfloat16().T).topk(CASE.n_probe, dim=1)
    ids = select(x.bfloat16(), mod.store.keys, half_scores, half_probes, CASE.experts,
                 top_k=CASE.top_k)
    assert torch.equal(seen.ids[0], ids)
    fp32_probes = (x @ router.T).topk(CASE.n_probe, dim=1).indices
    assert not torch.equal(fp32_probes.sort(1).values, half_probes.sort(1).values)

    x2, r2 = x.clone().requires_grad_(True), router.clone().requires_grad_(True)
    k2 = mod.store.keys.float().requires_grad_(True)
    v2 = mod.store.values.float().requires_grad_(True)
    gsel = (x2 @ r2.T).gather(1, ids // b)  # (T, K) exact gate values
    a = (k2[ids] * x2.unsqueeze(1)).sum(-1)  # (T, K)
    y2 = (torch.relu(gsel * a).unsqueeze(-1) * v2[ids]).sum(1)
    y2.backward(dy)
    for got, want in ((y, y2), (x1.grad, x2.grad), (mod.router.grad, r2.grad),
                      (mod.store.key_grad.to_dense(), k2.grad),
                      (mod.store.value_grad.to_dense(), v2.grad)):
        # fp32 sums in another order: relative to the tensor's scale
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("gate", ["product", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_without_the_union_equals_the_training_forward(
        gate: str, dtype: torch.dtype) -> None:
    """Under no_grad with the rows read in place (generation on CPU) the adapter skips the
    union and its gradient carriers: the output and every transfer count stay bitwise
    those of the forward that training runs."""
    mod = _module(dtype, gate)
    with torch.no_grad():  # values are zero at init: give the output something to show
        mod.store.values.normal_(generator=torch.Generator().manual_seed(3))
    for seed in range(3):  # fresh random inputs each time
        x = make_inputs(CASE, dtype, 40 + seed, lead=(2,))[0]
        before = dict(vars(mod.store.stats))
        trained = mod(x.clone().requires_grad_(True)).detach()
        counted = {k: v - before[k] for k, v in vars(mod.store.stats).items()
                   if isinstance(v, int)}
        before = dict(vars(mod.store.stats))
        with torch.no_grad():
            inferred = mod(x)
        assert torch.equal(inferred, trained)
        assert {k: v - before[k] for k, v in vars(mod.store.stats).items()
                if isinstance(v, int)} == counted
        assert counted["union_rows"] > 0 and counted["row_bytes_h2d"] > 0


def test_half_tables_route_in_float32_where_half_matmuls_are_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without native bf16 (meft.sysinfo.half_matmul_native) bf16 tables keep their
    storage and route in fp32: probing from the fp32 router product, candidates scored with
    the probed key blocks converted to fp32. The choice is the fp32 routing of the same
    (bf16-valued) keys, the output the definition's."""
    from meft import sysinfo

    monkeypatch.setitem(sysinfo._HALF_NATIVE, torch.bfloat16, False)
    _, keys, values, router, _ = make_inputs(CASE, torch.float32, 0)
    mod = OffloadedSparseAdapter(HostStore(keys.bfloat16(), values.bfloat16()),
                                 n_experts=CASE.experts, top_k=CASE.top_k,
                                 n_probe=CASE.n_probe, router=router, dtype=torch.float32)
    mod.counter = seen = _Ids()
    assert mod.store.keys.dtype == torch.bfloat16  # compact storage kept
    for seed in range(3):
        x = make_inputs(CASE, torch.float32, 50 + seed)[0]
        y = mod(x)
        scores, probes = (x @ router.T).topk(CASE.n_probe, dim=1)
        ids = select(x, mod.store.keys.float(), scores, probes, CASE.experts,
                     top_k=CASE.top_k)  # fp32 routing of the bf16-valued keys
        assert torch.equal(seen.ids[-1], ids)
        b = CASE.neurons // CASE.experts
        gsel = (x @ router.T).gather(1, ids // b)
        a = (mod.store.keys.float()[ids] * x.unsqueeze(1)).sum(-1)
        want = (torch.relu(gsel * a).unsqueeze(-1) * mod.store.values.float()[ids]).sum(1)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_half_matmul_native_is_decided_once_and_can_be_forced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from meft import sysinfo
    from meft.errors import ConfigError

    monkeypatch.setattr(sysinfo, "_HALF_NATIVE", {})
    for value, native in (("fp32", False), ("native", True)):
        monkeypatch.setenv("MEFT_HALF_MATMUL", value)
        sysinfo._HALF_NATIVE.clear()
        assert sysinfo.half_matmul_native(torch.bfloat16) is native
    monkeypatch.setenv("MEFT_HALF_MATMUL", "fp32")  # decided: the environment is not read again
    assert sysinfo.half_matmul_native(torch.bfloat16) is True
    monkeypatch.delenv("MEFT_HALF_MATMUL")
    sysinfo._HALF_NATIVE.clear()
    timed = sysinfo.half_matmul_native(torch.float16)  # measured: a bool either way
    assert isinstance(timed, bool) and {torch.float16: timed} == sysinfo._HALF_NATIVE
    monkeypatch.setenv("MEFT_HALF_MATMUL", "fast")
    sysinfo._HALF_NATIVE.clear()
    with pytest.raises(ConfigError, match="MEFT_HALF_MATMUL"):
        sysinfo.half_matmul_native(torch.bfloat16)
