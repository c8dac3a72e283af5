"""Disk cache of superpixel label maps, keyed by image content and generator fingerprint."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mllm_ris.processing.regions import as_rgb

if TYPE_CHECKING:
    from mllm_ris.modeling.superpixels import SuperpixelGenerator

__all__ = ["CacheStats", "SuperpixelCache"]


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
