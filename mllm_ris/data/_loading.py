"""Helpers shared by the dataset loaders: JSON files, image headers, COCO instances, sentences.

Every function raises :class:`DatasetError` with a one-line message naming the file (and the
entry inside it) when something is missing or malformed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_ris.data.sample import RefEntry, ReferringDataset, RefId, Sentence
from mllm_ris.errors import DatasetError
from mllm_ris.processing.masks import decode_segmentation

# EXIF orientations that rotate by 90 degrees (read_image applies them, so H and W swap).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


def load_json(path: Path, *, what: str) -> Any:
    """Parse a JSON file; ``what`` names the file's role in messages (``"instances file"``)."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from None


def require(entry: Any, key: str, types: type | tuple[type, ...], *, where: str) -> Any:
    """``entry[key]`` checked to be a dict entry of the given type(s); ``where`` locates it."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DatasetError(f"{where}: missing key {key!r}")
    value = entry[key]
    # bool is an int subclass; never accept it where a number or id is wanted.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise DatasetError(f"{where}: {key!r} has type {type(value).__name__}, expected {_type_names(types)}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image from its header, after EXIF orientation (no pixel decode)."""
    if not path.is_file():
        raise DatasetError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height
    return int(height), int(width)


class ImageSizeCache:
    """Header sizes of images shared by several refs, each file opened once."""

    def __init__(self) -> None:
        self._sizes: dict[Path, tuple[int, int]] = {}

    def __call__(self, path: Path, *, where: str) -> tuple[int, int]:
        """``(height, width)`` of ``path``; errors are prefixed with ``where`` (the entry asking)."""
        if path not in self._sizes:
            try:
                self._sizes[path] = image_size(path)
            except DatasetError as exc:
                raise DatasetError(f"{where}: {exc}") from None
        return self._sizes[path]


def select_split(refs: Sequence[RefEntry], split: str | None, *, source: Path | str) -> list[RefEntry]:
    """Keep the refs of ``split`` (all for None); an absent split raises listing those present."""
    if split is None:
        return list(refs)
    kept = [r for r in refs if r.split == split]
    if not kept:
        present = sorted({r.split for r in refs})
        raise DatasetError(
            f"split {split!r} not found in {source}; splits present: {', '.join(present) or 'none'}"
        )
    return kept


