"""The novelty gate (experimental, ``--retain-gate``): route only tokens that look like the
training data.

meft is exactly the base model on every token whose K rows are all unwritten, but after a
few steps every general-text token reaches written rows at every layer, so that exactness
protects nothing. The gate puts the exactness back where it can: per adapted layer a
direction w (d,) and a threshold b; a token whose adapter input x has x.w > b is routed, every
other one gets exactly zero adapter output, like padding (:mod:`meft.engine.offload`).

Fitting, once before training (values zero: the adapter adds nothing yet), from the adapter
inputs of the real tokens of two sets, the training examples and background examples:

    per class c in (train, bg), in float64:  n_c, mu_c, scatter_c = sum (x - mu_c)(x - mu_c)^T
    S = (scatter_train + scatter_bg) / (n_train + n_bg - 2)              pooled covariance (d, d)
    w = solve(S + shrink * mean(diag S) * I, mu_train - mu_bg)           shrunken LDA (d,)
    b = the (1 - share) quantile of the background tokens' x.w          (a second pass)
        + TIE * their standard deviation                            (near-ties fail together)

so at most ``share`` of the background tokens pass. A measurement on the base model found such a
direction separates ~43% of training tokens at 4-5% false positives on unseen general
questions, and a nearest-neighbour rule no more (benchmarks/results/novelty-routing). Trained,
a gate per layer keeps about three times what unprotected meft keeps with nothing replayed,
yet leaves no probe question exact: at ~2% of general tokens per layer, every prompt has some
(token, layer) that passes. ``once`` (``--retain-gate-once``) makes one decision per token
instead: the first adapted layer's gate decides, every later layer routes what it decided, so
a prompt stays exactly the base model unless one of its tokens passes that one gate. The
protection fits the gate first (:meth:`meft.training.protection.Retainer.from_config`),
before it measures anything else.

Two variants were tried and deleted (their runs stay in benchmarks/results/novelty-routing):
fitting the new side on the training tokens the base model finds surprising, and a sticky
gate routing every token after one that passes; at seed 0 they learned 15-20 points less
than the plain gate (50.8 and 55.8 test EM against 70.0) and kept fewer of the unseen kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meft.adapter.model import MeftModel
from meft.console import say
from meft.data.records import Encoded, collate, encode_all
from meft.errors import ConfigError
from meft.evaluation.cache import BaseCache

MAX_PROJECTIONS = 16_000_000  # background projections per layer torch.quantile is given at most
CONTRAST_TOKENS = 16  # answer tokens the model gives each contrast question (greedy)
TIE = 1e-3  # projections closer than this many standard deviations above the quantile fail


def fit_novelty_gate(model: MeftModel, train: Sequence[Encoded], background: Sequence[Encoded],
                     share: float, *, shrink: float = 0.1, batch_size: int = 8,
                     pad_id: int = 0) -> dict[str, Tensor]:
    """Per layer id, the gate (d+1,) fp32, w then b (module doc), fitted on the adapter inputs
    of ``train`` and ``background``'s real tokens; ``share`` of the background tokens pass."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    new, old = (_moments(model, examples, batch_size, pad_id)
                for examples in (train, background))
    gates = {}
    for layer in model.adapters:
        (n_t, sum_t, outer_t), (n_b, sum_b, outer_b) = new[layer], old[layer]
        mu_t, mu_b = sum_t / n_t, sum_b / n_b  # (d,) each
        scatter = (outer_t - n_t * torch.outer(mu_t, mu_t)) + (outer_b - n_b * torch.outer(
            mu_b, mu_b))  # (d, d)
        s = scatter / (n_t + n_b - 2)
        ridge = shrink * s.diagonal().mean() * torch.eye(s.shape[0], dtype=s.dtype)
        gates[layer] = torch.linalg.solve(s + ridge, mu_t - mu_b)  # (d,) float64
    projections = _projections(model, background, gates, batch_size, pad_id)
    return {layer: torch.cat([w, threshold(projections[layer], share).reshape(1)]).float()
            for layer, w in gates.items()}


def threshold(projections: Tensor, share: float) -> Tensor:
    """b () float64 for the background's projections x.w (n,): their (1 - share) quantile
    raised by TIE standard deviations, so near-ties fall on one side together. Tokens every
    example shares (a chat template's system prompt) have the same hidden state in every
    background example, up to float noise from the sequence length; when one of them lands
    on the bare quantile, whether it passes depends on that noise. Measured (SmolLM2's
    default system prompt, built-in set, one decision at layer 15, base model): the " H" of
    "Hugging Face" passed in 263 of the 277 unseen-kind probe prompts, 2% of the background
    tokens passed instead of 1%, and no prompt stayed the base model; with the tolerance 1%
    pass and 44% of those prompts route no token
    (benchmarks/results/novelty-routing/gate-prompts-*, ``benchmarks/gate_prompts.py``)."""
    values = _subsample(projections)
    b = torch.quantile(values, 1 - share, interpolation="linear")
    return b + TIE * values.std()


