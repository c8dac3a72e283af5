"""`mllm-ris data check`: read a whole dataset (every image, every mask) and count what is there."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import RefEntry, ReferringDataset
from mllm_ris.errors import MllmRisError

__all__ = ["CheckReport", "check_dataset", "check_loaded_dataset"]

COUNT_KEYS = ("images", "refs", "sentences", "negatives", "no_target", "instances")


@dataclass
class CheckReport:
    """What ``data check`` found.

    Attributes:
        images: distinct images referenced by the refs.
        refs: refs (one referred object set each).
        sentences: positive sentences (their target is non-empty).
        negatives: negative sentences (R-RefCOCO ``exist: false``, or any sentence of a
            no-target ref).
        no_target: refs whose target set is empty.
        instances: target instances summed over refs (a 3-object gRefCOCO ref counts 3).
        problems: one line per problem found (missing image, undecodable mask, ...).
    """

    dataset: str
    root: str
    split: str | None
    images: int = 0
    refs: int = 0
    sentences: int = 0
    negatives: int = 0
    no_target: int = 0
    instances: int = 0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The JSON object ``data check --json`` prints (counts + problems + what was checked)."""
        return asdict(self)


def _check_ref(ds: ReferringDataset, ref: RefEntry) -> list[str]:
    """Decode one ref's masks and ignore map; return the problems found."""
    where = f"ref {ref.ref_id} (image {ref.image_id})"
    problems: list[str] = []
    if not ref.sentences:
        problems.append(f"{where}: has no sentences")
    if ref.no_target:
        return problems
    try:
        masks = ds.load_masks(ref)
        ignore = ds.load_ignore(ref)
    except MllmRisError as exc:
        return [*problems, f"{where}: {exc}"]
    except Exception as exc:  # a checker reports every failure instead of stopping at the first
        return [*problems, f"{where}: cannot decode masks: {type(exc).__name__}: {exc}"]
    hw = (ref.height, ref.width)
    if masks.ndim != 3 or masks.shape[1:] != hw:
        problems.append(f"{where}: masks have shape {masks.shape}, expected (T, {hw[0]}, {hw[1]})")
    elif masks.shape[0] != len(ref.target_ids):
        problems.append(f"{where}: {masks.shape[0]} masks for {len(ref.target_ids)} targets")
    else:
        for tid, m in zip(ref.target_ids, masks, strict=True):
            if not m.any():
                problems.append(f"{where}: target {tid} has an empty mask")
    if ignore is not None and ignore.shape != hw:
        problems.append(f"{where}: ignore map has shape {ignore.shape}, expected {hw}")
    return problems


def check_loaded_dataset(ds: ReferringDataset, *, root: str = "", progress: bool = True) -> CheckReport:
    """Read every image and decode every mask of an opened dataset."""
    report = CheckReport(dataset=ds.name, root=root, split=ds.split)
    seen_images: set[object] = set()
    for ref in tqdm(ds.refs, desc=f"checking {ds.name}", unit="ref", disable=not progress or None):
        report.refs += 1
        report.instances += len(ref.target_ids)
        report.no_target += int(ref.no_target)
        for sent in ref.sentences:
            positive = sent.exist and not ref.no_target
            report.sentences += int(positive)
            report.negatives += int(not positive)
        if ref.image_id not in seen_images:
            seen_images.add(ref.image_id)
            try:
                image = ds.load_image(ref)
                if image.dtype != np.uint8 or image.ndim != 3:
                    report.problems.append(f"image {ref.image_path}: decoded to {image.dtype} {image.shape}")
            except MllmRisError as exc:
                report.problems.append(str(exc))
        report.problems.extend(_check_ref(ds, ref))
    report.images = len(seen_images)
    return report


def check_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    *,
    split_by: str | None = None,
    image_root: str | Path | None = None,
    progress: bool = True,
) -> CheckReport:
    """Open a dataset by name (images under ``image_root`` when given) and check it (see
    :func:`check_loaded_dataset`).

    Raises:
        DatasetError: the dataset cannot be opened at all (missing or malformed annotation file).
    """
    ds = build_dataset(name, root, split, split_by=split_by, image_root=image_root)
    return check_loaded_dataset(ds, root=str(root), progress=progress)
