"""meft inside ``transformers.Trainer`` (and TRL's ``SFTTrainer``): :class:`MeftTrainer`.

A plain Trainer steps, clips and saves ``nn.Module`` parameters. meft's host tables live outside
them (so ``model.to(device)`` never moves them), so the Trainer would neither update, clip nor
save them. :class:`MeftTrainerMixin` changes exactly that and nothing else:

    optimizer    :class:`MeftOptimizer`: a ``torch.optim.Optimizer`` whose param groups are the
                 routers' (the Trainer's scheduler scales them) over meft's
                 :class:`~meft.engine.optim.OptimizerSet` (torch AdamW on the routers, row-sparse
                 AdamW on the host tables at the same scheduled rate, AdamW settings from
                 ``TrainingArguments``); each step also clears the host gradients
    clipping     one global norm over router and host row gradients, ``max_grad_norm``
    checkpoints  ``checkpoint-N/`` holds the adapter as ``save_pretrained`` writes it (so
                 ``meft eval --adapter checkpoint-N`` reads it), the optimizer state as
                 ``optimizer.safetensors`` (the names meft's own checkpoints use), the scheduler
                 state and RNG states as JSON + safetensors, the arguments as JSON: nothing is
                 pickled; ``train(resume_from_checkpoint=True)`` continues bit for bit
    disk store   a model made with ``get_meft_model(..., arrays=DiskArrays(DIR))`` (tables
                 bigger than RAM, :mod:`meft.engine.disk`): the moments live in the store too, each
                 step's pages are released after it, every save commits the store at the
                 step saved and the adapter files hold the routers and name the store (as
                 ``meft train --store disk:DIR``). The store keeps its newest commit only, so
                 a run resumes from its newest checkpoint, and ``load_best_model_at_end``
                 is refused
    logs         ``meft_union`` (mean rows per layer per step) and ``meft_mb_moved`` (host <->
                 device MB per step), averaged since the last log
    protection   ``retainer=`` (:class:`meft.training.protection.Retainer`;
                 ``meft.training.protection.protection(model, tokenizer)`` builds meft train's
                 default): rows written before held and the replay added, in a pass of its
                 own, before clipping, as ``meft train --retain on`` does. Off unless
                 given: a Trainer has no background text

Everything else (gradient accumulation, ``logging_steps``, ``eval_strategy``,
``save_total_limit``, callbacks) is the Trainer's own. Use it as the Trainer:

    model = get_meft_model(AutoModelForCausalLM.from_pretrained(...), MeftConfig(...))
    trainer = MeftTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                          data_collator=MeftCollator(tokenizer.pad_token_id))

or pass the base model with ``meft_config=``. TRL: :func:`sft_trainer` returns ``SFTTrainer``
with the mixin (``pip install trl``). Needs ``pip install 'meft[hf]'`` (accelerate, datasets).
"""

from __future__ import annotations

import inspect
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from meft.adapter.model import MeftModel, get_meft_model, read_adapter
from meft.config import MeftConfig
from meft.data.records import Encoded, collate, encode, parse_record
from meft.engine.distributed import world_size
from meft.engine.optim import OptimizerSet
from meft.errors import ConfigError, SerializationError
from meft.training.protection import Retainer
from meft.training.trainer import Trainable

__all__ = ["MeftCollator", "MeftOptimizer", "MeftTrainer", "MeftTrainerMixin", "encoder",
           "sft_trainer"]

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
RNG_FILES = ("rng_state.json", "rng_state.safetensors")
ARGS_FILE = "training_args.json"


class MeftOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer: router param groups on the outside, meft's OptimizerSet inside.

    The Trainer's scheduler sets ``param_groups[0]["lr"]``; :meth:`step` passes that rate to
    every meft optimizer (host tables and routers alike), steps them (host first) and clears
    the host gradients (the Trainer's ``model.zero_grad()`` clears the routers')."""

    def __init__(self, model: MeftModel, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 retainer: Retainer | None = None) -> None:
        self.retainer = retainer
        self.selected = False  # the protection done for this step
        t = Trainable.of_meft(model)
        routers = t.routers
        self.set = OptimizerSet(routers=routers, host_tables=t.host_tables, lr=lr,
                                weight_decay=weight_decay, betas=betas, eps=eps,
                                host_state=t.host_state, seed=model.meft_config.seed,
                                arrays=model.arrays)  # a disk store: moments beside the tables
        # the facade's param group: the routers, or a placeholder the scheduler can scale
        params = list(routers.values()) or [nn.Parameter(torch.zeros(1), requires_grad=False)]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.traffic = t.traffic
        self.steps: list[dict[str, float]] = []  # per step: U and MB, until logged

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.select()
        self.selected = False
        self.set.set_lr(self.param_groups[0]["lr"] / self.set.lr)
        self.set.step()
        if self.set.host is not None:
            self.set.host.zero_grad()
        t = self.traffic()
        self.steps.append({"union": sum(t.union_per_layer) / max(1, len(t.union_per_layer)),
                           "mb": (t.bytes_h2d + t.bytes_d2h) / 1e6})
        return loss

    def select(self) -> None:
        """The protection (rows written before held, the replay's gradient), once per step,
        before any clipping (as meft's own trainer orders them)."""
        if self.retainer is not None and not self.selected:
            self.retainer.before_clip(self.retainer_step)
        self.selected = True

    retainer_step = 0  # set by the Trainer before each step (the replay's data position)

    def clip_(self, max_norm: float) -> Tensor:
        self.select()
        return self.set.clip_(max_norm)


class _ResetTraffic(TrainerCallback):
    """Forget the transfer counters at each step's start (evaluation forwards are not a
    training step's traffic)."""

    def __init__(self, model: MeftModel) -> None:
        self.model = model

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        for stats in self.model.transfer_stats():
            stats.reset(keep_history=True)


class MeftTrainerMixin:
    """What a Trainer needs to train a meft adapter (module doc). Mix into any
    ``transformers.Trainer`` subclass, before it."""

    model: Any
    args: Any
    optimizer: Any
    lr_scheduler: Any
    label_names: list[str]

    def __init__(self, model: nn.Module | None = None, *args: Any,
                 meft_config: MeftConfig | None = None, retainer: Retainer | None = None,
                 **kwargs: Any) -> None:
        self.retainer = retainer
        if world_size() > 1:  # transformers' DDP would train W unsharded copies that drift
            raise ConfigError("MeftTrainer under torchrun is not supported yet (each process "
                              "would train its own copy of the tables); use torchrun -m meft "
                              "train, which shards them")
        if not isinstance(model, MeftModel):
            if model is None or meft_config is None:
                raise TypeError("MeftTrainer needs a MeftModel (meft.get_meft_model), or the "
                                "base model and meft_config=")
            model = get_meft_model(model, meft_config)
        elif meft_config is not None:
            raise TypeError("meft_config= is for a base model; this model is already wrapped")
        # a trainable adapter is attached: what transformers asks of a quantized base (a
        # GGUF-loaded one is marked quantized) before it lets a Trainer fine-tune it, as PEFT
        model.__dict__["_hf_peft_config_loaded"] = True
        super().__init__(model, *args, **kwargs)  # type: ignore[call-arg]
        self.add_callback(_ResetTraffic(model))  # type: ignore[attr-defined]
        if model.arrays is not None and self.args.load_best_model_at_end:
            raise ConfigError("load_best_model_at_end cannot go back to an earlier checkpoint "
                              "with the tables in a disk store (it holds the newest step "
                              f"only: {model.arrays.dir}); evaluate the checkpoints instead")
        if not self.args.label_names:  # MeftModel.forward(*args, **kwargs) names no labels
            self.label_names = ["labels"]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """The Trainer's ``train``; a disk store an earlier run moved on is refused unless
        that run is resumed (fresh routers over its trained tables would be neither run)."""
        arrays = self.meft_model.arrays
        if arrays is not None and arrays.step != 0 and not resume_from_checkpoint:
            raise ConfigError(f"the disk store {arrays.dir} holds step {arrays.step} of an "
                              "earlier run; resume it (train(resume_from_checkpoint=True)) or "
                              "start from an empty directory")
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _set_signature_columns_if_needed(self) -> None:
        """The columns the base model's forward takes (MeftModel passes everything on)."""
        if getattr(self, "_signature_columns", None) is None:
            names = inspect.signature(self.meft_model.base_model.forward).parameters
            columns: Any = [*names, "label", "label_ids", *self.label_names]
            self._signature_columns = columns

    @property
    def meft_model(self) -> MeftModel:
        model: MeftModel = self.model
        return model

    # ------------------------------------------------------------ optimizer, clipping
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            a = self.args
            self.optimizer = MeftOptimizer(self.meft_model, lr=a.learning_rate,
                                           betas=(a.adam_beta1, a.adam_beta2),
                                           eps=a.adam_epsilon, weight_decay=a.weight_decay,
                                           retainer=self.retainer)
        return self.optimizer  # type: ignore[no-any-return]

    def _meft_optimizer(self) -> MeftOptimizer:
        opt = self.optimizer
        while not isinstance(opt, MeftOptimizer):  # accelerate wraps it
            opt = opt.optimizer
        return opt

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        return self._meft_optimizer().clip_(self.args.max_grad_norm)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any,
                      **kwargs: Any) -> Tensor:
        """With protection, tell the optimizer the step (which examples the replay draws)."""
        if self.retainer is not None:
            self._meft_optimizer().retainer_step = self.state.global_step  # type: ignore[attr-defined]
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc,no-any-return]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.optimizer is not None:
            steps = self._meft_optimizer().steps
            if steps:
                logs = {**logs, "meft_union": sum(s["union"] for s in steps) / len(steps),
                        "meft_mb_moved": sum(s["mb"] for s in steps) / len(steps)}
                steps.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
              ) -> None:
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        arrays = self.meft_model.arrays
        step = self.state.global_step  # type: ignore[attr-defined]
        # with a disk store: the files first, naming this step, then the store commits at it
        # (a crash between leaves the store at its last commit, whose files still exist)
        self.meft_model.save_pretrained(out, tables=arrays is None, tables_step=step)
        if arrays is not None and arrays.step != step:
            arrays.commit(step)
        processor = getattr(self, "processing_class", None)
        if processor is not None:
            processor.save_pretrained(out)
        (out / ARGS_FILE).write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.args.should_save:
            return
        save_file(self._meft_optimizer().set.state_tensors(),
                  os.path.join(output_dir, OPTIMIZER_FILE))
        Path(output_dir, SCHEDULER_FILE).write_text(json.dumps(self.lr_scheduler.state_dict(),
                                                               default=_jsonable))

    def _save_rng_state(self, output_dir: str) -> None:
        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        py = random.getstate()
        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
        Path(output_dir, RNG_FILES[0]).write_text(json.dumps({
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss]}))
        save_file(tensors, os.path.join(output_dir, RNG_FILES[1]))

    # ------------------------------------------------------------ loading
    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: nn.Module | None = None) -> None:
        config, tensors = read_adapter(resume_from_checkpoint)
        arrays = self.meft_model.arrays
        if arrays is not None and config.tables_step != arrays.step:
            held = ("its own tables" if config.tables_step is None
                    else f"step {config.tables_step} of a disk store")
            raise SerializationError(
                f"{resume_from_checkpoint}: a checkpoint of {held}, but the disk store "
                f"{arrays.dir} holds step {arrays.step}; resume from checkpoint-{arrays.step}")
        self.meft_model.load_adapter_state(tensors, source=resume_from_checkpoint,
                                           tables=arrays is None)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if best is not None:
            self._load_from_checkpoint(best)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        path = Path(checkpoint, OPTIMIZER_FILE)
        if not path.is_file():
            raise SerializationError(f"{checkpoint}: no {OPTIMIZER_FILE} (not a MeftTrainer "
                                     "checkpoint?)")
        self._meft_optimizer().set.load_state_tensors(load_file(str(path)))
        self.lr_scheduler.load_state_dict(json.loads(Path(checkpoint, SCHEDULER_FILE)
                                                     .read_text()))
        # torch keeps the current rate in the optimizer's param groups, which a torch
        # optimizer's own state_dict would restore; these state tensors do not hold it
        for group, lr in zip(self._meft_optimizer().param_groups,
                             self.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not Path(checkpoint, RNG_FILES[0]).is_file():
            return
        state = json.loads(Path(checkpoint, RNG_FILES[0]).read_text())
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32),
                             *state["numpy"][2:]))
        tensors = load_file(os.path.join(checkpoint, RNG_FILES[1]))
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)


