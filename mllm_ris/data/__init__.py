"""Datasets: one sample type (:class:`RISSample`) for every referring-segmentation source.

Nothing is imported here: the public names below come from their modules on first access
(``from mllm_ris.data import build_dataset`` imports :mod:`mllm_ris.data.registry` then), so using one
module of the package (e.g. :mod:`mllm_ris.data.sample`) does not import the dataset loaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from mllm_ris.data.registry import DATASET_NAMES, build_dataset
    from mllm_ris.data.sample import RefEntry, ReferringDataset, RISSample, Sentence

__all__ = [
    "DATASET_NAMES",
    "RISSample",
    "RefEntry",
    "ReferringDataset",
    "Sentence",
    "build_dataset",
]

# every public name, by the module it is imported from on first access (PEP 562, lazy_loader)
__getattr__, __dir__, _ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "registry": ["DATASET_NAMES", "build_dataset"],
        "sample": ["RISSample", "RefEntry", "ReferringDataset", "Sentence"],
    },
)
