"""Mask losses shared by every model: BCE + Dice on mask logits, MSE on the predicted IoU."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["LossConfig", "MaskLosses", "mask_iou", "mask_losses"]


@dataclass
class LossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    bce: float = field(default=1.0, metadata={"help": "per-pixel binary cross-entropy"})
    dice: float = field(default=1.0, metadata={"help": "soft Dice, on samples that have a target"})
    iou: float = field(default=1.0, metadata={"help": "MSE of the predicted IoU against the measured one"})
    lm: float = field(default=1.0, metadata={"help": "LM cross-entropy on the answer tokens (mllm mode)"})
    no_target: float = field(default=1.0, metadata={"help": "BCE of the reject logit (mllm mode)"})
    no_target_pos_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the no-target class in that BCE; targeted / no-target expressions of the "
            "training data balances the two classes (then reject_threshold 0.5 is a balanced decision)"
        },
    )
    sam: float = field(default=1.0, metadata={"help": "scale of the bce/dice/iou terms on SAM's masks"})
    region_bce: float = field(
        default=1.0, metadata={"help": "BCE of the region pointer's logits against the target's regions"}
    )
    region_dice: float = field(
        default=1.0, metadata={"help": "soft Dice of the pointer's painted region prior"}
    )
    region_threshold: float = field(
        default=0.5, metadata={"help": "a region belongs to a target when the target covers this fraction"}
    )
    match_targets: bool = field(
        default=True, metadata={"help": "assign targets to [SEG] queries by minimum BCE + Dice (Hungarian)"}
    )

    def __post_init__(self) -> None:
        for name in ("bce", "dice", "iou", "lm", "no_target", "sam", "region_bce", "region_dice"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: loss weights must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.region_threshold <= 1.0:
            raise ValueError(f"region_threshold: must be in (0, 1], got {self.region_threshold}")
        if self.no_target_pos_weight <= 0:
            raise ValueError(f"no_target_pos_weight: must be > 0, got {self.no_target_pos_weight}")


@dataclass
class MaskLosses:
    """Scalar loss terms (already weighted) and their sum."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction per mask, over valid pixels.

    Args:
        logits, targets: ``(N, H, W)`` (targets in {0, 1}); valid ``(N, H, W)`` bool.

    Returns:
        ``(N,)`` IoU; an empty target with an empty prediction scores 1.
    """
    pred = (logits > 0) & valid
    tgt = (targets > 0.5) & valid
    inter = (pred & tgt).flatten(1).sum(1).float()
    union = (pred | tgt).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def mask_losses(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    has_target: torch.Tensor,
    cfg: LossConfig,
) -> MaskLosses:
    """BCE + Dice on masks, MSE on the IoU head.

    Args:
        logits: ``(N, h, w)`` mask logits at any resolution (upsampled to the targets' size).
        iou_pred: ``(N,)`` predicted IoU.
        targets: ``(N, H, W)`` float in {0, 1}.
        valid: ``(N, H, W)`` bool; padding and ignore pixels are excluded everywhere.
        has_target: ``(N,)`` bool; Dice is only defined where a target exists, BCE pushes the rest
            towards an empty mask.
    """
    if logits.shape[-2:] != targets.shape[-2:]:
        # (N, h, w) -> (N, 1, h, w) for interpolate, back to (N, H, W)
        logits = F.interpolate(
            logits[:, None], size=targets.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
    w = valid.float()
    n_valid = w.flatten(1).sum(1).clamp_min(1.0)  # (N,)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce = ((bce * w).flatten(1).sum(1) / n_valid).mean()
    prob = torch.sigmoid(logits) * w
    inter = (prob * targets).flatten(1).sum(1)
    denom = prob.flatten(1).sum(1) + (targets * w).flatten(1).sum(1)
    dice_each = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)  # (N,)
    pos = has_target.float()
    dice = (dice_each * pos).sum() / pos.sum().clamp_min(1.0)
    measured = mask_iou(logits.detach(), targets, valid)
    iou = F.mse_loss(iou_pred.float(), measured)
    terms = {"bce": cfg.bce * bce, "dice": cfg.dice * dice, "iou": cfg.iou * iou}
    return MaskLosses(total=sum(terms.values()), terms=terms)  # type: ignore[arg-type]
