"""The mistakes a user can make, one class each; everything else is a bug.

The CLI prints a :class:`UserError` as one line (``meft: error: <message>``) and exits with
status 2; the message names the file, line, field or value at fault. Any other exception is an
internal bug and keeps its traceback, so a bug is never disguised as a user error. The
subclasses also derive from the builtin they refine (``ValueError``, ``RuntimeError``), so code
that caught those before still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave (a flag, a file, a model) that cannot work."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the field and the value."""


class DataError(UserError, ValueError):
    """A data file that cannot be read as examples; the message names file, line and field."""


class ModelLoadError(UserError, RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


class UnsupportedModelError(UserError, ValueError):
    """The model has no structure meft knows how to attach adapters to."""


class AdapterMismatchError(UserError, ValueError):
    """A saved adapter does not fit the base model it is being loaded into."""


class SerializationError(UserError, ValueError):
    """A file or directory that cannot be read as what it claims to be."""


class RunDirectoryError(UserError):
    """An output or resume directory that cannot be used as asked (exists, not a run, ...)."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or gradient norm became NaN or infinite (usually: the learning rate)."""


class PeerLost(UserError, RuntimeError):
    """Another process of a distributed run stopped or stopped answering: not a bug here, one
    line saying so, and how to continue (--resume)."""
