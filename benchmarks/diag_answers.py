"""What goes wrong in a pointer model's generated answers? Error classes per expression form.

For a saved mllm model with the region pointer and SynthRef val expressions (the first ``--limit``),
each answer is generated as a user gets it (``RISModel.generate``) and compared with the targets on
the processor's canvas, region by region: a target's regions are those lying >= 50 % inside it, an
answer's those its ``[SEG]`` select (logit > 0, and each one's best region). Per form of the query
(spatial split into the best / second along an axis and size comparisons, relational into one or
two relations), the answer is

    exact    the union of its regions is the targets' union     partial  a strict part of it
    extra    that union and more                                wrong    none of it
    mixed    some of it and some other region                   no_answer / false_answer  [REJ] for a
                                                                target / [SEG] for none

and for group answers (two or more targets) the instances: a target is found when a distinct
``[SEG]`` has region-set IoU >= 0.5 with it (recall over targets, precision over ``[SEG]``).
``--no-complete-groups`` turns ``mllm.complete_groups`` off to compare.

    python benchmarks/diag_answers.py --data data/synthref_seed7 --model mllm_ris/assets/default_model
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import ROOT

from mllm_ris.data.registry import build_dataset
from mllm_ris.modeling.losses import region_coverage
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.predictor import build_processor

CLASSES = ("exact", "extra", "partial", "mixed", "wrong", "no_answer", "false_answer", "rejected")


def query_forms(root: Path) -> dict[int, str]:
    """``sent_id`` → form: ``simple``, ``spatial:best`` / ``spatial:second`` / ``spatial:size``,
    ``relational:1`` / ``relational:2``, ``multi``, ``negative:<form>``; from the build's gRefCOCO file."""
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text(encoding="utf-8"))
    forms = {}
    for ref in refs:
        for sent in ref["sentences"]:
            level, query = sent["difficulty"], sent.get("query") or {}
            op = query.get("op")
            if level == "spatial":
                form = (
                    "spatial:size"
                    if op == "size_cmp"
                    else f"spatial:{'second' if query.get('rank') == 2 else 'best'}"
                )
            elif level == "relational":
                form = f"relational:{len(query.get('relations', []))}"
            elif level == "negative":
                form = f"negative:{op}"
            else:
                form = level
            forms[sent["sent_id"]] = form
    return forms


def answer_class(gold: list[set[int]], pred: list[set[int]]) -> str:
    """The class of one answer from the region sets of its targets and its ``[SEG]``."""
    if not gold:
        return "rejected" if not pred else "false_answer"
    if not pred:
        return "no_answer"
    g, p = set().union(*gold), set().union(*pred)
    if p == g:
        return "exact"
    if g < p:
        return "extra"
    if p < g:
        return "partial"
    return "mixed" if p & g else "wrong"


def instances_found(gold: list[set[int]], pred: list[set[int]]) -> int:
    """Targets matched, greedily in order, to a distinct ``[SEG]`` with region-set IoU >= 0.5."""
    used: set[int] = set()
    found = 0
    for g in gold:
        for j, p in enumerate(pred):
            if j not in used and len(g & p) >= 0.5 * len(g | p):
                used.add(j)
                found += 1
                break
    return found


def diagnose(model: RISModel, data: Path, limit: int, image_size: int = 128) -> dict[str, Any]:
    """Class counts per form, and group-answer instance recall / precision, on the first ``limit``
    val expressions of the SynthRef build ``data``."""
    if model.mllm is None or model.mllm.pointer is None:
        raise SystemExit("model: no region pointer (mllm.pointer_dim) to diagnose")
    forms = query_forms(data)
    dataset = build_dataset("synthref", data, "val")
    prompts = build_processor(model, image_size=image_size, answers=False)
    answered = build_processor(model, image_size=image_size, answers=True)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    group = Counter()
    model.eval()
    for start in range(0, min(limit, len(dataset)), 16):
        samples = [dataset[i] for i in range(start, min(limit, len(dataset), start + 16))]
        batch = prompts(samples)
        with torch.no_grad():
            out = model.generate(batch)
        labels = model.projector.region_labels(batch.superpixels)  # (B, S, S) token order
        targets = answered(samples)  # the target masks on the same canvas
        k = out.region_logits.shape[-1]
        for b, sample in enumerate(samples):
            gold: list[set[int]] = []
            if not sample.no_target:
                n = int(targets.target_valid[b].sum())
                cov = region_coverage(labels[b : b + 1], targets.target_masks[b : b + 1, :n], k)[0]  # (n, K)
                gold = [set((row >= 0.5).nonzero()[:, 0].tolist()) for row in cov]
            pred = []
            for t in out.target_valid[b].nonzero()[:, 0].tolist():
                logits = out.region_logits[b, t]
                pred.append(set((logits > 0).nonzero()[:, 0].tolist()) | {int(logits.argmax())})
            form = forms.get(int(sample.sent_id), sample.difficulty or "?")
            counts[form][answer_class(gold, pred)] += 1
            if len(gold) >= 2:
                group["targets"] += len(gold)
                group["segs"] += len(pred)
                group["found"] += instances_found(gold, pred)
                group["answers"] += 1
                group["count_right"] += int(len(pred) == len(gold))
    table = {form: dict(c) | {"n": sum(c.values())} for form, c in sorted(counts.items())}
    return {
        "forms": table,
        "groups": {
            "answers": group["answers"],
            "count_right": group["count_right"],
            "instance_recall": round(group["found"] / max(1, group["targets"]), 4),
            "instance_precision": round(group["found"] / max(1, group["segs"]), 4),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    rows = ["| form | n | " + " | ".join(CLASSES) + " |", "|---|---:|" + "---:|" * len(CLASSES)]
    for form, c in result["forms"].items():
        rows.append(f"| {form} | {c['n']} | " + " | ".join(str(c.get(k, 0)) for k in CLASSES) + " |")
    g = result["groups"]
    rows.append(
        f"\ngroup answers: {g['answers']}, count right {g['count_right']}, instance recall "
        f"{100 * g['instance_recall']:.1f} %, precision {100 * g['instance_precision']:.1f} %"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--model", type=Path, required=True, help="a saved model folder")
    parser.add_argument("--limit", type=int, default=800, help="val expressions looked at (the first ones)")
    parser.add_argument("--no-complete-groups", action="store_true", help="mllm.complete_groups off")
    parser.add_argument("--results", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = RISModel.from_pretrained(args.model)
    if args.no_complete_groups and model.mllm is not None:
        model.mllm.cfg.complete_groups = False
    result = {"model": str(args.model), "data": str(args.data), "limit": args.limit}
    result["complete_groups"] = bool(model.mllm is not None and model.mllm.cfg.complete_groups)
    result |= diagnose(model, args.data, args.limit)
    print(markdown(result))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
