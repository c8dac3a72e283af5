"""Superpixel regions: computing them, their label maps, descriptors and targets: what the model knows
about each superpixel, and which ones a mask picks. Not learned: the processor runs all of it per image.

Generators: an image ``(H, W, 3) uint8`` → a label map ``(H, W) int32`` with labels ``0..K-1``.

Three generators, one contract (:class:`SuperpixelGenerator`), built from one :class:`SuperpixelConfig`:

* ``slic`` — :class:`SLICSuperpixels`: scikit-image SLIC (connectivity enforced), then adjacent
  regions whose mean CIELAB colours differ by less than ``merge_threshold`` are merged
  (single linkage over the region adjacency graph), so flat areas cost one token, not many;
* ``sam`` — :class:`SAMSuperpixels`: "semantic superpixels" from segment-anything's automatic
  mask generator; masks are painted largest first (smaller masks stay visible on top), uncovered
  pixels go to the nearest region, or to SLIC regions where an uncovered area is large;
* ``grid`` — :class:`GridSuperpixels`: a regular ``grid x grid`` partition (a baseline).

Images larger than ``max_side`` are downscaled before segmenting; labels are upsampled back to
full size with nearest neighbour. Generators are deterministic. :class:`SuperpixelCache` (a training
cache, used when ``cache_dir`` is set) stores label maps on disk keyed by image content and generator
fingerprint. See docs/superpixels.md.

Label maps (the input and numbering every region consumer shares):

* the generators' input check: any image array → ``(H, W, 3) uint8`` RGB, or a one-line error
  (:func:`as_rgb`; shared by the generators and their disk cache, which keys files on the normalised
  image);
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

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.color import rgb2lab
from skimage.segmentation import slic

from mllm_ris.errors import ConfigError, MllmRisError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = [
    "COLOR_DIM",
    "GEOMETRY_DIM",
    "GEOMETRY_FIELDS",
    "SHAPE_SIZE",
    "CacheStats",
    "GridSuperpixels",
    "LruMemo",
    "RegionDescriptorBatch",
    "RegionDescriptors",
    "RegionInputError",
    "SAMSuperpixels",
    "SLICSuperpixels",
    "SuperpixelCache",
    "SuperpixelConfig",
    "SuperpixelGenerator",
    "SuperpixelInputError",
    "as_rgb",
    "batch_region_descriptors",
    "build_superpixel_generator",
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


# ----------------------------------------------------------------------------- generators

_ALGO_VERSION = 1  # bump when a generator's output changes for the same config: invalidates caches


@dataclass
class SuperpixelConfig:
    """How superpixels are computed; invalid values raise ConfigError naming the field."""

    method: Literal["slic", "sam", "grid"] = field(default="slic", metadata={"help": "generator kind"})
    n_segments: int = field(default=128, metadata={"help": "SLIC regions before merging (and SAM fallback)"})
    compactness: float = field(default=20.0, metadata={"help": "SLIC colour/space trade-off (high = square)"})
    merge_threshold: float = field(default=8.0, metadata={"help": "merge adjacent regions closer in CIELAB"})
    max_regions: int = field(default=48, metadata={"help": "SLIC: merge coarser down to this many (0 = off)"})
    grid: int = field(default=7, metadata={"help": "grid: cells per side"})
    max_side: int = field(default=512, metadata={"help": "longer image sides are downscaled to this, px"})
    min_region_area: int = field(default=16, metadata={"help": "sam: drop smaller masks / regions, px"})
    fallback_fraction: float = field(default=0.02, metadata={"help": "sam: SLIC in uncovered areas >= this"})
    points_per_side: int = field(default=16, metadata={"help": "sam: AMG point grid per side"})
    pred_iou_thresh: float = field(default=0.88, metadata={"help": "sam: AMG predicted-IoU filter"})
    stability_score_thresh: float = field(default=0.95, metadata={"help": "sam: AMG stability filter"})
    cache_dir: str | None = field(default=None, metadata={"help": "disk cache of label maps; null = off"})

    def __post_init__(self) -> None:
        if self.method not in ("slic", "sam", "grid"):
            raise ConfigError(f"method: must be one of slic, sam, grid, got {self.method!r}")
        lower = {"n_segments": 1, "grid": 1, "points_per_side": 1, "max_side": 8, "min_region_area": 0}
        lower |= {"max_regions": 0, "merge_threshold": 0, "compactness": 1e-6}
        for name, low in lower.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        for name in ("fallback_fraction", "pred_iou_thresh", "stability_score_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")


def _downscale(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``(H, W, 3)`` → ``(h, w, 3)`` with ``max(h, w) <= max_side`` (antialiased bilinear)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL takes (width, height)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _upsample_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(h, w)`` → ``(height, width)`` by nearest neighbour; every label survives when upsampling."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Non-negative integer labels → int32 ``0..K-1`` in increasing id order (``np.unique``'s inverse,
    by counting instead of sorting every pixel)."""
    flat = labels.ravel()
    if flat.size and int(flat.max()) >= 4 * flat.size:  # sparse huge ids: sorting is cheaper
        return np.unique(flat, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)
    present = np.bincount(flat) > 0
    rank = (np.cumsum(present) - 1).astype(np.int32)  # new id of each present label
    return rank[labels]


