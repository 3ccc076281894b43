"""Forgetting protection: new facts go into neurons that general text does not use.

meft's values start at zero, so a neuron that was never updated adds nothing: the model is the
base model on every token whose K neurons are all untouched. Forgetting comes from rows that
training writes and general inputs then read. The protection adapts Sparse Memory Finetuning
(Lin et al. 2025, arXiv 2510.15103) to meft: each step updates only the rows most specific to
the step's tokens, measured against background text.

Notation: N neurons per layer, K neurons per token, T tokens, D background documents.

Background statistics, once before training when the protection reads them (the row
selection, hubs, the output penalty; replay alone, the default, skips the pass:
:func:`uses_statistics`), fixed, saved with every checkpoint (:class:`Background`): the
model with its adapter as training starts reads background text (generic text the user does
not train on; :mod:`meft.training.background`), and per adapter layer and neuron i counts

    C_bg(i)   accesses: tokens x K slots that chose i, padding excluded          (N,)
    df(i)     background documents (sequences) with at least one access to i     (N,)

(SMF counts batches of 1,000 pretraining sequences; with a few hundred short documents a
document is the finer unit.) Per optimizer step and layer, ``c(i)`` counts the step's accesses
over every micro-batch, padding excluded, and each accessed row is scored

    tfidf(i) = c(i) / sum_j c(j) * log((D + 1) / (df(i) + 1))
    kl(i)    = p(i) * log(p(i) / q(i)),  p = c / sum c,  q = (C_bg + 1) / sum (C_bg + 1)

(the KL score of arXiv 2605.03229). The gradient rows (keys and values) of the ``rows`` best
scored rows are kept; the others are dropped before clipping. The lazy row-sparse AdamW only
touches rows that have a gradient, so a dropped row keeps its value and both moments bit for
bit (no momentum drift, no weight decay). Every accessed row still takes part in the forward
pass; traffic is unchanged. ``keys=False`` drops every key gradient (values only, as SMF);
``router=False`` asks the trainer to freeze the routers, so with values only the rows every
input reads are fixed from the start and the background statistics stay exact.

Output penalty (``penalty`` > 0, with or without the selection; ``rows=0`` turns the
selection off): while measuring, the adapter inputs x of M background tokens per layer are kept
(M, d); each step adds ``penalty * mean |adapter(x)|^2`` over the next m of them per layer to
the loss. Values start at zero, so the adapter starts silent and the penalty starts at zero; it
pulls back only rows that background tokens read. The inputs are those of the model as
training starts (later layers' inputs drift as earlier adapters learn: an approximation that
keeps the penalty adapter-sized work, no base-model pass).

Replay (``replay`` > 0): each step also trains on ``replay`` background examples, the next
ones of a fixed shuffle of the replay pool (``--retain-replay-pool``: by default the shipped
background's short general questions, :func:`meft.training.background.replay_pool`; all of a
background of the user's own that has none of them; or the whole background), each cut after its
first ``REPLAY_TOKENS`` answer tokens (the ones a short answer is decided by; the background's
answers average ~36 tokens, and replaying them whole made a step 1.8x slower at R=4), adding
at weight 1 the mean over their answer positions of

    distill:  KL(q || p) over the top-R tokens of q and the rest as one bucket,
              q = the model's next-token distribution as training starts (kept, R = 32)
    answers:  -log p(answer token)  (cross-entropy on the background's own answers)

``distill`` keeps what the model did, zero and without gradient until the model moves (the
shipped background is the base model's own greedy answers, so cross-entropy on them would
also sharpen the model towards them, raising its loss on other text). Replay acts at the
answer positions of questions, where the other mechanisms do not look. meft's trainer adds
the replayed examples to the step's first forward (:meth:`Retainer.replay_examples`,
:meth:`Retainer.replay_loss`): one routing, one staging of the union of rows, one backward;
a separate pass staged nearly as many rows again. They are not counted in the step's
accesses, and their gradient, like the step's own, reaches only the rows the step may train
(never rows written before or hubs; with a selection, only the selected).
:meth:`Retainer.replay_backward` gives the same gradient in a pass of its own after the
selection (MeftTrainer uses it). The encoded examples and the kept distributions are saved
with the background statistics, so a resumed run replays the same.

Any model (``meft bench``'s ``lora:*+retain``, ``full+retain``): replay and rehearsal need
nothing of meft's, so a :class:`Retainer` also takes a model without meft's tables. It then has
no layers: nothing is counted (no background pass), selected or held, and the replay is the
same as meft's: the same examples in the same order, distilled towards what the model did as
training started, at the same weight, carried by the step's first forward. Row selection, the
output penalty, hubs, values-only updates and frozen routers are refused for it
(:func:`sparse_only` names the flags).

Continual learning: rows whose values are already non-zero when the protection starts (an
adapter trained before, ``meft train --adapter DIR``) are never trained, neither selected nor
pulled by the penalty (with the selection off too), so what the adapter learned before keeps
its rows (``written=False`` trains them like the others).

Novelty gate (``retain_gate`` > 0, experimental, :mod:`meft.training.gate`): fitted first,
on the training examples (``from_config(train=...)``) and the replay pool, so whatever is
measured next (the background statistics) counts only the tokens the gate routes: with a row
selection, the rows background text reaches through the gate. A model that already has a gate
(a later set of ``meft bench --sets``) keeps it.

Rehearsal (``rehearse`` > 0 and earlier training examples, ``meft train --rehearse FILE``):
the earlier data join the replay as a stream of their own, ``rehearse`` examples per step
(the next ones of their own fixed shuffle), distilled like the background's towards what the
model, with the adapter it starts from, did on them. Their loss is the mean over their own
answer positions, added at weight 1 beside the background's: what the earlier adapter
answered stays its answer while new facts go into any row. They are not background: the
access statistics do not count them.

Several processes (:mod:`meft.engine.distributed`): every rank reads the same background (a check
compares them), measures the same statistics and keeps the same distributions, all in the
same forwards (lockstep). The masks (rows written before, hubs, the selection) are global
(N,) on every rank, each rank dropping the gradient rows it owns; the step's access counts are
summed over ranks before scoring. Rank 0 carries the step's replay in its first forward (the
gradient rows then go to their owners with the others), so a run on W processes trains what
one process would. The output penalty is for one process.

Hubs (``hubs`` < 1): rows that at least that share of the background documents read
(df(i) >= hubs D) are never selected either. TF-IDF already scores them near zero and KL low,
but with few accessed rows in a step such a row can still make the top t, and writing a fact
into a row most general inputs read is the surest way to change the model on them. Off by
default until the sweep says it helps. With the selection off they are still never trained
by the step's own gradient; the output penalty may pull them back towards silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from meft.adapter.model import MeftModel
from meft.config import TrainConfig
from meft.console import say
from meft.data.records import Encoded, Sample, collate, encode_all, to_record
from meft.engine.distributed import DataParallel, ShardedSparseAdapter
from meft.errors import ConfigError, DataError, SerializationError
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import labelled_logits
from meft.training.background import replay_pool
from meft.training.gate import set_novelty_gate

if TYPE_CHECKING:
    from meft.engine.offload import OffloadedSparseAdapter

SCORES = ("tfidf", "kl")
PENALTY_INPUTS = 4096  # background tokens whose adapter inputs are kept, per layer (M)
PENALTY_TOKENS = 256  # of them, used per step and layer by the output penalty (m)
REPLAY_SEED = 0  # the fixed shuffle replay goes through
REPLAY_TOP = 32  # tokens of the kept next-token distribution per answer position (R)
REPLAY_TOKENS = 8  # answer tokens kept of each replayed example (the first ones)
REPLAY_TARGETS = ("distill", "answers")
PREFIX = "retain."  # tensor names in checkpoints: retain.<layer>.counts, retain.<layer>.df


class AccessCounter:
    """How often one layer's adapter chose each neuron, while counting is on.

    The adapter calls :meth:`add` with each forward's ids (T, K); ``docs`` (T,) gives each
    token its document (-1: padding, not counted). With ``track_docs`` the counter also counts,
    per neuron, the distinct documents that chose it."""

    def __init__(self, n_neurons: int) -> None:
        self.n = n_neurons
        self.counts = torch.zeros(n_neurons, dtype=torch.long)  # (N,)
        self.df = torch.zeros(n_neurons, dtype=torch.long)  # (N,)
        self.docs: Tensor | None = None  # (T,) while counting, else None: not counting
        self.track_docs = False
        self.capture: Tensor | None = None  # (T,) bool: keep these tokens' inputs
        self.captured: list[Tensor] = []  # kept inputs, (T_i, d) each

    def add(self, ids: Tensor, x: Tensor, keep: Tensor | None = None) -> None:
        """One forward's chosen ids (T', K) and inputs x (T', d) on the host, for the tokens
        ``keep`` (T,) bool of the call (the adapter routes real tokens only; None: all T)."""
        if self.docs is None:
            return
        docs, capture = self.docs, self.capture
        if keep is not None:
            keep = keep.cpu()
            if keep.shape[0] == docs.shape[0]:
                docs = docs[keep]
                capture = capture[keep] if capture is not None else None
        if docs.shape[0] != ids.shape[0]:
            raise ValueError(f"access counter: {ids.shape[0]} tokens routed, "
                             f"{docs.shape[0]} in the mask")
        if capture is not None:
            self.captured.append(x[capture].float().clone())
        valid = docs >= 0  # (T',)
        chosen = ids[valid]  # (T'', K)
        self.counts += torch.bincount(chosen.reshape(-1), minlength=self.n)
        if self.track_docs:
            pairs = docs[valid].unsqueeze(1) * self.n + chosen  # (T'', K)
            self.df += torch.bincount(torch.unique(pairs) % self.n, minlength=self.n)

    def reset(self) -> None:
        self.counts.zero_()
        self.df.zero_()


@dataclass
class Background:
    """Per layer (by adapter layer id): accesses C_bg (N,), document frequency df (N,) and,
    for the output penalty, the adapter inputs of up to M background tokens (M, d); for
    replay, the encoded background examples and, per answer position (M in all), the ids
    (M, R) and probabilities (M, R) of the model's R likeliest next tokens as training
    started."""

    counts: dict[str, Tensor]
    df: dict[str, Tensor]
    documents: int
    inputs: dict[str, Tensor] = field(default_factory=dict)
    examples: list[Encoded] = field(default_factory=list)
    top_ids: Tensor | None = None  # (M, R) int64
    top_p: Tensor | None = None  # (M, R) fp32
    rehearsal: int = 0  # the last ones of examples are earlier training data (rehearsal)

    @classmethod
    @torch.no_grad()
    def measure(cls, model: MeftModel | nn.Module, encoded: Sequence[Encoded], pad_id: int, *,
                batch_size: int = 16, progress: bool = True, keep_inputs: int = 0,
                seed: int = 0) -> Background:
        """Count the accesses of ``model``'s adapters over ``encoded`` (module doc); keep the
        adapter inputs of ``keep_inputs`` tokens drawn by ``seed`` (padding never drawn)."""
        lengths = torch.tensor([len(e.input_ids) for e in encoded])
        starts = torch.cumsum(lengths, 0) - lengths  # (D,) first global token of each
        total = int(lengths.sum())
        chosen = torch.zeros(total, dtype=torch.bool)
        if keep_inputs:
            gen = torch.Generator().manual_seed(seed)
            chosen[torch.randperm(total, generator=gen)[:keep_inputs]] = True
        layers = _layers(model)
        if not layers or not isinstance(model, MeftModel):  # no meft tables: nothing to count
            return cls({}, {}, len(encoded))
        previous = {k: a.counter for k, a in layers}
        counters = {k: AccessCounter(a.n_neurons) for k, a in layers}
        for k, a in layers:
            a.counter = counters[k]
        was_training = model.training
        model.eval()
        try:
            for c in counters.values():
                c.track_docs = True
            for lo in tqdm(range(0, len(encoded), batch_size), desc="background",
                           unit="batch", disable=not progress, dynamic_ncols=True):
                batch = collate(encoded[lo:lo + batch_size], pad_id)
                mask = batch["attention_mask"].bool()  # (B, L)
                docs = torch.arange(lo, lo + mask.shape[0]).unsqueeze(1).expand_as(mask)
                position = starts[lo:lo + mask.shape[0]].unsqueeze(1) + torch.arange(
                    mask.shape[1])  # (B, L) global token index
                capture = (mask & chosen[position.clamp_max(total - 1)]).reshape(-1)
                for c in counters.values():
                    c.capture = capture if keep_inputs else None
                with _counting(counters, torch.where(mask, docs, -1).reshape(-1)):
                    model(input_ids=batch["input_ids"].to(model.device_),
                          attention_mask=mask.long().to(model.device_))
        finally:
            model.train(was_training)
            for k, a in layers:
                a.counter = previous[k]
        inputs = ({k: torch.cat(c.captured) for k, c in counters.items()} if keep_inputs
                  else {})
        return cls({k: c.counts.clone() for k, c in counters.items()},
                   {k: c.df.clone() for k, c in counters.items()}, len(encoded), inputs)

    @torch.no_grad()
    def keep_distributions(self, model: Any, pad_id: int, *, batch_size: int = 16,
                           cache: BaseCache | None = None) -> None:
        """Keep ``model``'s R likeliest next tokens and their probabilities at every answer
        position of :attr:`examples` (the targets of distilling replay). ``cache``: given
        only when ``model`` computes its base model exactly (a fresh adapter adds 0), whose
        targets are then looked up first and kept (:mod:`meft.evaluation.cache`)."""
        if cache is not None:
            inputs = {"examples": [[e.input_ids, e.labels] for e in self.examples],
                      "pad": pad_id, "batch_size": batch_size, "top": REPLAY_TOP}

            def compute() -> dict[str, list[list[float]]]:
                self.keep_distributions(model, pad_id, batch_size=batch_size)
                assert self.top_ids is not None and self.top_p is not None
                return {"ids": self.top_ids.tolist(), "p": self.top_p.tolist()}

            kept = cache.get("replay_targets", inputs, compute)
            self.top_ids = torch.tensor(kept["ids"], dtype=torch.long)
            self.top_p = torch.tensor(kept["p"], dtype=torch.float32)
            return
        ids, ps = [], []
        was_training = model.training
        model.eval()
        try:
            for lo in range(0, len(self.examples), batch_size):
                logits, _ = labelled_logits(model, collate(self.examples[lo:lo + batch_size],
                                                           pad_id))  # (M_b, V)
                p, i = torch.softmax(logits.float(), -1).topk(REPLAY_TOP, -1)
                ids.append(i.cpu())
                ps.append(p.cpu())
        finally:
            model.train(was_training)
        self.top_ids, self.top_p = torch.cat(ids), torch.cat(ps)

    def tensors(self) -> dict[str, Tensor]:
        out = {f"{PREFIX}documents": torch.tensor([self.documents])}
        for layer in self.counts:
            out[f"{PREFIX}{layer}.counts"] = self.counts[layer]
            out[f"{PREFIX}{layer}.df"] = self.df[layer]
            if layer in self.inputs:
                out[f"{PREFIX}{layer}.inputs"] = self.inputs[layer]
        if self.examples:  # flat ids and labels, and each example's length
            out[f"{PREFIX}replay.lengths"] = torch.tensor([len(e.input_ids)
                                                           for e in self.examples])
            out[f"{PREFIX}replay.input_ids"] = torch.tensor(
                [i for e in self.examples for i in e.input_ids], dtype=torch.long)
            out[f"{PREFIX}replay.labels"] = torch.tensor(
                [y for e in self.examples for y in e.labels], dtype=torch.long)
            if self.rehearsal:
                out[f"{PREFIX}replay.rehearsal"] = torch.tensor([self.rehearsal])
        if self.top_ids is not None and self.top_p is not None:
            out[f"{PREFIX}replay.top_ids"] = self.top_ids
            out[f"{PREFIX}replay.top_p"] = self.top_p
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], layers: Sequence[str]) -> Background:
        try:
            examples = []
            if f"{PREFIX}replay.lengths" in tensors:
                lengths = tensors[f"{PREFIX}replay.lengths"].tolist()
                ids = tensors[f"{PREFIX}replay.input_ids"].split(lengths)
                labels = tensors[f"{PREFIX}replay.labels"].split(lengths)
                examples = [Encoded(i.tolist(), y.tolist(), False)
                            for i, y in zip(ids, labels, strict=True)]
            measured = [k for k in layers if f"{PREFIX}{k}.counts" in tensors]  # or none
            return cls({k: tensors[f"{PREFIX}{k}.counts"].long() for k in measured},
                       {k: tensors[f"{PREFIX}{k}.df"].long() for k in measured},
                       int(tensors[f"{PREFIX}documents"].item()),
                       {k: tensors[f"{PREFIX}{k}.inputs"] for k in layers
                        if f"{PREFIX}{k}.inputs" in tensors}, examples,
                       tensors.get(f"{PREFIX}replay.top_ids"), tensors.get(f"{PREFIX}replay.top_p"),
                       int(tensors.get(f"{PREFIX}replay.rehearsal", torch.zeros(1)).item()))
        except KeyError as e:
            raise SerializationError(f"background statistics {e.args[0]} missing (a checkpoint "
                                     "trained without --retain?)") from None


def row_scores(counts: Tensor, bg_counts: Tensor, df: Tensor, documents: int,
               score: str) -> Tensor:
    """Scores (N,) of one layer's rows from the step's accesses ``counts`` (N,) (module doc);
    rows not accessed score -inf."""
    c = counts.double()
    p = c / c.sum().clamp_min(1)
    if score == "tfidf":
        out = p * torch.log((documents + 1) / (df.double() + 1))
    elif score == "kl":
        q = (bg_counts.double() + 1) / (bg_counts.double() + 1).sum()
        out = p * torch.log(p.clamp_min(1e-300) / q)
    else:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return out.masked_fill(counts == 0, -math.inf)


def hub_rows(df: Tensor, documents: int, share: float) -> Tensor:
    """(N,) bool: the rows at least ``share`` of the background documents read (none for a
    share above 1)."""
    return df.double() >= share * max(1, documents)


def _keep(grad: Any, allowed: Tensor) -> None:
    """Drop the gradient rows of ``grad`` (a RowSparseGrad) whose id ``allowed`` (N,) bool
    marks false; nothing is copied when every touched row is allowed."""
    keep = allowed[grad.ids]
    if not bool(keep.all()):
        grad.keep_(keep)


def distill_loss(logits: Tensor, top_ids: Tensor, top_p: Tensor) -> Tensor:
    """Mean over M positions of KL(q || p) on R + 1 buckets: the R tokens ``top_ids`` (M, R)
    with q = ``top_p`` (M, R), and everything else as one (q = 1 - sum top_p); p = softmax of
    ``logits`` (M, V). Zero, with zero gradient, where p equals the distribution q came
    from."""
    logp = torch.log_softmax(logits.float(), -1).gather(1, top_ids)  # (M, R)
    q = top_p.float()
    q_rest = (1 - q.sum(1)).clamp_min(0)  # (M,)
    p_rest = (1 - logp.exp().sum(1)).clamp_min(1e-12)  # (M,)
    kl = (torch.xlogy(q, q) - q * logp).sum(1) + torch.xlogy(q_rest, q_rest) \
        - q_rest * p_rest.log()
    return kl.mean()


def top_rows(scores: Tensor, rows: int) -> Tensor:
    """Ids of the ``rows`` best finite scores, ties to the lower id (deterministic)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    n = min(rows, int(torch.isfinite(scores).sum()))
    return order[:n]


def uses_statistics(config: TrainConfig) -> bool:
    """Whether ``config``'s protection reads the background statistics (the row selection,
    hubs, the output penalty's inputs); replay alone does not, and skips measuring them (a
    forward pass over the whole background: 2-3.5 minutes of the default job)."""
    return config.retain_rows > 0 or config.retain_hubs < 1 or config.retain_penalty > 0


def sparse_only(config: TrainConfig) -> list[str]:
    """The flags of ``config`` that ask for protection only a sparse memory has (row
    selection, output penalty, hubs, values only, frozen routers, rows written before kept,
    the novelty gate):
    a method without meft's tables refuses them (:class:`Retainer`)."""
    asked = {"--retain-rows": config.retain_rows > 0,
             "--retain-penalty": config.retain_penalty > 0,
             "--retain-hubs": config.retain_hubs < 1,
             "--retain-update": config.retain_update != "keys+values",
             "--retain-router": config.retain_router != "trained",
             "--retain-written": config.retain_written == "keep",
             "--retain-gate": config.retain_gate > 0}
    return [flag for flag, on in asked.items() if on]


class Retainer:
    """The protection during training: counts each step's accesses (:meth:`watch`), then keeps
    the gradients of the selected rows only (:meth:`select_`).

    ``model`` may be any causal LM without meft's tables (LoRA, full fine-tuning: what
    ``meft bench`` compares): it then has no layers to count, select or hold, and the
    protection is replay and rehearsal alone, exactly as meft's (the same examples in the
    same order, the same targets kept from the model as training starts, the same weight)."""

    def __init__(self, model: MeftModel | nn.Module, background: Background | None, *,
                 score: str = "tfidf", rows: int = 512, keys: bool = True,
                 router: bool = True, penalty: float = 0.0,
                 penalty_tokens: int = PENALTY_TOKENS, hubs: float = 1.0, replay: int = 0,
                 replay_target: str = "distill", written: bool = True, rehearse: int = 0,
                 replay_weight: float = 1.0, pad_id: int = 0,
                 gate_once: bool = False) -> None:
        if replay_target not in REPLAY_TARGETS:
            raise ValueError(f"replay_target must be one of {REPLAY_TARGETS}, got "
                             f"{replay_target!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if (rows < 0 or penalty < 0 or penalty_tokens < 1 or replay < 0 or rehearse < 0
                or not replay_weight > 0):
            raise ValueError(f"rows, penalty, replay and rehearse must be >= 0, penalty_tokens "
                             f">= 1, replay_weight > 0, got rows={rows}, penalty={penalty}, "
                             f"replay={replay}, rehearse={rehearse}, penalty_tokens="
                             f"{penalty_tokens}, replay_weight={replay_weight}")
        self.parallel: DataParallel | None = getattr(model, "parallel", None)
        if not _layers(model) and (rows or penalty or hubs < 1 or not keys or not router):
            raise ConfigError("row selection, the output penalty, hubs, values-only updates "
                              "and frozen routers need meft's sparse tables; this model has "
                              "none (replay and rehearsal work for any model)")
        if self.parallel is not None and penalty:
            raise ConfigError("--retain-penalty is for one process (a distributed run shards "
                              "the rows it would pull back)")
        self.model = model
        self.background = background
        self.score, self.rows, self.keys, self.router = score, rows, keys, router
        self.penalty, self.penalty_tokens = penalty, penalty_tokens
        self.hubs = hubs
        self.replay, self.replay_target, self.pad_id = replay, replay_target, pad_id
        self.replay_weight = replay_weight
        self.rehearse = rehearse
        self.gate_once = gate_once  # a resumed run's gate (restore) decides once per token
        self.counters = _attach(model)
        # rows an earlier run wrote (values start at zero): never selected, so what the
        # adapter already learned stays as it was (continual learning); written=False trains
        # them like the others
        self.protected = {layer: self._written(a) if written
                          else torch.zeros(a.n_neurons, dtype=torch.bool)
                          for layer, a in _layers(model)}  # (N,) each, on every rank
        self.allowed: dict[str, Tensor] = {}  # per layer (N,): the rows this step may train

    def _written(self, adapter: OffloadedSparseAdapter) -> Tensor:
        """(N,) bool: the rows of ``adapter`` with non-zero values (over every rank's)."""
        mine = adapter.store.values.abs().amax(1) > 0  # (rows this rank holds,)
        if not isinstance(adapter, ShardedSparseAdapter):
            return mine
        assert self.parallel is not None
        lo, hi = adapter.plan.rows
        every = torch.zeros(adapter.n_neurons, dtype=torch.int32)
        every[lo:hi] = mine.to(torch.int32)
        return self.parallel.sum_tensor(every) > 0

    def tensors(self) -> dict[str, Tensor]:
        """What a checkpoint keeps of the protection: the background statistics and, per
        layer, the rows written before it started (``retain.<layer>.protected``, (N,) uint8:
        a resumed run must not count the rows it wrote itself as an earlier adapter's) and
        the novelty gate fitted as it started (``retain.<layer>.gate``, (d+1,), if any: a
        resumed run's model is built from the run's recorded config, which has none)."""
        out = self.background.tensors() if self.background is not None else {}
        out.update({f"{PREFIX}{layer}.protected": mask.to(torch.uint8)
                    for layer, mask in self.protected.items()})
        out.update({f"{PREFIX}{layer}.gate": a.novelty.cpu() for layer, a in _layers(self.model)
                    if a.novelty is not None})
        return out

    def restore(self, tensors: dict[str, Tensor]) -> None:
        """Continue from :meth:`tensors` (a checkpoint written before the protected rows were
        saved keeps the ones found at start)."""
        self.background = Background.from_tensors(tensors, list(self.protected))
        for layer in self.protected:
            if f"{PREFIX}{layer}.protected" in tensors:
                self.protected[layer] = tensors[f"{PREFIX}{layer}.protected"].bool()
        gates = {layer: tensors[f"{PREFIX}{layer}.gate"] for layer in self.protected
                 if f"{PREFIX}{layer}.gate" in tensors}
        if gates:
            assert isinstance(self.model, MeftModel)
            self.model.set_novelty_gate(gates, once=self.gate_once)

    @contextlib.contextmanager
    def watch(self, attention_mask: Tensor) -> Iterator[None]:
        """Count the accesses of the forwards inside (``attention_mask`` (B, L): 0 = pad)."""
        mask = attention_mask.reshape(-1).cpu()
        with _counting(self.counters, torch.where(mask.bool(), 0, -1)):
            yield

    @torch.no_grad()
    def select_(self) -> list[int]:
        """Drop the gradient rows outside each layer's selection (``rows`` 0: no selection, but
        rows written before and hubs are still dropped, and ``keys=False`` still drops every key
        gradient); reset the counts; return the rows kept per layer."""
        if self.background is None:
            raise RuntimeError("Retainer.select_ before the background statistics exist")
        bg = self.background
        kept = []
        for layer, adapter in _layers(self.model):
            counter = self.counters[layer]
            allowed = ~self.protected[layer]  # (N,) rows this step may train
            if self.hubs < 1:
                allowed &= ~hub_rows(bg.df[layer], bg.documents, self.hubs)
            if self.rows:
                counts = (counter.counts if self.parallel is None  # every rank's tokens
                          else self.parallel.sum_tensor(counter.counts))
                scores = row_scores(counts, bg.counts[layer], bg.df[layer],
                                    bg.documents, self.score).masked_fill_(~allowed, -math.inf)
                chosen = torch.zeros(counter.n, dtype=torch.bool)
                chosen[top_rows(scores, self.rows)] = True
            else:  # no selection: every accessed row but the protected ones and the hubs
                chosen = allowed
            self._train_only(adapter, chosen)
            self.allowed[layer] = chosen
            kept.append(len(adapter.store.value_grad))
            counter.reset()
        if self.parallel is not None:  # each rank kept the rows it owns
            kept = self.parallel.sum_tensor(torch.tensor(kept, dtype=torch.long)).tolist()
        return kept

    def before_clip(self, step: int, replay_loss: float | None = None) -> dict[str, Any]:
        """A step's protection, after its backward passes and before clipping: the row
        selection (:meth:`select_`), then the replay's (unless the step's forward carried it:
        ``replay_loss`` is then its loss) and the output penalty's gradients
        (:meth:`replay_backward`, :meth:`penalty_backward`). Returns what the step's metrics
        record: the rows kept per layer, the penalty and the replay loss."""
        kept = self.select_()
        replay = self.replay_backward(step) if replay_loss is None else replay_loss
        return {"retained_rows_per_layer": kept, "retain_penalty": self.penalty_backward(step),
                "retain_replay_loss": replay}

    def _train_only(self, adapter: OffloadedSparseAdapter, allowed: Tensor) -> None:
        """Drop ``adapter``'s gradient rows outside ``allowed`` (N,) bool, and every key
        gradient when only values train."""
        if isinstance(adapter, ShardedSparseAdapter):  # its store holds its own rows only
            lo, hi = adapter.plan.rows
            allowed = allowed[lo:hi]
        _keep(adapter.store.value_grad, allowed)
        if self.keys:
            _keep(adapter.store.key_grad, allowed)
        else:
            adapter.store.key_grad.zero_()

    def _hold_written(self, adapter: OffloadedSparseAdapter, layer: str) -> None:
        """After a protection term's backward: drop its gradient on rows written before."""
        self._train_only(adapter, ~self.protected[layer])

    @property
    def replayed(self) -> int:
        """Examples replayed per step: the background's and the earlier data's."""
        return sum(self._counts())

    def _counts(self) -> tuple[int, int]:
        """(background, rehearsal) examples replayed per step: each stream only if it has
        examples (a background with none and no replay asked is no error)."""
        bg = self.background
        return self.replay, (self.rehearse if bg is not None and bg.rehearsal else 0)

    def replay_order(self) -> Tensor:
        """The fixed shuffle (D,) background replay goes through."""
        bg = self.background
        return _shuffle(len(bg.examples) - bg.rehearsal if bg is not None else 0, REPLAY_SEED)

    def replay_examples(self, step: int) -> tuple[list[Encoded], Tensor]:
        """The examples replayed at step ``step``: ``replay`` background examples (the next
        ones of :meth:`replay_order`), then ``rehearse`` earlier ones (the next ones of their
        own shuffle); and their indices in the background's examples (R,), for
        :meth:`replay_loss`."""
        bg = self.background
        examples = bg.examples if bg is not None else []
        if not examples:
            raise RuntimeError("replay needs the encoded background examples")
        assert bg is not None
        n_bg = len(examples) - bg.rehearsal
        n_bg_step, n_re_step = self._counts()
        parts = []
        if n_bg_step:
            if not n_bg:
                raise RuntimeError("background replay needs background examples")
            parts.append(self.replay_order()[(torch.arange(n_bg_step) + step * n_bg_step)
                                             % n_bg])
        if n_re_step:
            picks = (torch.arange(n_re_step) + step * n_re_step) % bg.rehearsal
            parts.append(n_bg + _shuffle(bg.rehearsal, REPLAY_SEED + 1)[picks])
        chosen = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return [examples[int(i)] for i in chosen], chosen

    def replay_loss(self, logits: Tensor, labels: Tensor, chosen: Tensor) -> Tensor:
        """The replay loss (module doc) from the logits (M_r, V) at the answer positions of
        the examples ``chosen`` (:meth:`replay_examples`), in their order, and their answer
        tokens (M_r,): per stream (background, rehearsal) the mean over its positions, summed."""
        bg = self.background
        assert bg is not None
        first = int((chosen < len(bg.examples) - bg.rehearsal).sum())  # background's, in front
        split = sum(bg.examples[int(i)].target_tokens for i in chosen[:first])
        total = logits.new_zeros((), dtype=torch.float32)
        for rows, sel, weight in ((slice(None, split), chosen[:first], self.replay_weight),
                                  (slice(split, None), chosen[first:], 1.0)):
            if sel.numel():
                total = total + weight * self._stream_loss(logits[rows], labels[rows], sel)
        return total

    def _stream_loss(self, logits: Tensor, labels: Tensor, chosen: Tensor) -> Tensor:
        """One stream's replay loss: mean over its answer positions."""
        if self.replay_target == "answers":
            return F.cross_entropy(logits.float(), labels, reduction="sum") / max(
                1, labels.numel())
        bg = self.background
        if bg is None or bg.top_ids is None or bg.top_p is None:
            raise RuntimeError("distilling replay needs the kept distributions "
                               "(Background.keep_distributions)")
        starts = self._replay_starts()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen.tolist()])
        return distill_loss(logits, bg.top_ids[rows].to(logits.device),
                            bg.top_p[rows].to(logits.device))

    def replay_backward(self, step: int) -> float:
        """Add the gradient of the replay loss of step ``step``'s examples in a pass of their
        own (the step's forward did not carry them), after :meth:`select_`: only the rows it
        let train get it, as in one backward with the step's. Returns the loss."""
        if not self.replayed:
            return 0.0
        if self.parallel is not None:  # after the gradient rows went to their owners
            raise RuntimeError("across processes the replay rides in rank 0's forward "
                               "(meft.training.trainer)")
        examples, chosen = self.replay_examples(step)
        logits, labels = labelled_logits(self.model, collate(examples, self.pad_id))
        loss = self.replay_loss(logits, labels, chosen)
        loss.backward()
        for layer, adapter in _layers(self.model):  # as if the step's forward carried them
            self._train_only(adapter, self.allowed.get(layer, ~self.protected[layer]))
        return float(loss.detach())

    def _replay_starts(self) -> list[int]:
        """Each example's first row in the kept distributions, and the total (D + 1,)."""
        assert self.background is not None
        counts = [e.target_tokens for e in self.background.examples]
        return [0, *torch.tensor(counts).cumsum(0).tolist()]

    def trained_routers(self, routers: dict[str, Tensor]) -> dict[str, Tensor]:
        """The routers an optimizer should train: all, or none with frozen routers (their
        gradients then switched off)."""
        if self.router:
            return routers
        for router in routers.values():
            router.requires_grad_(False)
        return {}

    def penalty_backward(self, step: int) -> float:
        """Add the gradient of ``penalty * mean_t |adapter(x_t)|^2`` over ``penalty_tokens``
        cached background inputs per layer (the next ones in order, from ``step``): the
        adapter is pulled back towards silence on background text. Returns the penalty."""
        if not self.penalty:
            return 0.0
        if self.background is None or not self.background.inputs:
            raise RuntimeError("the output penalty needs background inputs (keep_inputs)")
        total = 0.0
        for layer, adapter in _layers(self.model):
            xs = self.background.inputs[layer]  # (M, d)
            idx = (torch.arange(self.penalty_tokens) + step * self.penalty_tokens) % xs.shape[0]
            y = adapter(xs[idx].to(adapter.device))  # (m, d)
            loss = self.penalty * y.pow(2).sum(-1).mean()
            loss.backward()
            self._hold_written(adapter, layer)
            total += float(loss.detach())
        return total

    @classmethod
    def from_config(cls, model: MeftModel | nn.Module, config: TrainConfig,
                    background: Sequence[Sample] | None, tokenizer: Any, *,
                    progress: bool = True,
                    rehearsal: Sequence[Sample] | None = None,
                    cache: BaseCache | None = None,
                    train: Sequence[Encoded] | None = None) -> Retainer:
        """The protection ``config`` asks for (``retain_*`` fields); its statistics measured
        now over ``background`` samples, or None: restored from a checkpoint later.
        ``rehearsal``: earlier training data to rehearse (``config.retain_rehearse`` per
        step). ``cache``: the base model's results (the replay targets of a fresh adapter).
        ``train``: the training examples, which ``config.retain_gate`` fits the novelty gate
        on (with the replay pool) before anything is measured, so the statistics count only
        the tokens it routes (:mod:`meft.training.gate`; a model whose gate is already set,
        e.g. by an earlier set of a continual run, keeps it)."""
        stats = None
        rehearsal = rehearsal if config.retain_rehearse else None
        if background is not None:
            encoded = encode_all(background, tokenizer, config.max_length, "background")
            pool_examples: list[Encoded] = []
            if config.retain_replay or config.retain_gate:  # the gate is fitted on them
                pool = (replay_pool(background) if config.retain_replay_pool ==
                        "questions" else range(len(background)))
                # (encoded drops what truncation left without an answer: not index-aligned)
                replayed = encoded if len(pool) == len(background) else encode_all(
                    [background[i] for i in pool], tokenizer, config.max_length,
                    "replayed background")
                pool_examples = [e.first_targets(REPLAY_TOKENS) for e in replayed]
                _some_left(replayed, "replayed background", config.max_length, "--retain-replay 0")
            if (config.retain_gate and isinstance(model, MeftModel)
                    and all(a.novelty is None for a in model.adapter_modules)):
                if train is None:
                    raise ValueError("retain_gate: the novelty gate is fitted on the training "
                                     "examples; pass train=")
                set_novelty_gate(model, train, pool_examples, config.retain_gate,
                                 pad_id=tokenizer.pad_token_id or 0,
                                 once=config.retain_gate_once)
            if uses_statistics(config):
                stats = Background.measure(model, encoded, tokenizer.pad_token_id,
                                           progress=progress, seed=config.seed,
                                           keep_inputs=PENALTY_INPUTS if config.retain_penalty
                                           else 0)
            else:  # replay alone (the default) reads no access counts: no background pass
                stats = Background({}, {}, len(encoded))
            stats.examples = pool_examples
            if rehearsal:
                earlier = encode_all(rehearsal, tokenizer, config.max_length, "rehearsal")
                _some_left(earlier, "--rehearse", config.max_length, "--retain-rehearse 0")
                stats.examples += [e.first_targets(REPLAY_TOKENS) for e in earlier]
                stats.rehearsal = len(earlier)
            if (stats.examples and config.retain_replay_target == "distill"
                    and (config.retain_replay or rehearsal)):
                stats.keep_distributions(model, tokenizer.pad_token_id or 0,
                                         cache=cache if _computes_base(model) else None)
        return cls(model, stats, score=config.retain_score, rows=config.retain_rows,
                   keys=config.retain_update == "keys+values",
                   router=config.retain_router == "trained", penalty=config.retain_penalty,
                   hubs=config.retain_hubs, replay=config.retain_replay,
                   replay_target=config.retain_replay_target,
                   written=_keeps_written(config.retain_written, rehearsal),
                   rehearse=config.retain_rehearse, replay_weight=config.retain_replay_weight,
                   pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                   gate_once=config.retain_gate_once)

    def summary(self) -> str:
        bg = self.background
        docs = f"{bg.documents} background documents" if bg is not None else "no background"
        parts = "keys and values" if self.keys else "values only"
        router = "routers trained" if self.router else "routers frozen"
        written = sum(int(p.sum()) for p in self.protected.values())
        kept = f", {written} rows written earlier kept as they are" if written else ""
        selection = (f"{self.score} over {docs}, top {self.rows} rows per layer and step"
                     if self.rows else f"every row trains, {docs}")
        penalty = (f", output penalty {self.penalty:g} on {self.penalty_tokens} background "
                   "tokens per layer and step" if self.penalty else "")
        if self.hubs < 1:
            penalty += f", rows {self.hubs:g} of the background reads never trained"
        how = ("distilled: their next-token distributions kept" if self.replay_target ==
               "distill" else "trained on their answers")
        n_bg, n_re = self._counts()
        if n_bg:
            pool = f" of {len(bg.examples) - bg.rehearsal}" if bg is not None else ""
            penalty += f", {n_bg}{pool} background examples replayed per step ({how})"
        if n_re:
            assert bg is not None
            penalty += f", {n_re} of {bg.rehearsal} earlier examples rehearsed per step"
        if not self.protected:  # no sparse tables: replay alone
            return f"forgetting protection: replay{penalty}"
        return (f"forgetting protection: {selection}, {parts}, {router}{penalty}{kept}")


