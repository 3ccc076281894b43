"""meft: fine-tune LLMs with very large sparse adapters kept in host memory (MEFT, ACL 2024)."""

from meft._version import __version__
from meft.config import MeftConfig
from meft.functional import sparse_adapter, sparse_adapter_reference
from meft.model import MeftModel, get_meft_model

__all__ = [
    "MeftConfig",
    "MeftModel",
    "__version__",
    "get_meft_model",
    "sparse_adapter",
    "sparse_adapter_reference",
]
