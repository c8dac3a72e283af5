"""Learning benchmark: classic-mode S²RM (tiny CNN + MiniLM) vs the baseline heads on SynthRef.

Each variant trains from the same config, seed and data for at most ``--minutes`` on this
machine's CPU cores, then is evaluated on SynthRef val. Per-variant results are kept as JSON in
``benchmarks/results/`` (so variants can be run one at a time), and the table in
``docs/results.md`` is rebuilt from all of them.

    python benchmarks/bench_heads.py --data data/synthref --minutes 20
    python benchmarks/bench_heads.py --data data/synthref --variants s2rm,lts --minutes 20
    python benchmarks/bench_heads.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch
from _common import ROOT, machine, replace_section, shown

from mllm_ris.config import load_config
from mllm_ris.data.synthetic import make_synthref
from mllm_ris.training.trainer import train_classic

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
LEVELS = ("simple", "spatial", "relational", "multi", "negative")

# variant -> config overrides on top of configs/train/synthref-classic.yaml
VARIANTS: dict[str, list[str]] = {
    "s2rm": ["model.head.name=s2rm"],
    "s2rm-no-coparse": ["model.head.name=s2rm", "model.head.coparse=false"],
    "s2rm-no-balance": ["model.head.name=s2rm", "model.head.balance=false"],
    "lts": ["model.head.name=lts"],
    "cmsa": ["model.head.name=cmsa"],
    "two-stage": ["model.head.name=two-stage"],
    # diagnosis: the same S2RM model with the MiniLM text encoder fine-tuned instead of frozen
    "s2rm-text-ft": ["model.head.name=s2rm", "model.text.freeze=false"],
    # diagnosis: the same S2RM model with a 2x wider tiny CNN (4x the conv parameters)
    "s2rm-wide-cnn": ["model.head.name=s2rm", "model.pixel.cnn_widths=[32, 64, 128, 256]"],
}
DEFAULT_VARIANTS = ("s2rm", "s2rm-no-coparse", "s2rm-no-balance", "lts", "cmsa", "two-stage")


def run_variant(
    name: str, data: Path, minutes: float, steps: int, batch: int, seed: int, extra: list[str], tag: str = ""
) -> dict:
    """Train and evaluate one variant; returns the result record (also written to JSON).

    ``tag`` names a second run of the same variant (e.g. a longer budget) without replacing the first.
    """
    label = f"{name}@{tag}" if tag else name
    overrides = [
        f"data.train.0.root={data}",
        f"data.val.0.root={data}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.seed={seed}",
        f"train.output_dir={ROOT / 'runs' / 'bench_heads' / label}",
        *extra,
        *VARIANTS[name],
    ]
    cfg = load_config(ROOT / "configs" / "train" / "synthref-classic.yaml", overrides)
    load_before = os.getloadavg()[0]
    summary = train_classic(cfg, time_budget_s=minutes * 60, progress=True)
    report = next(iter(summary.eval.values()))
    record = {
        "variant": label,
        "overrides": [*extra, *VARIANTS[name]],
        "steps": summary.steps,
        "planned_steps": steps,
        "batch": batch,
        "samples_seen": summary.samples,
        "train_seconds": round(summary.seconds, 1),
        "final_loss": round(summary.final_loss, 4),
        "load_before": round(load_before, 2),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
        "command": f"python benchmarks/bench_heads.py --data {shown(data)} --variants {name} "
        f"--minutes {minutes:g} --steps {steps} --batch {batch} --seed {seed}"
        + "".join(f" --set {o}" for o in extra)
        + (f" --tag {tag}" if tag else ""),
        "eval": report.to_json(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"heads_{label}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_table() -> str:
    """Rebuild docs/results.md's head table from benchmarks/results/heads_*.json."""
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("heads_*.json"))]
    order = list(VARIANTS)

    def rank(record: dict) -> tuple[int, str]:
        base = record["variant"].split("@")[0]
        return (order.index(base) if base in order else len(order), record["variant"])

    records.sort(key=rank)
    lines = [
        "## Classic mode on SynthRef: S²RM vs baseline heads",
        "",
        "Tiny CNN pixel encoder + frozen MiniLM text encoder (`configs/train/synthref-classic.yaml`), "
        "trained on SynthRef train (2000 images, 128 px, seed 0), evaluated on SynthRef val. "
        "cIoU per difficulty level in % (the `negative` column is N-acc: negatives predicted empty). "
        "Each row names its command; `load` is the 1-minute load average before the run.",
        "",
        "| variant | steps | train min | overall cIoU | mIoU | simple | spatial | relational | multi "
        "| negative N-acc | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ev = r["eval"]
        diff = ev.get("difficulty", {})
        cells = [_pct(diff.get(level, {}).get("cIoU")) for level in LEVELS[:-1]]
        n_acc = _pct(diff.get("negative", {}).get("n_acc"))
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['train_seconds'] / 60:.1f} | {_pct(ev['cIoU'])} | "
            f"{_pct(ev['mIoU'])} | {' | '.join(cells)} | {n_acc} | {r['load_before']} |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- {r['variant']}: `{r['command']}` ({r['machine']}, {r['date']})" for r in records]
    block = "\n".join(lines) + "\n"
    replace_section(DOC, "bench_heads", block)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthref")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}"
    )
    parser.add_argument("--tag", default="", help="label a repeated run of a variant (e.g. 20min)")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time cap per variant")
    parser.add_argument("--steps", type=int, default=2400, help="schedule length (cosine) per variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild docs/results.md")
    args = parser.parse_args()
    if not args.table_only:
        if not (args.data / "grefcoco" / "grefs(unc).json").is_file():
            make_synthref(args.data, images=2000, seed=0, size=128)
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant {name!r}; one of {list(VARIANTS)}")
            t0 = time.perf_counter()
            record = run_variant(
                name, args.data, args.minutes, args.steps, args.batch, args.seed, args.set, args.tag
            )
            print(f"{name}: cIoU {_pct(record['eval']['cIoU'])} in {time.perf_counter() - t0:.0f} s")
    print(write_table())


if __name__ == "__main__":
    main()
