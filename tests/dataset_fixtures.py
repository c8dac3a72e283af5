"""Tiny datasets written in the exact on-disk layouts of docs/datasets.md, with known content.

Each ``make_*`` writes small generated images (32-48 px) and annotations under ``root`` and
returns a :class:`FixtureInfo` with the expected counts and the expected masks, so any test can
check a loader (``from dataset_fixtures import make_refer``)::

    info = make_refer(tmp_path)
    ds = build_dataset(info.name, info.root, split_by=info.split_by)
    assert len(ds) == info.samples

Masks are drawn so their pixels are known without the loader's decoder: polygon rectangles
``[x0, y0, x1, y0, x1, y1, x0, y1]`` cover ``[y0:y1, x0:x1]`` under COCO rasterisation; ReasonSeg
rectangles (PIL, outline included) cover ``[y0:y1 + 1, x0:x1 + 1]``; RLE and PNG masks are
encoded from numpy masks.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from _fixture_utils import (
    FixtureInfo,
    poly,
    rect,
    rle,
    sentence,
    uncompressed_rle,
    write_image,
    write_json,
)
from PIL import Image

__all__ = [
    "FixtureInfo",
    "make_grefcoco",
    "make_jsonl",
    "make_reasonseg",
    "make_refclef",
    "make_refer",
    "make_riscq",
    "make_rrefcoco",
]


# --------------------------------------------------------------------------- COCO refer layout
# image id -> (height, width); annotation id -> (image id, boxes); polygons are rectangles.
_COCO_IMAGES = {1: (32, 48), 2: (40, 36), 3: (36, 44)}
_COCO_ANNS = {
    101: (1, [(4, 4, 20, 16)]),
    102: (1, [(24, 8, 40, 14), (26, 20, 44, 30)]),  # two parts: mask is their union
    103: (2, [(2, 10, 30, 38)]),
    104: (3, [(10, 5, 30, 25)]),
}


def _coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _write_coco(ann_dir: Path, image_dir: Path) -> None:
    images, anns = [], []
    for image_id, (h, w) in _COCO_IMAGES.items():
        images.append({"id": image_id, "file_name": _coco_file_name(image_id), "height": h, "width": w})
        write_image(image_dir / _coco_file_name(image_id), h, w, image_id)
    for ann_id, (image_id, boxes) in _COCO_ANNS.items():
        h, w = _COCO_IMAGES[image_id]
        seg = [poly(*b) for b in boxes]
        area = int(rect(h, w, *boxes).sum())
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": seg,
                "area": area,
                "bbox": [0, 0, 1, 1],
                "iscrowd": 0,
            }
        )
    write_json(
        ann_dir / "instances.json",
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]},
    )


def _coco_masks(ann_ids: list[int], image_id: int) -> np.ndarray:
    h, w = _COCO_IMAGES[image_id]
    return (
        np.stack([rect(h, w, *_COCO_ANNS[a][1]) for a in ann_ids]) if ann_ids else np.zeros((0, h, w), bool)
    )


def _counts(refs: list[dict[str, Any]], n_images: int, name: str, root: Path, masks: dict) -> FixtureInfo:
    pos = neg = no_target = instances = 0
    splits: dict[str, int] = {}
    for ref in refs:
        targets = ref["_targets"]
        no_target += not targets
        instances += len(targets)
        for s in ref["sentences"]:
            positive = bool(targets) and s.get("exist", True)
            pos += positive
            neg += not positive
            splits[ref["split"]] = splits.get(ref["split"], 0) + 1
    return FixtureInfo(root, name, n_images, len(refs), pos, neg, no_target, instances, splits, masks)


def make_refer(
    root: Path, dataset: str = "refcoco", split_by: str = "unc", *, negatives: bool = False
) -> FixtureInfo:
    """Refer layout: ``<root>/<dataset>/refs(<split_by>).p`` (protocol 2), ``instances.json``, images.

    4 refs on 3 images; ref 2 has a two-part polygon; ref 1's second sentence has only ``raw``;
    splits train/val/testA (``test`` instead of ``testA`` for google / umd). ``negatives`` adds
    ``"exist": false`` sentences (R-RefCOCO).
    """
    last = "testA" if split_by == "unc" else "test"
    spec = [(1, 101, "train"), (2, 102, "val"), (3, 103, last), (4, 104, "train")]
    texts = {
        1: ["left red box", "box on the left"],
        2: ["two blue bars"],
        3: ["big square", "square"],
        4: ["middle one"],
    }
    refs, masks, sid = [], {}, 1000
    for ref_id, ann_id, split in spec:
        image_id = _COCO_ANNS[ann_id][0]
        sentences = []
        for i, text in enumerate(texts[ref_id]):
            sentences.append(
                sentence(
                    sid, text, raw_only=(ref_id == 1 and i == 1), **({"exist": True} if negatives else {})
                )
            )
            sid += 1
        if negatives and ref_id in (1, 3):
            sentences.append(sentence(sid, f"the purple elephant {ref_id}", exist=False))
            sid += 1
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann_id,
                "image_id": image_id,
                "split": split,
                "category_id": 1,
                "sent_ids": [s["sent_id"] for s in sentences],
                "sentences": sentences,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "_targets": [ann_id],
            }
        )
        masks[ref_id] = _coco_masks([ann_id], image_id)
    _write_coco(root / dataset, root / "images" / "mscoco" / "images" / "train2014")
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in refs]
    (root / dataset / f"refs({split_by}).p").write_bytes(pickle.dumps(public, protocol=2))
    info = _counts(refs, len(_COCO_IMAGES), dataset, root, masks)
    info.split_by = split_by
    return info


def make_rrefcoco(root: Path, dataset: str = "rrefcoco") -> FixtureInfo:
    """R-RefCOCO layout: :func:`make_refer` with two ``"exist": false`` sentences."""
    return make_refer(root, dataset, "unc", negatives=True)


def make_refclef(root: Path, split_by: str = "unc") -> FixtureInfo:
    """RefCLEF layout with RLE masks: a dict with str counts, a list holding one RLE dict, and an
    uncompressed RLE. Writes both ``refs(unc).p`` (train/val/testB) and ``refs(berkeley).p``
    (train/val/test); the counts returned are for ``split_by``."""
    sizes = {11: (34, 40), 12: (38, 32)}
    yy, xx = np.mgrid[0:34, 0:40]
    disk = (yy - 17) ** 2 + (xx - 20) ** 2 <= 81
    shapes = {
        201: (11, disk),
        202: (11, rect(34, 40, (0, 0, 6, 34))),
        203: (12, rect(38, 32, (5, 20, 30, 37))),
    }
    segs = {201: rle(shapes[201][1]), 202: [rle(shapes[202][1])], 203: uncompressed_rle(shapes[203][1])}
    images = []
    for image_id, (h, w) in sizes.items():
        name = f"{image_id}/images/{image_id}001.jpg"
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        write_image(root / "images" / "saiapr_tc-12" / name, h, w, image_id)
    anns = [{"id": a, "image_id": shapes[a][0], "category_id": 1, "segmentation": segs[a]} for a in shapes]
    write_json(root / "refclef" / "instances.json", {"images": images, "annotations": anns, "categories": []})
    splits = {"unc": ("train", "val", "testB"), "berkeley": ("train", "val", "test")}
    for sb, names in splits.items():
        refs = [
            {
                "ref_id": i,
                "ann_id": a,
                "image_id": shapes[a][0],
                "split": names[i],
                "category_id": 1,
                "sentences": [sentence(3000 + i, f"thing {a}")],
                "file_name": f"{shapes[a][0]}_{a}.jpg",
            }
            for i, a in enumerate(shapes)
        ]
        (root / "refclef" / f"refs({sb}).p").write_bytes(pickle.dumps(refs, protocol=2))
    refs = [{"split": splits[split_by][i], "sentences": [{}], "_targets": [a]} for i, a in enumerate(shapes)]
    masks = {i: shapes[a][1][None] for i, a in enumerate(shapes)}
    info = _counts(refs, len(sizes), "refclef", root, masks)
    info.split_by = split_by
    return info


def make_grefcoco(root: Path, *, images_in_mscoco: bool = False) -> FixtureInfo:
    """gRefCOCO layout: a single-target ref (int ids, one sentence with ``difficulty``), a
    two-target ref with one ``exist: false`` sentence, a no-target ref (``ann_id: [-1]``) and a
    one-element-list ref; splits train / val. ``images_in_mscoco`` puts the images where LISA
    keeps them (``images/mscoco/images/train2014``)."""
    spec = [(1, 101, "train"), (2, [101, 102], "train"), (3, [-1], "val"), (4, [103], "val")]
    refs, masks, sid = [], {}, 2000
    for ref_id, ann, split in spec:
        ids = [ann] if isinstance(ann, int) else ann
        targets = [a for a in ids if a != -1]
        image_id = _COCO_ANNS[targets[0]][0] if targets else 3
        sentences = [sentence(sid, f"gref {ref_id}", **({"difficulty": "simple"} if ref_id == 1 else {}))]
        sentences.append(
            sentence(sid + 1, f"not there {ref_id}", exist=False)
            if ref_id == 2
            else sentence(sid + 1, f"again {ref_id}")
        )
        sid += 2
        if ref_id == 4:
            sentences.pop()
        refs.append(
            {
                "ref_id": ref_id,
                "ann_id": ann,
                "category_id": ([1] * len(targets) or [-1]) if isinstance(ann, list) else 1,
                "image_id": image_id,
                "split": split,
                "no_target": not targets,
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "_targets": targets,
            }
        )
        masks[ref_id] = _coco_masks(targets, image_id)
    images = root / "images" / ("mscoco/images/train2014" if images_in_mscoco else "train2014")
    _write_coco(root / "grefcoco", images)
    write_json(
        root / "grefcoco" / "grefs(unc).json",
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in refs],
    )
    return _counts(refs, len(_COCO_IMAGES), "grefcoco", root, masks)


def make_riscq(root: Path) -> FixtureInfo:
    """RIS-CQ layout: ``train.json`` (3 entries on 2 images) and ``val.json`` (1 entry), images
    under ``images/train2017`` / ``images/val2017``, panoptic PNGs under ``panoptic_<split>2017``.
    Segment ids use all three PNG channels."""
    ids = {"a": 3648962, "b": 1249568, "c": 255, "d": 65536 * 3 + 5}
    plan = {
        "train": [
            (17, (36, 44), [("a", (2, 2, 20, 30)), ("b", (22, 4, 40, 20))]),
            (23, (40, 32), [("c", (0, 0, 32, 10))]),
        ],
        "val": [(31, (32, 40), [("d", (8, 8, 30, 28))])],
    }
    masks, splits = {}, {}
    for split, entries in plan.items():
        records = []
        for image_id, (h, w), segments in entries:
            name = f"{image_id:012d}"
            write_image(root / "images" / f"{split}2017" / f"{name}.jpg", h, w, image_id)
            id_map = np.zeros((h, w), dtype=np.int64)
            for key, box in segments:
                id_map[rect(h, w, box)] = ids[key]
            rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], axis=-1).astype(np.uint8)
            png = root / f"panoptic_{split}2017" / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(png)
            for key, _ in segments:
                masks[f"{split}:{len(records)}"] = (id_map == ids[key])[None]
                records.append(
                    {
                        "file_name": f"{split}2017/{name}.jpg",
                        "sentence": f"segment {key} beside the others",
                        "pan_seg_file": f"panoptic_{split}2017/{name}.png",
                        "id": ids[key],
                    }
                )
        write_json(root / f"{split}.json", records)
        splits[split] = len(records)
    return FixtureInfo(root, "riscq", 3, 4, 4, 0, 0, 4, splits, masks)


def make_reasonseg(root: Path) -> FixtureInfo:
    """ReasonSeg layout: ``train/`` (2 images) and ``val/`` (1 image), each ``NAME.jpg`` +
    ``NAME.json``. Shapes are listed smallest first, so painting in file order would give a
    different result than LISA's largest-first order. Image A: a smaller ignore inside a larger
    target, and a whole-image ``flag`` shape (skipped). Image B: a smaller target inside a larger
    ignore (the target wins), and a second target. Image C: float points (truncated)."""
    t, ig, fl = "target", "ignore", "flag"
    plan = {
        ("train", "a"): (
            (40, 48),
            ["what holds the food?", "the plate"],
            [(ig, (10, 10, 18, 18)), (t, (2, 2, 30, 30)), (fl, (0, 0, 47, 39))],
        ),
        ("train", "b"): (
            (36, 40),
            ["where would you sit?"],
            [(t, (5, 5, 12, 12)), (ig, (0, 0, 30, 20)), (t, (34, 25, 38, 33))],
        ),
        ("val", "c"): (
            (32, 32),
            ["the thing to drink from", "cup", "mug"],
            [(t, [[3.7, 4.2], [20.9, 4.2], [20.9, 15.5], [3.7, 15.5]])],
        ),
    }
    masks, ignore, splits = {}, {}, {}
    for (split, name), ((h, w), texts, shapes) in plan.items():
        write_image(root / split / f"{name}.jpg", h, w, len(name))
        json_shapes, painted = [], []
        for label, box in shapes:
            if isinstance(box, list):  # float points: (3.7, 4.2)-(20.9, 15.5) truncate to (3, 4)-(20, 15)
                json_shapes.append({"label": label, "points": box, "shape_type": "polygon"})
                box = (3, 4, 20, 15)
            else:
                x0, y0, x1, y1 = box
                json_shapes.append({"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]})
            if label != fl:
                painted.append((int(rect(h, w, box, inclusive=True).sum()), label, box))
        labels = np.zeros((h, w), dtype=np.uint8)
        for _, label, box in sorted(painted, key=lambda p: -p[0]):
            labels[rect(h, w, box, inclusive=True)] = 255 if label == ig else 1
        write_json(
            root / split / f"{name}.json",
            {"text": texts, "is_sentence": len(texts[0]) > 10, "shapes": json_shapes},
        )
        masks[f"{split}/{name}"] = (labels == 1)[None]
        ignore[f"{split}/{name}"] = labels == 255
        splits[split] = splits.get(split, 0) + len(texts)
    return FixtureInfo(root, "reasonseg", 3, 3, sum(splits.values()), 0, 0, 3, splits, masks, ignore)


def make_jsonl(root: Path) -> FixtureInfo:
    """JSONL layout in ``<root>/jsonl/``: ``train.jsonl`` (an RLE-mask line with an ``id``, and a
    two-mask line - PNG + uncompressed RLE - with two expressions) and ``val.jsonl`` (a
    no-target line whose image path is absolute). ``root`` of the result is that folder."""
    base = root / "jsonl"
    write_image(base / "imgs" / "a.jpg", 32, 40, 1)
    write_image(base / "imgs" / "b.png", 36, 36, 2)
    write_image(base / "imgs" / "c.jpg", 40, 32, 3)
    ma = rect(32, 40, (5, 5, 25, 20))
    mb0, mb1 = rect(36, 36, (0, 0, 10, 36)), rect(36, 36, (20, 3, 33, 30))
    (base / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mb0.astype(np.uint8) * 255).save(base / "masks" / "b0.png")
    lines = {
        "train": [
            {"image": "imgs/a.jpg", "expression": "the red box", "masks": [rle(ma)], "id": "a"},
            {
                "image": "imgs/b.png",
                "expressions": ["both bars", "the two bars"],
                "masks": [{"png": "masks/b0.png"}, uncompressed_rle(mb1)],
            },
        ],
        "val": [
            {
                "image": str((base / "imgs" / "c.jpg").resolve()),
                "expression": "a unicorn",
                "masks": [],
                "id": 7,
            }
        ],
    }
    for split, records in lines.items():
        (base / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    masks = {"a": ma[None], "train:2": np.stack([mb0, mb1]), 7: np.zeros((0, 40, 32), dtype=bool)}
    return FixtureInfo(base, "jsonl", 3, 3, 3, 1, 1, 3, {"train": 3, "val": 1}, masks)
