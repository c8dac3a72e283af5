"""gRefCOCO (GRES): refs with one, several or no target objects.

Layout (see docs/datasets.md)::

    <root>/grefcoco/grefs(unc).json   JSON list of refs; ann_id / category_id an id or a list
    <root>/grefcoco/instances.json    COCO images / annotations (polygons)
    <root>/images/train2014/          COCO train2014 images (or <root>/images/mscoco/images/train2014/)

A multi-target ref gives ``T`` masks, one per annotation; a no-target ref (``no_target: true``,
``ann_id: [-1]``) gives ``T == 0`` and all its sentences are negative. A sentence with
``"exist": false`` is negative too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_ris.data._loading import (
    CocoInstances,
    CocoSegmentationDataset,
    as_id_list,
    coco_ref_entry,
    first_existing,
    load_json,
    require,
    select_split,
)
from mllm_ris.data.sample import RefEntry
from mllm_ris.errors import DatasetError

__all__ = ["GRefCOCODataset"]

_NO_TARGET_ID = -1


class GRefCOCODataset(CocoSegmentationDataset):
    """gRefCOCO: one sample per sentence, ``masks`` ``(T, H, W)`` with ``T >= 0``.

    Subclasses reading the same layout elsewhere (SynthRef) override the class attributes
    :attr:`name` (the ``RISSample.dataset`` value) and :attr:`annotation_dir` (the sub-folder of
    ``root`` holding ``grefs(unc).json`` and ``instances.json``).

    Args:
        root: the folder holding ``grefcoco/`` and ``images/``.
        split: keep only this split (``train``, ``val``, ``testA``, ``testB``); None keeps all.
        image_root: folder the ``instances.json`` ``file_name`` values are relative to; by default
            ``<root>/images/train2014`` if it exists, else ``<root>/images/mscoco/images/train2014``
            (where LISA keeps them).

    Raises:
        DatasetError: a missing / malformed ``grefs(unc).json`` or ``instances.json``, a ref
            naming an unknown image or annotation, or a split that no ref has.
    """

    name: str = "grefcoco"
    annotation_dir: str = "grefcoco"

    def __init__(
        self, root: str | Path, *, split: str | None = None, image_root: str | Path | None = None
    ) -> None:
        root = Path(root)
        ann_dir = root / self.annotation_dir
        if image_root is None:
            candidates = [root / "images" / "train2014", root / "images" / "mscoco" / "images" / "train2014"]
            self.image_root = first_existing(candidates)
        else:
            self.image_root = Path(image_root)
        refs_path = ann_dir / "grefs(unc).json"
        raw_refs = load_json(refs_path, what="gRefCOCO refs file")
        if not isinstance(raw_refs, list):
            raise DatasetError(f"{refs_path}: expected a JSON list of refs, got {type(raw_refs).__name__}")
        instances = CocoInstances.load(ann_dir / "instances.json")
        refs = [self._parse_ref(raw, i, refs_path, instances) for i, raw in enumerate(raw_refs)]
        super().__init__(select_split(refs, split, source=refs_path), name=self.name, split=split)

    def _parse_ref(self, raw: Any, index: int, refs_path: Path, instances: CocoInstances) -> RefEntry:
        ref_id = require(raw, "ref_id", (int, str), where=f"{refs_path} ref {index}")
        where = f"{refs_path} ref_id {ref_id}"
        ann_ids = as_id_list(require(raw, "ann_id", (int, str, list), where=where), key="ann_id", where=where)
        no_target = raw.get("no_target", False)
        if not isinstance(no_target, bool):
            raise DatasetError(f"{where}: 'no_target' must be true or false, got {no_target!r}")
        # ``no_target`` is authoritative; otherwise the -1 placeholder means no target as well.
        target_ids = () if no_target else tuple(a for a in ann_ids if a != _NO_TARGET_ID)
        return coco_ref_entry(
            raw,
            ref_id=ref_id,
            target_ids=target_ids,
            instances=instances,
            image_root=self.image_root,
            where=where,
        )
