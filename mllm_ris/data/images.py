"""Reading images with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mllm_ris.errors import DatasetError

__all__ = ["read_image"]


def read_image(path: str | Path, *, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: the image file.
        expect_hw: if given, the ``(height, width)`` the annotation records; a mismatch raises.

    Returns:
        ``(H, W, 3)`` uint8 array (EXIF orientation applied, grayscale / RGBA / 16-bit converted).

    Raises:
        DatasetError: the file is missing, unreadable, or not of the expected size.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr16 = np.asarray(im, dtype=np.float64)
                scale = 255.0 / max(float(arr16.max()), 1.0)
                im = Image.fromarray((arr16 * scale).astype(np.uint8))
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    if expect_hw is not None and tuple(arr.shape[:2]) != tuple(expect_hw):
        raise DatasetError(
            f"image {path} is {arr.shape[0]}x{arr.shape[1]} (HxW) but the annotation says "
            f"{expect_hw[0]}x{expect_hw[1]}"
        )
    return arr
