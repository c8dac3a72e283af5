"""SynthRef: a procedural referring-segmentation dataset, so everything trains and is measured offline.

``make_synthref(out, images=N, seed=S, size=PX)`` renders N scenes of 2-6 shapes (shape x colour x
size, textured backgrounds, occlusion; a mask is the visible pixels) with referring expressions
at five difficulty levels recorded per sentence: ``simple`` ("the red circle"), ``spatial``
("the leftmost square", "the larger of the two blue ones"), ``relational`` ("the triangle below
the small green circle and right of the star"), ``multi`` ("all yellow shapes") and
``negative`` (an absent object). Every expression is generated from a structured query and kept
only when the query, evaluated on the scene, selects exactly its targets (``_synth_expr``).

The output is written in the refer, gRefCOCO and R-RefCOCO layouts (``_synth_write``) so the
project's real loaders read it; :class:`SynthRefDataset` reads the full gRefCOCO-layout copy.
The same ``(images, seed, size)`` gives byte-identical files for any worker count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mllm_ris.data._synth_expr import DIFFICULTIES, NEGATIVE_FORMS
from mllm_ris.data._synth_render import ImageRecord, margin_px, render_image
from mllm_ris.data._synth_scene import COLOURS, MIN_VISIBLE_FRACTION, SHAPES, SIZES, min_visible_pixels
from mllm_ris.data._synth_write import SPLITS, build_annotations, split_of_images, write_layouts
from mllm_ris.data.grefcoco import GRefCOCODataset
from mllm_ris.errors import ConfigError, DatasetError

__all__ = ["SYNTHREF_VERSION", "SynthRefDataset", "SynthRefSummary", "make_synthref"]

SYNTHREF_VERSION = "1.0"
META_FILE = "synthref_meta.json"
IMAGE_SUBDIR = Path("images") / "mscoco" / "images" / "train2014"
_ANNOTATION_FILES = (
    Path("grefcoco") / "grefs(unc).json",
    Path("grefcoco") / "instances.json",
    Path("synthref") / "refs(unc).p",
    Path("synthref") / "instances.json",
    Path("rrefcoco") / "refs(unc).p",
    Path("rrefcoco") / "instances.json",
    Path(META_FILE),
)
_MIN_SIZE = 48
_PARALLEL_FROM = 64  # fewer images render faster in-process than a pool starts


@dataclass(frozen=True)
class SynthRefSummary:
    """What :func:`make_synthref` built.

    Attributes:
        out_dir: the dataset root.
        images, seed, size: the generation parameters.
        workers: processes used.
        seconds: wall time of the build.
        counts: the statistics also written to ``synthref_meta.json`` (refs by kind, sentences by
            difficulty, per split, per layout).
    """

    out_dir: Path
    images: int
    seed: int
    size: int
    workers: int
    seconds: float
    counts: dict[str, Any]

    @property
    def sentences(self) -> int:
        """Sentences of every difficulty."""
        return sum(self.counts["sentences"].values())

    @property
    def refs(self) -> int:
        """Refs of every kind (single, multi, no-target)."""
        return sum(self.counts["refs"].values())

    def __str__(self) -> str:
        per_level = ", ".join(f"{k} {v}" for k, v in self.counts["sentences"].items())
        return (
            f"SynthRef: {self.images} images of {self.size} px (seed {self.seed}) in {self.out_dir}: "
            f"{self.refs} refs, {self.sentences} sentences ({per_level}); "
            f"{self.seconds:.1f} s with {self.workers} worker(s)"
        )


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir``; clear a previous SynthRef build in it; refuse a folder holding other data."""
    image_dir = out_dir / IMAGE_SUBDIR
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"SynthRef output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / META_FILE).is_file():
            raise DatasetError(
                f"SynthRef output {out_dir} is not empty and holds no {META_FILE}: "
                "choose an empty or new folder"
            )
        for rel in _ANNOTATION_FILES:
            (out_dir / rel).unlink(missing_ok=True)
        if image_dir.is_dir():
            for png in image_dir.glob("synthref_*.png"):
                png.unlink()
    image_dir.mkdir(parents=True, exist_ok=True)
    return image_dir


