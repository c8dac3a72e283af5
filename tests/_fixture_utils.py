"""Drawing and writing primitives of the dataset fixtures (see dataset_fixtures.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass
class FixtureInfo:
    """What a fixture holds.

    Attributes:
        root: the path to give the loader / ``build_dataset``.
        name: the ``build_dataset`` name.
        images, refs: numbers of image files and refs.
        sentences: positive samples (sentences with a target).
        negatives: samples without target (negative sentences and sentences of no-target refs).
        no_target: refs without target.
        instances: target instances summed over refs.
        splits: samples per split.
        masks: ref id -> expected ``(T, H, W)`` bool target masks.
        ignore: ref id -> expected ``(H, W)`` bool ignore map (ReasonSeg only).
        split_by: the refer ``splitBy`` the counts are for (None elsewhere).
    """

    root: Path
    name: str
    images: int
    refs: int
    sentences: int
    negatives: int
    no_target: int
    instances: int
    splits: dict[str, int]
    masks: dict[Any, np.ndarray]
    ignore: dict[Any, np.ndarray] = field(default_factory=dict)
    split_by: str | None = None

    @property
    def samples(self) -> int:
        """Total samples (one per sentence)."""
        return self.sentences + self.negatives


def image(h: int, w: int, seed: int) -> np.ndarray:
    """``(h, w, 3)`` uint8: a colour gradient with two flat rectangles."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 40 * seed % 256)], axis=-1)
    img[h // 4 : h // 2, w // 4 : w // 2] = (200, 30, 30)
    img[h // 2 :, w // 2 :] = (30, 30, 200)
    return img.astype(np.uint8)


def write_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image(h, w, seed)).save(path)


def rect(h: int, w: int, *boxes: tuple[int, int, int, int], inclusive: bool = False) -> np.ndarray:
    """``(h, w)`` bool union of boxes ``(x0, y0, x1, y1)``, end-exclusive unless ``inclusive``."""
    m = np.zeros((h, w), dtype=bool)
    e = 1 if inclusive else 0
    for x0, y0, x1, y1 in boxes:
        m[y0 : y1 + e, x0 : x1 + e] = True
    return m


def poly(x0: int, y0: int, x1: int, y1: int) -> list[int]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with ``counts`` as str (as it is stored in JSON)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def sentence(sent_id: int, text: str, *, raw_only: bool = False, **extra: Any) -> dict[str, Any]:
    s = {"tokens": text.split(), "raw": text, "sent_id": sent_id, **extra}
    if not raw_only:
        s["sent"] = text
    return s


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