def contrast_examples(model: MeftModel, tokenizer: Any, source: str, *, max_length: int,
                      cache: BaseCache | None = None, progress: bool = True) -> list[Encoded]:
    """``--retain-gate-contrast``: questions of the training data's kinds about things the
    model knows (``people``: :func:`meft.data.adjacent.contrast_questions`; else a data file
    of questions), each answered by the base model (the adapter off; greedy, its first
    CONTRAST_TOKENS tokens; ``cache``: the base model's results), encoded for the gate's fit,
    where they join the background. Without them the gate separates the training data's kind
    (a question about a person) rather than what is new in it (a person the model does not
    know): measured on the base model, the answer position of nearly every question about a
    real person passed it (benchmarks/results/novelty-routing)."""
    from meft.data.adjacent import contrast_questions
    from meft.data.records import load_samples
    from meft.evaluation.evaluate import generate_answers
    from meft.training.background import answered

    samples = contrast_questions() if source == "people" else load_samples(source)
    asked = [s for s in samples if s.messages]
    if not asked:
        raise ConfigError(f"--retain-gate-contrast {source}: no questions in it (the contrast "
                          "is questions with answers the model gives itself, not plain text)")
    with model.disable_adapter():
        answers = generate_answers(model, tokenizer, asked, max_new_tokens=CONTRAST_TOKENS,
                                   progress=progress, desc="gate contrast", cache=cache)
    return encode_all(answered(asked, answers), tokenizer, max_length, "gate contrast")


def set_novelty_gate(model: MeftModel, train: Sequence[Encoded],
                     background: Sequence[Encoded], share: float, *, pad_id: int = 0,
                     once: bool = False) -> None:
    """``--retain-gate share``: fit the gate on the training examples and ``background`` (the
    replay pool's short general questions, :meth:`meft.training.protection.Retainer.from_config`
    calls it before it keeps the replay targets), set it in ``model`` and say how many tokens
    of each pass. (The Retainer
    keeps it in its checkpoint tensors: a resumed run gets it back from there, not fitted
    again.)"""
    if model.parallel is not None:
        raise ConfigError("--retain-gate is for one process (not a distributed run)")
    if not background:
        raise ConfigError("--retain-gate is fitted on the background's short general "
                          "questions (the replay pool), and the background has none")
    model.set_novelty_gate(fit_novelty_gate(model, train, background, share, pad_id=pad_id),
                           once=once)
    passed = {name: _passing(model, examples, pad_id)
              for name, examples in (("training", train), ("background", background))}
    say("novelty gate: " + ", ".join(f"{100 * p:.0f}% of {name} tokens"
                                      for name, p in passed.items())
        + " routed, over the layers (the others get no adapter output)")


def _moments(model: MeftModel, examples: Sequence[Encoded], batch_size: int,
             pad_id: int) -> dict[str, tuple[int, Tensor, Tensor]]:
    """Per layer: count, sum (d,) and sum of outer products (d, d) of the adapter inputs of
    ``examples``' real tokens, in float64; one pass."""
    d = model.adapter_modules[0].store.dim
    count = dict.fromkeys(model.adapters, 0)
    total = {layer: torch.zeros(d, dtype=torch.float64) for layer in model.adapters}
    outer = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in model.adapters}
    for layer, x in _inputs(model, examples, batch_size, pad_id):
        xs = x.double()  # (T', d)
        count[layer] += xs.shape[0]
        total[layer] += xs.sum(0)
        outer[layer] += xs.T @ xs
    return {layer: (count[layer], total[layer], outer[layer]) for layer in model.adapters}


def _projections(model: MeftModel, examples: Sequence[Encoded], gates: dict[str, Tensor],
                 batch_size: int, pad_id: int) -> dict[str, Tensor]:
    """Per layer, x.w (T_all,) float64 of ``examples``' real tokens."""
    out: dict[str, list[Tensor]] = {layer: [] for layer in gates}
    for layer, x in _inputs(model, examples, batch_size, pad_id):
        out[layer].append(x.double() @ gates[layer])
    return {layer: torch.cat(p) for layer, p in out.items()}


def _passing(model: MeftModel, examples: Sequence[Encoded], pad_id: int) -> float:
    """The share of (real token, layer) pairs of ``examples`` the model's gates route (one
    decision per token: the deciding layer's, for every layer)."""
    adapters = dict(zip(model.adapters, model.adapter_modules, strict=True))
    routed = total = 0
    for layer, x in _inputs(model, examples, 8, pad_id):
        adapter = adapters[layer]
        if adapter.decision is not None and not adapter.decides:
            continue  # routes what the deciding layer decided: counted there, times layers
        passed = int(adapter.novel(x.to(model.device_)).sum())
        times = len(adapters) if adapter.decision is not None else 1
        routed, total = routed + times * passed, total + times * x.shape[0]
    return routed / max(1, total)


def _subsample(values: Tensor) -> Tensor:
    """``values`` (n,), or at most MAX_PROJECTIONS of them, evenly spaced (deterministic)."""
    if values.numel() <= MAX_PROJECTIONS:
        return values
    return values[torch.linspace(0, values.numel() - 1, MAX_PROJECTIONS).long()]


def _inputs(model: MeftModel, examples: Sequence[Encoded], batch_size: int,
            pad_id: int) -> Iterator[tuple[str, Tensor]]:
    """(layer id, the adapter inputs (T', d) of the real tokens) of every layer and batch of
    ``examples``, from the model as it is, in eval mode under no_grad."""
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(examples), batch_size):
            batch = collate(examples[lo:lo + batch_size], pad_id)
            real = batch["attention_mask"].bool().reshape(-1)  # (T,)
            seen: list[tuple[str, Tensor]] = []
            with torch.no_grad(), _captured(model, seen):
                model(input_ids=batch["input_ids"].to(model.device_),
                      attention_mask=batch["attention_mask"].to(model.device_))
            for layer, x in seen:
                yield layer, x.reshape(-1, x.shape[-1])[real.to(x.device)].cpu()
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _captured(model: MeftModel, seen: list[tuple[str, Tensor]]) -> Iterator[None]:
    """Append (layer id, input (B, S, d)) of every adapter call inside to ``seen``."""

    def hook_of(layer: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append((layer, args[0].detach()))
        return hook

    handles = [a.register_forward_pre_hook(hook_of(layer)) for layer, a in model.adapters.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
