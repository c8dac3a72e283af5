"""Diagnostics for the head benchmark: does a trained model use the language, and does it underfit?

Two references on SynthRef val, no training needed:

* ``all-objects``: the union of every object in the scene: what a model that segments the
  salient shapes but ignores the expression scores;
* ``gt-box``: each target's box (the field's trivial upper-bound-ish baseline).

and, for each trained variant in ``runs/bench_heads/``, cIoU on a slice of *train* beside val
(underfitting shows as train ≈ val, both low). Results go to docs/results.md (diagnostics block).

    python benchmarks/diag_synthref.py --data data/synthref --train-limit 1500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _common import ROOT, replace_section, shown

from mllm_ris.data.sample import RISSample
from mllm_ris.data.synthetic import SynthRefDataset
from mllm_ris.eval.evaluate import EvalReport, build_predictor, evaluate
from mllm_ris.modeling.predictor import RISPredictor
from mllm_ris.processing.masks import decode_segmentation
from mllm_ris.training.artifacts import load_trained_model

DOC = ROOT / "docs" / "results.md"
LEVELS = ("simple", "spatial", "relational", "multi")


class AllObjectsPredictor:
    """Predicts the union of every annotated object of the sample's image (ignores the text)."""

    name = "all-objects"

    def __init__(self, root: Path) -> None:
        instances = json.loads((root / "grefcoco" / "instances.json").read_text())
        self.size = {img["id"]: (img["height"], img["width"]) for img in instances["images"]}
        self.segs: dict[int, list] = {}
        for ann in instances["annotations"]:
            self.segs.setdefault(ann["image_id"], []).append(ann["segmentation"])
        self._union: dict[int, np.ndarray] = {}  # image id -> (1, H, W), decoded once per image

    def __call__(self, sample: RISSample) -> np.ndarray:
        if sample.image_id not in self._union:
            h, w = self.size[sample.image_id]
            union = np.zeros((h, w), dtype=bool)
            for seg in self.segs.get(sample.image_id, []):
                union |= decode_segmentation(seg, h, w)
            self._union[sample.image_id] = union[None]
        return self._union[sample.image_id]


def _row(name: str, split: str, report: EvalReport) -> str:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}"

    diff = report.difficulty
    cells = " | ".join(pct(diff.get(level, {}).get("cIoU")) for level in LEVELS)
    return f"| {name} | {split} | {report.samples} | {pct(report.metrics['cIoU'])} | {cells} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--train-limit", type=int, default=1500, help="train samples evaluated per variant")
    parser.add_argument("--variants", default="s2rm,s2rm-no-coparse,lts")
    args = parser.parse_args()

    val = SynthRefDataset(args.data, split="val")
    train = SynthRefDataset(args.data, split="train")
    rows = [
        _row(
            "all-objects (ignores text)", "val", evaluate(val, AllObjectsPredictor(args.data), progress=False)
        ),
        _row("gt-box", "val", evaluate(val, build_predictor("gt-box"), progress=False)),
    ]
    for variant in args.variants.split(","):
        run = ROOT / "runs" / "bench_heads" / variant
        if not (run / "config.json").is_file():
            print(f"skip {variant}: no trained model in {run}")
            continue
        loaded = load_trained_model(run)  # the run's final model (or its newest checkpoint)
        predictor = RISPredictor(loaded.model, image_size=loaded.image_size, batch_size=32)
        rows.append(
            _row(variant, "train", evaluate(train, predictor, limit=args.train_limit, progress=False))
        )
        rows.append(_row(variant, "val", evaluate(val, predictor, progress=False)))

    block = "\n".join(
        [
            "## Diagnostics: language use and fit",
            "",
            f"`python benchmarks/diag_synthref.py --data {shown(args.data)} "
            f"--train-limit {args.train_limit} --variants {args.variants}` — cIoU in %; "
            f"train rows use the first {args.train_limit} train samples.",
            "",
            "| predictor | split | samples | overall | simple | spatial | relational | multi |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    replace_section(DOC, "diag_synthref", block)
    print(block)


if __name__ == "__main__":
    main()
