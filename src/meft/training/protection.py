"""Forgetting protection: replay, rehearsal, the rows an earlier adapter wrote, the gate.

meft's values start at zero, so a neuron that was never updated adds nothing: the model is the
base model on every token whose K neurons are all untouched. Forgetting comes from rows that
training writes and general inputs then read.

Sparse Memory Finetuning's recipe (Lin et al. 2025, arXiv 2510.15103: per step, train only
the rows most specific to the step's tokens by TF-IDF or KL against background accesses,
values only, frozen routers) was built here with hubs (rows most background documents read,
never trained) and an output penalty (the adapter's output on background tokens pulled
towards zero), measured and deleted: on a fresh adapter with random keys it learned 0-57 test
EM and kept 7-22% of what the base model answered, and the penalty halved learning
(benchmarks/results/forgetting-protection, retain-sweep; the code: git show 8bacb91). SMF
works on a memory layer pretrained with its model, where ordinary text already has rows of its
own; meft's keys are random, so fact tokens and ordinary tokens share rows.

Notation: N neurons per layer, K neurons per token, T tokens, D background documents.

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
a separate pass staged nearly as many rows again. Their gradient, like the step's own, never
reaches rows written before. :meth:`Retainer.replay_backward` gives the same gradient in a
pass of its own (MeftTrainer uses it). The encoded examples and the kept distributions are
saved with every checkpoint (:class:`Background`), so a resumed run replays the same.

Any model (``meft bench``'s ``lora:*+retain``, ``full+retain``): replay and rehearsal need
nothing of meft's, so a :class:`Retainer` also takes a model without meft's tables. It then has
no layers: no row is held, and the replay is the same as meft's: the same examples in the
same order, distilled towards what the model did as training started, at the same weight,
carried by the step's first forward. Keeping written rows and the novelty gate are refused
for it (:func:`sparse_only` names the flags).

Continual learning: rows whose values are already non-zero when the protection starts (an
adapter trained before, ``meft train --adapter DIR``) are never trained: their gradient rows
are dropped before clipping, and the lazy row-sparse AdamW leaves a row without a gradient
bit for bit as it was, so what the adapter learned before keeps its rows (``written=False``
trains them like the others).

Novelty gate (``retain_gate`` > 0, experimental, :mod:`meft.training.gate`): fitted first,
on the training examples (``from_config(train=...)``) and the replay pool, before the replay
targets are kept (a fresh adapter adds nothing either way). A model that already has a gate
(a later set of ``meft bench --sets``) keeps it.

Rehearsal (``rehearse`` > 0 and earlier training examples, ``meft train --rehearse FILE``):
the earlier data join the replay as a stream of their own, ``rehearse`` examples per step
(the next ones of their own fixed shuffle), distilled like the background's towards what the
model, with the adapter it starts from, did on them. Their loss is the mean over their own
answer positions, added at weight 1 beside the background's: what the earlier adapter
answered stays its answer while new facts go into any row.

Several processes (:mod:`meft.engine.distributed`): every rank reads the same background (a
check compares them) and keeps the same distributions, in the same forwards (lockstep). The
mask of rows written before is global (N,) on every rank, each rank dropping the gradient rows
it owns. Rank 0 carries the step's replay in its first forward (the gradient rows then go to
their owners with the others), so a run on W processes trains what one process would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meft.adapter.model import MeftModel
from meft.config import TrainConfig
from meft.console import say
from meft.data.records import Encoded, Sample, collate, encode_all, to_record
from meft.engine.distributed import DataParallel, ShardedSparseAdapter
from meft.errors import ConfigError, DataError, SerializationError
from meft.evaluation.cache import BaseCache
from meft.evaluation.evaluate import labelled_logits
from meft.training.background import replay_pool
from meft.training.gate import contrast_examples, set_novelty_gate
from meft.training.subject import fit_subject_router, positions

if TYPE_CHECKING:
    from meft.engine.offload import OffloadedSparseAdapter

REPLAY_SEED = 0  # the fixed shuffle replay goes through
REPLAY_TOP = 32  # tokens of the kept next-token distribution per answer position (R)
REPLAY_TOKENS = 8  # answer tokens kept of each replayed example (the first ones)
REPLAY_TARGETS = ("distill", "answers")
PREFIX = "retain."  # tensor names in checkpoints: retain.replay.*, retain.<layer>.*


@dataclass
class Background:
    """What replay needs, saved with every checkpoint: the number of background documents,
    the encoded examples replayed (the background's, then any rehearsed ones) and, per answer
    position (M in all), the ids (M, R) and probabilities (M, R) of the model's R likeliest
    next tokens as training started."""

    documents: int
    examples: list[Encoded] = field(default_factory=list)
    top_ids: Tensor | None = None  # (M, R) int64
    top_p: Tensor | None = None  # (M, R) fp32
    rehearsal: int = 0  # the last ones of examples are earlier training data (rehearsal)

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
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Background:
        try:
            examples = []
            if f"{PREFIX}replay.lengths" in tensors:
                lengths = tensors[f"{PREFIX}replay.lengths"].tolist()
                ids = tensors[f"{PREFIX}replay.input_ids"].split(lengths)
                labels = tensors[f"{PREFIX}replay.labels"].split(lengths)
                examples = [Encoded(i.tolist(), y.tolist(), False)
                            for i, y in zip(ids, labels, strict=True)]
            return cls(int(tensors[f"{PREFIX}documents"].item()), examples,
                       tensors.get(f"{PREFIX}replay.top_ids"), tensors.get(f"{PREFIX}replay.top_p"),
                       int(tensors.get(f"{PREFIX}replay.rehearsal", torch.zeros(1)).item()))
        except KeyError as e:
            raise SerializationError(f"protection state {e.args[0]} missing (a checkpoint "
                                     "trained without --retain?)") from None


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


def sparse_only(config: TrainConfig) -> list[str]:
    """The flags of ``config`` that ask for protection only a sparse memory has (rows written
    before kept, the novelty gate): a method without meft's tables refuses them
    (:class:`Retainer`)."""
    asked = {"--retain-written": config.retain_written == "keep",
             "--retain-gate": config.retain_gate > 0,
             "--retain-subject": config.retain_subject > 0}
    return [flag for flag, on in asked.items() if on]


class Retainer:
    """The protection during training: after a step's backward passes, drops the gradient rows
    of rows written before and adds the replay's gradient (:meth:`before_clip`).

    ``model`` may be any causal LM without meft's tables (LoRA, full fine-tuning: what
    ``meft bench`` compares): it then has no layers to hold, and the protection is replay and
    rehearsal alone, exactly as meft's (the same examples in the same order, the same targets
    kept from the model as training starts, the same weight)."""

    def __init__(self, model: MeftModel | nn.Module, background: Background | None, *,
                 replay: int = 0, replay_target: str = "distill", written: bool = True,
                 rehearse: int = 0, replay_weight: float = 1.0, pad_id: int = 0,
                 gate_once: bool = False, subject: Tensor | None = None,
                 subject_layer: int = 0) -> None:
        if replay_target not in REPLAY_TARGETS:
            raise ValueError(f"replay_target must be one of {REPLAY_TARGETS}, got "
                             f"{replay_target!r}")
        if replay < 0 or rehearse < 0 or not replay_weight > 0:
            raise ValueError(f"replay and rehearse must be >= 0, replay_weight > 0, got "
                             f"replay={replay}, rehearse={rehearse}, "
                             f"replay_weight={replay_weight}")
        self.parallel: DataParallel | None = getattr(model, "parallel", None)
        self.model = model
        self.background = background
        self.replay, self.replay_target, self.pad_id = replay, replay_target, pad_id
        self.replay_weight = replay_weight
        self.rehearse = rehearse
        self.gate_once = gate_once  # a resumed run's gate (restore) decides once per token
        # subject routing (meft.training.subject): its router (d+1,) and deciding block
        self.subject, self.subject_layer = subject, subject_layer
        # rows an earlier run wrote (values start at zero): never trained, so what the
        # adapter already learned stays as it was (continual learning); written=False trains
        # them like the others
        self.protected = {layer: self._written(a) if written
                          else torch.zeros(a.n_neurons, dtype=torch.bool)
                          for layer, a in _layers(model)}  # (N,) each, on every rank

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
        """What a checkpoint keeps of the protection: the replay's (:class:`Background`) and,
        per layer, the rows written before it started (``retain.<layer>.protected``, (N,) uint8:
        a resumed run must not count the rows it wrote itself as an earlier adapter's) and
        the novelty gate fitted as it started (``retain.<layer>.gate``, (d+1,), if any: a
        resumed run's model is built from the run's recorded config, which has none)."""
        out = self.background.tensors() if self.background is not None else {}
        out.update({f"{PREFIX}{layer}.protected": mask.to(torch.uint8)
                    for layer, mask in self.protected.items()})
        out.update({f"{PREFIX}{layer}.gate": a.novelty.cpu() for layer, a in _layers(self.model)
                    if a.novelty is not None})
        if self.subject is not None:
            out[f"{PREFIX}subject"] = self.subject.cpu()
        return out

    def restore(self, tensors: dict[str, Tensor]) -> None:
        """Continue from :meth:`tensors` (a checkpoint written before the protected rows were
        saved keeps the ones found at start)."""
        self.background = Background.from_tensors(tensors)
        for layer in self.protected:
            if f"{PREFIX}{layer}.protected" in tensors:
                self.protected[layer] = tensors[f"{PREFIX}{layer}.protected"].bool()
        gates = {layer: tensors[f"{PREFIX}{layer}.gate"] for layer in self.protected
                 if f"{PREFIX}{layer}.gate" in tensors}
        if gates:
            assert isinstance(self.model, MeftModel)
            self.model.set_novelty_gate(gates, once=self.gate_once)
        if f"{PREFIX}subject" in tensors:
            assert isinstance(self.model, MeftModel) and self.subject_layer
            self.subject = tensors[f"{PREFIX}subject"].float()
            self.model.route_positions(positions(self.model, self.subject, self.subject_layer))

    @torch.no_grad()
    def hold_written(self) -> list[int]:
        """Drop the gradient rows of rows written before; return the rows left per layer."""
        kept = []
        for layer, adapter in _layers(self.model):
            self._train_only(adapter, ~self.protected[layer])
            kept.append(len(adapter.store.value_grad))
        if self.parallel is not None:  # each rank kept the rows it owns
            kept = self.parallel.sum_tensor(torch.tensor(kept, dtype=torch.long)).tolist()
        return kept

    def before_clip(self, step: int, replay_loss: float | None = None) -> dict[str, Any]:
        """A step's protection, after its backward passes and before clipping: the replay's
        gradient (unless the step's forward carried it: ``replay_loss`` is then its loss,
        :meth:`replay_backward`), then the rows written before held (:meth:`hold_written`).
        Returns what the step's metrics record: the rows trained per layer and the replay
        loss."""
        replay = self.replay_backward(step) if replay_loss is None else replay_loss
        return {"retained_rows_per_layer": self.hold_written(), "retain_replay_loss": replay}

    def _train_only(self, adapter: OffloadedSparseAdapter, allowed: Tensor) -> None:
        """Drop ``adapter``'s gradient rows (keys and values) outside ``allowed`` (N,) bool."""
        if isinstance(adapter, ShardedSparseAdapter):  # its store holds its own rows only
            lo, hi = adapter.plan.rows
            allowed = allowed[lo:hi]
        _keep(adapter.store.value_grad, allowed)
        _keep(adapter.store.key_grad, allowed)

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
        own (the step's forward did not carry them), as one backward with the step's would
        (:meth:`before_clip` then holds the rows written before). Returns the loss."""
        if not self.replayed:
            return 0.0
        if self.parallel is not None:  # after the gradient rows went to their owners
            raise RuntimeError("across processes the replay rides in rank 0's forward "
                               "(meft.training.trainer)")
        examples, chosen = self.replay_examples(step)
        logits, labels = labelled_logits(self.model, collate(examples, self.pad_id))
        loss = self.replay_loss(logits, labels, chosen)
        loss.backward()
        return float(loss.detach())

    def _replay_starts(self) -> list[int]:
        """Each example's first row in the kept distributions, and the total (D + 1,)."""
        assert self.background is not None
        counts = [e.target_tokens for e in self.background.examples]
        return [0, *torch.tensor(counts).cumsum(0).tolist()]

    @classmethod
    def from_config(cls, model: MeftModel | nn.Module, config: TrainConfig,
                    background: Sequence[Sample] | None, tokenizer: Any, *,
                    rehearsal: Sequence[Sample] | None = None,
                    cache: BaseCache | None = None,
                    train: Sequence[Encoded] | None = None) -> Retainer:
        """The protection ``config`` asks for (``retain_*`` fields), its replay drawn now from
        ``background`` samples, or None: restored from a checkpoint later.
        ``rehearsal``: earlier training data to rehearse (``config.retain_rehearse`` per
        step). ``cache``: the base model's results (the replay targets of a fresh adapter).
        ``train``: the training examples, which ``config.retain_gate`` fits the novelty gate
        on (with the replay pool; :mod:`meft.training.gate`; a model whose gate is already
        set, e.g. by an earlier set of a continual run, keeps it)."""
        stats = None
        subject = None  # subject routing's router, when fitted here
        rehearsal = rehearsal if config.retain_rehearse else None
        if background is not None:
            encoded = encode_all(background, tokenizer, config.max_length, "background")
            pool_examples: list[Encoded] = []
            # the replay draws from the pool; the gate and subject routing are fitted on it
            if config.retain_replay or config.retain_gate or config.retain_subject:
                pool = (replay_pool(background) if config.retain_replay_pool ==
                        "questions" else range(len(background)))
                # (encoded drops what truncation left without an answer: not index-aligned)
                replayed = encoded if len(pool) == len(background) else encode_all(
                    [background[i] for i in pool], tokenizer, config.max_length,
                    "replayed background")
                pool_examples = [e.first_targets(REPLAY_TOKENS) for e in replayed]
                _some_left(replayed, "replayed background", config.max_length, "--retain-replay 0")
            gate = (config.retain_gate and isinstance(model, MeftModel)
                    and all(a.novelty is None for a in model.adapter_modules))
            routing = (config.retain_subject and isinstance(model, MeftModel)
                       and not model.routes_positions)
            if gate or routing:  # fitted now on train, the pool and the contrast
                assert isinstance(model, MeftModel)
                if train is None:
                    raise ValueError(("retain_gate: the novelty gate is" if gate else
                                      "retain_subject is") + " fitted on the training "
                                     "examples; pass train=")
                contrast = (contrast_examples(model, tokenizer, config.retain_gate_contrast,
                                              max_length=config.max_length,
                                              cache=cache, progress=config.progress)
                            if config.retain_gate_contrast is not None else [])
                pad = tokenizer.pad_token_id or 0
                if gate:
                    set_novelty_gate(model, train, pool_examples + contrast, config.retain_gate,
                                     pad_id=pad, once=config.retain_gate_once)
                else:
                    subject = fit_subject_router(model, train, pool_examples + contrast,
                                                 layer=config.retain_subject, pad_id=pad)
                    model.route_positions(positions(model, subject, config.retain_subject))
            stats = Background(len(encoded), pool_examples)
            if rehearsal:
                earlier = encode_all(rehearsal, tokenizer, config.max_length, "rehearsal")
                _some_left(earlier, "--rehearse", config.max_length, "--retain-rehearse 0")
                stats.examples += [e.first_targets(REPLAY_TOKENS) for e in earlier]
                stats.rehearsal = len(earlier)
            if (stats.examples and config.retain_replay_target == "distill"
                    and (config.retain_replay or rehearsal)):
                stats.keep_distributions(model, tokenizer.pad_token_id or 0,
                                         cache=cache if _computes_base(model) else None)
        return cls(model, stats, replay=config.retain_replay,
                   replay_target=config.retain_replay_target,
                   written=_keeps_written(config.retain_written, rehearsal),
                   rehearse=config.retain_rehearse, replay_weight=config.retain_replay_weight,
                   pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                   gate_once=config.retain_gate_once, subject=subject,
                   subject_layer=config.retain_subject)

    def summary(self) -> str:
        bg = self.background
        how = ("distilled: their next-token distributions kept" if self.replay_target ==
               "distill" else "trained on their answers")
        parts = []
        n_bg, n_re = self._counts()
        if n_bg:
            pool = f" of {len(bg.examples) - bg.rehearsal}" if bg is not None else ""
            parts.append(f"{n_bg}{pool} background examples replayed per step ({how})")
        if n_re:
            assert bg is not None
            parts.append(f"{n_re} of {bg.rehearsal} earlier examples rehearsed per step")
        written = sum(int(p.sum()) for p in self.protected.values())
        if written:
            parts.append(f"{written} rows written earlier kept as they are")
        if any(a.novelty is not None for _, a in _layers(self.model)):
            parts.append("novelty gate" + (", one decision per token" if self.gate_once
                                           else ""))
        if self.subject is not None:
            parts.append(f"subject routing decided at block {self.subject_layer}")
        return "forgetting protection: " + (", ".join(parts) or "nothing replayed or held")


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
                questions_only=config.retain_replay_pool == "questions")
        say(f"background: {desc}")
    if isinstance(rehearse, (str, Path)):
        rehearse = load_samples(rehearse)
    if model.parallel is not None:  # the replay targets are kept in forwards every rank runs
        _same_on_every_rank(model.parallel, [*background, *(rehearse or [])])
    return Retainer.from_config(model, config, list(background), tokenizer,
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
