"""Exceptions that mllm-ris raises on purpose.

Every error a user can cause (a bad path, a corrupt file, a wrong config value) is raised as a
subclass of :class:`MllmRisError` with a one-line message that names the problem. The CLI turns
these into one line on stderr and a non-zero exit code; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "MllmRisError",
    "NotAvailableError",
]


class MllmRisError(Exception):
    """Base class of all errors raised deliberately by mllm-ris."""


class ConfigError(MllmRisError, ValueError):
    """A config value is missing, has the wrong type or is out of range (the message names the field)."""


class DatasetError(MllmRisError):
    """A dataset file is missing, unreadable or malformed (the message names the file)."""


class CheckpointError(MllmRisError):
    """A checkpoint is missing, truncated or does not fit the model (the message names the file)."""


class NotAvailableError(MllmRisError):
    """A feature that is planned but not built yet."""
