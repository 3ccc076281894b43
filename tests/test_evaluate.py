"""The training loss over labelled positions only, against the loss over every position."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers import meft_config as config
from helpers import tiny
from meft.adapter.model import get_meft_model
from meft.data.records import Encoded, collate
from meft.evaluation.evaluate import _logits_to_keep, token_loss_sum


def batch(seed: int = 0) -> dict[str, Tensor]:
    """Four examples of uneven length, labels on their last 2-5 tokens, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        ids = torch.randint(2, 97, (7 + 3 * i,), generator=gen).tolist()
        answer = 2 + i
        out.append(Encoded(ids, [-100] * (len(ids) - answer) + ids[-answer:], False))
    return collate(out, 0)


def reference(model: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Every position's logits, then the labelled ones: the specification."""
    return token_loss_sum(model, b, every_position=True)


class Positions4x(nn.Module):
    """A causal LM as transformers 4.x exposed it: ``logits_to_keep`` takes 1-D positions."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                logits_to_keep: int | Tensor = 0) -> Any:
        assert not isinstance(logits_to_keep, Tensor) or logits_to_keep.dim() == 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          logits_to_keep=logits_to_keep)


class NoKeep(nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))


def meft(model: nn.Module) -> nn.Module:
    m = get_meft_model(model, config())
    for s in m.stores:
        s.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return m


@pytest.mark.parametrize(("arch", "wrap", "how"), [
    ("llama", None, "mask"), ("gpt2", None, "mask"), ("qwen2", None, "mask"),
    ("llama", meft, "mask"), ("llama", lora, "mask"),
    ("llama", Positions4x, "positions"), ("llama", NoKeep, None)])
def test_labelled_logits_give_the_full_loss_and_gradients(arch: str, wrap: Any,
                                                          how: str | None) -> None:
    base = tiny(arch)
    for p in base.parameters():
        p.requires_grad_(True)
    model = wrap(base) if wrap is not None else base
    assert _logits_to_keep(model) == how
    b = batch()
    params = [p for p in model.parameters() if p.requires_grad]
    stores = getattr(model, "stores", []) if wrap is meft else []
    runs = []
    for fn in (token_loss_sum, reference):
        loss, n = fn(model, b)
        loss.backward()
        host = [t.grad.to_dense().clone() for s in stores for t in s.tables]
        runs.append((loss.detach(), n, [p.grad.clone() for p in params], host))
        model.zero_grad()
        for s in stores:
            s.zero_grad()
    (loss, n, g, h), (want, want_n, wg, wh) = runs
    assert n == want_n == 2 + 3 + 4 + 5
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(g + h, wg + wh, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    assert not stores or any(bool(x.abs().sum() > 0) for x in h)
