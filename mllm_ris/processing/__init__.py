"""Input preparation that is not learned, the one input path of training, evaluation and inference: the
:class:`~mllm_ris.processing.processor.Processor` (letterbox, superpixel labels, descriptors, chat
encoding, batching: ``processor``), the chat format (``conversation``), mask encodings (``masks``) and
superpixel regions: label maps in token order, per-region descriptors and their memo, region targets and
the superpixel ceiling (``regions``).

The public names are those of :mod:`mllm_ris.processing.regions` (import the label-map helpers and the
memo from that module). Nothing is imported here: a name is loaded from ``regions`` on first access, so
importing one module of the package (e.g. :mod:`mllm_ris.processing.masks`) does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

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


# each public name is imported from mllm_ris.processing.regions on first access (PEP 562, lazy_loader)
__getattr__, __dir__, _ = lazy_loader.attach(__name__, submod_attrs={"regions": __all__})
