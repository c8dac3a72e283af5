"""Input preparation that is not learned: superpixel label maps in token order (``labels``) and
per-region descriptors, region targets and the superpixel ceiling (``regions``).

The public names are those of :mod:`mllm_ris.processing.regions` (import the label helpers from
:mod:`mllm_ris.processing.labels`).
"""

from mllm_ris.processing import regions as _regions
from mllm_ris.processing.regions import *  # noqa: F403  (the public API: regions.__all__)

__all__ = list(_regions.__all__)
