"""The ``mllm-ris`` command.

Subcommands:
    data check     read a whole dataset and count images / refs / sentences / problems
    make-synthref  generate the SynthRef procedural referring dataset
    eval           evaluate a checkpoint or a trivial predictor on a dataset
    config         print the resolved config (YAML + dotted overrides)
    segment, chat, demo, app, train, export
                   planned; they say "not available yet" and exit non-zero

Every error the user can cause is printed as one line on stderr (exit code 2); ``data check``
exits 1 when it found problems.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mllm_ris import __version__
from mllm_ris.errors import ConfigError, MllmRisError, NotAvailableError

__all__ = ["build_parser", "main"]

# Subcommands owned by later work, with what they will do.
_PLANNED: dict[str, str] = {
    "segment": "segment an image from a referring expression (pipeline API and CLI)",
    "chat": "multi-turn grounded chat about an image (pipeline API and CLI)",
    "demo": "run the bundled default model on the bundled scenes (needs the bundled default model)",
    "app": "the Gradio web demo (pipeline API and CLI)",
    "train": "fine-tune a model with accelerate / DeepSpeed (training)",
    "export": "merge LoRA and write a from_pretrained directory (training)",
}


def _dataset_names() -> tuple[str, ...]:
    from mllm_ris.data.registry import DATASET_NAMES

    return DATASET_NAMES


def _add_dataset_args(p: argparse.ArgumentParser, *, split_default: str | None) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        choices=_dataset_names(),
        metavar="NAME",
        help=f"one of: {', '.join(_dataset_names())}",
    )
    p.add_argument("--root", required=True, help="dataset root folder (jsonl: the .jsonl file or its folder)")
    p.add_argument(
        "--split", default=split_default, help="split name, or 'all' for every split (default: %(default)s)"
    )
    p.add_argument("--split-by", default=None, help="refer layout annotation source: unc|google|umd|berkeley")


def _split(args: argparse.Namespace) -> str | None:
    """``--split all`` (or none given) means every split."""
    return None if args.split in (None, "all") else args.split


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mllm-ris`` (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="mllm-ris", description="Referring image segmentation.")
    parser.add_argument("--version", action="version", version=f"mllm-ris {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check", help="read every image and mask of a dataset and count them")
    _add_dataset_args(check, split_default=None)
    check.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    synth = sub.add_parser("make-synthref", help="generate the SynthRef procedural referring dataset")
    synth.add_argument("out", help="output folder")
    synth.add_argument("--images", type=int, default=2000, help="number of scenes (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    ev = sub.add_parser(
        "eval", help="evaluate on a dataset; prints a table, writes metrics.json + metrics.md"
    )
    _add_dataset_args(ev, split_default="val")
    who = ev.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="a trained model directory")
    who.add_argument("--predictor", choices=("empty", "gt-box"), help="a trivial baseline")
    ev.add_argument("--out", default=None, help="output folder (default: runs/eval/DATASET_SPLIT_PREDICTOR)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    ev.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    cfg = sub.add_parser("config", help="print the resolved config")
    cfg.add_argument("--config", default=None, help="a YAML file under configs/")
    cfg.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")

    for name, what in _PLANNED.items():
        p = sub.add_parser(name, help=f"(not available yet) {what}")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _cmd_data_check(args: argparse.Namespace) -> int:
    from mllm_ris.data.check import COUNT_KEYS, check_dataset

    report = check_dataset(
        args.dataset, args.root, args.split, split_by=args.split_by, progress=not args.json
    )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.dataset} @ {args.root} (split: {_split(args) or 'all'})")
        for key in COUNT_KEYS:
            table.add_column(key, justify="right")
        table.add_row(*(str(getattr(report, k)) for k in COUNT_KEYS))
        Console().print(table)
        # problems as plain lines (no wrapping), so they can be grepped
        if report.problems:
            print(f"{len(report.problems)} problem(s):")
            for line in report.problems:
                print(f"  - {line}")
        else:
            print("no problems found")
    return 1 if report.problems else 0


def _cmd_make_synthref(args: argparse.Namespace) -> int:
    from mllm_ris.data.synthetic import make_synthref

    for flag, value, low in (("--images", args.images, 1), ("--size", args.size, 32)):
        if value < low:
            raise ConfigError(f"{flag}: must be >= {low}, got {value}")
    summary = make_synthref(
        args.out, images=args.images, seed=args.seed, size=args.size, workers=args.workers
    )
    print(summary)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mllm_ris.data.registry import build_dataset
    from mllm_ris.eval.evaluate import build_predictor, evaluate

    if args.checkpoint is not None:
        raise NotAvailableError(
            "eval --checkpoint: not available yet (needs the end-to-end model); "
            "use --predictor empty|gt-box for the trivial baselines"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    dataset = build_dataset(args.dataset, args.root, _split(args), split_by=args.split_by)
    predictor = build_predictor(args.predictor)
    report = evaluate(dataset, predictor, limit=args.limit, progress=not args.json)
    out = Path(args.out or Path("runs") / "eval" / f"{args.dataset}_{args.split or 'all'}_{args.predictor}")
    json_path, md_path = report.save(out)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        from rich.console import Console

        console = Console()
        console.print(report.render_table())
        console.print(f"wrote {json_path} and {md_path}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mllm_ris.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mllm-ris`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in _PLANNED:
            raise NotAvailableError(f"{args.command}: not available yet — {_PLANNED[args.command]}")
        if args.command == "data":
            return _cmd_data_check(args)
        handlers = {"make-synthref": _cmd_make_synthref, "eval": _cmd_eval, "config": _cmd_config}
        return handlers[args.command](args)
    except MllmRisError as exc:
        print(f"mllm-ris: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mllm-ris: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
