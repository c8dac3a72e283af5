"""Learning benchmark: the tiny MLLM (``configs/model/tiny-synth.yaml``) on SynthRef, superpixel vs patch.

Each run trains ``configs/model/tiny-synth.yaml`` + ``configs/train/synthref-mllm.yaml`` on SynthRef
train for a time budget on this machine's CPU, then evaluates on SynthRef val with generation
(:class:`~mllm_ris.modeling.predictor.RISPredictor`): cIoU per difficulty level, N-acc on the
negatives, gIoU on the multi-target expressions, plus training steps and samples/s. ``--projector
patch`` is ``model.projector.kind=patch`` (LLaVA-style: all 32 x 32 patches, no superpixels).

The LR schedule must end inside the budget, so by default the number of steps comes from a short
calibration: a few training steps of the same model and data give the step time with a warm
superpixel cache and the SLIC time per new image; the plan adds SLIC for the images the run is
expected to see once (``planned_steps``) and keeps 10 % spare (a shared machine's speed varies;
the budget still stops a slow run). ``--steps N`` fixes it instead. The superpixel label maps are
cached in the run folder, which is deleted first: every run pays for its own SLIC (once per
image). Results go to ``benchmarks/results/mllm_<label>.json``; the ``bench_mllm`` section of
``docs/results.md`` is rebuilt from all of them.

    python benchmarks/bench_mllm.py --data data/synthref --projector superpixel --minutes 20
    python benchmarks/bench_mllm.py --data data/synthref --projector patch --minutes 20
    python benchmarks/bench_mllm.py --table-only
    python benchmarks/bench_mllm.py --minutes 1 --no-docs --results /tmp/bench_mllm   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, machine, replace_section, shown

from mllm_ris.config import Config, load_config
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.predictor import RISPredictor
from mllm_ris.training.ris_task import RISTask
from mllm_ris.training.trainer import Trainer

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
CONFIGS = [ROOT / "configs" / "model" / "tiny-synth.yaml", ROOT / "configs" / "train" / "synthref-mllm.yaml"]
MODELS = {  # --model: the config files (the first is the default, the MLLM)
    "mllm": CONFIGS,
    "mllm-pointer": [  # the bundled model's recipe (region pointer, descriptor tokens, prior masks)
        ROOT / "configs" / "model" / "tiny-synth.yaml",
        ROOT / "configs" / "model" / "tiny-synth-pointer.yaml",
        ROOT / "configs" / "train" / "synthref-pointer.yaml",
    ],
    "classic-pointer": [
        ROOT / "configs" / "model" / "tiny-synth-classic.yaml",
        ROOT / "configs" / "model" / "tiny-synth-classic-pointer.yaml",
        ROOT / "configs" / "train" / "synthref-classic-pointer.yaml",
    ],
}
LEVELS = ("simple", "spatial", "relational", "multi")
TARGETS = {"simple": 0.92, "relational": 0.85, "n_acc": 0.95}  # cIoU simple / relational, N-acc
PROJECTORS = {"superpixel": [], "patch": ["model.projector.kind=patch"]}


def build_config(args: argparse.Namespace, label: str, steps: int, out: Path) -> Config:
    """The benchmark config: the two files + data roots, schedule, no periodic eval / checkpoints."""
    overrides = [
        f"data.train.0.root={args.data}",
        f"data.val.0.root={args.data}",
        f"train.output_dir={out / label}",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch}",
        f"train.seed={args.seed}",
        f"train.warmup_steps={min(100, max(1, steps // 10))}",
        f"train.pointer_warmup_steps={round(args.pointer_warmup * steps)}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.tensorboard=false",
        "train.overwrite_output_dir=true",
        f"eval.limit={args.eval_limit if args.eval_limit else 'null'}",
        *PROJECTORS[args.projector],
        *args.set,
    ]
    if args.cache_dir is not None:
        overrides.append(f"model.superpixels.cache_dir={args.cache_dir}")
    return load_config(MODELS[args.model], overrides)


def calibrate(cfg: Config, steps: int = 6) -> tuple[float, float, int]:
    """Time a few training steps of the benchmark's model and data.

    Returns seconds per step with a warm superpixel cache (mean of steps 2..``steps``: warm-up and full
    steps in the schedule's proportion), seconds of
    superpixels per new image (about 0 for patch tokens) and the number of training images.
    """
    task = RISTask(cfg)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().train()
    warm_fraction = cfg.train.pointer_warmup_steps / cfg.train.max_steps
    dataset, _ = task.train_data()
    images = len({r.image_id for d in dataset.datasets for r in getattr(d, "refs", [])}) or len(dataset)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    warm, per_image = [], []
    for i in range(steps):
        picks = [(97 * (i * cfg.train.batch_size + j)) % len(dataset) for j in range(cfg.train.batch_size)]
        samples = [dataset[k] for k in picks]
        t0 = time.perf_counter()
        task.collate(samples)  # cold: computes and caches the label maps
        t1 = time.perf_counter()
        batch = task.collate(samples)  # warm
        t2 = time.perf_counter()
        # steps alternate in the schedule's proportion of pointer warm-up (language side only) steps
        task.begin_step(0 if (i + 0.5) / steps < warm_fraction else cfg.train.max_steps)
        loss, _ = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warm.append(time.perf_counter() - t1)
        per_image.append(max(0.0, (t1 - t0) - (t2 - t1)) / len({s.image_id for s in samples}))
    return statistics.mean(warm[1:]), statistics.median(per_image[1:]), images


def planned_steps(budget_s: float, step_s: float, image_s: float, images: int, batch: int) -> int:
    """The most steps whose expected time fits ``budget_s``: ``N * step_s`` plus superpixels for the
    images seen, ``images * (1 - exp(-N * batch / images))`` (samples drawn uniformly, with replacement)."""

    def seconds(n: int) -> float:
        return n * step_s + images * (1.0 - math.exp(-n * batch / max(images, 1))) * image_s

    lo, hi = 1, max(2, int(budget_s / step_s) + 1)
    while lo < hi:  # the largest n with seconds(n) <= budget_s
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if seconds(mid) <= budget_s else (lo, mid - 1)
    return lo


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate (unless ``--steps``), train for the budget, evaluate; returns the JSON record."""
    label = (args.projector if args.model == "mllm" else args.model) + (f"@{args.tag}" if args.tag else "")
    out = Path(args.runs)
    shutil.rmtree(out / label, ignore_errors=True)  # a fresh superpixel cache: each run pays its SLIC
    budget = args.minutes * 60.0
    step_s = None
    steps = args.steps
    if not steps:
        # the blend of the two step costs: pointer warm-up (language side only) and full steps
        step_s, image_s, images = calibrate(build_config(args, label + ".calibration", 1000, out))
        shutil.rmtree(out / (label + ".calibration"), ignore_errors=True)
        steps = max(10, planned_steps(0.9 * budget, step_s, image_s, images, args.batch))
        print(
            f"calibration: {step_s:.2f} s/step (warm cache), superpixels {1000 * image_s:.0f} ms/image, "
            f"{images} images -> {steps} steps in {args.minutes:g} min"
        )
    cfg = build_config(args, label, steps, out)
    load_before = os.getloadavg()[0]
    trainer = Trainer(cfg, progress=True)
    t0 = time.perf_counter()
    summary = trainer.fit(time_budget_s=budget)
    after_s = time.perf_counter() - t0 - summary.seconds  # checkpoint, final model, evaluation
    report = next(iter(summary.eval.values()))
    options = f" --eval-limit {args.eval_limit}" if args.eval_limit else ""
    options += "".join(f" --set {o}" for o in args.set) + (f" --tag {args.tag}" if args.tag else "")
    options += f" --cache-dir {args.cache_dir}" if args.cache_dir else ""
    return {
        "label": label,
        "projector": args.projector,
        "model": args.model,
        "steps": summary.steps,
        "planned_steps": steps,
        "calibrated_step_s": None if step_s is None else round(step_s, 3),
        "batch": args.batch,
        "lr": cfg.train.lr,
        "samples_seen": summary.samples,
        "train_seconds": round(summary.seconds, 1),
        "samples_per_s": round(summary.samples / max(summary.seconds, 1e-9), 2),
        "save_and_eval_seconds": round(after_s, 1),
        "final_loss": round(summary.final_loss, 4),
        "load_before": round(load_before, 2),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
        "command": f"python benchmarks/bench_mllm.py --data {shown(Path(args.data))}"
        + (f" --model {args.model}" if args.model != "mllm" else f" --projector {args.projector}")
        + f" --minutes {args.minutes:g}"
        + (f" --steps {args.steps}" if args.steps else "")
        + f" --batch {args.batch} --seed {args.seed}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --pointer-warmup {args.pointer_warmup:g}" if args.pointer_warmup else "")
        + options,
        "eval": report.to_json(),
        "reject": reject_separation(cfg, out / label, args.eval_limit),
    }


