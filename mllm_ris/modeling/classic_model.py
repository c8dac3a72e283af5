"""Classic mode: text encoder + pixel encoder + fusion head, no LLM (the S²RM paper's setting).

One expression → one query (``T = 1``); a multi-target expression is segmented as the union of
its targets, a negative one as an empty mask.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mllm_ris.data.collate import RISBatch
from mllm_ris.errors import CheckpointError
from mllm_ris.modeling.losses import LossConfig, MaskLosses, mask_losses
from mllm_ris.modeling.model_io import check_state_fits, read_safetensors
from s2rm_head.head import FusionHead
from s2rm_head.pixel_encoder import PixelEncoder, build_pixel_encoder
from s2rm_head.registry import build_head
from s2rm_head.text_encoder import TextEncoder, build_text_encoder
from s2rm_head.types import HeadOutput

__all__ = ["ClassicOutput", "ClassicRISModel", "build_classic_model", "load_state", "save_state"]

WEIGHTS_NAME = "model.safetensors"


@dataclass
class ClassicOutput:
    """Forward result.

    Attributes:
        mask_logits: ``(B, 1, S/4, S/4)`` one logit map per expression.
        iou_pred: ``(B, 1)`` predicted IoU.
        loss: the weighted sum of terms, when targets were given.
        loss_terms: the weighted terms (``bce``, ``dice``, ``iou``).
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class ClassicRISModel(nn.Module):
    """Wires a text encoder, a pixel encoder and a fusion head (keyword-only parts, SAM style).

    Args:
        text_weights_external: the text transformer is frozen *and* loaded from its own
            pretrained files, so checkpoints leave it out (they hold everything else).
    """

    def __init__(
        self,
        *,
        text_encoder: TextEncoder,
        pixel_encoder: PixelEncoder,
        head: FusionHead,
        loss: LossConfig,
        text_weights_external: bool = False,
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pixel_encoder = pixel_encoder
        self.head = head
        self.loss_cfg = loss
        self.text_weights_external = text_weights_external

    def forward(self, images: torch.Tensor, texts: list[str], batch: RISBatch | None = None) -> ClassicOutput:
        """Segment one expression per image.

        Args:
            images: ``(B, 3, S, S)`` normalised.
            texts: ``B`` expressions.
            batch: when given, its ``targets (B, S, S)``, ``valid`` and ``has_target`` give the loss.
        """
        if images.shape[0] != len(texts):
            raise ValueError(f"images: {images.shape[0]}, texts: {len(texts)}; need one expression per image")
        lang = self.text_encoder.encode(texts, device=images.device)  # queries (B, 1, D)
        pyramid = self.pixel_encoder(images)  # 4 x (B, C_i, S/s_i, S/s_i)
        out: HeadOutput = self.head(pyramid, lang)  # (B, 1, S/4, S/4), (B, 1)
        result = ClassicOutput(mask_logits=out.mask_logits, iou_pred=out.iou_pred)
        if batch is not None:
            losses: MaskLosses = mask_losses(
                out.mask_logits[:, 0],
                out.iou_pred[:, 0],
                batch.targets,
                batch.valid,
                batch.has_target,
                self.loss_cfg,
            )
            result.loss, result.loss_terms = losses.total, losses.terms
        return result


def build_classic_model(model_cfg: object) -> ClassicRISModel:
    """Build from ``Config.model`` (a :class:`mllm_ris.config.ModelConfig`).

    ``head.in_channels`` and ``head.lang_dim`` are taken from the built encoders.
    """
    text = build_text_encoder(model_cfg.text)  # type: ignore[attr-defined]
    pixel = build_pixel_encoder(model_cfg.pixel)  # type: ignore[attr-defined]
    head_cfg = dataclasses.replace(
        model_cfg.head,  # type: ignore[attr-defined]
        in_channels=tuple(pixel.channels),
        lang_dim=text.dim,
    )
    head = build_head(head_cfg)
    if not head.uses_words:  # e.g. LTS reads only the sentence query: keep unused weights out of training
        text.token_proj.requires_grad_(False)
    return ClassicRISModel(
        text_encoder=text,
        pixel_encoder=pixel,
        head=head,
        loss=model_cfg.loss,  # type: ignore[attr-defined]
        text_weights_external=model_cfg.text.init == "pretrained" and model_cfg.text.freeze,  # type: ignore[attr-defined]
    )


def _trainable_or_owned(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer except a frozen pretrained text transformer (loaded from its files)."""
    state = model.state_dict()
    if getattr(model, "text_weights_external", False):
        state = {k: v for k, v in state.items() if not k.startswith("text_encoder.model.")}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_state(model: nn.Module, out_dir: str | Path, *, config: dict | None = None) -> Path:
    """Write ``model.safetensors`` (+ ``config.json``) into ``out_dir``; returns the weights path.

    A frozen pretrained text transformer is not written: it is reloaded from its own files
    (a randomly initialised or fine-tuned one is).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS_NAME
    tmp = path.with_suffix(".tmp")
    save_file(_trainable_or_owned(model), str(tmp))
    tmp.replace(path)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_state(model: nn.Module, path: str | Path) -> None:
    """Load weights written by :func:`save_state`, reporting missing / unexpected keys.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = read_safetensors(path, f"checkpoint {path}")
    expected = _trainable_or_owned(model)
    check_state_fits(state, expected, name=f"checkpoint {path}")
    model.load_state_dict(state, strict=False)
