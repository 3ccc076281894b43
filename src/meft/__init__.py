"""meft: fine-tune LLMs with very large sparse adapters kept in host memory (MEFT, ACL 2024).

The package in layers, each importing only the ones before it (tests/test_architecture.py):

    errors, console, sysinfo, _version   what every layer uses: user errors, messages, the machine
    engine/      the sparse engine: routing, kernels, the offloaded adapter, host stores, disk
                 store, compact state, the row-sparse optimizer, the distributed adapter
    config       every setting and default (the CLI is generated from it)
    adapter/     the model: MeftModel beside a base model, its files and checkpoints, baselines,
                 loading a base model
    data/        training data: records and encoding, the built-in sets, the general questions
    evaluation/  scoring: generation and metrics, the retention probe, the base-model cache
    training/    the training loop, forgetting protection and its background, integrations
    cli/         the command line: commands, recipes (one per command), plan, plots, bench

The public API is imported lazily, so ``meft --help`` never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meft._version import __version__

if TYPE_CHECKING:
    from meft.adapter.model import MeftModel, get_meft_model
    from meft.config import MeftConfig
    from meft.engine.functional import sparse_adapter, sparse_adapter_reference

_PUBLIC = {
    "MeftConfig": "meft.config",
    "MeftModel": "meft.adapter.model",
    "get_meft_model": "meft.adapter.model",
    "sparse_adapter": "meft.engine.functional",
    "sparse_adapter_reference": "meft.engine.functional",
}

__all__ = ["MeftConfig", "MeftModel", "__version__", "get_meft_model", "sparse_adapter",
           "sparse_adapter_reference"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'meft' has no attribute {name!r}")
