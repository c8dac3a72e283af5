"""Mask encoding and decoding through pycocotools (polygons, RLE, boxes)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["decode_segmentation", "encode_rle", "mask_to_box"]


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode one COCO ``segmentation`` field to a binary mask.

    Accepts a polygon list (``[[x1, y1, x2, y2, ...], ...]``, parts are unioned), a compressed
    RLE (``{"size": [h, w], "counts": str | bytes}``), an uncompressed RLE (``counts`` a list
    of ints), or a list of RLE dicts (RefCLEF; parts are unioned).

    Returns:
        ``(H, W)`` bool.

    Raises:
        ValueError: the segmentation is of an unknown form or does not fit ``height x width``.
    """
    if isinstance(segmentation, list) and segmentation and all(isinstance(s, dict) for s in segmentation):
        out = np.zeros((height, width), dtype=bool)
        for part in segmentation:
            out |= decode_segmentation(part, height, width)
        return out
    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(polys, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        size = list(segmentation.get("size", [height, width]))
        if size != [height, width]:
            raise ValueError(f"RLE size {size} does not match image {height}x{width}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            if isinstance(counts, str):
                counts = counts.encode("ascii")
            rle = {"size": size, "counts": counts}
    else:
        raise ValueError(f"unknown segmentation of type {type(segmentation).__name__}")
    decoded = mask_utils.decode(rle)
    if decoded.ndim == 3:
        decoded = decoded.any(axis=2)
    return decoded.astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a ``(H, W)`` bool mask as a COCO RLE with ``counts`` as a JSON-friendly str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box ``(x0, y0, x1, y1)`` (inclusive-exclusive) of a ``(H, W)`` mask, None if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
