"""Small building blocks shared by the S²RM head, the CASG decoder and the baseline heads.

Everything here is private to :mod:`s2rm_head.heads` (imported by ``s2rm.py``, ``casg.py``,
``fusion.py`` and ``baselines.py``); the public API is in ``s2rm_head/__init__.py``.

Normalisation inside fusion blocks is :class:`LayerNorm2d` (per pixel, over channels), never
GroupNorm/BatchNorm: a per-pixel norm has no spatial reach, so the only long-range paths in a
block are the ones its design puts there (this is what the S²RM co-parsing test relies on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []

NUM_COORD_CHANNELS = 8


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` map, independently at every pixel."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # (B, 1, H, W)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv(k, same padding, no bias) -> LayerNorm2d -> GELU``; ``(B, Cin, H, W) -> (B, Cout, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        LayerNorm2d(out_channels),
        nn.GELU(),
    )


def coord_features(n: int, h: int, w: int, *, like: torch.Tensor) -> torch.Tensor:
    """The 8-channel spatial coordinate map used by concat-fusion RIS models (LTS, CMSA).

    Per cell: ``x_min, y_min, x_max, y_max, x_center, y_center`` in [-1, 1] and ``1/w, 1/h``.

    Returns:
        ``(n, 8, h, w)`` on ``like``'s device and dtype.
    """
    ys = torch.linspace(-1.0, 1.0, h + 1, device=like.device, dtype=like.dtype)  # (h+1,) cell edges
    xs = torch.linspace(-1.0, 1.0, w + 1, device=like.device, dtype=like.dtype)  # (w+1,)
    y0, y1 = ys[:-1, None].expand(h, w), ys[1:, None].expand(h, w)  # (h, w) each
    x0, x1 = xs[None, :-1].expand(h, w), xs[None, 1:].expand(h, w)  # (h, w) each
    inv_w = torch.full((h, w), 1.0 / w, device=like.device, dtype=like.dtype)
    inv_h = torch.full((h, w), 1.0 / h, device=like.device, dtype=like.dtype)
    coords = torch.stack([x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, inv_w, inv_h])  # (8, h, w)
    return coords[None].expand(n, -1, -1, -1)  # (n, 8, h, w)


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x (B, C, h, w)`` to the spatial size of ``ref (B, *, H, W)``."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class ConcatFusion(nn.Module):
    """Concat-and-conv fusion: vision ‖ tiled query ‖ coordinates -> conv -> fused map.

    The classic RIS fusion (Hu et al. 2016, LTS, CMSA's per-level input): no attention, every
    pixel sees the same sentence vector. Cost ``O(HW C^2)``.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.fuse = nn.Sequential(
            conv_norm_act(2 * dim + NUM_COORD_CHANNELS, dim, kernel_size=1),
            conv_norm_act(dim, dim, kernel_size=3),
        )

    def forward(self, vis: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``vis (N, C, H, W)``, ``query (N, C)`` -> ``(N, C, H, W)``."""
        n, _, h, w = vis.shape
        tiled = query[:, :, None, None].expand(-1, -1, h, w)  # (N, C) -> (N, C, H, W)
        coords = coord_features(n, h, w, like=vis)  # (N, 8, H, W)
        return self.fuse(torch.cat([vis, tiled, coords], dim=1))  # (N, 2C+8, H, W) -> (N, C, H, W)


class TopDownDecoder(nn.Module):
    """FPN-style top-down merge shared by the baselines: coarsest level upsampled into each finer one.

    ``y_3 = x_3``; ``y_i = conv3x3(x_i + up(y_{i+1}))``. Cost ``O(sum_i H_i W_i C^2)``.
    """

    def __init__(self, *, dim: int, num_levels: int) -> None:
        super().__init__()
        self.merge = nn.ModuleList(conv_norm_act(dim, dim) for _ in range(num_levels - 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """``feats``: ``(N, C, H_i, W_i)`` finest first -> ``(N, C, H_0, W_0)``."""
        y = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            y = self.merge[i](feats[i] + upsample_to(y, feats[i]))
        return y


class MaskIoUPredictor(nn.Module):
    """Mask logits and a predicted IoU from a decoded 1/4-resolution map.

    The IoU regressor is a small MLP over two pooled descriptors of the map: its global mean and
    its mean inside the predicted mask (so the score sees what was segmented). Its output is left
    sigmoid-free (regressed to the true IoU in [0, 1], as in SAM's IoU head).
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.mask = nn.Sequential(conv_norm_act(dim, dim), nn.Conv2d(dim, 1, kernel_size=1))
        self.iou = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (N, C, h, w)`` -> ``(mask_logits (N, 1, h, w), iou_pred (N,))``."""
        logits = self.mask(x)  # (N, 1, h, w)
        weight = torch.sigmoid(logits)  # (N, 1, h, w) soft mask
        inside = (x * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)  # (N, C)
        pooled = torch.cat([x.mean((2, 3)), inside], dim=1)  # (N, 2C)
        return logits, self.iou(pooled).squeeze(1)  # (N, 1, h, w), (N,)