def _merge_regions(
    labels: np.ndarray, rgb: np.ndarray, threshold: float, budget: int, ignore: int | None = None
) -> np.ndarray:
    """Merge adjacent regions of similar mean CIELAB colour.

    Pass 1 joins every adjacent pair closer than ``threshold`` (single linkage over the region
    adjacency graph). While more than ``budget`` groups remain (``budget`` 0 = no limit), the
    threshold grows x1.5 and groups (with their new mean colours) are merged again. The region
    ``ignore`` is never merged. ``labels (h, w)`` non-negative → ``(h, w)`` group ids.
    """
    k = int(labels.max()) + 1
    flat = labels.ravel()
    lab = rgb2lab(rgb).reshape(-1, 3)  # (h*w, 3)
    counts = np.bincount(flat, minlength=k).astype(np.float64)  # (k,) pixels per region
    sums = np.stack([np.bincount(flat, weights=lab[:, c], minlength=k) for c in range(3)], 1)  # (k, 3)
    horizontal = np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1)  # (h*(w-1), 2)
    vertical = np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1)  # ((h-1)*w, 2)
    pairs = np.sort(np.concatenate([horizontal, vertical]), axis=1)
    keep = pairs[:, 0] != pairs[:, 1]
    if ignore is not None:
        keep &= (pairs != ignore).all(axis=1)
    codes = np.unique(pairs[keep, 0].astype(np.int64) * k + pairs[keep, 1])  # 1-D unique: faster than axis=0
    pairs = np.stack([codes // k, codes % k], 1)  # (E, 2) distinct pairs of touching regions, sorted
    groups = np.arange(k)  # region -> group
    while len(pairs):
        g_counts = np.maximum(np.bincount(groups, weights=counts, minlength=k), 1.0)
        g_means = np.stack([np.bincount(groups, weights=sums[:, c], minlength=k) for c in range(3)], 1)
        g_means /= g_counts[:, None]  # (k, 3) mean colour of each group
        gp = groups[pairs]  # (E, 2) group pairs
        gp = gp[gp[:, 0] != gp[:, 1]]
        close = gp[np.linalg.norm(g_means[gp[:, 0]] - g_means[gp[:, 1]], axis=1) < threshold]
        graph = coo_matrix((np.ones(len(close)), (close[:, 0], close[:, 1])), shape=(k, k))
        groups = connected_components(graph, directed=False)[1][groups]
        n_groups = len(np.unique(groups[counts > 0])) - (ignore is not None)
        if not budget or n_groups <= budget or threshold >= 200.0:  # CIELAB distances stay below ~200
            break
        threshold = max(threshold * 1.5, 2.0)
    return groups[labels]


def _slic(
    rgb: np.ndarray, cfg: SuperpixelConfig, n_segments: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """SLIC + colour merging on ``(h, w, 3)``; with ``mask (h, w)`` pixels outside are label 0.

    The region budget ``cfg.max_regions`` is scaled by the mask's area fraction.
    """
    labels = slic(
        rgb,
        n_segments=n_segments,
        compactness=cfg.compactness,
        channel_axis=-1,
        enforce_connectivity=True,
        start_label=0 if mask is None else 1,
        mask=mask,
    )
    if cfg.merge_threshold == 0 and cfg.max_regions == 0:
        return labels
    budget = cfg.max_regions if mask is None else max(1, round(cfg.max_regions * float(mask.mean())))
    return _merge_regions(labels, rgb, cfg.merge_threshold, budget, ignore=None if mask is None else 0)


class SuperpixelGenerator(ABC):
    """Base of every generator: ``__call__(image (H, W, 3) uint8) -> labels (H, W) int32, 0..K-1``.

    Subclasses implement :meth:`_segment` on the (possibly downscaled) RGB image.
    """

    downscale: bool = True  # False: segment at full size (cheap generators)

    def __init__(self, cfg: SuperpixelConfig | None = None) -> None:
        self.cfg = cfg or SuperpixelConfig()

    @abstractmethod
    def _segment(self, rgb: np.ndarray) -> np.ndarray:
        """``(h, w, 3) uint8`` → ``(h, w)`` non-negative integer labels (any ids)."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image (H, W, 3)`` uint8 (or grey / RGBA) → ``(H, W)`` int32 labels ``0..K-1``, all used.

        Raises:
            SuperpixelInputError: not a non-empty uint8 grey / RGB / RGBA array.
        """
        rgb = as_rgb(image)
        small = _downscale(rgb, self.cfg.max_side) if self.downscale else rgb
        labels = _consecutive(self._segment(small))  # relabel 0..K-1 at low res
        return _upsample_nearest(labels, *rgb.shape[:2])

    def _fingerprint_extra(self) -> str:
        return ""

    @property
    def fingerprint(self) -> str:
        """Hex digest of everything that determines the output (class, config, version, weights)."""
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "cache_dir"}
        text = json.dumps(
            [type(self).__name__, _ALGO_VERSION, settings, self._fingerprint_extra()], sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()


class SLICSuperpixels(SuperpixelGenerator):
    """SLIC superpixels (connectivity enforced) with adjacent similar-colour regions merged."""

    def _segment(self, rgb: np.ndarray) -> np.ndarray:
        return _slic(rgb, self.cfg, self.cfg.n_segments)


class GridSuperpixels(SuperpixelGenerator):
    """A regular grid of ``min(grid, H) x min(grid, W)`` cells (computed at full size)."""

    downscale = False

    def _segment(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        gy, gx = min(self.cfg.grid, h), min(self.cfg.grid, w)
        rows = np.arange(h) * gy // h  # (h,) cell row of each pixel row
        cols = np.arange(w) * gx // w  # (w,)
        return rows[:, None] * gx + cols[None, :]


def _module_digest(module: object) -> str:
    """Digest of a module's weights: names, shapes, dtypes and <= 4096 strided values per tensor
    (device-independent; tells checkpoints apart without reading gigabytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():  # type: ignore[attr-defined]
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


class SAMSuperpixels(SuperpixelGenerator):
    """Semantic superpixels from segment-anything's automatic mask generator (AMG).

    Merging rule: masks smaller than ``min_region_area`` are dropped; the rest are painted in
    order of decreasing area (ties: AMG order), so a part (smaller) stays visible on top of its
    whole (larger). Regions left with fewer than ``min_region_area`` visible pixels are erased.
    Uncovered connected areas of at least ``fallback_fraction`` of the image are split by SLIC
    (``n_segments`` scaled by their area, same merging); smaller uncovered areas join the nearest
    region. No mask at all → plain SLIC. A region may be disconnected (an occluded object).

    Args:
        sam: a segment-anything ``Sam`` model (any size; weights are the caller's).
        cfg: the config (``points_per_side``, thresholds, ``min_region_area``...).
    """

    def __init__(self, sam: Sam, cfg: SuperpixelConfig | None = None) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        super().__init__(cfg)
        self.sam = sam.eval()
        self.amg = SamAutomaticMaskGenerator(
            sam,
            points_per_side=self.cfg.points_per_side,
            pred_iou_thresh=self.cfg.pred_iou_thresh,
            stability_score_thresh=self.cfg.stability_score_thresh,
            output_mode="binary_mask",
        )
        self._weights_digest: str | None = None

    def _fingerprint_extra(self) -> str:
        if self._weights_digest is None:
            self._weights_digest = _module_digest(self.sam)
        return self._weights_digest

    def _masks(self, rgb: np.ndarray) -> list[np.ndarray]:
        """AMG masks ``[(h, w) bool]`` for ``rgb (h, w, 3)``, in AMG order."""
        return [np.asarray(r["segmentation"], dtype=bool) for r in self.amg.generate(rgb)]

    def _segment(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        cfg = self.cfg
        masks = [m for m in self._masks(rgb) if m.shape == (h, w) and m.sum() >= max(cfg.min_region_area, 1)]
        labels = np.full((h, w), -1, dtype=np.int64)
        order = np.argsort([-int(m.sum()) for m in masks], kind="stable")
        for rank, i in enumerate(order):  # largest first; smaller masks paint over them
            labels[masks[i]] = rank
        if masks:  # erase regions mostly hidden by smaller masks painted over them
            visible = np.bincount(labels[labels >= 0], minlength=len(masks))
            labels[np.isin(labels, np.flatnonzero(visible < cfg.min_region_area))] = -1
        uncovered = labels < 0
        if uncovered.all():
            return _slic(rgb, cfg, cfg.n_segments)
        if uncovered.any():
            labels = self._fill_uncovered(rgb, labels, uncovered)
        return labels

    def _fill_uncovered(self, rgb: np.ndarray, labels: np.ndarray, uncovered: np.ndarray) -> np.ndarray:
        """Large uncovered areas → SLIC regions; the rest → label of the nearest covered pixel."""
        cfg = self.cfg
        components, n = ndimage.label(uncovered)  # (h, w) 0 = covered, 1..n uncovered areas
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        sizes[0] = 0
        large = np.isin(components, np.flatnonzero(sizes >= cfg.fallback_fraction * uncovered.size))
        if large.any():
            n_segments = max(1, round(cfg.n_segments * large.mean()))
            extra = _slic(rgb, cfg, n_segments, mask=large)  # 0 outside ``large``, >= 1 inside
            labels = np.where(large, labels.max() + 1 + extra, labels)  # new ids above SAM's
            uncovered = labels < 0
        if uncovered.any():
            # (2, h, w): row / col of the nearest covered pixel for every pixel
            idx = ndimage.distance_transform_edt(uncovered, return_distances=False, return_indices=True)
            labels = labels[idx[0], idx[1]]
        return labels


def build_superpixel_generator(
    cfg: SuperpixelConfig, sam: Sam | None = None
) -> SuperpixelGenerator | SuperpixelCache:
    """Build the generator ``cfg.method`` names, wrapped in a :class:`SuperpixelCache` if ``cfg.cache_dir``.

    Raises:
        ConfigError: ``method: sam`` without a SAM model.
    """
    generator: SuperpixelGenerator
    if cfg.method == "slic":
        generator = SLICSuperpixels(cfg)
    elif cfg.method == "grid":
        generator = GridSuperpixels(cfg)
    else:
        if sam is None:
            msg = "method: 'sam' needs a segment-anything model (pass sam=...), or use method slic / grid"
            raise ConfigError(msg)
        generator = SAMSuperpixels(sam, cfg)
    if not cfg.cache_dir:
        return generator
    return SuperpixelCache(cfg.cache_dir, generator)


# ----------------------------------------------------------------------------- the disk cache (training)


@dataclass
class CacheStats:
    """Counters of a :class:`SuperpixelCache`: ``recovered`` counts unreadable files recomputed."""

    hits: int = 0
    misses: int = 0
    recovered: int = 0


class SuperpixelCache:
    """Disk cache of label maps around a generator; same call contract as the generator.

    Key: sha256 of the normalised image's bytes, shape and dtype plus the generator's
    :attr:`~SuperpixelGenerator.fingerprint`. File: ``cache_dir/<fingerprint[:16]>/<key[:2]>/<key>.npy``,
    stored as uint8 / uint16 / int32 (the smallest that fits K), written to a temporary file and
    renamed (safe with several DataLoader workers). An unreadable or inconsistent file is
    recomputed and overwritten; a cache folder that cannot be written warns and computes.
    """

    def __init__(self, cache_dir: str | Path, generator: SuperpixelGenerator) -> None:
        self.cache_dir = Path(cache_dir)
        self.generator = generator
        self.stats = CacheStats()
        self.fingerprint = generator.fingerprint  # fixed for the cache's lifetime
        self._warned = False

    def path_for(self, image: np.ndarray) -> Path:
        """The cache file of ``image`` (which need not exist)."""
        return self._path(as_rgb(image))

    def _path(self, rgb: np.ndarray) -> Path:
        digest = hashlib.sha256()
        digest.update(f"{rgb.shape}{rgb.dtype}{self.fingerprint}".encode())
        digest.update(rgb.tobytes())
        key = digest.hexdigest()
        return self.cache_dir / self.fingerprint[:16] / key[:2] / f"{key}.npy"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``image (H, W, 3) uint8`` → ``(H, W) int32`` labels ``0..K-1``, from disk when cached."""
        rgb = as_rgb(image)  # the generators' input normalisation
        path = self._path(rgb)
        if path.is_file():
            labels = _load_labels(path, rgb.shape[:2])
            if labels is not None:
                self.stats.hits += 1
                return labels
            self.stats.recovered += 1
        self.stats.misses += 1
        labels = self.generator(rgb)
        self._save(path, labels)
        return labels

    def _save(self, path: Path, labels: np.ndarray) -> None:
        k = int(labels.max()) + 1
        dtype = np.uint8 if k <= 256 else np.uint16 if k <= 65536 else np.int32
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:8]}", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, labels.astype(dtype))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            if not self._warned:
                warnings.warn(
                    f"superpixel cache {self.cache_dir} not writable ({exc}); computing", stacklevel=3
                )
                self._warned = True


def _load_labels(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A cached label map as int32, or None if the file is unreadable or not a valid ``shape`` map."""
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if labels.shape != shape or labels.dtype.kind not in "ui" or labels.min() != 0:
        return None
    if np.bincount(labels.ravel().astype(np.int64)).min() == 0:  # not consecutive 0..K-1
        return None
    return labels.astype(np.int32)


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