def protection(model: MeftModel, tokenizer: Any,
               background: str | Path | Sequence[Sample] | None = None, *,
               config: TrainConfig | None = None, progress: bool = True,
               rehearse: str | Path | Sequence[Sample] | None = None,
               cache: BaseCache | None = None,
               train: Sequence[Encoded] | None = None) -> Retainer:
    """``meft train``'s default forgetting protection for a training loop of your own (pass it
    to ``MeftTrainer(retainer=...)``): ``config``'s ``retain_*`` settings (default: meft train's
    defaults), measured on ``background`` (a file ``--data`` reads, samples, or None: the base
    model's own answers to the shipped prompts, generated once and cached; meft.training.background)
    with the adapter as it is now. ``rehearse``: the data an adapter you go on from was trained
    on (a file or samples), replayed to keep what it learned. ``train``: the encoded
    training examples, needed with ``config.retain_gate`` (the novelty gate is fitted on
    them). Call it before training."""
    from meft.data.records import load_samples
    from meft.training.background import load_background

    config = config if config is not None else TrainConfig()
    if background is None or isinstance(background, (str, Path)):
        with model.disable_adapter():
            # replay alone draws only the short general questions: generate only those
            background, desc = load_background(
                background, model.base_model, tokenizer, progress=progress, cache=cache,
                questions_only=(not uses_statistics(config) and config.retain_replay_pool
                                == "questions"))
        say(f"background: {desc}")
    if isinstance(rehearse, (str, Path)):
        rehearse = load_samples(rehearse)
    if model.parallel is not None:  # the statistics are measured in forwards every rank runs
        _same_on_every_rank(model.parallel, [*background, *(rehearse or [])])
    return Retainer.from_config(model, config, list(background), tokenizer,
                                progress=progress,
                                rehearsal=list(rehearse) if rehearse is not None else None,
                                cache=cache, train=train)


