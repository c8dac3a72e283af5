"""Losses: mask losses shared by every model (BCE + Dice on mask logits, MSE on the predicted IoU),
and the terms :class:`~mllm_ris.modeling.model.RISModel` builds from them.

Losses of :class:`~mllm_ris.modeling.model.RISModel`: per-target masks, target matching, no-target.

Terms (each already weighted; their sum is the loss):

* ``lm`` — the grounding LLM's next-token cross-entropy on answer tokens, x ``LossConfig.lm``;
* ``head_bce`` / ``head_dice`` / ``iou`` — :func:`~mllm_ris.modeling.losses.mask_losses` on every real
  (image, target) pair at the head level (logits upsampled to the canvas side ``S``), weights
  ``LossConfig.bce`` / ``dice`` / ``iou``; padded target slots (``target_valid`` False) are left out;
* ``sam_bce`` / ``sam_dice`` / ``sam_iou`` — the same on SAM's masks and predicted IoU,
  x ``LossConfig.sam``;
* ``no_target`` — BCE of the reject logit against "this expression has no target",
  x ``LossConfig.no_target``, the no-target class weighted ``LossConfig.no_target_pos_weight``;
* ``region_bce`` / ``region_dice`` — the region pointer (``mllm.pointer_dim``): BCE of each ``[SEG]``'s
  region logits against its target's regions (a region is the target's when the target covers at
  least ``LossConfig.region_threshold`` of it) and Dice of the painted prior, x ``LossConfig.region_bce``
  / ``region_dice`` (:func:`region_losses`).

**Target matching.** Every ``[SEG]`` token is the same token, so which ``[SEG]`` should segment which
target is not given by the text: the order of a sample's masks is the annotation's order. With
``match_targets`` the targets of each sample are reordered to the ``[SEG]`` queries by a minimum-cost
assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``) on BCE + Dice of the head's masks, as
DETR does for its queries; the same order is used at the SAM level. With one target nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mllm_ris.modeling.model_config import LossConfig
from mllm_ris.modeling.projector import pointer_loss

__all__ = [
    "LossConfig",
    "MaskLosses",
    "mask_iou",
    "mask_losses",
    "match_targets",
    "no_target_loss",
    "pair_mask_losses",
    "region_coverage",
    "region_losses",
]


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


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that stays in the graph of ``like`` (backward gives zero gradients, not errors)."""
    return like.sum() * 0.0


