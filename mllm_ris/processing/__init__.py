"""Input preparation that is not learned: superpixel label maps in token order (``labels``) and
per-region descriptors, region targets and the superpixel ceiling (``regions``).

The public names are those of :mod:`mllm_ris.processing.regions` (import the label helpers from
:mod:`mllm_ris.processing.labels`). Nothing is imported here: a name is loaded from ``regions`` on
first access, so importing one module of the package (e.g. :mod:`mllm_ris.processing.memo`) does not
import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllm_ris.processing.regions import (
        COLOR_DIM,
        GEOMETRY_DIM,
        GEOMETRY_FIELDS,
        SHAPE_SIZE,
        RegionDescriptorBatch,
        RegionDescriptors,
        RegionInputError,
        batch_region_descriptors,
        oracle_mask,
        region_coverage,
        region_descriptors,
        region_targets,
        superpixel_ceiling_counts,
        superpixel_ceiling_iou,
    )

__all__ = [
    "COLOR_DIM",
    "GEOMETRY_DIM",
    "GEOMETRY_FIELDS",
    "SHAPE_SIZE",
    "RegionDescriptorBatch",
    "RegionDescriptors",
    "RegionInputError",
    "batch_region_descriptors",
    "oracle_mask",
    "region_coverage",
    "region_descriptors",
    "region_targets",
    "superpixel_ceiling_counts",
    "superpixel_ceiling_iou",
]


def __getattr__(name: str) -> Any:
    """The public name ``name`` of :mod:`mllm_ris.processing.regions`, imported on first use (PEP 562)."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.regions"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names and the lazily imported public ones."""
    return sorted({*globals(), *__all__})
