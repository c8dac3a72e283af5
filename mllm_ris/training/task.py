"""The contract between the model-agnostic :class:`~mllm_ris.training.trainer.Trainer` and a model family.

A *task* builds the model, provides the training data and its collate function, computes the
loss of a batch, wraps a model as an evaluation predictor and writes the final model files.
Every :class:`~mllm_ris.modeling.model.RISModel` (classic or mllm mode) is
:class:`mllm_ris.training.ris_task.RISTask`, the trainer's default; tests plug in toy tasks.

Optional: ``external_weights(model) -> set[str]`` names state-dict keys (of the bare model) that
``build_model`` loads from their own pretrained files, e.g. a frozen LLM under LoRA. Training
checkpoints then leave them out and resume loads the rest non-strictly, after checking that
nothing else is missing (not under DeepSpeed, which writes its own checkpoint format).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from mllm_ris.data.sample import ReferringDataset
from mllm_ris.eval.evaluate import Predictor

__all__ = ["TrainTask"]


@runtime_checkable
class TrainTask(Protocol):
    """What the trainer needs from a model family (all methods are called on every rank).

    Attributes:
        name: short label used in logs.
    """

    name: str

    def build_model(self) -> nn.Module:
        """A freshly initialised (or ``model.checkpoint``-loaded) model on the CPU."""
        ...

    def train_data(self) -> tuple[Dataset, torch.Tensor]:
        """The training dataset and its ``(N,)`` per-sample sampling weights (see ``build_mixture``)."""
        ...

    def collate(self, samples: list[Any]) -> Any:
        """Samples -> a batch; the batch is moved with ``accelerate.utils.send_to_device``."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]:
        """The scalar loss to minimise and named terms to log (``model`` may be DDP / DeepSpeed-wrapped)."""
        ...

    def val_data(self) -> dict[str, ReferringDataset]:
        """Validation datasets by label (``"refcoco:val"``); may be empty."""
        ...

    def predictor(self, model: nn.Module, device: torch.device) -> Predictor:
        """Wrap the bare (unwrapped) model for :func:`mllm_ris.eval.evaluate.evaluate`."""
        ...

    def save_model(self, model: nn.Module, out_dir: Path, config: dict) -> Path:
        """Write the deliverable model files (plain safetensors + config) into ``out_dir``."""
        ...