def _computes_base(model: Any) -> bool:
    """Whether ``model`` computes exactly its base model: a meft model whose values are all
    zero (a fresh adapter adds exactly 0 to every block)."""
    stores = getattr(model, "stores", None) or []
    return bool(stores) and not any(bool(s.values.any()) for s in stores)


def _some_left(encoded: Sequence[Encoded], what: str, max_length: int, off: str) -> None:
    """Stop before training when truncation left ``what`` no example to replay."""
    if not encoded:
        raise DataError(f"--max-length {max_length}: every {what} example lost its answer to "
                        f"truncation; raise --max-length (or {off})")


def _digest(samples: Sequence[Sample]) -> float:
    """48 bits of the samples' SHA-256 as a float (exact in float64, and summed over ranks)."""
    digest = hashlib.sha256(json.dumps([to_record(s) for s in samples]).encode()).hexdigest()
    return float(int(digest[:12], 16))


def _same_on_every_rank(parallel: DataParallel, samples: Sequence[Sample]) -> None:
    """Stop, on every rank, unless every rank has the same background and rehearsal samples
    (else their forwards would not pair up)."""
    mine = _digest(samples)
    if parallel.sum([mine])[0] != mine * parallel.world:
        raise ConfigError("the background or rehearsal text differs between the processes of "
                          "this run: give every process the same --background and --rehearse "
                          "files")


