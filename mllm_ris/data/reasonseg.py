"""ReasonSeg (LISA): reasoning queries, polygon masks with ignore regions.

Layout (see docs/datasets.md)::

    <root>/<split>/NAME.jpg     the image (split: train, val, test)
    <root>/<split>/NAME.json    {"text": [1-5 phrasings], "is_sentence": bool,
                                 "shapes": [{"label", "points": [[x, y], ...]}, ...]}

One ref per image, one sentence per ``text`` entry, one target mask (``T == 1``; ReasonSeg has
no instance split). Shapes labelled ``flag`` are skipped; labels containing ``ignore`` mark
pixels excluded from the metrics (:meth:`ReasonSegDataset.load_ignore`). As in LISA, polygons
are filled largest-area first (target = 1, ignore = 255), so a smaller later shape overwrites a
larger one; points are truncated to integers and the outline is part of the polygon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mllm_ris.data._loading import ImageSizeCache, load_json, require
from mllm_ris.data.sample import RefEntry, ReferringDataset, Sentence
from mllm_ris.errors import DatasetError

__all__ = ["ReasonSegDataset", "rasterise_shapes"]

TARGET_VALUE = 1
IGNORE_VALUE = 255
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Polygon = tuple[tuple[int, int], ...]


def _fill(canvas: Image.Image, points: Polygon, value: int) -> None:
    draw = ImageDraw.Draw(canvas)
    if len(points) == 1:
        draw.point(points, fill=value)
    else:
        draw.polygon(points, fill=value, outline=value)


def rasterise_shapes(shapes: tuple[tuple[int, Polygon], ...], height: int, width: int) -> np.ndarray:
    """Paint ``(value, polygon)`` shapes largest-area first (ties keep file order).

    Returns:
        ``(H, W)`` uint8 label map: 0 background, 1 target, 255 ignore.
    """
    areas = []
    for _, points in shapes:
        alone = Image.new("L", (width, height), 0)
        _fill(alone, points, 1)
        areas.append(int(np.asarray(alone).sum()))
    canvas = Image.new("L", (width, height), 0)
    for i in sorted(range(len(shapes)), key=lambda k: -areas[k]):
        _fill(canvas, shapes[i][1], shapes[i][0])
    return np.asarray(canvas, dtype=np.uint8)


def _parse_points(points: Any, *, where: str) -> Polygon:
    if not isinstance(points, list) or not points:
        raise DatasetError(f"{where}: 'points' must be a non-empty list of [x, y]")
    out = []
    for p in points:
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)):
            raise DatasetError(f"{where}: point {p!r} is not [x, y]")
        out.append((int(p[0]), int(p[1])))  # truncation toward zero, as np.int32 in LISA
    return tuple(out)


class ReasonSegDataset(ReferringDataset):
    """ReasonSeg: one sample per phrasing, ``masks`` ``(1, H, W)``, ``ignore`` ``(H, W)``.

    ``ref_id`` is ``"<split>/<NAME>"``, ``sent_id`` ``"<split>/<NAME>:<i>"``, ``image_id``
    ``NAME``. Image sizes come from the image headers, read once when the dataset is built.

    Args:
        root: the folder holding the split folders.
        split: a split folder (``train``, ``val``, ``test``); None reads every sub-folder holding
            annotation JSON files.
        image_root: folder holding ``<split>/NAME.jpg`` (default ``root``).

    Raises:
        DatasetError: an unknown split, a malformed annotation (naming the JSON file), or an
            image that is missing or unreadable.
    """

    def __init__(
        self, root: str | Path, *, split: str | None = None, image_root: str | Path | None = None
    ) -> None:
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else self.root
        present = (
            sorted(d.name for d in self.root.iterdir() if d.is_dir() and any(d.glob("*.json")))
            if self.root.is_dir()
            else []
        )
        if split is not None and split not in present:
            raise DatasetError(
                f"ReasonSeg split folder {self.root / split} has no annotation JSON; "
                f"splits present: {', '.join(present) or 'none'}"
            )
        if not present:
            raise DatasetError(f"no ReasonSeg split folder with annotation JSON files found in {self.root}")
        sizes = ImageSizeCache()
        refs = [
            self._parse(json_path, name, sizes)
            for name in ([split] if split is not None else present)
            for json_path in sorted((self.root / name).glob("*.json"))
        ]
        self._cache: tuple[Any, np.ndarray] | None = None
        super().__init__(refs, name="reasonseg", split=split)

    def _image_path(self, split: str, stem: str) -> Path:
        folder = self.image_root / split
        for suffix in _IMAGE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        return folder / f"{stem}.jpg"  # missing: image_size raises naming this path

    def _parse(self, json_path: Path, split: str, sizes: ImageSizeCache) -> RefEntry:
        where = str(json_path)
        ann = load_json(json_path, what="ReasonSeg annotation")
        texts = require(ann, "text", (list, str), where=where)
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DatasetError(f"{where}: 'text' must be a non-empty list of strings")
        shapes = []
        for i, shape in enumerate(require(ann, "shapes", list, where=where)):
            label = require(shape, "label", str, where=f"{where} shapes[{i}]").lower()
            if label == "flag":  # deprecated annotations, skipped as in LISA
                continue
            value = IGNORE_VALUE if "ignore" in label else TARGET_VALUE
            shapes.append((value, _parse_points(shape.get("points"), where=f"{where} shapes[{i}]")))
        image_path = self._image_path(split, json_path.stem)
        height, width = sizes(image_path, where=where)
        ref_id = f"{split}/{json_path.stem}"
        has_target = any(value == TARGET_VALUE for value, _ in shapes)
        return RefEntry(
            ref_id=ref_id,
            image_id=json_path.stem,
            image_path=image_path,
            height=height,
            width=width,
            split=split,
            sentences=tuple(
                Sentence(text=t, sent_id=f"{ref_id}:{i}", exist=has_target) for i, t in enumerate(texts)
            ),
            target_ids=(ref_id,) if has_target else (),
            payload=tuple(shapes),
        )

    def _labels(self, ref: RefEntry) -> np.ndarray:
        """The ref's ``(H, W)`` uint8 label map, cached for the ref last asked for."""
        if self._cache is None or self._cache[0] != ref.ref_id:
            self._cache = (ref.ref_id, rasterise_shapes(ref.payload, ref.height, ref.width))
        return self._cache[1]

    def load_masks(self, ref: RefEntry) -> np.ndarray:
        """``(1, H, W)`` bool: the target pixels (label 1 after painting)."""
        return (self._labels(ref) == TARGET_VALUE)[None]

    def load_ignore(self, ref: RefEntry) -> np.ndarray:
        """``(H, W)`` bool: pixels of ``ignore`` shapes not painted over by a smaller target."""
        return self._labels(ref) == IGNORE_VALUE
