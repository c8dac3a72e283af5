"""Datasets: one sample type (:class:`RISSample`) for every referring-segmentation source.

Nothing is imported here: the public names below come from their modules on first access
(``from mllm_ris.data import build_dataset`` imports :mod:`mllm_ris.data.registry` then), so using one
module of the package (e.g. :mod:`mllm_ris.data.collate`) does not import the dataset loaders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllm_ris.data.registry import DATASET_NAMES, build_dataset
    from mllm_ris.data.sample import RefEntry, ReferringDataset, RISSample, Sentence

_MODULE_OF = {
    "DATASET_NAMES": "registry",
    "build_dataset": "registry",
    "RISSample": "sample",
    "RefEntry": "sample",
    "ReferringDataset": "sample",
    "Sentence": "sample",
}

__all__ = ["DATASET_NAMES", "RISSample", "RefEntry", "ReferringDataset", "Sentence", "build_dataset"]


def __getattr__(name: str) -> Any:
    """The public name ``name``, imported from its module on first use (PEP 562)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names and the lazily imported public ones."""
    return sorted({*globals(), *__all__})
