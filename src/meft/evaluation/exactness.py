"""How much ordinary text the trained rows reach: the quantity that keeps meft exact.

meft's values start at zero, and the lazy row-sparse optimizer changes only the rows a step
trained, so a row whose value is still all zeros adds exactly nothing, whatever its key. At one
adapted layer, a token whose K chosen rows are all unwritten gets exactly the base FFN output
there; a sequence none of whose tokens reaches a written row at any adapted layer gives exactly
the base model's logits, bit for bit (tested). Forgetting can only come from the other tokens:
the share of ordinary text that reaches written rows bounds where the model may differ.

:func:`reach` runs the model with its adapters over general text (the paragraphs the general
loss is measured on, :func:`meft.data.general.general_text_samples`, in windows of at most
``window`` tokens, one window per call, so no padding) and, for every adapted layer, marks each
token whose K rows are all unwritten (values row exactly zero). Notation: L adapted layers, T
tokens of a window, N rows per layer.

    written_rows           share of the L x N rows with a non-zero value
    untouched_token_layers share of the (token, layer) pairs whose K rows are all unwritten
    untouched_tokens       share of tokens untouched at every adapted layer
    exact_windows          share of windows untouched at every token and layer: these windows
                           are bitwise the base model's

A model without meft's tables (LoRA, full fine-tuning) has no rows: :func:`reach` returns None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from meft.evaluation.probe import general_windows


class _Reach:
    """An adapter's access counter (the ``Counter`` protocol of :mod:`meft.engine.offload`):
    per call, (T,) bool: the tokens whose K chosen rows are all unwritten (a token the
    novelty gate does not route reads no row)."""

    def __init__(self, written: Tensor) -> None:
        self.written = written  # (N,) bool
        self.calls: list[Tensor] = []

    def add(self, ids: Tensor, x: Tensor, keep: Tensor | None) -> None:
        untouched = ~self.written[ids.cpu()].any(1)  # (T',) from the routed tokens' ids (T', K)
        if keep is not None:  # (T,) the routed ones
            keep = keep.cpu()
            untouched = torch.ones(keep.shape[0], dtype=torch.bool).masked_scatter_(keep,
                                                                                   untouched)
        self.calls.append(untouched)


def written_rows(adapter: Any) -> Tensor:
    """(N,) bool: the rows of one adapter layer whose value is not all zeros."""
    values: Tensor = adapter.store.values
    return values.abs().amax(1) > 0


@torch.no_grad()
def reach(model: Any, tokenizer: Any, *, window: int = 256,
          windows: list[list[int]] | None = None) -> dict[str, Any] | None:
    """The shares of the module doc for ``model`` (a MeftModel) on ``windows`` (token id
    lists; default the general text's, :func:`meft.evaluation.probe.general_windows`), or
    None for a model without meft's rows."""
    adapters = list(getattr(model, "adapter_modules", []) or [])
    if not adapters:
        return None
    if windows is None:
        windows = [e.input_ids for e in general_windows(tokenizer, window)]
    previous = [a.counter for a in adapters]
    counters = [_Reach(written_rows(a)) for a in adapters]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pairs = tokens = exact = untouched_tokens = 0
    try:
        for a, c in zip(adapters, counters, strict=True):
            a.counter = c
        for ids in windows:
            for c in counters:
                c.calls.clear()
            model(input_ids=torch.tensor([ids], device=device))
            flags = torch.stack([torch.cat(c.calls) for c in counters])  # (L, T)
            pairs += int(flags.sum())
            every = flags.all(0)  # (T,)
            untouched_tokens += int(every.sum())
            exact += int(bool(every.all()))
            tokens += flags.shape[1]
    finally:
        for a, p in zip(adapters, previous, strict=True):
            a.counter = p
        model.train(was_training)
    n_rows = sum(a.n_neurons for a in adapters)
    return {
        "written_rows": sum(int(c.written.sum()) for c in counters) / n_rows,
        "untouched_token_layers": pairs / max(1, tokens * len(adapters)),
        "untouched_tokens": untouched_tokens / max(1, tokens),
        "exact_windows": exact / max(1, len(windows)),
        "windows": len(windows),
        "tokens": tokens,
    }
