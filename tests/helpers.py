"""Shared test helpers: tiny random models, random adapter inputs, and tie-aware comparison
against the reference. Fixtures built from these live in conftest.py; scripts/kill_resume.py
builds its model with :func:`save_tiny_llama` too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from meft.config import MeftConfig
from meft.data.records import Encoded

VOCAB = 97
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
# adapter flags for the tiny models (hidden size 32): N=64, K=4, E=8, P=2
TINY = ["--neurons", "64", "--top-k", "4", "--experts", "8", "--n-probe", "2"]


def tiny(arch: str = "llama", hidden: int = 32, layers: int = 3, vocab: int = VOCAB,
         **extra: object) -> nn.Module:
    """A small random causal LM (llama, qwen2 or gpt2), the same for the same arguments."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    model: nn.Module
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **extra))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **extra))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers,
                                           n_head=4, n_positions=64, bos_token_id=0,
                                           eos_token_id=1, **extra))
    return model.eval()


def tiny_for(tokenizer: object, layers: int = 2) -> nn.Module:
    """A tiny Llama whose vocabulary and special tokens fit ``tokenizer``."""
    return tiny("llama", layers=layers, vocab=len(tokenizer),  # type: ignore[arg-type]
                eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
                pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
                bos_token_id=None)


def save_tiny_llama(directory: Path) -> Path:
    """A tiny Llama and the tiny tokenizer saved as a model directory ``--model`` accepts."""
    from tokenizers_for_tests import make_tokenizer

    tok = make_tokenizer()
    tiny_for(tok).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def meft_config(**kw: object) -> MeftConfig:
    """An adapter config for the tiny models (N=64, K=8, E=8, P=2, seed 1)."""
    base: dict[str, object] = dict(neurons=64, top_k=8, experts=8, n_probe=2, seed=1)
    base.update(kw)
    return MeftConfig(**base)  # type: ignore[arg-type]


def logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # type: ignore[no-any-return]


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


def random_examples(n: int, seed: int, lo: int, hi: int) -> list[Encoded]:
    """``n`` examples of 5-8 random ids in [lo, hi), the first two without loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(lo, hi, (5 + i % 4,), generator=gen).tolist()
        out.append(Encoded(ids, [-100] * 2 + ids[2:], False))
    return out


def files(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` (not recursive) by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

