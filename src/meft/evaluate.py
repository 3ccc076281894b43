"""Evaluation: greedy generation on held-out questions, scored like SQuAD and like the paper.

For each sample the prompt is what :func:`meft.data.prompt_text` renders (the chat template's
generation prompt when the tokenizer has one). Prompts are left-padded into batches and
decoded greedily (``do_sample=False``) for at most ``max_new_tokens``; the completion is cut
at the first newline-free end of turn the tokenizer knows (its eos). Scores
(:mod:`meft.metrics`): exact match after SQuAD normalisation against any alias, token F1, and
"contains" (the normalised answer occurs in the output: the paper's EM). Also the mean
per-token loss of the reference answers (teacher forcing), which moves long before exact
match does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meft.data import Encoded, Sample, collate, prompt_text
from meft.metrics import score_predictions


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, samples: Sequence[Sample], *,
                     max_new_tokens: int = 24, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy completions (stripped text) for each sample's prompt."""
    prompts = [prompt_text(s, tokenizer) for s in samples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            device = _input_device(model)
            out = model.generate(
                input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            outputs.extend(t.strip() for t in tokenizer.batch_decode(new,
                                                                      skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
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


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their number."""
    device = _input_device(model)
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def evaluate(model: Any, tokenizer: Any, samples: Sequence[Sample], *,
             max_new_tokens: int = 24, batch_size: int = 16, progress: bool = True,
             desc: str = "eval") -> dict[str, Any]:
    """Generate and score; returns metrics plus per-sample predictions."""
    preds = generate_answers(model, tokenizer, samples, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress, desc=desc)
    scores: dict[str, Any] = dict(score_predictions(preds, [s.answers for s in samples]))
    scores["predictions"] = [
        {"prompt": _question(s), "prediction": p, "answers": list(s.answers)}
        for s, p in zip(samples, preds, strict=True)
    ]
    return scores


def _question(sample: Sample) -> str:
    users = [m["content"] for m in sample.messages if m.get("role") == "user"]
    return users[-1] if users else sample.text


def _input_device(model: Any) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
