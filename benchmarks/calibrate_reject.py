"""Choose a model's reject threshold (``model.reject_threshold``) on validation data.

An mllm model answers "no such object" when its no-target probability (the reject head's, or with
``mllm.reject_from: pointer`` the presence query's: ``sigmoid(-best region logit)``) is above the
threshold. This generates the answers of the val expressions of a SynthRef build (present and absent
objects), sweeps the threshold and picks the one with the highest balanced accuracy
``(N-acc + T-acc) / 2`` (N-acc: absent objects rejected, T-acc: present ones answered); ties go to the
threshold nearest 0.5. Choose on the run's own val, then measure on data never used to choose.
``--write`` stores the choice in the model folder's ``config.json`` (that key only).

    python benchmarks/calibrate_reject.py --data data/synthref_negall --model runs/export --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from _common import ROOT

from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.predictor import build_processor

THRESHOLDS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def no_target_probs(
    model: RISModel, data: Path, limit: int | None, image_size: int = 128
) -> tuple[list[float], list[bool]]:
    """The generated no-target probability of each val expression (the first ``limit``) and whether
    it has no target. The model's own threshold does not change the probability."""
    if model.mllm is None:
        raise SystemExit(
            "model: the reject threshold is an mllm model's (classic mode rejects by an empty mask)"
        )
    dataset = build_dataset("synthref", data, "val")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    prompts = build_processor(model, image_size=image_size, answers=False)
    probs: list[float] = []
    absent: list[bool] = []
    model.eval()
    for start in range(0, n, 32):
        samples = [dataset[i] for i in range(start, min(n, start + 32))]
        with torch.no_grad():
            out = model.generate(prompts(samples))
        probs += out.no_target_prob.float().tolist()
        absent += [s.no_target for s in samples]
    return probs, absent


def sweep(
    probs: list[float], absent: list[bool], thresholds: tuple[float, ...] = THRESHOLDS
) -> list[dict[str, float]]:
    """N-acc, T-acc and their mean per threshold (a row rejects when its probability is above it)."""
    neg = [p for p, a in zip(probs, absent, strict=True) if a]
    pos = [p for p, a in zip(probs, absent, strict=True) if not a]
    if not neg or not pos:
        raise SystemExit("data: the val split needs both absent and present objects to calibrate")
    rows = []
    for t in thresholds:
        n_acc = sum(p > t for p in neg) / len(neg)
        t_acc = sum(p <= t for p in pos) / len(pos)
        rows.append(
            {
                "threshold": t,
                "n_acc": round(n_acc, 4),
                "t_acc": round(t_acc, 4),
                "balanced": round((n_acc + t_acc) / 2, 4),
            }
        )
    return rows


def choose(rows: list[dict[str, float]]) -> float:
    """The threshold of the best balanced accuracy; ties: the one nearest 0.5."""
    best = max(rows, key=lambda r: (r["balanced"], -abs(r["threshold"] - 0.5)))
    return best["threshold"]


def write_threshold(folder: Path, threshold: float) -> None:
    """Set ``model.reject_threshold`` in ``folder/config.json`` (nothing else changes)."""
    path = folder / "config.json"
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["reject_threshold"] = threshold
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref_negall")
    parser.add_argument("--model", type=Path, required=True, help="a saved model folder")
    parser.add_argument("--limit", type=int, default=None, help="val expressions used (default: all)")
    parser.add_argument("--write", action="store_true", help="store the choice in the model's config.json")
    parser.add_argument("--results", type=Path, default=None, help="also write the sweep as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = RISModel.from_pretrained(args.model)
    probs, absent = no_target_probs(model, args.data, args.limit)
    rows = sweep(probs, absent)
    chosen = choose(rows)
    print("| threshold | N-acc % | T-acc % | balanced % |\n|---:|---:|---:|---:|")
    for r in rows:
        mark = " ←" if r["threshold"] == chosen else ""
        cells = f"{100 * r['n_acc']:.1f} | {100 * r['t_acc']:.1f} | {100 * r['balanced']:.2f}{mark}"
        print(f"| {r['threshold']} | {cells} |")
    print(f"chosen: {chosen} ({sum(absent)} absent, {len(absent) - sum(absent)} present expressions)")
    if args.write:
        write_threshold(args.model, chosen)
        print(f"wrote model.reject_threshold = {chosen} to {args.model / 'config.json'}")
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": str(args.model), "data": str(args.data), "chosen": chosen, "sweep": rows}
        args.results.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