def reject_separation(cfg: Config, model_dir: Path, limit: int | None) -> dict[str, float | None]:
    """How well the trained reject head separates val negatives from positives, whatever the answer
    text says: the AUC of its no-target probability (1 = perfect, 0.5 = chance) and its mean on
    each class, over the first ``limit`` val samples (those the evaluation scores)."""
    model = RISModel.from_pretrained(model_dir)
    predictor = RISPredictor(model, image_size=cfg.data.image_size, batch_size=16)
    data = next(iter(RISTask(cfg).val_data().values()))
    samples = [data[i] for i in range(min(len(data), limit or len(data)))]
    probs, negative = [], []
    for i in range(0, len(samples), 16):
        chunk = samples[i : i + 16]
        probs += [p.no_target_prob for p in predictor.predict(chunk)]
        negative += [s.no_target for s in chunk]
    prob, neg = torch.tensor(probs), torch.tensor(negative)
    n_neg, n_pos = int(neg.sum()), int((~neg).sum())
    if not n_neg or not n_pos:
        return {"auc": None, "prob_negative": None, "prob_positive": None}
    ranks = prob.argsort().argsort().double() + 1  # ties are rare for float probabilities
    auc = (ranks[neg].sum() - n_neg * (n_neg + 1) / 2) / (n_neg * n_pos)  # Mann-Whitney U / (n_neg n_pos)
    return {
        "auc": round(float(auc), 4),
        "prob_negative": round(float(prob[neg].mean()), 4),
        "prob_positive": round(float(prob[~neg].mean()), 4),
    }


