"""A JSON Lines format for your own referring-segmentation data.

``root`` is one ``.jsonl`` file, or a folder of ``<split>.jsonl`` files. One line is one image
with its expression(s) and target masks (full spec and example in docs/datasets.md)::

    {"image": "imgs/0001.jpg", "expressions": ["the red cup", "cup on the left"],
     "masks": [{"size": [480, 640], "counts": "<COCO RLE>"}, {"png": "masks/0001_b.png"}],
     "id": "0001", "split": "val"}

* ``image``: path relative to the ``.jsonl`` file's folder (or ``image_root``), or absolute.
* ``expression`` (a string) or ``expressions`` (a non-empty list of strings).
* ``masks``: one entry per target instance, a COCO RLE (``size`` + ``counts``, compressed str
  or uncompressed list) or ``{"png": path}`` (relative to the ``.jsonl`` folder; non-zero
  pixels are the mask). An empty list means the expressions refer to nothing (``T == 0``).
* ``id`` (optional, unique): the ref id; default ``"<file stem>:<line number>"``.
* ``split`` (optional): default the file stem; in a folder it must equal the file stem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mllm_ris.data._loading import ImageSizeCache, require, select_split
from mllm_ris.data.sample import RefEntry, ReferringDataset, Sentence
from mllm_ris.errors import DatasetError
from mllm_ris.processing.masks import decode_segmentation

__all__ = ["JsonlDataset"]


def _read_png_mask(path: Path) -> np.ndarray:
    """``(H, W)`` bool: the non-zero pixels of a mask PNG (any colour channel, alpha ignored)."""
    if not path.is_file():
        raise DatasetError(f"mask PNG not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read mask PNG {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] in (3, 4) else arr.any(axis=-1)
    return arr > 0


class JsonlDataset(ReferringDataset):
    """User data in the JSONL format above: one sample per expression, ``masks`` ``(T, H, W)``.

    ``sent_id`` is ``"<ref id>:<i>"``; ``image_id`` is the ``image`` value as written. Image
    sizes come from the image headers, read once per image when the dataset is built.

    Args:
        root: a ``.jsonl`` file or a folder of ``<split>.jsonl`` files.
        split: keep only this split; None keeps all.
        image_root: folder relative ``image`` paths are resolved against (default: the folder
            of the ``.jsonl`` file).

    Raises:
        DatasetError: a missing root or split, or a bad line (``file:line`` and the problem:
            invalid JSON, missing key, wrong type, duplicate id, RLE size that does not match
            the image, missing image).
    """

    def __init__(
        self, root: str | Path, *, split: str | None = None, image_root: str | Path | None = None
    ) -> None:
        root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else None
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(root.glob("*.jsonl"))
            if not files:
                raise DatasetError(f"no <split>.jsonl file found in {root}")
            if split is not None:
                if not (root / f"{split}.jsonl").is_file():
                    present = ", ".join(f.stem for f in files)
                    raise DatasetError(
                        f"split file {root / f'{split}.jsonl'} not found; splits present: {present}"
                    )
                files = [root / f"{split}.jsonl"]
        else:
            raise DatasetError(f"JSONL dataset not found: {root}")
        sizes = ImageSizeCache()
        seen: dict[Any, str] = {}
        refs = [
            ref
            for f in files
            for ref in self._read_file(f, fixed_split=root.is_dir(), sizes=sizes, seen=seen)
        ]
        super().__init__(select_split(refs, split, source=root), name="jsonl", split=split)

    def _read_file(
        self, path: Path, *, fixed_split: bool, sizes: ImageSizeCache, seen: dict[Any, str]
    ) -> list[RefEntry]:
        try:
            # split on "\n" only: str.splitlines would also cut at U+2028 inside a JSON string
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from None
        refs = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
                ) from None
            refs.append(
                self._parse_line(record, path, lineno, fixed_split=fixed_split, sizes=sizes, seen=seen)
            )
        return refs

    def _parse_line(
        self,
        record: Any,
        path: Path,
        lineno: int,
        *,
        fixed_split: bool,
        sizes: ImageSizeCache,
        seen: dict[Any, str],
    ) -> RefEntry:
        loc = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise DatasetError(f"{loc}: a line must be a JSON object, got {type(record).__name__}")
        image = require(record, "image", str, where=loc)
        texts = self._expressions(record, loc)
        masks = require(record, "masks", list, where=loc)
        ref_id = record.get("id", f"{path.stem}:{lineno}")
        if not isinstance(ref_id, (int, str)) or isinstance(ref_id, bool):
            raise DatasetError(f"{loc}: 'id' must be an integer or a string, got {ref_id!r}")
        if ref_id in seen:
            raise DatasetError(f"{loc}: duplicate id {ref_id!r} (first at {seen[ref_id]})")
        seen[ref_id] = loc
        split = record.get("split", path.stem)
        if not isinstance(split, str):
            raise DatasetError(f"{loc}: 'split' must be a string, got {split!r}")
        if fixed_split and split != path.stem:
            raise DatasetError(f"{loc}: 'split' is {split!r} but the file is the {path.stem!r} split")
        image_path = Path(image)
        if not image_path.is_absolute():
            image_path = (self.image_root or path.parent) / image_path
        height, width = sizes(image_path, where=loc)
        specs = tuple(self._mask_spec(m, i, path, loc, height, width) for i, m in enumerate(masks))
        return RefEntry(
            ref_id=ref_id,
            image_id=image,
            image_path=image_path,
            height=height,
            width=width,
            split=split,
            sentences=tuple(
                Sentence(text=t, sent_id=f"{ref_id}:{i}", exist=bool(specs)) for i, t in enumerate(texts)
            ),
            target_ids=tuple(f"{ref_id}:mask{i}" for i in range(len(specs))),
            payload=(loc, specs),
        )

    @staticmethod
    def _expressions(record: dict[str, Any], loc: str) -> list[str]:
        if ("expression" in record) == ("expressions" in record):
            raise DatasetError(
                f"{loc}: give exactly one of 'expression' (a string) or 'expressions' (a list)"
            )
        if "expression" in record:
            return [require(record, "expression", str, where=loc)]
        texts = require(record, "expressions", list, where=loc)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DatasetError(f"{loc}: 'expressions' must be a non-empty list of strings")
        return texts

    @staticmethod
    def _mask_spec(mask: Any, i: int, path: Path, loc: str, height: int, width: int) -> tuple[str, Any]:
        if isinstance(mask, dict) and "png" in mask:
            if not isinstance(mask["png"], str):
                raise DatasetError(f"{loc}: masks[{i}].png must be a path string")
            return ("png", path.parent / mask["png"])
        if isinstance(mask, dict) and "counts" in mask and "size" in mask:
            if list(mask["size"]) != [height, width]:
                raise DatasetError(
                    f"{loc}: masks[{i}] RLE size {mask['size']} does not match the image ({height}, {width})"
                )
            if not isinstance(mask["counts"], (str, list)):
                raise DatasetError(f"{loc}: masks[{i}].counts must be a string or a list of ints")
            return ("rle", mask)
        raise DatasetError(f'{loc}: masks[{i}] must be a COCO RLE {{size, counts}} or {{"png": path}}')

    def load_masks(self, ref: RefEntry) -> np.ndarray:
        """``(T, H, W)`` bool, one mask per ``masks`` entry, in line order."""
        loc, specs = ref.payload
        out = np.zeros((len(specs), ref.height, ref.width), dtype=bool)
        for t, (kind, spec) in enumerate(specs):
            if kind == "png":
                mask = _read_png_mask(spec)
                if mask.shape != (ref.height, ref.width):
                    raise DatasetError(
                        f"{loc}: mask PNG {spec} is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image "
                        f"is {ref.height}x{ref.width}"
                    )
            else:
                try:
                    mask = decode_segmentation(spec, ref.height, ref.width)
                except (ValueError, TypeError) as exc:
                    raise DatasetError(f"{loc}: cannot decode masks[{t}]: {exc}") from None
            out[t] = mask
        return out
