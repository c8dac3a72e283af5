"""Superpixels: an image ``(H, W, 3) uint8`` → a label map ``(H, W) int32`` with labels ``0..K-1``.

Three generators, one contract (:class:`SuperpixelGenerator`), built from one :class:`SuperpixelConfig`:

* ``slic`` — :class:`SLICSuperpixels`: scikit-image SLIC (connectivity enforced), then adjacent
  regions whose mean CIELAB colours differ by less than ``merge_threshold`` are merged
  (single linkage over the region adjacency graph), so flat areas cost one token, not many;
* ``sam`` — :class:`SAMSuperpixels`: "semantic superpixels" from segment-anything's automatic
  mask generator; masks are painted largest first (smaller masks stay visible on top), uncovered
  pixels go to the nearest region, or to SLIC regions where an uncovered area is large;
* ``grid`` — :class:`GridSuperpixels`: a regular ``grid x grid`` partition (a baseline).

Images larger than ``max_side`` are downscaled before segmenting; labels are upsampled back to
full size with nearest neighbour. Generators are deterministic. :class:`SuperpixelCache` stores
label maps on disk keyed by image content and generator fingerprint. See docs/superpixels.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.color import rgb2lab
from skimage.segmentation import slic

from mllm_ris.errors import ConfigError
from mllm_ris.processing.regions import SuperpixelInputError, as_rgb

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from mllm_ris.modeling.superpixel_cache import SuperpixelCache

__all__ = [
    "GridSuperpixels",
    "SAMSuperpixels",
    "SLICSuperpixels",
    "SuperpixelConfig",
    "SuperpixelGenerator",
    "SuperpixelInputError",
    "build_superpixel_generator",
]

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
    from mllm_ris.modeling.superpixel_cache import SuperpixelCache  # a training cache

    return SuperpixelCache(cfg.cache_dir, generator)
