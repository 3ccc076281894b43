"""meft: fine-tune LLMs with very large sparse adapters kept in host memory (MEFT, ACL 2024)."""

from meft.functional import sparse_adapter, sparse_adapter_reference

__version__ = "0.1.0"

__all__ = ["__version__", "sparse_adapter", "sparse_adapter_reference"]
