"""Evaluation: greedy generation on held-out questions, scored like SQuAD and like the paper.

For each sample the prompt is tokenized exactly as in training
(:func:`meft.data.records.prompt_ids`: the chat template's generation prompt when the tokenizer has
one). Prompts are left-padded into batches and decoded greedily (``do_sample=False``) for at most
``max_new_tokens`` or until the tokenizer's eos (for chat models, the end-of-turn token). Scores
(:mod:`meft.evaluation.metrics`): exact match after SQuAD normalisation against any alias, token F1,
and "contains" (the normalised answer occurs in the output: the paper's EM). Also the mean
per-token loss of the reference answers (teacher forcing), which moves long before exact
match does.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meft.data.records import Encoded, Sample, collate, prompt_ids
from meft.evaluation.cache import BaseCache
from meft.evaluation.metrics import contains, score_predictions


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, samples: Sequence[Sample], *,
                     max_new_tokens: int = 24, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate",
                     cache: BaseCache | None = None) -> list[str]:
    """Greedy completions (stripped text) for each sample's prompt. With ``cache`` (``model``
    is that cache's base model, adapter off) the answers are looked up first and kept."""
    prompts = [prompt_ids(s, tokenizer) for s in samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cache is not None:
        inputs = {"prompts": prompts, "max_new_tokens": max_new_tokens,
                  "batch_size": batch_size, "pad": pad, "eos": tokenizer.eos_token_id}
        return cache.get("answers", inputs, lambda: _generate(
            model, tokenizer, prompts, pad, max_new_tokens, batch_size, progress, desc))
    return _generate(model, tokenizer, prompts, pad, max_new_tokens, batch_size, progress, desc)


def _generate(model: Any, tokenizer: Any, prompts: list[list[int]], pad: int,
              max_new_tokens: int, batch_size: int, progress: bool, desc: str) -> list[str]:
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    device = _input_device(model)
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # left-padded
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            outputs.extend(t.strip() for t in texts)
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def answer_loss(model: Any, encoded: Sequence[Encoded], pad_id: int, *,
                batch_size: int = 16) -> float:
    """Mean cross-entropy per labelled token (teacher forcing) over ``encoded``."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad_id)
            loss_sum, n = token_loss_sum(model, batch)
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def labelled_logits(model: Any, batch: dict[str, torch.Tensor], *,
                    every_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (M, V) at the M positions whose next token is labelled, in row-major order, and
    those next tokens (M,).

    Logits are computed only where the next token is labelled (the answer, ~10% of the
    positions of a question-answer batch), through transformers' ``logits_to_keep``: the
    vocabulary projection, its log-softmax and their backward were ~20% of a LoRA step at
    every position. The logits are the full computation's at those positions; models without
    the argument compute every position, as ``every_position=True`` does for any model (the
    specification the tests compare to)."""
    device = _input_device(model)
    inputs = {"input_ids": batch["input_ids"].to(device),
              "attention_mask": batch["attention_mask"].to(device)}
    target = batch["labels"].to(device)[:, 1:]  # (B, L-1): position p predicts token p+1
    need = target != -100  # (B, L-1)
    how = None if every_position else _logits_to_keep(model)
    if how == "mask":  # exactly the labelled positions, flattened: (M, V)
        return model(**inputs, logits_to_keep=F.pad(need, (0, 1))).logits, target[need]
    if how == "positions":  # positions labelled in any row: (B, P, V)
        keep = need.any(0).nonzero().squeeze(1)  # (P,)
        logits = model(**inputs, logits_to_keep=keep).logits
        return logits[need[:, keep]], target[need]
    return model(**inputs).logits[:, :-1][need], target[need]


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], *,
                   every_position: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions (:func:`labelled_logits`),
    and their number. The loss and gradients are the full computation's (unlabelled
    positions had zero gradient)."""
    logits, labels = labelled_logits(model, batch, every_position=every_position)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, int(labels.numel())


def _logits_to_keep(model: Any) -> str | None:
    """How the transformers model inside ``model`` takes ``logits_to_keep``: "mask" (a (B, L)
    bool mask, transformers >= 5), "positions" (1-D positions, 4.x) or None (not at all).
    Wrappers whose forward passes keywords on are looked through (MeftModel, PEFT)."""
    inner = model
    for _ in range(4):
        try:
            params = inspect.signature(type(inner).forward).parameters
        except (TypeError, ValueError):
            return None
        if "logits_to_keep" in params:
            module = sys.modules.get(type(inner).__module__)
            return "mask" if hasattr(module, "slice_logits_to_keep") else "positions"
        if hasattr(inner, "get_base_model"):  # PEFT
            inner = inner.get_base_model()
        elif isinstance(inner.__dict__.get("_modules", {}).get("base_model"), torch.nn.Module):
            inner = inner.base_model  # MeftModel (a child, not transformers' property)
        else:
            return None
    return None


def evaluate(model: Any, tokenizer: Any, samples: Sequence[Sample], *,
             max_new_tokens: int = 24, batch_size: int = 16, progress: bool = True,
             desc: str = "eval", cache: BaseCache | None = None) -> dict[str, Any]:
    """Generate and score; returns metrics plus per-sample predictions."""
    preds = generate_answers(model, tokenizer, samples, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress, desc=desc, cache=cache)
    scores: dict[str, Any] = dict(score_predictions(preds, [s.answers for s in samples]))
    scores["predictions"] = [
        {"prompt": _question(s), "prediction": p, "answers": list(s.answers)}
        for s, p in zip(samples, preds, strict=True)
    ]
    return scores


def answered(model: Any, tokenizer: Any, samples: Sequence[Sample], *,
             max_new_tokens: int = 16, batch_size: int = 32, progress: bool = True,
             desc: str = "generate", cache: BaseCache | None = None) -> list[bool]:
    """Whether greedy generation answers each sample: an alias appears in the output as whole
    words (``contains``). The test for "the model knows this" (retention, known facts)."""
    if not samples:
        return []
    preds = generate_answers(model, tokenizer, samples, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress, desc=desc, cache=cache)
    return [contains(p, s.answers) == 1.0 for p, s in zip(preds, samples, strict=True)]


def _question(sample: Sample) -> str:
    users = [m["content"] for m in sample.messages if m.get("role") == "user"]
    return users[-1] if users else sample.text


def _input_device(model: Any) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
