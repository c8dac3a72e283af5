"""Errors raised on purpose, one hierarchy for ``s2rm_head`` and ``mllm_ris``.

``s2rm_head`` stands alone (it imports nothing from ``mllm_ris``), so the base classes live here and
:mod:`mllm_ris.errors` re-exports them beside its own (``MllmRisError`` is :class:`RISError`): an
application catching ``MllmRisError`` catches a head's bad config or SAM checkpoint too. Every
message is one line naming the field or file.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "MissingFileError", "RISError"]


class RISError(Exception):
    """Base class of all errors raised deliberately by s2rm_head and mllm-ris."""


class ConfigError(RISError, ValueError):
    """A config value is missing, has the wrong type or is out of range (the message names the field)."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder a config names does not exist (also a ``FileNotFoundError``; the message names it)."""


class CheckpointError(RISError):
    """A checkpoint is missing, truncated or does not fit the model (the message names the file)."""