def pair_mask_losses(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    pair_valid: torch.Tensor,
    has_target: torch.Tensor,
    valid: torch.Tensor,
    cfg: LossConfig,
    *,
    prefix: str,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """BCE + Dice + IoU-MSE over the real (image, query) pairs of a batch.

    Args:
        logits: ``(B, T, h, w)`` mask logits (upsampled to ``S`` inside :func:`mask_losses` if needed).
        iou_pred: ``(B, T)`` predicted IoU.
        targets: ``(B, T, S, S)`` float in {0, 1}, in query order.
        pair_valid: ``(B, T)`` bool, the pairs that count (padded slots are False).
        has_target: ``(B, T)`` bool, False where the target is empty on purpose (classic no-target:
            BCE pushes the mask empty, Dice is skipped).
        valid: ``(B, S, S)`` bool pixels inside the image and not ignored.
        prefix: name prefix (``head`` / ``sam``): terms ``{prefix}_bce``, ``{prefix}_dice`` and
            ``iou`` (head) or ``sam_iou``.
        scale: multiplies every term.
    """
    iou_name = "iou" if prefix == "head" else f"{prefix}_iou"
    names = (f"{prefix}_bce", f"{prefix}_dice", iou_name)
    b_idx, t_idx = pair_valid.nonzero(as_tuple=True)  # (N,), (N,) real pairs, sample-major
    if b_idx.numel() == 0:  # no real pair in the batch (e.g. every sample is a no-target one)
        zero = _zero(logits) + _zero(iou_pred)
        return dict.fromkeys(names, zero)
    out = mask_losses(
        logits[b_idx, t_idx],  # (N, h, w)
        iou_pred[b_idx, t_idx],  # (N,)
        targets[b_idx, t_idx],  # (N, S, S)
        valid[b_idx],  # (N, S, S)
        has_target[b_idx, t_idx],  # (N,)
        cfg,
    )
    terms = out.terms
    return {
        names[0]: scale * terms["bce"],
        names[1]: scale * terms["dice"],
        names[2]: scale * terms["iou"],
    }


@torch.no_grad()
def match_targets(
    logits: torch.Tensor, targets: torch.Tensor, target_valid: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Reorder each sample's targets to its queries by minimum BCE + Dice (Hungarian assignment).

    Args:
        logits: ``(B, T, h, w)`` the head's mask logits, query ``t`` = the ``t``-th ``[SEG]``.
        targets: ``(B, T, S, S)`` in annotation order; ``target_valid (B, T)``; ``valid (B, S, S)``.

    Returns:
        ``(B, T)`` long: query ``t`` of sample ``b`` is trained on ``targets[b, order[b, t]]``
        (the identity on padded slots and for samples with fewer than two targets).
    """
    b, t, h, w = logits.shape
    order = torch.arange(t, device=logits.device).repeat(b, 1)  # (B, T) identity
    counts = target_valid.sum(1).tolist()
    if t < 2 or max(counts, default=0) < 2:
        return order
    # targets and valid area at the head's resolution (area average: soft targets on edge cells)
    small = F.adaptive_avg_pool2d(targets.float(), (h, w))  # (B, T, S, S) -> (B, T, h, w)
    area = F.adaptive_avg_pool2d(valid[:, None].float(), (h, w))[:, 0]  # (B, S, S) -> (B, h, w)
    for i, n in enumerate(counts):
        if n < 2:
            continue
        x = logits[i, :n].float().flatten(1)  # (n, h*w) queries
        y = small[i, :n].flatten(1)  # (n, h*w) targets
        m = area[i].flatten()[None]  # (1, h*w) weights
        p = x.sigmoid() * m
        # BCE cost (n, n): mean over valid pixels of -[y log p + (1-y) log(1-p)], as one matmul
        pos, neg = -F.logsigmoid(x) * m, -F.logsigmoid(-x) * m  # (n, h*w)
        bce = (pos @ y.T + neg @ (1 - y).T) / m.sum().clamp_min(1.0)  # (n_q, n_t)
        dice = 1 - (2 * p @ y.T + 1) / (p.sum(1, keepdim=True) + (y * m).sum(1)[None] + 1)  # (n_q, n_t)
        rows, cols = linear_sum_assignment((bce + dice).cpu().numpy())
        order[i, torch.as_tensor(rows, device=order.device)] = torch.as_tensor(cols, device=order.device)
    return order


def no_target_loss(
    reject_logit: torch.Tensor, has_target: torch.Tensor, weight: float, pos_weight: float = 1.0
) -> torch.Tensor:
    """``weight`` x BCE of ``reject_logit (B,)`` against ``~has_target (B,)`` (1 = nothing matches),
    the no-target class weighted ``pos_weight``."""
    pw = reject_logit.new_tensor(pos_weight, dtype=torch.float32)
    target = (~has_target).float()
    return weight * F.binary_cross_entropy_with_logits(reject_logit.float(), target, pos_weight=pw)


def region_coverage(labels: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of each region inside each target.

    Args:
        labels: ``(B, S, S)`` long region ids ``0..K-1`` (``-1`` = no region).
        targets: ``(B, T, S, S)`` in {0, 1}.
        k: ``K``, the number of region slots.

    Returns:
        ``(B, T, K)`` float: target pixels of region ``k`` / pixels of region ``k`` (0 for empty ids).
    """
    b, t = targets.shape[:2]
    flat = labels.reshape(b, -1)  # (B, S*S)
    inside = (flat >= 0).float()  # (B, S*S)
    index = flat.clamp_min(0)
    area = targets.new_zeros(b, k).scatter_add_(1, index, inside)  # (B, K) pixels per region
    hits = targets.flatten(2).float() * inside[:, None]  # (B, T, S, S) -> (B, T, S*S)
    covered = targets.new_zeros(b, t, k).scatter_add_(2, index[:, None].expand(b, t, index.shape[1]), hits)
    return covered / area.clamp_min(1.0)[:, None]  # (B, T, K)


def region_losses(
    region_logits: torch.Tensor,
    region_mask: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    pair_valid: torch.Tensor,
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """``region_bce`` and ``region_dice`` of the pointer (``region_logits (B, T, K)``, ``region_mask
    (B, K)``) against ``targets (B, T, S, S)`` in query order over the real pairs ``pair_valid (B, T)``;
    ``labels (B, S, S)`` are the region ids the logits index (``-1`` = none)."""
    region_targets = (
        region_coverage(labels, targets, region_logits.shape[-1]) >= cfg.region_threshold
    ).float()
    bce, dice = pointer_loss(
        region_logits.float(),
        region_targets,
        region_mask,
        pair_valid,
        labels,
        targets,
        bce_weight=cfg.region_bce,
        dice_weight=cfg.region_dice,
    )
    return {"region_bce": bce, "region_dice": dice}
