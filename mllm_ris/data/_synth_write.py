"""SynthRef layout writers: one set of generated images -> refer, gRefCOCO and R-RefCOCO files.

Ids are assigned here, in image order, so they are the same for any worker count: image ids
``1..N``, annotation ids ``1..``, ref ids and sentence ids ``0..``. One sentence keeps its
``sent_id`` and one single-target ref its ``ref_id`` in every layout.

Refs group the sentences of one image by target set: one ref per referred object (``simple``,
``spatial``, ``relational`` sentences), one per multi-target set, and one no-target ref holding
the image's ``negative`` sentences. Layouts (see docs/synthref.md):

* ``grefcoco/grefs(unc).json`` - every ref, ``ann_id`` / ``category_id`` lists, no-target refs
  with ``[-1]`` and ``no_target: true``;
* ``synthref/refs(unc).p`` - single-target refs, positive sentences only (refer layout);
* ``rrefcoco/refs(unc).p`` - single-target refs, each with the negatives derived from its
  object appended as ``"exist": false`` sentences (R-RefCOCO layout).
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllm_ris.data._synth_expr import DIFFICULTIES
from mllm_ris.data._synth_render import ImageRecord
from mllm_ris.data._synth_scene import SHAPES
from mllm_ris.data._synth_text import tokenize

__all__ = ["SPLITS", "SynthAnnotations", "build_annotations", "split_of_images", "write_layouts"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
CATEGORY_IDS: dict[str, int] = {shape: i + 1 for i, shape in enumerate(SHAPES)}


def split_of_images(images: int, seed: int) -> list[str]:
    """Split of each image index: a seeded permutation cut 80 / 10 / 10 (val, test >= 1 from 3 images)."""
    n_held = 0 if images < 3 else max(1, round(0.1 * images))
    order = np.random.default_rng([seed, 0x5EED]).permutation(images)
    splits = ["train"] * images
    for rank, index in enumerate(order):
        if rank < n_held:
            splits[int(index)] = "val"
        elif rank < 2 * n_held:
            splits[int(index)] = "test"
    return splits


@dataclass
class SynthAnnotations:
    """All annotation files of one SynthRef build, as Python objects.

    Attributes:
        instances: the COCO ``instances.json`` content (the same in every layout folder).
        grefs: gRefCOCO refs (every ref).
        refer_refs: refer-layout refs (single target, positive sentences).
        rrefs: R-RefCOCO refs (single target, negatives as ``exist: false`` sentences).
        counts: the statistics recorded in ``synthref_meta.json``.
    """

    instances: dict[str, Any]
    grefs: list[dict[str, Any]] = field(default_factory=list)
    refer_refs: list[dict[str, Any]] = field(default_factory=list)
    rrefs: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)


def _sentence(expr: dict[str, Any], sent_id: int) -> dict[str, Any]:
    return {
        "tokens": tokenize(expr["text"]),
        "raw": expr["text"],
        "sent_id": sent_id,
        "sent": expr["text"],
        "difficulty": expr["difficulty"],
        "query": expr["query"],
    }


def build_annotations(records: Sequence[ImageRecord], splits: Sequence[str]) -> SynthAnnotations:
    """Assign ids and build every layout's refs from the image records (in index order)."""
    images, annotations = [], []
    out = SynthAnnotations(instances={})
    sentence_counts: Counter[tuple[str, str]] = Counter()  # (split, difficulty)
    ref_counts: Counter[tuple[str, str]] = Counter()  # (split, kind)
    next_ann, next_ref, next_sent = 1, 0, 0
    for record, split in zip(records, splits, strict=True):
        image_id = record.index + 1
        stem = record.file_name.rsplit(".", 1)[0]
        images.append(
            {
                "id": image_id,
                "file_name": record.file_name,
                "height": record.size,
                "width": record.size,
                "background": record.background,
            }
        )
        ann_ids = []
        for k, obj in enumerate(record.objects):
            ann_ids.append(next_ann)
            annotations.append(
                {
                    "id": next_ann,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[obj["shape"]],
                    "segmentation": obj["rle"],
                    "area": obj["area"],
                    "bbox": obj["bbox"],
                    "iscrowd": 0,
                    "attributes": {"shape": obj["shape"], "colour": obj["colour"], "size": obj["size"]},
                    "full_area": obj["full_area"],
                    "visible_fraction": obj["visible_fraction"],
                    "draw_order": k,
                }
            )
            next_ann += 1
        # group sentences by target set, in order of first appearance; negatives last
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        negatives: list[tuple[dict[str, Any], int]] = []
        for expr in record.expressions:
            sent = _sentence(expr, next_sent)
            next_sent += 1
            sentence_counts[(split, expr["difficulty"])] += 1
            if expr["targets"]:
                groups.setdefault(tuple(expr["targets"]), []).append(sent)
            else:
                negatives.append((sent, expr["source"]))
        single_refs: dict[int, dict[str, Any]] = {}
        for targets, sentences in groups.items():
            ids = [ann_ids[t] for t in targets]
            cats = [CATEGORY_IDS[record.objects[t]["shape"]] for t in targets]
            gref = {
                "ref_id": next_ref,
                "image_id": image_id,
                "ann_id": ids,
                "category_id": cats,
                "split": split,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"{stem}_{next_ref}.png",
                "sentences": sentences,
                "no_target": False,
            }
            out.grefs.append(gref)
            ref_counts[(split, "single" if len(targets) == 1 else "multi")] += 1
            if len(targets) == 1:
                refer = {**gref, "ann_id": ids[0], "category_id": cats[0]}
                del refer["no_target"]
                out.refer_refs.append(refer)
                single_refs[targets[0]] = refer
            next_ref += 1
        if negatives:
            out.grefs.append(
                {
                    "ref_id": next_ref,
                    "image_id": image_id,
                    "ann_id": [-1],
                    "category_id": [-1],
                    "split": split,
                    "sent_ids": [s["sent_id"] for s, _ in negatives],
                    "file_name": f"{stem}_{next_ref}.png",
                    "sentences": [s for s, _ in negatives],
                    "no_target": True,
                }
            )
            ref_counts[(split, "no_target")] += 1
            next_ref += 1
        for t, refer in single_refs.items():
            extra = [{**s, "exist": False} for s, source in negatives if source == t]
            sentences = [{**s, "exist": True} for s in refer["sentences"]] + extra
            out.rrefs.append({**refer, "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]})
        unattached = [s for s, source in negatives if source not in single_refs]
        if unattached:
            raise AssertionError(f"image {image_id}: negatives derived from an object without a ref")
    out.instances = {
        "info": {"description": "SynthRef procedural referring scenes (mllm-ris)"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in CATEGORY_IDS.items()],
    }
    out.counts = _counts(out, splits, sentence_counts, ref_counts)
    return out


def _counts(
    ann: SynthAnnotations,
    splits: Sequence[str],
    sentence_counts: Counter[tuple[str, str]],
    ref_counts: Counter[tuple[str, str]],
) -> dict[str, Any]:
    per_split = {}
    for split in SPLITS:
        per_split[split] = {
            "images": sum(s == split for s in splits),
            "refs": {k: ref_counts[(split, k)] for k in ("single", "multi", "no_target")},
            "sentences": {d: sentence_counts[(split, d)] for d in DIFFICULTIES},
        }
    return {
        "images": len(splits),
        "annotations": len(ann.instances["annotations"]),
        "refs": {k: sum(ref_counts[(s, k)] for s in SPLITS) for k in ("single", "multi", "no_target")},
        "sentences": {d: sum(sentence_counts[(s, d)] for s in SPLITS) for d in DIFFICULTIES},
        "layouts": {
            "grefcoco": {"refs": len(ann.grefs), "sentences": sum(len(r["sentences"]) for r in ann.grefs)},
            "synthref": {
                "refs": len(ann.refer_refs),
                "sentences": sum(len(r["sentences"]) for r in ann.refer_refs),
            },
            "rrefcoco": {"refs": len(ann.rrefs), "sentences": sum(len(r["sentences"]) for r in ann.rrefs)},
        },
        "splits": per_split,
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, separators=(",", ":")))  # dumps: the C encoder, much faster than dump


def _write_pickle(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pickle output depends on which objects are shared (memo references), and that differs between
    # records built in-process and records received from workers: a JSON round trip makes the object
    # graph a function of the content only, so the bytes are the same for any worker count.
    canonical = json.loads(json.dumps(data))
    with path.open("wb") as f:
        pickle.dump(canonical, f, protocol=2)


def write_layouts(out_dir: Path, ann: SynthAnnotations, meta: dict[str, Any]) -> list[Path]:
    """Write the annotation files of every layout and ``synthref_meta.json`` under ``out_dir``.

    Returns:
        the files written.
    """
    written = []
    for folder in ("grefcoco", "synthref", "rrefcoco"):
        path = out_dir / folder / "instances.json"
        _write_json(path, ann.instances)
        written.append(path)
    targets: list[tuple[Path, Any]] = [
        (out_dir / "grefcoco" / "grefs(unc).json", ann.grefs),
        (out_dir / "synthref" / "refs(unc).p", ann.refer_refs),
        (out_dir / "rrefcoco" / "refs(unc).p", ann.rrefs),
    ]
    for path, data in targets:
        if path.suffix == ".json":
            _write_json(path, data)
        else:
            _write_pickle(path, data)
        written.append(path)
    meta_path = out_dir / "synthref_meta.json"
    with meta_path.open("w", encoding="utf-8") as f:
        json.dump({**meta, "counts": ann.counts}, f, indent=2)
        f.write("\n")
    written.append(meta_path)
    return written