def _render_all(
    images: int,
    seed: int,
    size: int,
    image_dir: Path,
    workers: int,
    progress: bool,
    negative_forms: tuple[str, ...],
) -> list[ImageRecord]:
    render = partial(
        render_image, seed=seed, size=size, image_dir=str(image_dir), negative_forms=negative_forms
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images, desc="synthref", unit="img", file=sys.stderr)
    records: list[ImageRecord] = []
    try:
        if workers == 1:
            for index in range(images):
                records.append(render(index))
                if bar is not None:
                    bar.update(1)
        else:
            # spawn: safe whatever threads the parent runs (torch, tokenizers); order kept by imap
            ctx = multiprocessing.get_context("spawn")
            chunk = max(1, min(32, images // (workers * 8)))
            with ctx.Pool(workers) as pool:
                for record in pool.imap(render, range(images), chunksize=chunk):
                    records.append(record)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records


def make_synthref(
    out_dir: str | Path,
    *,
    images: int,
    seed: int,
    size: int,
    workers: int | None = None,
    progress: bool = True,
    negative_forms: Sequence[str] = ("attr",),
) -> SynthRefSummary:
    """Generate a SynthRef dataset into ``out_dir``.

    Layout written (see docs/synthref.md)::

        out_dir/images/mscoco/images/train2014/synthref_<id:08d>.png   every image
        out_dir/grefcoco/grefs(unc).json + instances.json              every ref (gRefCOCO layout)
        out_dir/synthref/refs(unc).p + instances.json                  single-target refs (refer layout)
        out_dir/rrefcoco/refs(unc).p + instances.json                  single-target + negatives (R-RefCOCO)
        out_dir/synthref_meta.json                                     parameters and counts

    Args:
        out_dir: a new or empty folder, or a previous SynthRef build (its files are replaced).
        images: number of images (>= 1); split 80 / 10 / 10 into train / val / test by seed.
        seed: the seed (>= 0); the same ``(images, seed, size)`` gives byte-identical files.
        size: image side in pixels (>= 48).
        workers: rendering processes; None uses every available CPU (one for < 64 images).
            Workers are started with ``spawn``, so a script calling this with ``workers > 1``
            needs the usual ``if __name__ == "__main__":`` guard.
        progress: show a progress bar on stderr.
        negative_forms: the forms negatives take (:data:`~mllm_ris.data._synth_expr.NEGATIVE_FORMS`:
            ``attr`` "the red star" without one; ``spatial`` "the leftmost red star" without one;
            ``relational`` "the circle left of the red square" when no circle is). The default,
            ``attr`` alone, builds exactly what SynthRef built before the other forms existed.

    Returns:
        a :class:`SynthRefSummary`.

    Raises:
        ConfigError: ``images``, ``seed``, ``size`` or ``workers`` out of range.
        DatasetError: ``out_dir`` is a file, or a non-empty folder that is not a SynthRef build.
    """
    if images < 1:
        raise ConfigError(f"images must be >= 1, got {images}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if size < _MIN_SIZE:
        raise ConfigError(f"size must be >= {_MIN_SIZE} pixels, got {size}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1 or None, got {workers}")
    forms = tuple(dict.fromkeys(negative_forms))  # unique, in the given order
    if not forms or set(forms) - set(NEGATIVE_FORMS):
        raise ConfigError(f"negative_forms: {list(negative_forms)}; choose from {list(NEGATIVE_FORMS)}")
    if workers is None:
        workers = 1 if images < _PARALLEL_FROM else _available_cpus()
    workers = max(1, min(workers, images))
    start = time.perf_counter()
    out = Path(out_dir)
    image_dir = _prepare_out_dir(out)
    records = _render_all(images, seed, size, image_dir, workers, progress, forms)
    ann = build_annotations(records, split_of_images(images, seed))
    meta = {
        "generator": "mllm-ris synthref",
        "version": SYNTHREF_VERSION,
        "seed": seed,
        "images": images,
        "size": size,
        "margin_px": margin_px(size),
        "min_visible_fraction": MIN_VISIBLE_FRACTION,
        "min_visible_pixels": min_visible_pixels(size),
        "shapes": list(SHAPES),
        "colours": dict(COLOURS),
        "sizes": list(SIZES),
        "difficulties": list(DIFFICULTIES),
        "negative_forms": list(forms),
        "splits": list(SPLITS),
        "image_dir": IMAGE_SUBDIR.as_posix(),
    }
    write_layouts(out, ann, meta)
    return SynthRefSummary(
        out_dir=out,
        images=images,
        seed=seed,
        size=size,
        workers=workers,
        seconds=time.perf_counter() - start,
        counts=ann.counts,
    )


class SynthRefDataset(GRefCOCODataset):
    """A SynthRef build read through its gRefCOCO-layout copy (every ref, every difficulty).

    Samples carry ``difficulty`` (``simple``, ``spatial``, ``relational``, ``multi``,
    ``negative``); multi-target sentences give ``T >= 2`` masks and negatives ``T == 0``.

    Args:
        root: a folder written by :func:`make_synthref`.
        split: ``train``, ``val`` or ``test``; None keeps all.
        image_root: override the image folder.

    Attributes:
        meta: the content of ``synthref_meta.json`` (generator version, seed, size, counts).

    Raises:
        DatasetError: ``root`` holds no ``synthref_meta.json`` or malformed annotation files.
    """

    name = "synthref"
    annotation_dir = "grefcoco"

    def __init__(
        self, root: str | Path, *, split: str | None = None, image_root: str | Path | None = None
    ) -> None:
        meta_path = Path(root) / META_FILE
        if not meta_path.is_file():
            raise DatasetError(
                f"{root} is not a SynthRef dataset (no {META_FILE}); create one with `mllm-ris make-synthref`"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"cannot read {meta_path}: {exc}") from None
        super().__init__(root, split=split, image_root=image_root)
