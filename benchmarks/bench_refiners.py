"""How much does a head refining the region prior add, and does it go past the superpixel ceiling?

For models trained with ``model.refine_from`` (a head on a frozen region-pointer model's prior,
``configs/model/refine-s2rm.yaml``), on targeted SynthRef val expressions (evenly spaced, ``--limit``
of them), each sample's gold answer is fed (teacher forcing: the ``[SEG]`` count is right, the
reject decision is left out) and four masks are compared with the targets:

* ``prior``: the pointer's painted prior, as output mode prior shows it (union of chosen superpixels);
* ``refined``: prior + the head's residual (what the refined model returns);
* ``oracle``: the superpixel ceiling, the regions ≥ 50 % inside each target painted (each region's
  logit keeps the pointer's magnitude, its sign is the oracle's choice: the head sees the scale it
  trained on);
* ``oracle+head``: the head refining that oracle prior: can it go past the superpixels?

cIoU (summed intersections over summed unions, per expression the union of its query masks against
the union of its targets, inside the image) and mean IoU, overall and per expression form, on the
model's letterboxed canvas. One JSON line per model:

    python benchmarks/bench_refiners.py --data data/synthref_seed7 --models runs/refine-s2rm runs/refine-lts
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from _common import ROOT

from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import PRIOR_CLAMP, RISModel
from mllm_ris.modeling.predictor import build_processor
from mllm_ris.modeling.projector import paint_regions

KINDS = ("prior", "refined", "oracle", "oracle+head")


def _union(logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``logits (B, T, S, S)``, ``slots (B, T)`` real ones → ``(B, S, S)`` bool: any real slot > 0."""
    return ((logits > 0) & slots[..., None, None]).any(1)


def refine_gain(model: RISModel, data: Path, limit: int, image_size: int = 128) -> dict[str, dict]:
    """cIoU / mIoU of the four masks (module doc) per expression form and ``all``.

    Raises:
        SystemExit: the model has no head or no region pointer.
    """
    if model.head is None or model.mllm is None or model.mllm.pointer is None:
        raise SystemExit("model: needs a region pointer and a head (a model.refine_from run)")
    dataset = build_dataset("synthref", data, "val")
    collate = build_processor(model, image_size=image_size)
    picks = list(range(0, len(dataset), max(1, len(dataset) // limit)))[:limit]
    inter: dict[tuple[str, str], float] = defaultdict(float)
    union: dict[tuple[str, str], float] = defaultdict(float)
    ious: dict[tuple[str, str], list[float]] = defaultdict(list)
    model.eval()
    for start in range(0, len(picks), 16):
        samples = [s for s in (dataset[i] for i in picks[start : start + 16]) if s.masks.shape[0] > 0]
        if not samples:
            continue
        batch = collate(samples)
        with torch.no_grad():
            q = model.queries.teacher_forced(batch)
            assert q.region_logits is not None and batch.target_masks is not None
            prior = model.queries.prior_masks(q)  # (B, T, S, S)
            labels = model.projector.region_labels(batch.superpixels)  # (B, S, S) token order
            cover = region_coverage(labels, batch.target_masks, q.region_logits.shape[-1])  # (B, T, K)
            # the right regions at the pointer's own confidence: |logit|, signed by the oracle choice
            size = q.region_logits.float().abs()
            oracle = paint_regions(torch.where(cover >= 0.5, size, -size), labels)
            oracle = oracle.clamp(-PRIOR_CLAMP, PRIOR_CLAMP)  # (B, T, S, S)
            masks = {
                "prior": prior,
                "refined": model._segment(batch.images, q.lang, prior).head_up,
                "oracle": oracle,
                "oracle+head": model._segment(batch.images, q.lang, oracle).head_up,
            }
        slots = batch.target_valid
        target = batch.targets.bool() & batch.valid  # (B, S, S)
        for kind, logits in masks.items():
            pred = _union(logits.float(), slots) & batch.valid  # (B, S, S)
            i = (pred & target).flatten(1).sum(1).float()
            u = (pred | target).flatten(1).sum(1).float()
            for sample, si, su in zip(samples, i.tolist(), u.tolist(), strict=True):
                for form in (sample.difficulty, "all"):
                    inter[kind, form] += si
                    union[kind, form] += su
                    ious[kind, form].append(si / su if su else 1.0)
    forms = sorted({form for _, form in inter})
    return {
        kind: {
            form: {
                "ciou": round(100 * inter[kind, form] / max(union[kind, form], 1.0), 2),
                "miou": round(100 * sum(ious[kind, form]) / len(ious[kind, form]), 2),
                "n": len(ious[kind, form]),
            }
            for form in forms
        }
        for kind in KINDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref_seed7")
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="refined model folders")
    parser.add_argument("--limit", type=int, default=800, help="val expressions looked at")
    parser.add_argument("--out", type=Path, default=None, help="also write the results (JSON) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for folder in args.models:
        model = RISModel.from_pretrained(folder)
        row = {
            "model": str(folder),
            "head": model.cfg.head.name,
            "head_cfg": {
                "coparse": model.cfg.head.coparse,
                "balance": model.cfg.head.balance,
                "prior_input": model.cfg.head.prior_input,
            },
        }
        row.update(refine_gain(model, args.data, args.limit))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
