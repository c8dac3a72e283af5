"""Dataset names → loader classes. ``build_dataset`` is the one way the CLI and trainer open data."""

from __future__ import annotations

import importlib
from pathlib import Path

from mllm_ris.data.sample import ReferringDataset
from mllm_ris.errors import DatasetError

__all__ = ["DATASET_NAMES", "build_dataset"]

# name -> (module, class). Imported lazily so one broken optional loader never breaks the others.
_LOADERS: dict[str, tuple[str, str]] = {
    "refcoco": ("mllm_ris.data.refer", "ReferDataset"),
    "refcoco+": ("mllm_ris.data.refer", "ReferDataset"),
    "refcocog": ("mllm_ris.data.refer", "ReferDataset"),
    "refclef": ("mllm_ris.data.refer", "ReferDataset"),
    "rrefcoco": ("mllm_ris.data.refer", "ReferDataset"),
    "rrefcoco+": ("mllm_ris.data.refer", "ReferDataset"),
    "rrefcocog": ("mllm_ris.data.refer", "ReferDataset"),
    "grefcoco": ("mllm_ris.data.grefcoco", "GRefCOCODataset"),
    "riscq": ("mllm_ris.data.riscq", "RISCQDataset"),
    "reasonseg": ("mllm_ris.data.reasonseg", "ReasonSegDataset"),
    "synthref": ("mllm_ris.data.synthetic", "SynthRefDataset"),
    "jsonl": ("mllm_ris.data.jsonl", "JsonlDataset"),
}

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def build_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    *,
    split_by: str | None = None,
    image_root: str | Path | None = None,
) -> ReferringDataset:
    """Open a dataset by name.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: the dataset root as laid out in docs/datasets.md (for ``jsonl``: the .jsonl file or
            a folder holding ``<split>.jsonl``).
        split: a split name, or None for every split.
        split_by: refer-layout annotation source (``unc``, ``google``, ``umd``, ``berkeley``);
            None picks the standard one for the dataset.
        image_root: override the folder images are read from.

    Raises:
        DatasetError: unknown name, or the loader found a missing / malformed file.
    """
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    module_name, class_name = _LOADERS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, object] = {"split": split, "image_root": image_root}
    if module_name.endswith(".refer"):
        kwargs["dataset"] = name
        kwargs["split_by"] = split_by
    return cls(root, **kwargs)
