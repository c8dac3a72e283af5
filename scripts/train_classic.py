"""Train a classic-mode model (text encoder + pixel encoder + fusion head) from a config.

    python scripts/train_classic.py --config configs/train/synthref-classic.yaml \
        data.train.0.root=data/synthref data.val.0.root=data/synthref train.max_steps=1000

A thin wrapper over :func:`mllm_ris.training.trainer.train_classic`; errors are one line.
"""

from __future__ import annotations

import argparse
import sys

from mllm_ris.config import load_config
from mllm_ris.errors import MllmRisError
from mllm_ris.training.trainer import train_classic


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/train/synthref-classic.yaml")
    parser.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        budget = None if args.minutes is None else args.minutes * 60
        summary = train_classic(cfg, time_budget_s=budget)
    except MllmRisError as exc:
        print(f"train_classic: error: {exc}", file=sys.stderr)
        return 2
    done = f"{summary.steps} steps, {summary.samples} samples in {summary.seconds:.0f} s"
    print(f"{done}; loss {summary.final_loss:.4f}")
    for name, report in summary.eval.items():
        cIoU = report.metrics["cIoU"]
        print(f"{name}: cIoU {'–' if cIoU is None else f'{100 * cIoU:.2f}'} % over {report.samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
