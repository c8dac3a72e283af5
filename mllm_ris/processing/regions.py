"""Superpixel regions: their label maps, descriptors and targets: what the model knows about each superpixel,
and which ones a mask picks.

Label maps (the input and numbering every region consumer shares):

* the generators' input check: any image array → ``(H, W, 3) uint8`` RGB, or a one-line error
  (:func:`as_rgb`; shared by the generators, :mod:`mllm_ris.modeling.superpixels`, and their disk
  cache, :mod:`mllm_ris.modeling.superpixel_cache`, which keys files on the normalised image);
* label maps in token order (:func:`token_order_labels`, :func:`relabel`, :func:`keep_largest`): the one
  numbering that region tokens, region descriptors and the painted region prior share (region ``k`` of an
  image = its ``k``-th visual token).

Descriptors and targets:

Inputs are a letterboxed canvas ``(H, W, 3) uint8`` (``H == W == S`` in the pipeline, but any size works) and
its superpixel label map ``(H, W)`` int with ids ``0..K-1``; ``-1`` marks letterbox padding, which belongs to
no region. Everything here is numpy, deterministic and unlearned (it runs once per image in the processor and
can be cached); :func:`batch_region_descriptors` turns a list of per-image descriptors into padded torch
tensors.

Per region ``k`` (:class:`RegionDescriptors`):

* ``shape (K, 16, 16)`` — the region's mask cropped to its bounding box and resized to 16×16 by area
  averaging (each output cell is the fraction of its area covered by the region), values in ``[0, 1]``;
* ``color (K, 6)`` — CIELAB statistics inside the region, ``[L_mean/100, a_mean/100, b_mean/100,
  L_std/50, a_std/50, b_std/50]``: means of L in ``[0, 1]`` and of a, b in about ``[-1, 1]``; stds in about
  ``[0, 1]`` (50 is half of L's range, the largest std L can have);
* ``geometry (K, 10)`` — see :data:`GEOMETRY_FIELDS`: centroid ``(cx, cy)`` of the pixel centres divided by
  ``(W, H)``; box ``(x0, y0, x1, y1)`` (``x1``/``y1`` exclusive) divided by ``(W, H)``, so a full-canvas
  region is ``(0, 0, 1, 1)``; ``area`` = pixels / ``(H * W)``; second central moments of the pixel centres
  in canvas units ``(cov_xx, cov_xy, cov_yy)``, multiplied by 12 so that a region covering the whole canvas
  has ``cov_xx == cov_yy ≈ 1`` (the variance of a uniform distribution on ``[0, 1]`` is 1/12);
* ``valid (K,)`` — False for ids in ``0..K-1`` that have no pixel; their rows are all zeros.

Targets: :func:`region_coverage` is the fraction of each region's pixels inside each target mask ``(T, K)``;
:func:`region_targets` thresholds it (``coverage >= threshold``, so exactly 50 % counts at 0.5);
:func:`oracle_mask` paints the chosen regions back ``(T, H, W)`` — the best mask a model that only chooses
regions can produce (the *superpixel ceiling*), measured by :func:`superpixel_ceiling_iou`.

Cost of :func:`region_descriptors` (2-core dev machine shared with other jobs, load 3-6; numpy 2.4,
scikit-image 0.26; random image, Voronoi label maps; best / mean of 20 runs): 128×128 with 20 regions
4.2 / 4.7-7.8 ms; 512×512 with 60 regions 87 / 108 ms, of which ``rgb2lab`` is ~55 ms, the bincounts and
index gathers most of the rest; the loop over regions for the 16×16 crops is a few ms. Cache per image: the
processor keeps them in an :class:`LruMemo` keyed by :func:`digest` of the canvas and labels (a bounded
least-recently-used memo keyed by array bytes, which a frozen vision tower uses for its features too;
``functools.lru_cache`` needs hashable arguments and bounds by entry count only, here the bound may be a
cost, e.g. bytes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch
from scipy import ndimage
from skimage.color import rgb2lab

from mllm_ris.errors import MllmRisError

__all__ = [
    "COLOR_DIM",
    "GEOMETRY_DIM",
    "GEOMETRY_FIELDS",
    "SHAPE_SIZE",
    "LruMemo",
    "RegionDescriptorBatch",
    "RegionDescriptors",
    "RegionInputError",
    "SuperpixelInputError",
    "as_rgb",
    "batch_region_descriptors",
    "digest",
    "keep_largest",
    "oracle_mask",
    "region_coverage",
    "region_descriptors",
    "region_targets",
    "relabel",
    "superpixel_ceiling_counts",
    "superpixel_ceiling_iou",
    "token_order_labels",
]

SHAPE_SIZE = 16
GEOMETRY_FIELDS: tuple[str, ...] = ("cx", "cy", "x0", "y0", "x1", "y1", "area", "cov_xx", "cov_xy", "cov_yy")
GEOMETRY_DIM = len(GEOMETRY_FIELDS)
COLOR_DIM = 6
_LAB_MEAN_SCALE = 100.0
_LAB_STD_SCALE = 50.0
_COV_SCALE = 12.0


class RegionInputError(MllmRisError, ValueError):
    """A canvas, label map or target mask has the wrong dtype or shape, or they do not fit each other."""


# ----------------------------------------------------------------------------- label maps


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


# ----------------------------------------------------------------------------- descriptors


class RegionDescriptors(NamedTuple):
    """Descriptors of the ``K`` regions of one image (numpy, float32 except ``valid``).

    Attributes:
        shape: ``(K, 16, 16)`` region mask in its box, area-resized, in ``[0, 1]``.
        color: ``(K, 6)`` CIELAB ``[L, a, b] / 100`` means and ``[L, a, b] / 50`` stds.
        geometry: ``(K, 10)`` fields :data:`GEOMETRY_FIELDS` (module docstring).
        valid: ``(K,)`` bool, False for ids without pixels (their rows are zero).
    """

    shape: np.ndarray
    color: np.ndarray
    geometry: np.ndarray
    valid: np.ndarray

    @property
    def num_regions(self) -> int:
        return int(self.valid.shape[0])


@dataclass
class RegionDescriptorBatch:
    """Descriptors of ``B`` images padded to ``Kmax`` regions (torch).

    Attributes:
        shape: ``(B, Kmax, 16, 16)`` float32.
        color: ``(B, Kmax, 6)`` float32.
        geometry: ``(B, Kmax, 10)`` float32.
        mask: ``(B, Kmax)`` bool — True for regions that exist and have pixels (padding and empty ids False).
        num_regions: ``(B,)`` long — each image's ``K`` (label ids ``>= K`` do not occur in its label map).
    """

    shape: torch.Tensor
    color: torch.Tensor
    geometry: torch.Tensor
    mask: torch.Tensor
    num_regions: torch.Tensor

    def to(self, device: torch.device | str) -> RegionDescriptorBatch:
        return RegionDescriptorBatch(
            shape=self.shape.to(device),
            color=self.color.to(device),
            geometry=self.geometry.to(device),
            mask=self.mask.to(device),
            num_regions=self.num_regions.to(device),
        )


def _check_labels(labels: np.ndarray, num_regions: int | None) -> tuple[np.ndarray, int]:
    """Validate a label map ``(H, W)`` int; return it as int64 and ``K`` (``num_regions`` or ``max + 1``)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise RegionInputError(f"labels: expected a non-empty (H, W) map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise RegionInputError(f"labels: expected an integer dtype, got {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < -1:
        raise RegionInputError(f"labels: ids must be >= -1 (-1 = padding), got {lo}")
    k = hi + 1 if num_regions is None else int(num_regions)
    if hi >= k:
        raise RegionInputError(f"labels: id {hi} does not fit num_regions {k}")
    return labels, k


@lru_cache(maxsize=512)
def _area_weights(n: int, m: int = SHAPE_SIZE) -> np.ndarray:
    """``(m, n)`` area-averaging weights from ``n`` input cells to ``m`` output cells (rows sum to 1).

    Output cell ``i`` spans ``[i n/m, (i+1) n/m)`` in input units; its weight on input cell ``j`` is the
    overlap with ``[j, j+1)`` divided by the cell length ``n/m`` (exact for up- and down-sampling).
    """
    edges = np.arange(m + 1, dtype=np.float64) * (n / m)  # (m+1,)
    j = np.arange(n, dtype=np.float64)  # (n,)
    lo = np.maximum(edges[:-1, None], j[None, :])  # (m, n)
    hi = np.minimum(edges[1:, None], j[None, :] + 1.0)  # (m, n)
    w = np.clip(hi - lo, 0.0, None) / (n / m)
    w.flags.writeable = False
    return w


def region_descriptors(
    canvas: np.ndarray, labels: np.ndarray, *, num_regions: int | None = None
) -> RegionDescriptors:
    """Shape, colour and geometry descriptors of every region of one image.

    Args:
        canvas: ``(H, W, 3)`` uint8 RGB (letterboxed).
        labels: ``(H, W)`` int, ids ``0..K-1``, ``-1`` for padding (no region).
        num_regions: ``K``; default ``labels.max() + 1``. Ids without pixels get ``valid = False``.

    Returns:
        :class:`RegionDescriptors` with ``K`` rows.
    """
    canvas = np.asarray(canvas)
    labels, k = _check_labels(labels, num_regions)
    h, w = labels.shape
    if canvas.dtype != np.uint8 or canvas.shape != (h, w, 3):
        raise RegionInputError(
            f"canvas: expected ({h}, {w}, 3) uint8 to match labels {labels.shape}, "
            f"got {canvas.shape} {canvas.dtype}"
        )
    flat = labels.reshape(-1)  # (H*W,)
    idx = np.flatnonzero(flat >= 0)  # (N,) pixels that belong to a region
    lab_id = flat[idx]  # (N,)
    counts = np.bincount(lab_id, minlength=k).astype(np.float64)  # (K,)
    valid = counts > 0
    denom = np.maximum(counts, 1.0)

    # colour: two-pass mean / std of CIELAB per region
    lab = rgb2lab(canvas).reshape(-1, 3)[idx]  # (H, W, 3) -> (H*W, 3) -> (N, 3)
    total = np.stack([np.bincount(lab_id, weights=lab[:, c], minlength=k) for c in range(3)], 1)  # (K, 3)
    mean = total / denom[:, None]
    dev = lab - mean[lab_id]  # (N, 3)
    var = np.stack([np.bincount(lab_id, weights=dev[:, c] ** 2, minlength=k) for c in range(3)], 1)
    std = np.sqrt(var / denom[:, None])  # (K, 3)
    color = np.concatenate([mean / _LAB_MEAN_SCALE, std / _LAB_STD_SCALE], 1)  # (K, 6)

    # geometry: pixel centres in canvas units, first and second moments per region
    ys, xs = np.divmod(idx, w)  # (N,), (N,)
    xn = (xs + 0.5) / w
    yn = (ys + 0.5) / h
    cx = np.bincount(lab_id, weights=xn, minlength=k) / denom  # (K,)
    cy = np.bincount(lab_id, weights=yn, minlength=k) / denom
    dx = xn - cx[lab_id]  # (N,)
    dy = yn - cy[lab_id]
    cov_xx = np.bincount(lab_id, weights=dx * dx, minlength=k) / denom * _COV_SCALE
    cov_xy = np.bincount(lab_id, weights=dx * dy, minlength=k) / denom * _COV_SCALE
    cov_yy = np.bincount(lab_id, weights=dy * dy, minlength=k) / denom * _COV_SCALE

    # boxes and shape crops: find_objects wants 1..K with 0 = background (our -1)
    shape = np.zeros((k, SHAPE_SIZE, SHAPE_SIZE), dtype=np.float32)
    box = np.zeros((k, 4), dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(labels + 1, max_label=k)):
        if sl is None:
            continue
        ys_sl, xs_sl = sl
        box[i] = (xs_sl.start / w, ys_sl.start / h, xs_sl.stop / w, ys_sl.stop / h)
        crop = (labels[sl] == i).astype(np.float64)  # (h_i, w_i)
        wy = _area_weights(crop.shape[0])  # (16, h_i)
        wx = _area_weights(crop.shape[1])  # (16, w_i)
        shape[i] = np.clip(wy @ crop @ wx.T, 0.0, 1.0)  # (16, h_i) @ (h_i, w_i) @ (w_i, 16) -> (16, 16)

    geometry = np.stack(
        [cx, cy, box[:, 0], box[:, 1], box[:, 2], box[:, 3], counts / (h * w), cov_xx, cov_xy, cov_yy], 1
    )  # (K, 10), order = GEOMETRY_FIELDS
    color[~valid] = 0.0
    geometry[~valid] = 0.0
    return RegionDescriptors(
        shape=shape,
        color=color.astype(np.float32),
        geometry=geometry.astype(np.float32),
        valid=valid,
    )


def batch_region_descriptors(
    descriptors: list[RegionDescriptors], *, pad_to: int | None = None
) -> RegionDescriptorBatch:
    """Pad per-image descriptors to ``(B, Kmax, ...)`` tensors with a ``(B, Kmax)`` mask.

    Args:
        descriptors: ``B`` results of :func:`region_descriptors` (``K_b`` regions each).
        pad_to: ``Kmax`` (a fixed size, e.g. for static shapes); default ``max_b K_b``. Regions are never
            dropped: a ``K_b > pad_to`` raises, because the label maps index regions by position.
    """
    if not descriptors:
        raise RegionInputError("descriptors: need at least one image, got an empty list")
    ks = [d.num_regions for d in descriptors]
    kmax = max(ks) if pad_to is None else int(pad_to)
    if max(ks) > kmax:
        raise RegionInputError(f"pad_to: {kmax} is smaller than the largest region count {max(ks)}")
    b = len(descriptors)
    shape = torch.zeros(b, kmax, SHAPE_SIZE, SHAPE_SIZE)
    color = torch.zeros(b, kmax, COLOR_DIM)
    geometry = torch.zeros(b, kmax, GEOMETRY_DIM)
    mask = torch.zeros(b, kmax, dtype=torch.bool)
    for i, (d, k) in enumerate(zip(descriptors, ks, strict=True)):
        shape[i, :k] = torch.from_numpy(np.ascontiguousarray(d.shape, dtype=np.float32))
        color[i, :k] = torch.from_numpy(np.ascontiguousarray(d.color, dtype=np.float32))
        geometry[i, :k] = torch.from_numpy(np.ascontiguousarray(d.geometry, dtype=np.float32))
        mask[i, :k] = torch.from_numpy(np.asarray(d.valid, dtype=bool))
    return RegionDescriptorBatch(
        shape=shape, color=color, geometry=geometry, mask=mask, num_regions=torch.tensor(ks, dtype=torch.long)
    )


def _check_targets(labels: np.ndarray, target_masks: np.ndarray) -> np.ndarray:
    target_masks = np.asarray(target_masks)
    if target_masks.ndim != 3 or target_masks.shape[1:] != labels.shape:
        raise RegionInputError(
            f"target_masks: expected (T, {labels.shape[0]}, {labels.shape[1]}) to match labels, "
            f"got {target_masks.shape}"
        )
    return target_masks.astype(bool, copy=False)


def region_coverage(
    labels: np.ndarray, target_masks: np.ndarray, *, num_regions: int | None = None
) -> np.ndarray:
    """Fraction of each region's pixels inside each target mask.

    Args:
        labels: ``(H, W)`` int, ``-1`` = padding (ignored).
        target_masks: ``(T, H, W)`` bool.
        num_regions: ``K``; default ``labels.max() + 1``.

    Returns:
        ``(T, K)`` float64 in ``[0, 1]``; 0 for regions without pixels.
    """
    labels, k = _check_labels(labels, num_regions)
    target_masks = _check_targets(labels, target_masks)
    t = target_masks.shape[0]
    flat = labels.reshape(-1)  # (H*W,)
    idx = np.flatnonzero(flat >= 0)
    lab_id = flat[idx]  # (N,)
    counts = np.bincount(lab_id, minlength=k).astype(np.float64)  # (K,)
    inside = target_masks.reshape(t, flat.size)[:, idx]  # (T, H, W) -> (T, H*W) -> (T, N) bool
    tt, nn = np.nonzero(inside)  # pixel hits per target
    hits = np.bincount(tt * k + lab_id[nn], minlength=t * k).reshape(t, k)  # (T*K,) -> (T, K)
    return hits / np.maximum(counts, 1.0)[None, :]


def region_targets(
    labels: np.ndarray,
    target_masks: np.ndarray,
    threshold: float = 0.5,
    *,
    num_regions: int | None = None,
) -> np.ndarray:
    """``(T, K)`` float32: 1 where target ``t`` covers at least ``threshold`` of region ``k``'s pixels.

    The comparison is ``coverage >= threshold``: a region exactly half inside counts at 0.5.
    """
    if not 0.0 < threshold <= 1.0:
        raise RegionInputError(f"threshold: must be in (0, 1], got {threshold}")
    coverage = region_coverage(labels, target_masks, num_regions=num_regions)
    return (coverage >= threshold).astype(np.float32)


def _paint(labels: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``chosen (T, K)`` bool painted through ``labels (H, W)`` → ``(T, H, W)`` bool; padding is False."""
    t, k = chosen.shape
    ext = np.concatenate([chosen, np.zeros((t, 1), dtype=bool)], 1)  # (T, K+1): column K = padding
    lab = np.where(labels >= 0, labels, k)  # (H, W)
    return ext[:, lab]  # (T, H, W)


def oracle_mask(
    labels: np.ndarray,
    target_masks: np.ndarray,
    threshold: float = 0.5,
    *,
    num_regions: int | None = None,
) -> np.ndarray:
    """The superpixel oracle: the union of the regions :func:`region_targets` picks, ``(T, H, W)`` bool."""
    labels, k = _check_labels(labels, num_regions)
    chosen = region_targets(labels, target_masks, threshold, num_regions=k) > 0  # (T, K)
    return _paint(labels, chosen)


def superpixel_ceiling_counts(
    labels: np.ndarray,
    target_masks: np.ndarray,
    threshold: float = 0.5,
    *,
    num_regions: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union pixel counts ``(T,)``, ``(T,)`` int64 of the oracle with the true masks.

    Sum them over a dataset for the ceiling's cIoU (``sum(inter) / sum(union)``).
    """
    labels, k = _check_labels(labels, num_regions)
    target_masks = _check_targets(labels, target_masks)
    oracle = oracle_mask(labels, target_masks, threshold, num_regions=k)  # (T, H, W)
    t = target_masks.shape[0]
    inter = (oracle & target_masks).reshape(t, labels.size).sum(1)  # (T, H, W) -> (T, H*W) -> (T,)
    union = (oracle | target_masks).reshape(t, labels.size).sum(1)
    return inter.astype(np.int64), union.astype(np.int64)


def superpixel_ceiling_iou(
    labels: np.ndarray,
    target_masks: np.ndarray,
    threshold: float = 0.5,
    *,
    num_regions: int | None = None,
) -> np.ndarray:
    """IoU ``(T,)`` float64 of the oracle mask with each true mask (empty target and empty oracle: 1)."""
    inter, union = superpixel_ceiling_counts(labels, target_masks, threshold, num_regions=num_regions)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------- the descriptor memo

V = TypeVar("V")


def digest(*arrays: np.ndarray) -> bytes:
    """A 16-byte BLAKE2b digest of the arrays' raw bytes, in order (shape and dtype are the caller's)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


class LruMemo(Generic[V]):
    """Values by key, least recently used dropped first once the summed ``cost`` exceeds ``capacity``
    (the newest value is always kept, even if it alone exceeds it).

    Args:
        capacity: the bound on the summed cost.
        cost: the cost of one value (default 1: ``capacity`` counts entries).
    """

    def __init__(self, capacity: float, cost: Callable[[V], float] = lambda value: 1) -> None:
        self.capacity = capacity
        self.cost = cost
        self.used = 0.0
        self._items: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: V) -> None:
        """Store ``value`` under ``key`` (a no-op if present), then drop the oldest values over capacity."""
        if key in self._items:
            return
        self._items[key] = value
        self.used += self.cost(value)
        while self.used > self.capacity and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= self.cost(old)

    def clear(self) -> None:
        """Drop every value."""
        self._items.clear()
        self.used = 0.0
