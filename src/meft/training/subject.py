"""Subject routing (issue 37, in progress: the fit and the decision, applied to a model with
:meth:`~meft.adapter.model.MeftModel.route_positions`; not yet in training's options or saved
with the adapter): decide once per sequence, at the subject, whether it is new.

Every per-token gate (:mod:`meft.training.gate`) decides on what a token looks like, and at
the position that produces an answer a question about an invented person looks like the same
question about a real one. Where they differ is the name: the base model's middle layers
enrich the last token of a name it knows, and a linear direction there tells held-out
invented people from held-out real ones almost perfectly (benchmarks/results/novelty-routing,
name-novelty-*). Simulated on the base model, the rule below routes every test prompt and
every training answer position and 2-3% of the adjacent kinds' prompts (subject-routing-*).

Letters: B sequences, T positions, d the hidden size, L the deciding layer.

Fit, once before training, on the base model (adapter off), from the real tokens of the
training examples and of background examples (replay pool and contrast):

    surprise_t = -log p_base(token_t | tokens_<t)      (T,), 0 at t = 0
    new = {x_L(t) : surprise_t > tau} over the training tokens                   (n_new, d)
    old = {x_L(t)} over the background tokens                                     (n_old, d)
    w = solve(S + shrink * mean(diag S) * I, mean(new) - mean(old))   shrunken LDA (d,)
    b = meft.training.gate.threshold(old @ w, share)       at most ``share`` of old passes

x_L is the input of block L's MLP (what an adapter there reads). Without naming anything,
``tau`` picks the tokens the base model cannot predict: in the built-in set mostly the
invented names' pieces.

Decision, per sequence, on the base model's states (so it never drifts with training, and a
sequence none of whose positions passes is exactly the base model at every layer):

    passes = x_L @ w > b  on real tokens                  (B, T) bool
    routed[t] = passes[0] or ... or passes[t]              (B, T) cumulative, pads never

:func:`decide` computes it with a pre-pass through blocks 0..L-1 only (no gradient, adapter
off), so that every adapted layer, below L as well, can route by it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from meft.adapter.model import MeftModel, find_decoder_layers, find_mlp
from meft.data.records import Encoded, collate
from meft.errors import ConfigError
from meft.training.gate import threshold

SURPRISE = 4.0  # nats: a training token above it is on the new side (tau)
SHARE = 0.001  # background tokens passing
SHRINK = 1.0  # LDA shrinkage, a multiple of the mean variance


class _Stop(Exception):
    """Raised by the deciding block's hook: the pre-pass needs nothing above it."""


def fit_subject_router(model: MeftModel, train: Sequence[Encoded],
                       background: Sequence[Encoded], *, layer: int, share: float = SHARE,
                       tau: float = SURPRISE, shrink: float = SHRINK, batch_size: int = 8,
                       pad_id: int = 0) -> Tensor:
    """The router (d+1,) fp32, w then b (module doc), at block ``layer`` of the base model."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    new = [x[s > tau] for x, s in _states(model, train, layer, batch_size, pad_id,
                                          surprise=True)]
    old = [x for x, _ in _states(model, background, layer, batch_size, pad_id)]
    a, b_ = torch.cat(new).double(), torch.cat(old).double()  # (n_new, d), (n_old, d)
    if len(a) < 2:
        raise ConfigError(f"--retain-subject: only {len(a)} training tokens have surprise "
                          f"above {tau} nats (the base model predicts the rest): nothing new "
                          "to route by")
    centred = torch.cat([a - a.mean(0), b_ - b_.mean(0)])
    s = centred.T @ centred / (len(centred) - 2)  # (d, d)
    ridge = shrink * s.diagonal().mean() * torch.eye(s.shape[0], dtype=s.dtype)
    w = torch.linalg.solve(s + ridge, a.mean(0) - b_.mean(0))  # (d,)
    return torch.cat([w, threshold(b_ @ w, share).reshape(1)]).float()


def routed(passes: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T) bool: a real position is routed when it or an earlier real one passes."""
    real = attention_mask.bool()
    return torch.cummax((passes & real).int(), dim=1).values.bool() & real


def decide(model: MeftModel, router: Tensor, layer: int, input_ids: Tensor,
           attention_mask: Tensor) -> Tensor:
    """(B, T) bool, the routed positions of ``input_ids`` (B, T): the base model's states at
    block ``layer``'s MLP input, from a pre-pass that stops there."""
    w, b = router[:-1], router[-1]
    with (torch.no_grad(), model.disable_adapter(), _captured(model, layer) as seen,
          contextlib.suppress(_Stop)):
        model(input_ids=input_ids, attention_mask=attention_mask)
    x = seen[0]  # (B, T, d)
    return routed(x.float() @ w.to(x.device) > b.to(x.device), attention_mask.to(x.device))


def positions(model: MeftModel, router: Tensor, layer: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The decision as :meth:`MeftModel.route_positions` takes it: ``model.route_positions(
    positions(model, router, layer))`` routes every call by :func:`decide`."""
    return lambda input_ids, mask: decide(model, router, layer, input_ids, mask)


def token_surprise(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(B, T) fp32: -log p(token_t | tokens_<t) from ``logits`` (B, T, V); 0 at t = 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    out[:, 1:] = -logp.gather(2, input_ids[:, 1:, None]).squeeze(2)
    return out


def _states(model: MeftModel, examples: Sequence[Encoded], layer: int, batch_size: int,
            pad_id: int, *, surprise: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Per example: block ``layer``'s MLP inputs (T, d) fp32 on the base model, and (with
    ``surprise``, else zeros) each token's surprise (T,); a full pass when surprise is asked
    (the logits), else one that stops at the layer."""
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            batch = collate(chunk, pad_id)
            ids = batch["input_ids"].to(model.device_)
            mask = batch["attention_mask"].to(model.device_)
            logits = None
            with (torch.no_grad(), model.disable_adapter(),
                  _captured(model, layer, stop=not surprise) as seen, contextlib.suppress(_Stop)):
                logits = model(input_ids=ids, attention_mask=mask).logits
            scores = token_surprise(logits, ids) if logits is not None else None
            for i, e in enumerate(chunk):
                n = len(e.input_ids)
                yield (seen[0][i, :n].float().cpu(),
                       scores[i, :n].cpu() if scores is not None else torch.zeros(n))
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _captured(model: MeftModel, layer: int, *, stop: bool = True) -> Iterator[list[Tensor]]:
    """Within: block ``layer``'s MLP input (B, T, d) of the next call lands in the list;
    with ``stop`` the call then ends (``_Stop``)."""
    blocks = find_decoder_layers(model.base_model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer}: the model has blocks 0..{len(blocks) - 1}")
    mlp = find_mlp(blocks[layer])
    assert mlp is not None  # an adaptable model has an MLP in every block
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> None:
        seen.append((args[0] if args else next(iter(kwargs.values()))).detach())
        if stop:
            raise _Stop

    handle = mlp.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