class MeftTrainer(MeftTrainerMixin, Trainer):
    """``transformers.Trainer`` for a meft adapter (module doc)."""


def sft_trainer(*args: Any, **kwargs: Any) -> Any:
    """TRL's ``SFTTrainer`` with :class:`MeftTrainerMixin` (needs ``pip install trl``).

    TRL patches the model's forward with a fused LM head that calls ``model.base_model`` as
    the transformer backbone (``PreTrainedModel``'s meaning); a MeftModel's ``base_model`` is
    the whole causal LM, so the patch moves to that causal LM, where it belongs (meft's
    adapters are hooks inside it and stay active)."""
    try:
        from trl import SFTTrainer  # type: ignore[attr-defined]
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        raise ImportError("sft_trainer needs TRL: pip install trl") from None

    def __init__(self: Any, *a: Any, **kw: Any) -> None:
        MeftTrainerMixin.__init__(self, *a, **kw)
        if "forward" in self.meft_model.__dict__:  # TRL's patch on the wrapper
            del self.meft_model.__dict__["forward"]
            add_fused_lm_head(self.meft_model.base_model,
                              outputs=("log_probs", "entropy", "is_top1"))

    cls = type("MeftSFTTrainer", (MeftTrainerMixin, SFTTrainer), {"__init__": __init__})
    return cls(*args, **kwargs)


class MeftCollator:
    """Pads meft-encoded examples (``input_ids``, ``labels``) as ``meft train`` does."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        return collate([Encoded(list(r["input_ids"]), list(r["labels"]), False) for r in rows],
                       self.pad_id)


def encoder(tokenizer: Any, max_length: int = 256
            ) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A ``datasets.Dataset.map`` function: one record in any format ``meft train`` reads
    ({question, answer}, {prompt, completion}, {messages}, {text}) -> input_ids and labels,
    encoded exactly as ``meft train`` encodes it."""

    def encode_record(record: Mapping[str, Any]) -> dict[str, Any]:
        # a datasets row (a mapping; columns another format uses are None here)
        plain = {k: v for k, v in dict(record).items() if v is not None}
        enc = encode(parse_record(plain, "record"), tokenizer, max_length)
        return {"input_ids": enc.input_ids, "labels": enc.labels}

    return encode_record


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in the scheduler state is not JSON")
