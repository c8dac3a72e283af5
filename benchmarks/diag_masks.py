"""Where does a trained head lose IoU: the wrong object, or a coarse mask on the right one?

For each trained variant in ``runs/bench_heads/`` and each single-target SynthRef val sample
(simple, spatial, relational), it finds the scene object the predicted mask overlaps most
(IoU against every annotated instance of the image):

* ``located``: that object is the target (the head picked the right object);
* ``IoU located``: mean IoU on those samples (mask quality once the object is right);
* ``IoU by area``: mean IoU per target area (px at the 128-px training size);
* ``located by attribute`` (second table): on simple expressions, the located rate split by the
  attributes the expression names (colour, shape, size and their combinations);
* ``1/4 oracle``: the IoU the ground truth itself keeps after a round trip through the head's
  output resolution (area-downsampled to 1/4, bilinear up, threshold 0.5) — the ceiling that
  resolution alone imposes.

Results go to docs/results.md (``diag_masks`` block).

    python benchmarks/diag_masks.py --data data/synthref --variants s2rm,cmsa --limit 600
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT, replace_section, shown

from mllm_ris.data._synth_scene import COLOURS, SHAPES, SIZES
from mllm_ris.data.synthetic import SynthRefDataset
from mllm_ris.modeling.predictor import RISPredictor
from mllm_ris.processing.masks import decode_segmentation
from mllm_ris.training.artifacts import load_trained_model

DOC = ROOT / "docs" / "results.md"
LEVELS = ("simple", "spatial", "relational")
ATTR_KEYS = ("colour", "size", "colour+size", "shape", "shape+size", "colour+shape", "colour+shape+size")
AREA_BINS = ((0, 100), (100, 300), (300, 1000), (1000, 10**9))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _instances(root: Path) -> dict[int, list[np.ndarray]]:
    """image id -> every annotated instance mask ``(H, W)`` bool."""
    data = json.loads((root / "grefcoco" / "instances.json").read_text())
    size = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    out: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        h, w = size[ann["image_id"]]
        out.setdefault(ann["image_id"], []).append(decode_segmentation(ann["segmentation"], h, w))
    return out


def _oracle_iou(target: np.ndarray, size: int) -> float:
    """IoU of ``target (H, W)`` after a round trip through the 1/4 output grid of a ``size`` canvas."""
    h, w = target.shape
    t = torch.tensor(target, dtype=torch.float32)[None, None]  # (1, 1, H, W)
    low = F.interpolate(
        t, size=(max(1, h * size // max(h, w) // 4), max(1, w * size // max(h, w) // 4)), mode="area"
    )
    back = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
    return _iou(back.numpy(), target)


def _attributes(text: str) -> str:
    """Which SynthRef attributes an expression names, e.g. ``colour+shape``."""
    words = set(text.lower().replace(",", " ").split())
    named = [
        name
        for name, vocab in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES))
        if words & set(vocab)
    ]
    return "+".join(named) or "none"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--variants", default="s2rm,cmsa")
    parser.add_argument("--limit", type=int, default=600, help="single-target val samples per level")
    args = parser.parse_args()

    val = SynthRefDataset(args.data, split="val")
    instances = _instances(args.data)
    by_level: dict[str, list] = {level: [] for level in LEVELS}
    for sample in val:
        level = sample.difficulty
        if level in by_level and sample.masks.shape[0] == 1 and len(by_level[level]) < args.limit:
            by_level[level].append(sample)

    rows, attr_rows = [], []
    for variant in args.variants.split(","):
        run = ROOT / "runs" / "bench_heads" / variant
        if not (run / "config.json").is_file():
            print(f"skip {variant}: no trained model in {run}")
            continue
        loaded = load_trained_model(run)  # the run's final model (or its newest checkpoint)
        predictor = RISPredictor(loaded.model, image_size=loaded.image_size, batch_size=32)
        scale = loaded.image_size
        for level, samples in by_level.items():
            ious, located, areas, oracle, attrs = [], [], [], [], []
            for start in range(0, len(samples), predictor.batch_size):
                chunk = samples[start : start + predictor.batch_size]
                for sample, pred in zip(chunk, predictor.predict_batch(chunk), strict=True):
                    target = sample.masks[0]
                    mask = pred[0] if len(pred) else np.zeros_like(target)
                    ious.append(_iou(mask, target))
                    objects = instances[sample.image_id]
                    best = max(objects, key=lambda obj, m=mask: _iou(m, obj))
                    located.append(mask.any() and _iou(best, target) > 0.9)
                    h, w = target.shape
                    areas.append(target.sum() * (scale / max(h, w)) ** 2)
                    oracle.append(_oracle_iou(target, scale))
                    attrs.append(_attributes(sample.text))
            ious_a, located_a, areas_a = np.array(ious), np.array(located), np.array(areas)
            by_area = []
            for lo, hi in AREA_BINS:
                sel = (areas_a >= lo) & (areas_a < hi)
                by_area.append(f"{_pct(ious_a[sel].mean())} ({sel.sum()})" if sel.any() else "–")
            rows.append(
                f"| {variant} | {level} | {len(ious)} | {_pct(ious_a.mean())} | {_pct(located_a.mean())} | "
                f"{_pct(ious_a[located_a].mean()) if located_a.any() else '–'} | "
                + " | ".join(by_area)
                + f" | {_pct(float(np.mean(oracle)))} |"
            )
            print(rows[-1])
            if level == "simple":
                groups: dict[str, list[bool]] = {}
                for key, hit in zip(attrs, located, strict=True):
                    groups.setdefault(key, []).append(bool(hit))
                cells = " | ".join(
                    f"{_pct(float(np.mean(groups[k])))} ({len(groups[k])})" if k in groups else "–"
                    for k in ATTR_KEYS
                )
                attr_rows.append(f"| {variant} | {cells} |")

    bins = " | ".join(f"IoU area {lo}–{hi if hi < 10**9 else '∞'}" for lo, hi in AREA_BINS)
    block = "\n".join(
        [
            "## Diagnostics: wrong object or coarse mask?",
            "",
            f"`python benchmarks/diag_masks.py --data {shown(args.data)} --variants {args.variants} "
            f"--limit {args.limit}` — single-target val samples; IoU in % (per sample, then averaged); "
            "area in px at the training size (count in brackets).",
            "",
            f"| variant | level | samples | mIoU | located | IoU located | {bins} | 1/4 oracle |",
            "|---|---|---:|---:|---:|---:|" + "---:|" * len(AREA_BINS) + "---:|",
            *rows,
            "",
            "Simple expressions: located % by the attributes the expression names (count in brackets).",
            "",
            "| variant | " + " | ".join(ATTR_KEYS) + " |",
            "|---|" + "---:|" * len(ATTR_KEYS),
            *attr_rows,
        ]
    )
    replace_section(DOC, "diag_masks", block)
    print(block)


if __name__ == "__main__":
    main()
