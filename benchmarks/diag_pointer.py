"""Does a trained region pointer pick the named object? Teacher-forced top-1 region accuracy.

For a saved mllm model with the region pointer (``mllm.pointer_dim``) and targeted SynthRef val
expressions (evenly spaced, ``--limit`` of them), each sample's gold answer is fed (so the ``[SEG]``
count is right whatever the model would generate) and its ``[SEG]``'s best region is checked: a hit
when that region lies ≥ 50 % inside its target (every target of a multi-target expression must be
hit). This isolates the grounding decision from the answer text, the reject head and the mask head.
Chance is about one in the number of object regions (about 1/6 on SynthRef).

    python benchmarks/diag_pointer.py --data data/synthref --model runs/bench_mllm/superpixel@pointer-words
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from _common import ROOT

from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.predictor import build_processor


def pointer_top1(model: RISModel, data: Path, limit: int, image_size: int = 128) -> dict[str, float]:
    """Top-1 hit rate per difficulty level (and ``all``) on ``limit`` targeted val expressions."""
    if model.mllm is None or model.mllm.pointer is None:
        raise SystemExit("model: no region pointer (mllm.pointer_dim) to diagnose")
    dataset = build_dataset("synthref", data, "val")
    collate = build_processor(model, image_size=image_size)
    picks = list(range(0, len(dataset), max(1, len(dataset) // limit)))[:limit]
    hits: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    model.eval()
    for start in range(0, len(picks), 16):
        samples = [dataset[i] for i in picks[start : start + 16]]
        samples = [s for s in samples if s.masks.shape[0] > 0]
        if not samples:
            continue
        batch = collate(samples)
        with torch.no_grad():
            out = model(batch, segment=False)
        labels = model.projector.region_labels(batch.superpixels)  # (B, S, S) token order
        cov = region_coverage(labels, batch.target_masks, out.region_logits.shape[-1])  # (B, T, K)
        hit = cov.gather(2, out.region_logits.argmax(-1)[..., None])[..., 0] >= 0.5  # (B, T)
        for sample, row, valid in zip(samples, hit, batch.target_valid, strict=True):
            for level in (sample.difficulty, "all"):
                hits[level] += int(row[valid].all())
                seen[level] += 1
    return {level: round(hits[level] / seen[level], 4) for level in seen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--model", type=Path, required=True, help="a saved model folder")
    parser.add_argument("--limit", type=int, default=400, help="val expressions looked at")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = pointer_top1(RISModel.from_pretrained(args.model), args.data, args.limit)
    print(json.dumps({"model": str(args.model), "top1": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
