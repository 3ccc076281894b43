"""A `meft bench` method's training steps, driven one at a time: what the step-timing
scripts (`profile_step.py`, `interleaved_steps.py`) share.

:func:`embedded_training_set` encodes the job's training questions for the embedded model as
`meft bench` does; :func:`method_steps` builds one method on a model as `meft bench` builds
it (the method's default rate, the job's seed, meft's one Trainer, no forgetting protection)
and yields the trainer with its endless batch iterator, so a script can call
``trainer.train_step(next(batches))`` itself and time what it likes around it.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from meft.adapter.loading import load_tokenizer, resolve_model
from meft.cli.bench.methods import build, parse_method
from meft.config import BenchJob
from meft.data.datasets import load_splits
from meft.data.records import Encoded, encode_all
from meft.training.trainer import Trainer


def embedded_training_set(job: BenchJob, dataset: str) -> tuple[Any, Any, list[Encoded]]:
    """(model source, tokenizer, encoded training examples) of the embedded default model and
    the built-in ``dataset``, split with the job's seed."""
    source = resolve_model(None)
    tokenizer = load_tokenizer(source)
    splits = load_splits(None, None, seed=job.seed, dataset=dataset)
    train = encode_all(splits.train, tokenizer, job.train_config(1e-3).max_length, "training")
    return source, tokenizer, train


@contextlib.contextmanager
def method_steps(name: str, model: torch.nn.Module, tokenizer: Any, train: list[Encoded],
                 job: BenchJob) -> Iterator[tuple[Trainer, Iterator[Any]]]:
    """Method ``name`` built on ``model`` (trained in place) and its trainer, with the
    iterator of its batches; the trainer's run directory lives as long as the context."""
    method = parse_method(name)
    tconfig = job.train_config(method.default_lr)
    torch.manual_seed(tconfig.seed)
    trainable = build(method, model, job, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="meft-steps-") as tmp:
        trainer = Trainer(trainable, train, tconfig, tmp, pad_id=tokenizer.pad_token_id)
        yield trainer, trainer._batches()
