"""The training task of a config.

:class:`~mllm_ris.training.classic_task.ClassicTask` for classic mode without the region pointer (the
legacy ``ClassicRISModel``), :class:`~mllm_ris.training.ris_task.RISTask` for every
:class:`~mllm_ris.modeling.model.RISModel` (mllm mode, classic mode with ``pointer.dim``).
"""

from __future__ import annotations

from mllm_ris.config import Config
from mllm_ris.training.classic_task import ClassicTask
from mllm_ris.training.ris_task import RISTask
from mllm_ris.training.task import TrainTask, legacy_classic

__all__ = ["build_task"]


def build_task(cfg: Config) -> TrainTask:
    """The task that trains ``cfg.model``."""
    return ClassicTask(cfg) if legacy_classic(cfg.model) else RISTask(cfg)
