"""Which part of the real training keeps the MLLM pointer from learning? The trainer's own batches and
loss, precomputed, with one knob changed at a time.

``bench_pointer_probe.py --query mllm`` (the model's grounding LLM and pointer on precomputed
single-target rows, region BCE only, no clipping) learns; a ``mllm-ris train`` run of the same
architecture (``configs/model/tiny-synth-pointer.yaml``) did not. This script sits between the two:
batches come from :class:`~mllm_ris.training.ris_task.RISTask` (its collator, question phrasings,
answers, multi-target and no-target samples; precomputed once, then cycled in random order), the
loss is the task's (``--set model.loss.no_target=0`` etc. switch terms off), the optimiser is AdamW
with the trainer's gradient clipping (``--clip``, 0 = off) and a constant learning rate. The curve is
the teacher-forced top-1 of :func:`diag_pointer.pointer_top1` on SynthRef val.

    python benchmarks/pointer_bisect.py --data data/synthref --max-samples 100000 --tag full
    python benchmarks/pointer_bisect.py --data data/synthref --max-samples 100000 --single-only --tag single
"""

from __future__ import annotations

import argparse
import json
import random
import time
from datetime import date
from pathlib import Path

import torch
from _common import ROOT, machine, shown
from diag_pointer import pointer_top1

from mllm_ris.config import load_config
from mllm_ris.training.ris_task import RISTask

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = [
    ROOT / "configs" / "model" / "tiny-synth.yaml",
    ROOT / "configs" / "model" / "tiny-synth-pointer.yaml",
    ROOT / "configs" / "train" / "synthref-pointer.yaml",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--samples", type=int, default=12000, help="train samples precomputed")
    parser.add_argument("--single-only", action="store_true", help="keep single-target samples only")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    parser.add_argument("--max-samples", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--eval-every", type=int, default=16_000, help="samples between curve points")
    parser.add_argument("--limit", type=int, default=400, help="val expressions of the top-1 check")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "pointer_probe" / "superpixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = load_config(
        CONFIGS,
        [
            f"data.train.0.root={args.data}",
            f"data.val.0.root={args.data}",
            f"model.superpixels.cache_dir={args.cache_dir}",
            f"train.batch_size={args.batch}",
            *args.overrides,
        ],
    )
    task = RISTask(cfg)
    model = task.build_model().train()
    dataset, _ = task.train_data()
    order = list(range(len(dataset)))
    random.Random(args.seed).shuffle(order)
    t0 = time.perf_counter()
    samples = []
    for i in order:
        s = dataset[i]
        if args.single_only and s.masks.shape[0] != 1:
            continue
        samples.append(s)
        if len(samples) >= args.samples:
            break
    batches = [task.collate(samples[i : i + args.batch]) for i in range(0, len(samples), args.batch)]
    prep_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.train.weight_decay)
    rng = random.Random(args.seed)
    curve, seen, step, t0, next_eval = [], 0, 0, time.perf_counter(), args.eval_every
    while seen < args.max_samples and time.perf_counter() - t0 < args.minutes * 60:
        batch = batches[rng.randrange(len(batches))]
        loss, terms = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step, seen = step + 1, seen + len(batch.texts)
        if seen >= next_eval:
            next_eval += args.eval_every
            top1 = pointer_top1(model, args.data, args.limit)
            model.train()
            point = {"samples": seen, "seconds": round(time.perf_counter() - t0, 1), "top1": top1}
            point["terms"] = {k: round(float(v), 4) for k, v in terms.items()}
            curve.append(point)
            print(json.dumps(point), flush=True)
    record = {
        "tag": args.tag,
        "overrides": args.overrides,
        "single_only": args.single_only,
        "clip": args.clip,
        "lr": args.lr,
        "batch": args.batch,
        "train_samples": len(samples),
        "precompute_seconds": round(prep_s, 1),
        "samples_seen": seen,
        "final": pointer_top1(model, args.data, args.limit),
        "curve": curve,
        "machine": machine(),
        "date": date.today().isoformat(),
        "command": f"python benchmarks/pointer_bisect.py --data {shown(args.data)} --samples {args.samples} "
        f"--batch {args.batch} --lr {args.lr:g} --clip {args.clip:g} --max-samples {args.max_samples} "
        f"--seed {args.seed} --tag {args.tag}"
        + (" --single-only" if args.single_only else "")
        + "".join(f" --set {o}" for o in args.overrides),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"pointer_bisect_{args.tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["final"]), f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
