"""Does a model follow the sentence? (:mod:`mllm_ris.eval.sentence`) on SynthRef val.

For each model: pairs of single-target queries on one image naming different objects; ``follows`` =
each prediction overlaps its own target more than the other's; ``same_mask`` = both predictions are
the same mask. The text-blind failure (one mask per scene) shows as follows ≈ 0, same_mask ≈ 1.
``oracle`` (the ground truth) and ``text-blind`` (one fixed mask per image: the first query's
target, returned for every query of that image) bracket the scale.

    python benchmarks/bench_follows_sentence.py --data data/synthref \
        --model bundled=mllm_ris/assets/default_model --model pointer=runs/bench_mllm/superpixel@pointer-1600

Results: ``benchmarks/results/follows_<label>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine

from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import RISSample
from mllm_ris.eval.sentence import follows_sentence, sentence_pairs
from mllm_ris.training.artifacts import trained_predictor

RESULTS = ROOT / "benchmarks" / "results"


class _Oracle:
    """The ground truth: every sample's own target."""

    def __call__(self, sample: RISSample) -> np.ndarray:
        return sample.masks


class _OneMaskPerImage:
    """Text-blind reference: the first query seen on an image gets its target; every later query
    of that image gets the same mask (what a model that ignores the sentence does)."""

    def __init__(self) -> None:
        self.first: dict[object, np.ndarray] = {}

    def __call__(self, sample: RISSample) -> np.ndarray:
        return self.first.setdefault(sample.image_id, sample.masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--split", default="val")
    parser.add_argument("--pairs", type=int, default=100, help="at most this many pairs (one per image)")
    parser.add_argument("--model", action="append", default=[], help="LABEL=PATH (repeatable)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-reject-head",
        action="store_true",
        help="answer from the LLM's text only (model.reject_threshold = null): masks of every query",
    )
    args = parser.parse_args()
    dataset = build_dataset("synthref", args.data, args.split)
    pairs = sentence_pairs(dataset, limit=args.pairs)
    models: list[tuple[str, object, str]] = [
        ("oracle", _Oracle(), "-"),
        ("text-blind", _OneMaskPerImage(), "-"),
    ]
    for item in args.model:
        label, _, path = item.partition("=")
        predictor = trained_predictor(path)
        if args.no_reject_head:
            predictor.model.cfg.reject_threshold = None  # type: ignore[attr-defined]
            label += "@no-reject-head"
        models.append((label, predictor, path))
    args.results.mkdir(parents=True, exist_ok=True)
    print(f"{len(pairs)} pairs from SynthRef {args.split} ({args.data})")
    print("| model | pairs | follows % | same mask % | s |")
    print("|---|---:|---:|---:|---:|")
    for label, predictor, path in models:
        start = time.perf_counter()
        report = follows_sentence(predictor, dataset, pairs)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        record = {
            "label": label,
            "model": path,
            "data": str(args.data),
            "split": args.split,
            **report.to_json(),
            "seconds": round(seconds, 1),
            "machine": machine(),
        }
        (args.results / f"follows_{label}.json").write_text(json.dumps(record, indent=2) + "\n")
        f, s = report.follows_rate or 0.0, report.same_mask_rate or 0.0
        print(f"| {label} | {report.pairs} | {100 * f:.1f} | {100 * s:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
