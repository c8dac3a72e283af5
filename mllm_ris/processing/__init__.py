"""Input preparation that is not learned: letterbox, superpixels, region descriptors, chat encoding.

- ``regions``: per-region descriptors (shape crop, CIELAB colour, geometry), their batching, and region
  targets / the superpixel oracle ceiling.
"""

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
