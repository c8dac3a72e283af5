"""Classic mode (text encoder + pixel encoder + head) as a training task, and its legacy entry point.

:class:`ClassicTask` plugs the classic model into the model-agnostic
:class:`~mllm_ris.training.trainer.Trainer`: it mixes the ``data.train`` datasets by their
``weight``, computes the mask losses, evaluates with :class:`ClassicPredictor` and writes
``model.safetensors`` + ``config.json`` (:func:`mllm_ris.modeling.classic_model.save_state`).
:func:`mllm_ris.training.trainer.train_classic` (``scripts/train_classic.py``,
``benchmarks/bench_heads.py``) runs it: a fresh single-config run in one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from mllm_ris.config import Config
from mllm_ris.data.collate import RISBatch, RISTransform, collate_ris, unletterbox
from mllm_ris.data.sample import ReferringDataset, RISSample
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.classic_model import ClassicRISModel, build_classic_model, load_state, save_state
from mllm_ris.training.sampling import build_mixture, open_dataset
from mllm_ris.training.summary import TrainSummary

__all__ = ["ClassicPredictor", "ClassicTask", "TrainSummary", "build_mixture"]


class ClassicPredictor:
    """Wraps a classic model as an evaluation :class:`~mllm_ris.eval.evaluate.Predictor`.

    Returns ``(1, H, W)`` bool (the thresholded mask at the original size) or ``(0, H, W)``
    when the mask is empty; :meth:`predict_batch` runs ``batch_size`` samples per forward pass.
    """

    name = "classic"

    def __init__(
        self,
        model: ClassicRISModel,
        transform: RISTransform,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.transform = transform
        self.device = torch.device(device)
        self.batch_size = batch_size

    def __call__(self, sample: RISSample) -> np.ndarray:
        return self.predict_batch([sample])[0]

    @torch.no_grad()
    def predict_batch(self, samples: list[RISSample]) -> list[np.ndarray]:
        """One forward pass over ``samples``; a ``(N, H, W)`` bool array per sample (N in {0, 1})."""
        self.model.eval()
        batch = collate_ris(samples, self.transform).to(self.device)
        out = self.model(batch.images, batch.texts)  # mask_logits (B, 1, S/4, S/4)
        preds = []
        for logits, hw in zip(out.mask_logits, batch.hw, strict=True):
            mask = (unletterbox(logits, hw, self.transform) > 0).cpu().numpy()  # (1, H, W)
            preds.append(mask if mask.any() else mask[:0])
        return preds


class ClassicTask:
    """The classic model as a :class:`~mllm_ris.training.task.TrainTask`.

    Args:
        cfg: the resolved config (``model.mode`` must be ``classic``).
    """

    name = "classic"

    def __init__(self, cfg: Config) -> None:
        if cfg.model.mode != "classic":
            raise ConfigError(f"model.mode: this task trains classic mode, got {cfg.model.mode!r}")
        self.cfg = cfg
        self.transform = RISTransform(cfg.data.image_size)

    def build_model(self) -> ClassicRISModel:
        """Built from ``cfg.model``; ``model.checkpoint`` weights are loaded when set."""
        model = build_classic_model(self.cfg.model)
        if self.cfg.model.checkpoint is not None:
            load_state(model, self.cfg.model.checkpoint)
        return model

    def external_weights(self, model: nn.Module) -> set[str]:
        """A frozen pretrained text transformer is reloaded from its files: not in training checkpoints."""
        if not getattr(model, "text_weights_external", False):
            return set()
        return {k for k in model.state_dict() if k.startswith("text_encoder.model.")}

    def train_data(self) -> tuple[ConcatDataset, torch.Tensor]:
        """The ``data.train`` mixture and its per-sample weights."""
        return build_mixture(self.cfg.data.train)

    def collate(self, samples: list[RISSample]) -> RISBatch:
        """Letterbox + batch (drops the source samples: training needs only tensors)."""
        return collate_ris(samples, self.transform)

    def loss(self, model: nn.Module, batch: RISBatch) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """Mask BCE + Dice + IoU-head loss of one batch."""
        out = model(batch.images, batch.texts, batch)
        return out.loss, {k: v.detach() for k, v in out.loss_terms.items()}

    def val_data(self) -> dict[str, ReferringDataset]:
        """``data.val`` by ``"name:split"``."""
        return {f"{spec.name}:{spec.split}": open_dataset(spec) for spec in self.cfg.data.val}

    def predictor(self, model: nn.Module, device: torch.device) -> ClassicPredictor:
        """Batched evaluation predictor."""
        return ClassicPredictor(model, self.transform, device=device)  # type: ignore[arg-type]

    def save_model(self, model: nn.Module, out_dir: Path, config: dict) -> Path:
        """``model.safetensors`` (a frozen pretrained text transformer left out) + ``config.json``."""
        return save_state(model, out_dir, config=config)
