"""Does a model reject absent objects of every sentence form, and answer present ones of the same forms?

On a SynthRef split built with ``--negative-forms all`` (or any build: forms it lacks are not
reported), every negative is relabelled ``negative-<form>`` (``attr`` "the red star" without one,
``spatial`` "the leftmost red star" without one, ``relational`` "the circle left of the red square"
when no circle is) and evaluated with ``--negatives`` of them evenly spaced beside ``--positives``
evenly spaced present-target expressions. N-acc per form says whether the model checks the image or
only recognises the form of a negative it was trained on; T-acc per present level is the other side
of the same decision.

    mllm-ris make-synthref data/synthref_seed7_negall --images 1000 --seed 7 --negative-forms all
    python benchmarks/bench_negative_forms.py --data data/synthref_seed7_negall \\
        --model bundled=mllm_ris/assets/default_model --negatives 300 --positives 500

Results: ``benchmarks/results/negative_forms_<label>.json`` (the per-level metrics of
:func:`mllm_ris.eval.evaluate.evaluate`, with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from _common import ROOT, machine

from mllm_ris.data._synth_expr import negative_form
from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import RISSample
from mllm_ris.eval.evaluate import evaluate
from mllm_ris.training.artifacts import trained_predictor

RESULTS = ROOT / "benchmarks" / "results"


def _spread(indices: list[int], n: int) -> list[int]:
    """Up to ``n`` of ``indices``, evenly spaced."""
    if n >= len(indices):
        return indices
    step = len(indices) / n
    return [indices[int(i * step)] for i in range(n)]


class FormSubset:
    """``negatives`` + ``positives`` samples of a SynthRef split (evenly spaced), negatives relabelled
    ``difficulty = negative-<form>`` from their stored queries."""

    def __init__(self, root: Path, split: str, negatives: int, positives: int) -> None:
        self.data = build_dataset("synthref", root, None if split == "all" else split)
        grefs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
        self.forms = {
            s["sent_id"]: negative_form(s["query"]) for r in grefs for s in r["sentences"] if r["no_target"]
        }
        difficulty = [self.data.entry(i)[1].difficulty for i in range(len(self.data))]
        neg = [i for i, d in enumerate(difficulty) if d == "negative"]
        pos = [i for i, d in enumerate(difficulty) if d != "negative"]
        self.indices = sorted(_spread(neg, negatives) + _spread(pos, positives))
        self.name = f"synthref-{split}-forms"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> RISSample:
        sample = self.data[self.indices[i]]
        if sample.difficulty == "negative":
            sample = replace(sample, difficulty=f"negative-{self.forms[sample.sent_id]}")
        return sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a SynthRef build")
    parser.add_argument("--split", default="val", help="train, val, test or all")
    parser.add_argument("--model", action="append", required=True, help="LABEL=FOLDER (repeatable)")
    parser.add_argument("--negatives", type=int, default=300)
    parser.add_argument("--positives", type=int, default=500)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    subset = FormSubset(args.data, args.split, args.negatives, args.positives)
    args.results.mkdir(parents=True, exist_ok=True)
    for item in args.model:
        label, _, folder = item.partition("=")
        if not folder:
            parser.error(f"--model: {item!r} is not LABEL=FOLDER")
        start = time.perf_counter()
        report = evaluate(subset, trained_predictor(folder), progress=False).to_json()
        levels = report["difficulty"]
        print(f"{label}: {len(subset)} samples in {time.perf_counter() - start:.0f} s")
        for level, m in sorted(levels.items()):
            negative = level.startswith("negative")
            acc = f"{'N' if negative else 'T'}-acc {100 * m['n_acc' if negative else 't_acc']:.1f}"
            ciou = "" if negative else f"  cIoU {100 * m['cIoU']:.1f}"
            print(f"  {level:20s} n={m['samples']:4d}  {acc}{ciou}")
        out = {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
            "machine": machine(),
            "model": folder,
            "data": str(args.data),
            "split": args.split,
            "levels": levels,
        }
        (args.results / f"negative_forms_{label}.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
