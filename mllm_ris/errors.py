"""Exceptions that mllm-ris raises on purpose.

Every error a user can cause (a bad path, a corrupt file, a wrong config value) is raised as a
subclass of :class:`MllmRisError` with a one-line message that names the problem. The CLI turns
these into one line on stderr and a non-zero exit code; anything else is a bug. One hierarchy with
``s2rm_head``'s (:mod:`s2rm_head.errors`): ``MllmRisError``, ``ConfigError``, ``MissingFileError``
and ``CheckpointError`` are its classes, re-exported, so ``except ConfigError`` catches a bad value
in a head's config and in the run's alike. ``ConfigError`` is also a ``ValueError`` (and
``MissingFileError``, a ``ConfigError``, a ``FileNotFoundError``); a tensor of the wrong shape at call
time stays a plain ``ValueError`` (a bug in the caller, not a config).
"""

from __future__ import annotations

from s2rm_head.errors import CheckpointError, ConfigError, MissingFileError, RISError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "InputError",
    "MissingFileError",
    "MllmRisError",
    "NotAvailableError",
]


MllmRisError = RISError
"""Base class of all errors raised deliberately by mllm-ris (and s2rm_head: :mod:`s2rm_head.errors`)."""


class DatasetError(MllmRisError):
    """A dataset file is missing, unreadable or malformed (the message names the file)."""


class NotAvailableError(MllmRisError):
    """A feature that is planned but not built yet."""


class InputError(MllmRisError, ValueError):
    """An image, query or chat history the pipeline cannot use (the message says which and why)."""
