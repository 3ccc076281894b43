"""get_meft_model / MeftModel on tiny random Llama, Qwen2 and GPT-2 models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import IDS, logits, tiny
from helpers import meft_config as config
from meft.adapter.model import (
    AdapterMismatchError,
    MeftModel,
    UnsupportedModelError,
    find_decoder_layers,
    get_meft_model,
)
from meft.adapter.serialization import SerializationError
from meft.config import ConfigError, MeftConfig
from meft.engine.offload import TokenMask
from meft.engine.optim import RowSparseAdamW

ARCHS = ["llama", "qwen2", "gpt2"]


def perturb(model: MeftModel) -> None:
    gen = torch.Generator().manual_seed(5)
    for store in model.stores:
        store.values.normal_(0, 0.5, generator=gen)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_initialisation(arch: str) -> None:
    base = tiny(arch)
    want = logits(base)
    model = get_meft_model(base, config())
    assert torch.equal(logits(model), want)
    assert model.layer_ids == [0, 1, 2]
    assert all(not p.requires_grad for p in model.base_model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_adapter_equals_base_and_enabled_differs(arch: str) -> None:
    base = tiny(arch)
    want = logits(base)
    model = get_meft_model(base, config())
    perturb(model)
    assert not torch.allclose(logits(model), want)
    with model.disable_adapter():
        assert torch.equal(logits(model), want)
    assert not torch.allclose(logits(model), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_change_only_the_adapter(arch: str) -> None:
    base = tiny(arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_meft_model(base, config())
    keys0 = [s.keys.clone() for s in model.stores]
    values0 = [s.values.clone() for s in model.stores]
    routers0 = [r.detach().clone() for r in model.router_parameters()]
    host = RowSparseAdamW([t for s in model.stores for t in s.tables], lr=1e-2)
    dev = torch.optim.AdamW(model.router_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        host.step()
        dev.step()
        host.zero_grad()
        dev.zero_grad()
        losses.append(out.loss.item())
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(a, b.values) for a, b in zip(values0, model.stores, strict=True))
    # keys (and routers, through the product gate) move once values are non-zero
    assert any(not torch.equal(a, b.keys) for a, b in zip(keys0, model.stores, strict=True))
    assert any(not torch.equal(a, b.detach())
               for a, b in zip(routers0, model.router_parameters(), strict=True))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_gives_identical_logits(arch: str, tmp_path: Path) -> None:
    model = get_meft_model(tiny(arch), config())
    perturb(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["neurons"] == 64 and saved["hidden_size"] == 32 and saved["layers"] == [0, 1, 2]
    loaded = MeftModel.from_pretrained(tiny(arch), tmp_path / "adapter")
    assert torch.equal(logits(loaded), want)


def test_sharded_save_round_trip(tmp_path: Path) -> None:
    model = get_meft_model(tiny("llama"), config(neurons=128, experts=16))
    perturb(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "a", max_shard_bytes=20_000)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "adapter_model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 2
    assert torch.equal(logits(MeftModel.from_pretrained(tiny("llama"), tmp_path / "a")), want)


def test_saving_into_a_directory_keeps_what_else_is_there(tmp_path: Path) -> None:
    """A Trainer's output directory holds checkpoints: saving the adapter there replaces only
    the adapter's own files (and drops shards a smaller save no longer needs)."""
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    model = get_meft_model(tiny("llama"), config(neurons=128, experts=16))
    perturb(model)
    model.save_pretrained(out, max_shard_bytes=20_000)
    assert sum(p.name.startswith("adapter_model-") for p in out.iterdir()) > 2
    model.save_pretrained(out)  # one file now: the shards and their index go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-2",
                     "notes.txt"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert torch.equal(logits(MeftModel.from_pretrained(tiny("llama"), out)), logits(model))


