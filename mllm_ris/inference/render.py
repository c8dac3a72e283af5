"""Pictures of results: coloured mask overlays, binary mask images, and the HTML gallery of the demo."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mllm_ris.inference.results import RISResult

__all__ = ["PALETTE", "GalleryItem", "gallery_html", "mask_image", "overlay"]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (170, 255, 0),
    (64, 160, 255),
    (255, 64, 64),
    (255, 200, 0),
    (80, 220, 120),
    (220, 80, 255),
    (255, 128, 0),
    (0, 220, 220),
    (255, 255, 255),
)
"""Colour of mask ``i`` is ``PALETTE[i % len(PALETTE)]``."""


def overlay(image: np.ndarray, result: RISResult, *, alpha: float = 0.5) -> np.ndarray:
    """Blend each mask of ``result`` over ``image`` in its palette colour, with a solid outline.

    Args:
        image: ``(H, W, 3)`` uint8, the image the result is about.
        alpha: opacity of the mask fill.

    Returns:
        ``(H, W, 3)`` uint8 (a new array; the image itself when there is no mask, dimmed by 30 %
        so "nothing found" is visible at a glance).
    """
    if image.shape[:2] != tuple(result.image_hw):
        raise ValueError(f"image is {image.shape[:2]} but the result is about {tuple(result.image_hw)}")
    out = image.astype(np.float32)
    if result.rejected:
        return (out * 0.7).round().astype(np.uint8)
    for i, pred in enumerate(result):
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        m = pred.mask
        out[m] = (1 - alpha) * out[m] + alpha * colour
        edge = m & ~ndimage.binary_erosion(m, iterations=max(1, min(m.shape) // 128))
        out[edge] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def mask_image(result: RISResult) -> np.ndarray:
    """``(H, W)`` uint8: 255 where any mask is, 0 elsewhere (all 0 when nothing was found)."""
    return result.union_mask().astype(np.uint8) * 255


@dataclass(frozen=True)
class GalleryItem:
    """One picture of the gallery.

    Attributes:
        image: the overlay's path relative to the HTML file.
        title: the question (or expression) shown above it.
        lines: short text lines shown below it (answer, scores, what was expected).
    """

    image: str
    title: str
    lines: tuple[str, ...] = ()


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em}
.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:208px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
figure img{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;display:block;margin:auto}
figcaption{font-size:.8em;line-height:1.35} figcaption b{display:block;margin-bottom:2px}
.note{color:#666;font-size:.85em}"""


def gallery_html(title: str, sections: Sequence[tuple[str, Sequence[GalleryItem]]], *, note: str = "") -> str:
    """A self-contained HTML page (no scripts, no external resources) with one row per section."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append('<div class="row">')
        for item in items:
            lines = "".join(f"{html.escape(line)}<br>" for line in item.lines)
            parts.append(
                f'<figure><img src="{html.escape(item.image)}" alt="{html.escape(item.title)}">'
                f"<figcaption><b>{html.escape(item.title)}</b>{lines}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
