"""What the pipeline returns, drawn and written.

* :class:`Prediction` (one mask) and :class:`RISResult` (one query's answer);
* pictures of them: coloured mask overlays, binary mask images, and the HTML gallery of the demo;
* writing them to disk atomically: ``<stem>_mask.png``, ``<stem>_overlay.png``, ``<stem>.json``.
  Everything is encoded in memory first, then each file is written to a temporary name in the output
  folder and renamed, so an error (a full disk, an interrupt) never leaves a half-written file under
  a final name; a failure while writing a set removes the files of that set already renamed.
"""

from __future__ import annotations

import html
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image
from scipy import ndimage

from mllm_ris.errors import InputError
from mllm_ris.processing.processor import Turn

__all__ = [
    "PALETTE",
    "GalleryItem",
    "OutputFiles",
    "Prediction",
    "RISResult",
    "ensure_out_dir",
    "gallery_html",
    "mask_image",
    "overlay",
    "result_record",
    "write_atomic",
    "write_result_files",
]


@dataclass(eq=False)  # masks are arrays: compare fields explicitly
class Prediction:
    """One segmented object.

    Attributes:
        mask: ``(H, W)`` bool at the original image size.
        score: the model's predicted IoU of the mask.
        rle: COCO RLE of ``mask`` (``{"size": [H, W], "counts": str}``).
        box: COCO ``[x, y, w, h]`` of the mask (``[0, 0, 0, 0]`` when it is empty).
        answer_text: the model's answer this mask belongs to.
    """

    mask: np.ndarray
    score: float
    rle: dict[str, Any]
    box: list[int]
    answer_text: str

    def to_json(self) -> dict[str, Any]:
        """``score``, ``box``, ``area`` and ``rle`` (no pixel array)."""
        return {"score": self.score, "box": self.box, "area": int(self.mask.sum()), "rle": self.rle}


@dataclass(eq=False)
class RISResult(Sequence[Prediction]):
    """The result of one (image, query): a sequence of :class:`Prediction` (empty = "no such object").

    Attributes:
        predictions: one per ``[SEG]`` the model generated (mllm) or the one mask (classic).
        answer_text: the model's answer (``"Sure, it is [SEG]."``, ``"… [REJ]."``); classic mode
            writes ``"[SEG]"`` / ``"[REJ]"``.
        no_target_prob: the model's probability that nothing matches.
        image_hw: ``(H, W)`` of the input image.
        question: the question the model answered (the last turn).
    """

    predictions: list[Prediction]
    answer_text: str
    no_target_prob: float
    image_hw: tuple[int, int]
    question: str = ""
    turns: list[Turn] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.predictions)

    @overload
    def __getitem__(self, i: int) -> Prediction: ...
    @overload
    def __getitem__(self, i: slice) -> list[Prediction]: ...
    def __getitem__(self, i: int | slice) -> Prediction | list[Prediction]:
        return self.predictions[i]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    @property
    def rejected(self) -> bool:
        """True when the model found nothing (``[REJ]``, no ``[SEG]``, or an empty classic mask)."""
        return not self.predictions

    def union_mask(self) -> np.ndarray:
        """``(H, W)`` bool: every mask together (all False when rejected)."""
        out = np.zeros(self.image_hw, dtype=bool)
        for p in self.predictions:
            out |= p.mask
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (no pixel arrays)."""
        h, w = self.image_hw
        return {
            "question": self.question,
            "answer": self.answer_text,
            "no_target_prob": self.no_target_prob,
            "height": h,
            "width": w,
            "predictions": [p.to_json() for p in self.predictions],
        }


# ------------------------------------------------------------------------------------- pictures

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


# ---------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class OutputFiles:
    """The three files of one result."""

    mask: Path
    overlay: Path
    json: Path

    def __iter__(self) -> Iterator[Path]:
        return iter((self.mask, self.overlay, self.json))


def ensure_out_dir(path: str | Path) -> Path:
    """Create the output folder (and parents).

    Raises:
        InputError: it exists as a file, or cannot be created.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out: cannot create {out}: {exc.strerror or exc}") from None
    return out


def write_atomic(files: dict[Path, bytes]) -> None:
    """Write every ``path: content`` via a temporary file in the same folder and a rename; on any error,
    remove the temporaries and the files of this call already renamed, then raise ``InputError``."""
    tmps: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps[path] = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException as exc:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        for path in done:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {next(iter(files), '')}: {exc.strerror or exc}") from None
        raise


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def result_record(result: RISResult, **extra: Any) -> dict[str, Any]:
    """The JSON written for a result: ``extra`` fields (image, query, model …) then ``result.to_json()``."""
    return {**extra, **result.to_json()}


def free_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem_2``, ``stem_3`` … : the first whose three result files are all absent from
    ``out_dir``, so a second query about the same image keeps the first one's files."""
    candidate, n = stem, 1
    while any(
        (out_dir / f"{candidate}{suffix}").exists() for suffix in ("_mask.png", "_overlay.png", ".json")
    ):
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def write_result_files(
    out_dir: Path, stem: str, pixels: np.ndarray, result: RISResult, record: Mapping[str, Any] | None = None
) -> OutputFiles:
    """Write the mask PNG (255 = any mask), the overlay PNG and the JSON (RLEs, scores, answer) of one
    result, atomically (see the module docstring).

    Args:
        out_dir: an existing folder.
        stem: file name stem (``<stem>_mask.png`` …).
        pixels: ``(H, W, 3)`` uint8, the image the result is about.
        record: fields put first in the JSON (e.g. ``image``, ``query``, ``model``).
    """
    files = OutputFiles(
        out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png", out_dir / f"{stem}.json"
    )
    data = result_record(result, **(record or {}))
    contents = {
        files.mask: _png(mask_image(result)),
        files.overlay: _png(overlay(pixels, result)),
        files.json: (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
    }
    write_atomic(contents)
    return files
