"""RIS-CQ (referring segmentation with complex queries), masks from COCO panoptic PNGs.

The release (``lili0415/DuMoGa``, ``benchmark/sub_ris.json``) is a JSON list of
``{"file_name": "train2017/….jpg", "sentence", "pan_seg_file": "panoptic_train2017/….png",
"id"}`` where ``id`` is a COCO panoptic segment id; the paths are relative to the COCO folder
(images) and the COCO panoptic annotation folder (PNGs). Layout read here (docs/datasets.md)::

    <root>/<split>.json                     one JSON list per split (train.json, val.json,
                                            test.json, or the released sub_ris.json)
    <root>/train2017/….jpg                  file_name under <root> (where COCO users keep it), or
    <root>/images/train2017/….jpg           under <root>/images; --image-root DIR: DIR/<file_name>
    <root>/panoptic_train2017/….png         pan_seg_file under <root>

One entry is one ref with one sentence and one target (``T == 1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_ris.data._loading import ImageSizeCache, load_json, require
from mllm_ris.data.sample import RefEntry, ReferringDataset, Sentence
from mllm_ris.errors import DatasetError

__all__ = ["RISCQ_SPLITS", "RISCQDataset", "read_panoptic_ids"]

# Split files read when no split is given (other JSON files beside them, such as COCO's
# panoptic_train2017.json, are left alone); any other <name>.json is read when asked by name.
RISCQ_SPLITS: tuple[str, ...] = ("train", "val", "test", "sub_ris")


def read_panoptic_ids(path: Path) -> np.ndarray:
    """Segment-id map of a COCO panoptic PNG: ``R + 256·G + 65536·B``, ``(H, W)`` int64."""
    if not path.is_file():
        raise DatasetError(f"panoptic PNG not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read panoptic PNG {path}: {exc}") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _image_id(file_name: str) -> int | str:
    """COCO image id from ``train2017/000000417720.jpg`` (417720), else the file stem."""
    stem = Path(file_name).stem
    return int(stem) if stem.isdigit() else stem


class RISCQDataset(ReferringDataset):
    """RIS-CQ: one sample per entry, ``masks`` ``(1, H, W)``.

    ``ref_id`` and ``sent_id`` are ``"<split>:<index in the split file>"`` (the entry ``id`` is
    a segment id, unique only within one image). Image sizes come from the image headers
    (RIS-CQ records none), read once per image when the dataset is built.

    Args:
        root: the folder holding ``<split>.json`` and the panoptic PNG folders.
        split: a split file stem (``train``, ``val``, ``test``, ``sub_ris`` or any other
            ``<split>.json`` in ``root``); None reads those of :data:`RISCQ_SPLITS` present.
        image_root: folder the ``file_name`` values are relative to; by default each image is looked
            for at ``<root>/<file_name>``, then ``<root>/images/<file_name>``.

    Raises:
        DatasetError: no / unknown split file, a malformed entry (naming file and index), or a
            missing / unreadable image.
    """

    def __init__(
        self, root: str | Path, *, split: str | None = None, image_root: str | Path | None = None
    ) -> None:
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else None
        self._image_roots = [self.image_root] if self.image_root else [self.root, self.root / "images"]
        present = [s for s in RISCQ_SPLITS if (self.root / f"{s}.json").is_file()]
        if split is None and not present:
            raise DatasetError(
                f"no RIS-CQ split file found in {self.root}; expected one of: "
                + ", ".join(f"{s}.json" for s in RISCQ_SPLITS)
            )
        if split is not None and not (self.root / f"{split}.json").is_file():
            raise DatasetError(
                f"RIS-CQ split file {self.root / f'{split}.json'} not found; "
                f"splits present: {', '.join(present) or 'none'}"
            )
        sizes = ImageSizeCache()
        refs: list[RefEntry] = []
        for name in [split] if split is not None else present:
            path = self.root / f"{name}.json"
            entries = load_json(path, what="RIS-CQ split file")
            if not isinstance(entries, list):
                raise DatasetError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
            refs.extend(self._parse_entry(e, i, path, name, sizes) for i, e in enumerate(entries))
        super().__init__(refs, name="riscq", split=split)

    def _parse_entry(self, entry: Any, index: int, path: Path, split: str, sizes: ImageSizeCache) -> RefEntry:
        where = f"{path} entry {index}"
        file_name = require(entry, "file_name", str, where=where)
        sentence = require(entry, "sentence", str, where=where)
        pan_seg_file = require(entry, "pan_seg_file", str, where=where)
        segment_id = require(entry, "id", int, where=where)
        image_path = self._find_image(file_name, where=where)
        height, width = sizes(image_path, where=where)
        ref_id = f"{split}:{index}"
        return RefEntry(
            ref_id=ref_id,
            image_id=_image_id(file_name),
            image_path=image_path,
            height=height,
            width=width,
            split=split,
            sentences=(Sentence(text=sentence, sent_id=ref_id),),
            target_ids=(segment_id,),
            payload=self.root / pan_seg_file,
        )

    def _find_image(self, file_name: str, *, where: str) -> Path:
        """The first existing ``<image root>/<file_name>``; a missing image names every path tried."""
        tried = [folder / file_name for folder in self._image_roots]
        for path in tried:
            if path.is_file():
                return path
        hint = "" if self.image_root else " (or pass --image-root / image_root)"
        raise DatasetError(f"{where}: image not found; tried: {', '.join(map(str, tried))}{hint}")

    def load_masks(self, ref: RefEntry) -> np.ndarray:
        """``(1, H, W)`` bool: the pixels of the panoptic PNG whose id is the entry's ``id``."""
        png: Path = ref.payload
        ids = read_panoptic_ids(png)
        if ids.shape != (ref.height, ref.width):
            raise DatasetError(
                f"panoptic PNG {png} is {ids.shape[0]}x{ids.shape[1]} (HxW) but image {ref.image_path} "
                f"is {ref.height}x{ref.width}"
            )
        segment_id = ref.target_ids[0]
        mask = ids == segment_id
        if not mask.any():
            raise DatasetError(f"panoptic PNG {png} has no segment with id {segment_id}")
        return mask[None]
