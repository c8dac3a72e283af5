"""SynthRef worker: one image index -> scene, verified expressions, PNG on disk, RLE masks.

Everything about image ``index`` is drawn from ``numpy.random.default_rng([seed, index])``, so an
image does not depend on which process renders it or on the other images: the dataset is the
same for any worker count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mllm_ris.data._synth_expr import generate_expressions
from mllm_ris.data._synth_scene import sample_scene
from mllm_ris.processing.masks import encode_rle, mask_to_box

__all__ = ["MARGIN_FRACTION", "ImageRecord", "image_file_name", "margin_px", "render_image"]

# Spatial margin of the expression checker, as a fraction of the image side (10 px at 128 px).
MARGIN_FRACTION = 0.08


def margin_px(size: int) -> float:
    """The spatial margin (pixels) used for ``size`` x ``size`` images."""
    return MARGIN_FRACTION * size


def image_file_name(index: int) -> str:
    """File name of image ``index`` (0-based); its image id is ``index + 1``."""
    return f"synthref_{index + 1:08d}.png"


@dataclass(frozen=True)
class ImageRecord:
    """What one worker returns about one image (small and picklable: no pixels).

    Attributes:
        index: 0-based image index.
        file_name: image file name (relative to the image folder).
        size: image side in pixels.
        background: background texture kind.
        objects: per object, in drawing order: ``shape``, ``colour``, ``size``, ``rle``, ``area``,
            ``bbox`` (COCO ``[x, y, w, h]``), ``full_area``, ``visible_fraction``.
        expressions: per expression: ``text``, ``difficulty``, ``targets`` (object indices),
            ``query``, ``source`` (object index a negative was derived from, else None).
    """

    index: int
    file_name: str
    size: int
    background: str
    objects: tuple[dict[str, Any], ...]
    expressions: tuple[dict[str, Any], ...]


def render_image(
    index: int,
    *,
    seed: int,
    size: int,
    image_dir: str | Path,
    negative_forms: Sequence[str] = ("attr",),
) -> ImageRecord:
    """Generate image ``index`` of the dataset ``(seed, size)``; write its PNG into ``image_dir``.
    ``negative_forms``: see :func:`~mllm_ris.data._synth_expr.generate_expressions`.

    Returns:
        the image's :class:`ImageRecord`.
    """
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, size)
    expressions = generate_expressions(scene.objects, rng, margin_px(size), negative_forms)
    file_name = image_file_name(index)
    # compress_level fixed: PNG bytes depend only on the pixels.
    Image.fromarray(scene.image).save(Path(image_dir) / file_name, format="PNG", compress_level=6)
    objects = []
    for obj in scene.objects:
        box = mask_to_box(obj.mask)
        assert box is not None  # placement keeps every object visible
        x0, y0, x1, y1 = box
        objects.append(
            {
                "shape": obj.shape,
                "colour": obj.colour,
                "size": obj.size,
                "rle": encode_rle(obj.mask),
                "area": obj.area,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "full_area": obj.full_area,
                "visible_fraction": round(obj.visible_fraction, 4),
            }
        )
    return ImageRecord(
        index=index,
        file_name=file_name,
        size=size,
        background=scene.background,
        objects=tuple(objects),
        expressions=tuple(
            {
                "text": e.text,
                "difficulty": e.difficulty,
                "targets": list(e.targets),
                "query": e.query,
                "source": e.source,
            }
            for e in expressions
        ),
    )
