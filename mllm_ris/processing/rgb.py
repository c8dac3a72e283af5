"""The superpixel generators' input check: any image array → ``(H, W, 3) uint8`` RGB, or a one-line error.

Shared by the generators (:mod:`mllm_ris.modeling.superpixels`) and their disk cache
(:mod:`mllm_ris.modeling.superpixel_cache`), which keys files on the normalised image.
"""

from __future__ import annotations

import numpy as np

from mllm_ris.errors import MllmRisError

__all__ = ["SuperpixelInputError", "as_rgb"]


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