def test_subset_of_layers_and_generate() -> None:
    model = get_meft_model(tiny("qwen2", layers=4), config(layers=[1, -1]))
    assert model.layer_ids == [1, 3]
    perturb(model)
    out = model.generate(input_ids=IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    with pytest.raises(ConfigError, match="out of range"):
        get_meft_model(tiny("qwen2", layers=2), config(layers=[5]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_is_not_routed(arch: str) -> None:
    """A padded batch gives each sequence the logits it gets alone, routes only its real
    tokens (the byte counters see no padding) and the adapter adds nothing at padded
    positions; the mask may also come positionally."""
    model = get_meft_model(tiny(arch), config())
    perturb(model)
    lengths = [12, 7]
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    hidden: list[torch.Tensor] = []
    handle = model.adapters["1"].register_forward_hook(lambda m, a, out: hidden.append(out))
    with torch.no_grad():
        batched = model(input_ids=IDS, attention_mask=mask).logits
        assert sum(s.stats.tokens for s in model.stores) == 3 * sum(lengths)
        assert torch.equal(hidden[0][1, 7:], torch.zeros_like(hidden[0][1, 7:]))
        assert hidden[0][1, :7].abs().sum() > 0
        names = list(inspect.signature(model.base_model.forward).parameters)
        before = [None] * (names.index("attention_mask") - 1)
        positional = model.base_model(IDS, *before, mask).logits
        for b, n in enumerate(lengths):
            alone = model(input_ids=IDS[b:b + 1, :n]).logits[0]
            torch.testing.assert_close(batched[b, :n], alone, rtol=1e-5, atol=1e-5)
    handle.remove()
    torch.testing.assert_close(positional, batched, rtol=0, atol=0)
    assert model.tokens.mask is None  # only while a call is in progress


def test_a_call_without_mask_after_a_padded_call_routes_every_token() -> None:
    """Block inputs reuse freed memory: a later call without a mask must not take an earlier
    padded call's decision for an input that happens to sit at the same address."""
    model = get_meft_model(tiny("llama"), config())
    perturb(model)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        for _ in range(4):
            model(input_ids=IDS, attention_mask=mask)
            for s in model.stores:
                s.stats.reset()
            assert torch.equal(model(input_ids=IDS).logits, want)
            assert sum(s.stats.tokens for s in model.stores) == 3 * IDS.numel()


def test_token_mask_serves_a_recomputed_block_its_forward_decision() -> None:
    """Where checkpointing reruns a block's hooks in backward (transformers 4.x checkpoints
    ``__call__``), the block's input is the forward's tensor or a detached view of it."""
    tokens = TokenMask()
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    tokens.begin(mask)
    keep = tokens.for_block(0, hidden)
    assert keep is not None and keep.tolist() == mask.reshape(-1).bool().tolist()
    assert tokens.for_block(1, torch.randn(2, 5, 4)) is not None
    tokens.end()
    assert tokens.for_block(0, hidden.detach()) is keep  # the recomputation
    assert tokens.for_block(0, torch.randn(2, 5, 4)) is None  # another input
    assert tokens.for_block(2, hidden) is None  # another block
    tokens.begin(None)  # a later call without a mask, perhaps at the same address
    assert tokens.for_block(0, hidden) is None
    tokens.end()


@pytest.mark.parametrize("reentrant", [False, True])
def test_padding_under_gradient_checkpointing(reentrant: bool) -> None:
    """Blocks recomputed in backward route the tokens their forward routed: gradients (host
    rows and routers) equal those without checkpointing."""
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    grads = []
    for checkpointing in (False, True):
        base = tiny("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        base.train()
        model = get_meft_model(base, config())
        perturb(model)
        out = model(input_ids=IDS, attention_mask=mask).logits
        (out[:, :-1].logsumexp(-1) * mask[:, :-1]).sum().backward()
        grads.append([t.grad.to_dense() for s in model.stores for t in s.tables]
                     + [r.grad for r in model.router_parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_left_padded_batch_generates_what_each_prompt_generates_alone() -> None:
    """Generation with a KV cache: each step's new tokens are the mask's last columns."""
    model = get_meft_model(tiny("llama"), config())
    perturb(model)
    prompts = [IDS[0, :8], IDS[1, :5]]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 8 - len(p):], mask[b, 8 - len(p):] = p, 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
        assert torch.equal(out[b, 8:], alone[0, len(p):])


def test_adapter_for_another_model_is_refused(tmp_path: Path) -> None:
    get_meft_model(tiny("llama", hidden=32), config()).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="hidden size 32"):
        MeftModel.from_pretrained(tiny("llama", hidden=48), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="3 decoder layers"):
        MeftModel.from_pretrained(tiny("llama", layers=2), tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="no such adapter directory"):
        MeftModel.from_pretrained(tiny("llama"), tmp_path / "missing")


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    get_meft_model(tiny("llama"), config()).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(SerializationError, match="refusing pickle"):
        MeftModel.from_pretrained(tiny("llama"), tmp_path / "a")


def test_unsupported_model_names_what_was_looked_for() -> None:
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="mlp, feed_forward, ffn"):
        get_meft_model(NoLayers(), config())


def test_decoder_layers_found_by_structure() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 8)])
            self.blocks = nn.ModuleList([Block() for _ in range(3)])

    net = Net()
    assert find_decoder_layers(net) is net.blocks


def test_config_validation_and_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must divide"):
        MeftConfig(neurons=100, experts=7)
    with pytest.raises(ConfigError, match="top_k"):
        MeftConfig(neurons=64, experts=32, top_k=10, n_probe=2)
    with pytest.raises(ConfigError, match="init_std must be a positive number, got 0"):
        MeftConfig(init_std=0)
    with pytest.raises(ConfigError, match="gate must be one of product, none, got 'max'"):
        MeftConfig(gate="max")
    with pytest.raises(ConfigError, match="host_dtype"):
        MeftConfig(host_dtype="int8")
    assert MeftConfig(neurons=4096).experts == 256
    (tmp_path / "adapter_config.json").write_text(json.dumps({"neurons": 64, "bogus": 1}))
    with pytest.raises(ConfigError, match="unknown field"):
        MeftConfig.load(tmp_path)
