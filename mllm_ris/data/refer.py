"""RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF and R-RefCOCO(+/g): the ``refer`` layout.

Layout (see docs/datasets.md)::

    <root>/<dataset>/refs(<splitBy>).p     list of ref dicts (read with a restricted unpickler)
    <root>/<dataset>/instances.json        COCO images / annotations (polygons, or RLE for RefCLEF)
    <root>/images/mscoco/images/train2014/ COCO images (RefCLEF: <root>/images/saiapr_tc-12/)

One ref has one target annotation (``T == 1``). R-RefCOCO sentences with ``"exist": false`` are
negatives (``T == 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm_ris.data._loading import (
    CocoInstances,
    CocoSegmentationDataset,
    coco_ref_entry,
    require,
    select_split,
)
from mllm_ris.data.safe_pickle import load_refs_pickle
from mllm_ris.data.sample import RefEntry
from mllm_ris.errors import DatasetError

__all__ = ["REFER_DATASETS", "ReferDataset", "default_split_by"]

# dataset -> valid splitBy values, the first one being the default.
REFER_DATASETS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "rrefcoco": ("unc", "google"),
    "rrefcoco+": ("unc",),
    "rrefcocog": ("umd", "google"),
    "synthref": ("unc",),  # SynthRef's single-target refs, written in the refer layout
}


def default_split_by(dataset: str) -> str:
    """The standard annotation source of ``dataset`` (``unc``, or ``umd`` for RefCOCOg)."""
    if dataset not in REFER_DATASETS:
        raise DatasetError(f"unknown refer dataset {dataset!r}; choose one of: {', '.join(REFER_DATASETS)}")
    return REFER_DATASETS[dataset][0]


def _default_image_root(root: Path, dataset: str) -> Path:
    if dataset == "refclef":
        return root / "images" / "saiapr_tc-12"
    return root / "images" / "mscoco" / "images" / "train2014"


class ReferDataset(CocoSegmentationDataset):
    """A refer-layout dataset: one sample per sentence, ``masks`` ``(1, H, W)`` or ``(0, H, W)``.

    Args:
        root: the folder holding ``<dataset>/`` and ``images/``.
        dataset: ``refcoco``, ``refcoco+``, ``refcocog``, ``refclef``, ``rrefcoco``,
            ``rrefcoco+`` or ``rrefcocog``.
        split: keep only this split (``train``, ``val``, ``testA`` ...), exact match; None keeps all.
        split_by: annotation source; None picks ``unc`` (``umd`` for RefCOCOg).
        image_root: folder the ``instances.json`` ``file_name`` values are relative to.

    Raises:
        DatasetError: unknown dataset, invalid ``split_by`` for it, missing / malformed refs
            pickle or ``instances.json``, a ref naming an unknown image or annotation, or a
            split that no ref has.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        dataset: str,
        split: str | None = None,
        split_by: str | None = None,
        image_root: str | Path | None = None,
    ) -> None:
        default = default_split_by(dataset)  # also validates the dataset name
        split_by = default if split_by is None else split_by
        if split_by not in REFER_DATASETS[dataset]:
            raise DatasetError(
                f"splitBy {split_by!r} is not valid for {dataset}; "
                f"valid: {', '.join(REFER_DATASETS[dataset])}"
            )
        root = Path(root)
        self.dataset = dataset
        self.split_by = split_by
        self.image_root = Path(image_root) if image_root is not None else _default_image_root(root, dataset)
        refs_path = root / dataset / f"refs({split_by}).p"
        raw_refs = load_refs_pickle(refs_path)
        if not isinstance(raw_refs, list):
            raise DatasetError(f"{refs_path}: expected a list of refs, got {type(raw_refs).__name__}")
        instances = CocoInstances.load(root / dataset / "instances.json")
        refs = [self._parse_ref(raw, i, refs_path, instances) for i, raw in enumerate(raw_refs)]
        super().__init__(select_split(refs, split, source=refs_path), name=dataset, split=split)

    def _parse_ref(self, raw: Any, index: int, refs_path: Path, instances: CocoInstances) -> RefEntry:
        ref_id = require(raw, "ref_id", (int, str), where=f"{refs_path} ref {index}")
        where = f"{refs_path} ref_id {ref_id}"
        ann_id = require(raw, "ann_id", (int, str), where=where)
        return coco_ref_entry(
            raw,
            ref_id=ref_id,
            target_ids=(ann_id,),
            instances=instances,
            image_root=self.image_root,
            where=where,
        )
