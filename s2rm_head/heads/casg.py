"""CASG: the Cross-scale Abstract Semantic Guided decoder of S²RM (arXiv 2405.09006).

Our own implementation of the paper's description ("emphasize the foreground of the referent,
integrating different grained features at a comparatively low cost"):

1. **Abstract semantics.** The two coarsest fused levels (1/16 and 1/32) are merged at 1/32 —
   the 1/16 map average-pooled down, concatenated with the 1/32 map, conv — into the abstract map
   ``A``. A 1x1 conv on ``A`` gives the foreground *guidance* logits ``G`` (one channel).
2. **Guided top-down decoding.** Starting from ``D_3 = A``, for each finer level ``i = 2, 1, 0``
   the guidance ``g = sigmoid(G)`` is upsampled to the level and re-weights it,
   ``F_i' = F_i * (1 + g)`` (foreground emphasised, background kept at half weight), then merged
   with the upsampled coarser decoding: ``D_i = conv3x3([F_i', up(D_{i+1})])``.
3. **Prediction.** ``D_0`` (1/4 resolution) -> mask logits, and a small MLP on its pooled
   features (global mean and mean inside the predicted mask) -> predicted IoU.

Every merge runs at the common width ``C``, and the guidance is computed once at the coarsest
level, so the decoder costs ``O(sum_i H_i W_i C^2)`` — no attention anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from s2rm_head.errors import ConfigError
from s2rm_head.heads._blocks import MaskIoUPredictor, conv_norm_act, upsample_to

__all__ = ["CASGDecoder", "CASGOutput"]


class CASGOutput(NamedTuple):
    """What the CASG decoder returns (``N`` = batch x targets); a ``NamedTuple`` so that ZeRO-3's
    hooks see the tensors, as :class:`~s2rm_head.types.HeadOutput`.

    Attributes:
        mask_logits: ``(N, 1, H_0, W_0)`` mask logits at the finest level (1/4 of the image).
        iou_pred: ``(N,)`` predicted IoU of each mask.
        guidance_logits: ``(N, 1, H_3, W_3)`` foreground guidance at the coarsest level (before the
            sigmoid); usable for deep supervision with a downsampled target mask.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    guidance_logits: torch.Tensor


class CASGDecoder(nn.Module):
    """Cross-scale abstract-semantic guided decoder over a 4-level fused pyramid."""

    def __init__(self, *, dim: int, num_levels: int = 4) -> None:
        super().__init__()
        if num_levels < 2:
            raise ConfigError(f"num_levels: CASG needs at least 2 levels, got {num_levels}")
        self.num_levels = num_levels
        self.abstract = conv_norm_act(2 * dim, dim)  # [F_{n-1}, pooled F_{n-2}] -> A
        self.guide = nn.Conv2d(dim, 1, kernel_size=1)  # A -> guidance logits
        # one merge per finer level: [F_i', up(D_{i+1})] (2C) -> D_i (C)
        self.merge = nn.ModuleList(conv_norm_act(2 * dim, dim) for _ in range(num_levels - 1))
        self.predict = MaskIoUPredictor(dim=dim)

    def forward(self, feats: list[torch.Tensor]) -> CASGOutput:
        """Decode a fused pyramid.

        Args:
            feats: ``num_levels`` maps ``(N, C, H_i, W_i)``, finest first (strides 4, 8, 16, 32).

        Returns:
            :class:`CASGOutput` with ``mask_logits (N, 1, H_0, W_0)``, ``iou_pred (N,)`` and
            ``guidance_logits (N, 1, H_3, W_3)``.
        """
        if len(feats) != self.num_levels:
            raise ValueError(f"CASG expects {self.num_levels} levels, got {len(feats)}")
        top, below = feats[-1], feats[-2]
        # cross-scale abstract semantics: (N, C, H_2, W_2) pooled to (N, C, H_3, W_3), concat -> 2C channels
        pooled = F.adaptive_avg_pool2d(below, top.shape[-2:])
        abstract = self.abstract(torch.cat([top, pooled], dim=1))  # (N, C, H_3, W_3)
        guidance_logits = self.guide(abstract)  # (N, 1, H_3, W_3)
        guidance = torch.sigmoid(guidance_logits)

        dec = abstract
        for i in range(self.num_levels - 2, -1, -1):
            level = feats[i]  # (N, C, H_i, W_i)
            weighted = level * (
                1.0 + upsample_to(guidance, level)
            )  # foreground re-weighting, (N, C, H_i, W_i)
            # [F_i', up(D_{i+1})]: (N, 2C, H_i, W_i) -> D_i (N, C, H_i, W_i)
            dec = self.merge[i](torch.cat([weighted, upsample_to(dec, level)], dim=1))
        mask_logits, iou_pred = self.predict(dec)  # (N, 1, H_0, W_0), (N,)
        return CASGOutput(mask_logits=mask_logits, iou_pred=iou_pred, guidance_logits=guidance_logits)
