"""Superpixel label maps: their input and their numbering.

* the generators' input check: any image array → ``(H, W, 3) uint8`` RGB, or a one-line error
  (:func:`as_rgb`; shared by the generators, :mod:`mllm_ris.modeling.superpixels`, and their disk
  cache, :mod:`mllm_ris.modeling.superpixel_cache`, which keys files on the normalised image);
* label maps in token order: the one numbering that region tokens, region descriptors and the painted
  region prior share (region ``k`` of an image = its ``k``-th visual token).
"""

from __future__ import annotations

import numpy as np
import torch

from mllm_ris.errors import MllmRisError

__all__ = ["SuperpixelInputError", "as_rgb", "keep_largest", "relabel", "token_order_labels"]


class SuperpixelInputError(MllmRisError, ValueError):
    """The image given to a superpixel generator has the wrong type, dtype, shape or is empty."""


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate and normalise an image to ``(H, W, 3) uint8``.

    Accepted: ``(H, W, 3)`` RGB, ``(H, W)`` / ``(H, W, 1)`` grey (replicated), ``(H, W, 4)`` RGBA
    (alpha ignored). Only ``uint8``: float images are refused because their range (0-1 or 0-255)
    is ambiguous.
    """
    if not isinstance(image, np.ndarray):
        raise SuperpixelInputError(f"image: expected a numpy array, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dtype != np.uint8:
        raise SuperpixelInputError(f"image: expected dtype uint8 (0-255), got {image.dtype}")
    image = image[:, :, None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise SuperpixelInputError(f"image: expected shape (H, W, 3), (H, W, 4) or (H, W), got {shape}")
    if image.size == 0:
        raise SuperpixelInputError(f"image: empty image of shape {shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)  # (H, W, 1) -> (H, W, 3)
    return np.ascontiguousarray(image[:, :, :3])  # RGBA -> RGB


def token_order_labels(superpixels: torch.Tensor, *, max_tokens: int | None = None) -> torch.Tensor:
    """``(B, H', W')`` label maps (any integer ids, negative = no region) → ``(B, H', W')`` long ids
    ``0..K_b-1`` in increasing id order, ``-1`` = no region; with ``max_tokens`` only each image's
    largest ``max_tokens`` regions keep an id (:func:`keep_largest`)."""
    dense, total = relabel(superpixels.long())
    if max_tokens is not None:
        dense = keep_largest(dense, total, max_tokens)
    return dense


def relabel(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``labels (B, H', W')`` any integer ids (negative = no region) → consecutive ids per image in
    increasing id order ``(B, H', W')`` (-1 kept) and the region count per image ``(B,)``.

    Counting ids (``bincount``) replaces a per-image sort; sparse huge ids are first compacted with
    one ``torch.unique`` over the batch.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    valid = flat >= 0
    if not bool(valid.any()):
        return torch.full_like(labels, -1), torch.zeros(b, dtype=torch.long, device=labels.device)
    m = int(flat.max()) + 1
    if m > flat.numel():  # sparse ids: compact them (keeps their order) before counting
        compact = torch.unique(flat[valid], return_inverse=True)[1]
        flat = torch.full_like(flat, -1).masked_scatter(valid, compact)
        m = int(compact.max()) + 1
    rows = torch.arange(b, device=labels.device)[:, None]
    index = rows * m + flat.clamp_min(0)  # (B, P) id in a per-image block of m
    present = torch.bincount(index[valid], minlength=b * m).view(b, m) > 0  # (B, m)
    rank = present.cumsum(1) - 1  # (B, m) consecutive id of each present label
    dense = torch.where(valid, rank.gather(1, flat.clamp_min(0)), -1)
    return dense.view_as(labels), present.sum(1)


def keep_largest(dense: torch.Tensor, total: torch.Tensor, cap: int) -> torch.Tensor:
    """Keep each image's ``cap`` regions with the most pixels (ties: smaller id), renumbered in id order;
    the others become -1. ``dense (B, H', W')`` consecutive ids, ``total (B,)`` regions per image."""
    b = dense.shape[0]
    k0 = int(total.max()) if b else 0
    if k0 <= cap:
        return dense
    flat = dense.reshape(b, -1)
    valid = flat >= 0
    rows = torch.arange(b, device=dense.device)[:, None]
    area = torch.bincount((rows * k0 + flat.clamp_min(0))[valid], minlength=b * k0).view(b, k0)
    order = torch.sort(-area, dim=1, stable=True).indices  # largest first; ties: smaller id; absent ids last
    chosen = torch.arange(k0, device=dense.device)[None, :] < total.clamp(max=cap)[:, None]  # (B, k0)
    selected = torch.zeros_like(chosen).scatter(1, order, chosen)  # (B, k0) by region id
    remap = torch.where(selected, selected.cumsum(1) - 1, -1)  # kept regions renumbered in id order
    return torch.where(valid, remap.gather(1, flat.clamp_min(0)), -1).view_as(dense)