def _shuffle(n: int, seed: int) -> Tensor:
    """A replay stream's fixed order (n,): the same for every step and every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _keeps_written(setting: str, rehearsal: Sequence[Sample] | None) -> bool:
    """Whether rows an earlier adapter wrote stay as they are (``--retain-written``): auto
    keeps them unless earlier data are rehearsed (rehearsal keeps what they hold, and frozen
    they leave new data few rows: benchmarks/results/continual-learning)."""
    return setting == "keep" or (setting == "auto" and not rehearsal)


def _layers(model: MeftModel | nn.Module) -> list[tuple[str, OffloadedSparseAdapter]]:
    """meft's adapter layers of ``model`` (by layer id); none for a model without them."""
    if not isinstance(model, MeftModel):
        return []
    return list(zip(model.adapters, model.adapter_modules, strict=True))


def _attach(model: MeftModel | nn.Module) -> dict[str, AccessCounter]:
    """A fresh counter in every adapter of ``model`` (replacing any earlier one)."""
    counters = {}
    for layer, adapter in _layers(model):
        counters[layer] = adapter.counter = AccessCounter(adapter.n_neurons)
    return counters


@contextlib.contextmanager
def _counting(counters: dict[str, Any], docs: Tensor) -> Iterator[None]:
    for c in counters.values():
        c.docs = docs
    try:
        yield
    finally:
        for c in counters.values():
            c.docs = None