def parse_sentences(
    raw: Any, *, ref_id: RefId, sent_ids: Any, where: str, force_negative: bool
) -> tuple[Sentence, ...]:
    """Sentences of a refer / gRefCOCO ref.

    Text is ``sent``, falling back to ``raw``; ``sent_id`` falls back to the ref's ``sent_ids``
    then to ``"<ref_id>:<index>"``; ``exist`` defaults to True (``force_negative`` makes every
    sentence negative, for a no-target ref); ``difficulty`` is passed through (SynthRef).

    Returns:
        tuple of :class:`Sentence`.
    """
    if not isinstance(raw, list):
        raise DatasetError(f"{where}: 'sentences' must be a list, got {type(raw).__name__}")
    out = []
    for i, sent in enumerate(raw):
        at = f"{where} sentence {i}"
        if not isinstance(sent, dict):
            raise DatasetError(f"{at}: expected an object, got {type(sent).__name__}")
        text = sent.get("sent", sent.get("raw"))
        if not isinstance(text, str):
            raise DatasetError(f"{at}: needs a string 'sent' or 'raw'")
        if "sent_id" in sent:
            sent_id = sent["sent_id"]
        elif isinstance(sent_ids, list) and i < len(sent_ids):
            sent_id = sent_ids[i]
        else:
            sent_id = f"{ref_id}:{i}"
        exist = sent.get("exist", True)
        if not isinstance(exist, (bool, int)) or exist not in (0, 1):  # 0 / 1 accepted as well
            raise DatasetError(f"{at}: 'exist' must be true or false, got {exist!r}")
        difficulty = sent.get("difficulty")
        if difficulty is not None and not isinstance(difficulty, str):
            raise DatasetError(f"{at}: 'difficulty' must be a string, got {type(difficulty).__name__}")
        out.append(
            Sentence(
                text=text, sent_id=sent_id, exist=bool(exist) and not force_negative, difficulty=difficulty
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class CocoInstances:
    """The parts of a COCO ``instances.json`` the loaders use, indexed by id.

    Attributes:
        path: the file.
        images: image id -> ``{"file_name", "height", "width", ...}``.
        annotations: annotation id -> ``{"image_id", "segmentation", ...}``.
    """

    path: Path
    images: dict[Any, dict[str, Any]]
    annotations: dict[Any, dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> CocoInstances:
        """Read and validate ``instances.json`` (images need id/file_name/height/width)."""
        data = load_json(path, what="instances file")
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a JSON object with 'images' and 'annotations'")
        images = {}
        for i, img in enumerate(require(data, "images", list, where=str(path))):
            where = f"{path} images[{i}]"
            require(img, "file_name", str, where=where)
            require(img, "height", int, where=where)
            require(img, "width", int, where=where)
            images[require(img, "id", (int, str), where=where)] = img
        annotations = {}
        for i, ann in enumerate(require(data, "annotations", list, where=str(path))):
            where = f"{path} annotations[{i}]"
            require(ann, "image_id", (int, str), where=where)
            if "segmentation" not in ann:
                raise DatasetError(f"{where}: missing key 'segmentation'")
            annotations[require(ann, "id", (int, str), where=where)] = ann
        return cls(path=path, images=images, annotations=annotations)

    def image(self, image_id: Any, *, where: str) -> dict[str, Any]:
        """The image record of ``image_id``; an unknown id raises naming ``where`` and the file."""
        if image_id not in self.images:
            raise DatasetError(f"{where}: image id {image_id!r} not found in {self.path}")
        return self.images[image_id]

    def segmentations(self, ann_ids: Iterable[Any], *, image_id: Any, where: str) -> tuple:
        """``(ann_id, segmentation)`` pairs; unknown ids or ids of another image raise."""
        out = []
        for ann_id in ann_ids:
            ann = self.annotations.get(ann_id)
            if ann is None:
                raise DatasetError(f"{where}: ann id {ann_id!r} not found in {self.path}")
            if ann["image_id"] != image_id:
                raise DatasetError(
                    f"{where}: ann id {ann_id!r} belongs to image {ann['image_id']!r}, not {image_id!r} "
                    f"({self.path})"
                )
            out.append((ann_id, ann["segmentation"]))
        return tuple(out)


class CocoSegmentationDataset(ReferringDataset):
    """Base of the loaders whose ``RefEntry.payload`` is ``(source, ((ann_id, segmentation), ...))``."""

    def load_masks(self, ref: RefEntry) -> np.ndarray:
        """Decode every target annotation: ``(T, H, W)`` bool, one mask per target id."""
        source, segs = ref.payload
        masks = np.zeros((len(segs), ref.height, ref.width), dtype=bool)
        for t, (ann_id, seg) in enumerate(segs):
            try:
                masks[t] = decode_segmentation(seg, ref.height, ref.width)
            except (ValueError, TypeError, KeyError) as exc:
                raise DatasetError(f"{source}: cannot decode annotation {ann_id!r}: {exc}") from None
        return masks


def coco_ref_entry(
    raw: dict[str, Any],
    *,
    ref_id: RefId,
    target_ids: tuple[RefId, ...],
    instances: CocoInstances,
    image_root: Path,
    where: str,
) -> RefEntry:
    """A :class:`RefEntry` for a refer / gRefCOCO ref dict whose targets are ``target_ids``.

    Reads ``image_id``, ``split``, ``sentences`` and ``sent_ids`` from ``raw``; the image path and
    size come from ``instances.json`` (not from the ref's own ``file_name``). With no target,
    every sentence is negative. The payload holds the target segmentations for
    :class:`CocoSegmentationDataset`.
    """
    image_id = require(raw, "image_id", (int, str), where=where)
    split = require(raw, "split", str, where=where)
    image = instances.image(image_id, where=where)
    sentences = parse_sentences(
        require(raw, "sentences", list, where=where),
        ref_id=ref_id,
        sent_ids=raw.get("sent_ids"),
        where=where,
        force_negative=not target_ids,
    )
    segs = instances.segmentations(target_ids, image_id=image_id, where=where)
    return RefEntry(
        ref_id=ref_id,
        image_id=image_id,
        image_path=image_root / image["file_name"],
        height=image["height"],
        width=image["width"],
        split=split,
        sentences=sentences,
        target_ids=target_ids,
        payload=(str(instances.path), segs),
    )


def first_existing(candidates: Sequence[Path]) -> Path:
    """The first folder of ``candidates`` that exists, else the first one (errors then name it)."""
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def as_id_list(value: Any, *, key: str, where: str) -> list[Any]:
    """An id or a list of ids as a list (gRefCOCO ``ann_id`` / ``category_id``)."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        return list(value)
    raise DatasetError(f"{where}: {key!r} must be an id or a list of ids, got {value!r}")