def headline(record: dict[str, Any]) -> dict[str, float | None]:
    """cIoU per level, N-acc on negatives, gIoU on multi-target, overall cIoU / gIoU (fractions)."""
    ev = record["eval"]
    diff = ev.get("difficulty", {})
    row: dict[str, float | None] = {level: diff.get(level, {}).get("cIoU") for level in LEVELS}
    row["multi_gIoU"] = diff.get("multi", {}).get("gIoU")
    row["n_acc"] = diff.get("negative", {}).get("n_acc")
    row["cIoU"], row["gIoU"] = ev.get("cIoU"), ev.get("gIoU")
    row["t_acc"] = ev.get("t_acc")
    row["reject_auc"] = (record.get("reject") or {}).get("auc")
    return row


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _auc(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _vs_target(key: str, value: float | None) -> str:
    if key not in TARGETS:
        return _pct(value)
    ok = value is not None and value >= TARGETS[key]
    return f"{_pct(value)} ({'≥' if ok else '<'} {100 * TARGETS[key]:.0f})"


def print_record(record: dict[str, Any]) -> None:
    """The headline numbers with the targets beside them."""
    row = headline(record)
    print(
        f"{record['label']}: {record['steps']} steps, {record['train_seconds'] / 60:.1f} min, "
        f"{record['samples_per_s']} samples/s; cIoU overall {_pct(row['cIoU'])}, "
        + ", ".join(f"{level} {_vs_target(level, row[level])}" for level in LEVELS)
        + f"; multi gIoU {_pct(row['multi_gIoU'])}; negative N-acc {_vs_target('n_acc', row['n_acc'])}"
        + "  [targets: simple >= 92, relational >= 85, N-acc >= 95]"
    )


def write_table(results: Path, doc: Path | None) -> str:
    """Rebuild the ``bench_mllm`` section from ``results/mllm_*.json`` (written to ``doc`` unless None)."""
    records = sorted(
        (json.loads(p.read_text()) for p in results.glob("mllm_*.json")),
        key=lambda r: (list(PROJECTORS).index(r["projector"]), r["label"]),
    )
    lines = [
        "## Learning on SynthRef at a time budget: MLLM (superpixel / patch tokens, region pointer) "
        "and the classic region pointer",
        "",
        "`superpixel` / `patch` rows: `configs/model/tiny-synth.yaml` (random ViT, tiny Llama fully "
        "trained, S²RM head, direct masks, the `[SEG]`-only path unless `--set` adds the pointer) with "
        "`configs/train/synthref-mllm.yaml`; `mllm-pointer`: the bundled model's recipe "
        "(`tiny-synth-pointer.yaml`, `synthref-pointer.yaml`); `classic-pointer`: MiniLM + the region "
        "pointer, no LLM (`tiny-synth-classic[-pointer].yaml`, `synthref-classic-pointer.yaml`). Trained "
        "on SynthRef train (2000 images, 128 px) for a time budget on the CPU, evaluated on SynthRef val "
        "by generation (one mask per `[SEG]`, none for `[REJ]`; classic: one mask per expression, none "
        "when no region scores above 0). cIoU per difficulty level, gIoU on multi-target, N-acc on "
        "negatives, "
        "T-acc on targeted expressions (answered with a mask), in %; targets: simple ≥ 92, relational "
        "≥ 85, N-acc ≥ 95. `reject AUC`: how well the reject head's no-target probability separates "
        "negatives from positives (0.5 = chance), whatever the answer. `load` is the 1-minute load "
        "average before the run; steps come from a short calibration unless the command fixes them.",
        "",
        "| run | steps | train min | samples/s | overall cIoU | simple | spatial | relational | multi "
        "| multi gIoU | negative N-acc | T-acc | reject AUC | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        row = headline(r)
        cells = [_vs_target(level, row[level]) for level in LEVELS]
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['train_seconds'] / 60:.1f} | {r['samples_per_s']} | "
            f"{_pct(row['cIoU'])} | {' | '.join(cells)} | {_pct(row['multi_gIoU'])} | "
            f"{_vs_target('n_acc', row['n_acc'])} | {_pct(row['t_acc'])} | "
            f"{_auc(row['reject_auc'])} | {r['load_before']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['label']}: `{r['command']}` ({r['machine']}, {r['date']})" for r in records]
    block = "\n".join(lines) + "\n"
    if doc is not None:
        replace_section(doc, "bench_mllm", block)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument("--projector", choices=list(PROJECTORS), default="superpixel")
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default="mllm",
        help="mllm: tiny-synth.yaml (--projector picks the tokens); mllm-pointer: the bundled model's "
        "recipe (tiny-synth-pointer.yaml); classic-pointer: MiniLM + region pointer, no LLM "
        "(tiny-synth-classic[-pointer].yaml)",
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=0, help="schedule length; 0 = calibrate to the budget")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--eval-limit", type=int, default=0, help="first N val samples only (0 = all)")
    parser.add_argument("--cache-dir", default=None, help="a shared superpixel cache (default: in the run)")
    parser.add_argument("--tag", default="", help="label a repeated run (e.g. 40min)")
    parser.add_argument(
        "--pointer-warmup",
        type=float,
        default=0.0,
        help="fraction of the steps that train the language side only (train.pointer_warmup_steps)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_mllm", help="run folders")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON records go")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/results.md")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the docs table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        if not (args.data / "grefcoco" / "grefs(unc).json").is_file():
            make_synthref(args.data, images=2000, seed=0, size=128)
        record = run(args)
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"mllm_{record['label']}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print_record(record)
        print(f"wrote {path}")
    print(write_table(args.results, None if args.no_docs else DOC))


if __name__ == "__main__":
    main()
