"""The ``mllm-ris`` command.

Subcommands:
    data check     read a whole dataset and count images / refs / sentences / problems
    make-synthref  generate the SynthRef procedural referring dataset
    eval           evaluate a checkpoint or a trivial predictor on a dataset
    config         print the resolved config (YAML + dotted overrides)
    train          train a model from a config (also under ``accelerate launch -m mllm_ris.cli``)
    segment        segment an image (or a JSONL batch) from a query: mask PNG, overlay PNG, JSON
    chat           multi-turn grounded chat about an image (questions on stdin)
    demo           the default model on the bundled scenes: overlays + an HTML gallery
    app            the Gradio web demo on 127.0.0.1
    export         merge LoRA and write a self-contained from_pretrained model folder

Every error the user can cause is printed as one line on stderr (exit code 2); ``data check``
exits 1 when it found problems. Each command imports its modules in its handler: building the parser
imports none (the dataset names are read from the registry only when ``--dataset`` is checked or
shown), so ``mllm-ris segment`` does not import the dataset loaders, the trainer or the other commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mllm_ris import __version__
from mllm_ris.errors import ConfigError, MllmRisError

__all__ = ["build_parser", "main"]


def _dataset_names() -> tuple[str, ...]:
    from mllm_ris.data.registry import DATASET_NAMES

    return DATASET_NAMES


class _DatasetNames:
    """``--dataset``'s choices: :data:`~mllm_ris.data.registry.DATASET_NAMES`, read when argparse checks
    a value or writes the help (building the parser for another command leaves the registry alone)."""

    def __contains__(self, name: object) -> bool:
        return name in _dataset_names()

    def __iter__(self) -> Iterator[str]:
        return iter(_dataset_names())


def _add_dataset_args(p: argparse.ArgumentParser, *, split_default: str | None) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        choices=_DatasetNames(),
        metavar="NAME",
        help="one of: %(choices)s",
    )
    p.add_argument("--root", required=True, help="dataset root folder (jsonl: the .jsonl file or its folder)")
    p.add_argument(
        "--split", default=split_default, help="split name, or 'all' for every split (default: %(default)s)"
    )
    p.add_argument("--split-by", default=None, help="refer layout annotation source: unc|google|umd|berkeley")
    p.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="folder the annotation's image paths are relative to (default: the dataset's own layout)",
    )


def _split(args: argparse.Namespace) -> str | None:
    """``--split all`` (or none given) means every split."""
    return None if args.split in (None, "all") else args.split


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    """``segment``, ``chat``, ``demo``, ``app`` (mllm_ris.inference; docs/inference.md)."""

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model", default=None, metavar="DIR", help="a model folder (default: the bundled model)"
        )
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "float16"),
            help="dtype of the LLM and vision tower (default: %(default)s)",
        )

    seg = sub.add_parser(
        "segment",
        help="segment an image from a query: <stem>_mask.png, _overlay.png, .json (<stem>_2 … if taken)",
    )
    seg.add_argument("image", nargs="?", help="an image file")
    seg.add_argument("query", nargs="?", help='the referring expression, e.g. "the red circle"')
    seg.add_argument("--batch", metavar="FILE", help='a JSONL file: {"image": PATH, "query": TEXT} per line')
    seg.add_argument("--out", default=".", metavar="DIR", help="output folder (default: the current folder)")
    seg.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)"
    )
    model_args(seg)
    chat = sub.add_parser(
        "chat", help="multi-turn grounded chat about an image (one question per stdin line)"
    )
    chat.add_argument("image", help="an image file")
    chat.add_argument(
        "--out", default=None, metavar="DIR", help="write each answer's mask / overlay / JSON here"
    )
    model_args(chat)
    demo = sub.add_parser("demo", help="run the default model on the bundled scenes: overlays + index.html")
    demo.add_argument(
        "--out", default="mllm-ris-demo", metavar="DIR", help="output folder (default: %(default)s)"
    )
    model_args(demo)
    app = sub.add_parser("app", help="the Gradio web demo (needs the demo extra)")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    app.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    app.add_argument("--max-file-size", default="10mb", help="upload size limit (default: %(default)s)")
    model_args(app)


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
    synth.add_argument(
        "--negative-forms",
        default="attr",
        help="comma-separated forms of the absent-object expressions: attr ('the red star' without one), "
        "spatial ('the leftmost red star'), relational ('the circle left of the red square' when no "
        "circle is), or all (default: %(default)s, what earlier builds had)",
    )

    ev = sub.add_parser(
        "eval", help="evaluate on a dataset; prints a table, writes metrics.json + metrics.md"
    )
    _add_dataset_args(ev, split_default="val")
    who = ev.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", help="a model folder, a run folder or a training checkpoint")
    who.add_argument("--predictor", choices=("empty", "gt-box"), help="a trivial baseline")
    ev.add_argument("--out", default=None, help="output folder (default: runs/eval/DATASET_SPLIT_PREDICTOR)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    ev.add_argument("--device", default="cpu", help="--checkpoint: cpu, cuda, ... (default: %(default)s)")
    ev.add_argument("--batch-size", type=int, default=8, help="--checkpoint: samples per forward pass")
    ev.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")

    cfg = sub.add_parser("config", help="print the resolved config")
    cfg.add_argument("--config", default=None, help="a YAML file under configs/")
    cfg.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")

    tr = sub.add_parser(
        "train",
        help="train a model from a config (single process, or under `accelerate launch -m mllm_ris.cli`)",
        usage="mllm-ris train [--resume auto|PATH] [--time-budget S] CONFIG [CONFIG ...] [KEY=VALUE ...]",
        description="Train from YAML configs; see docs/training.md. Exit code 130 / 143 when "
        "SIGINT / SIGTERM stopped the run (a checkpoint was written; continue with --resume auto).",
    )
    tr.add_argument(
        "config",
        nargs="+",
        metavar="CONFIG|KEY=VALUE",
        help="YAML files merged in order (e.g. configs/model/tiny-synth-classic.yaml "
        "configs/train/synthref-classic.yaml), then dotted overrides such as train.max_steps=100",
    )
    tr.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="auto: continue from the newest checkpoint in train.output_dir (fresh if none); "
        "or a checkpoint directory",
    )
    tr.add_argument(
        "--time-budget", type=float, default=None, metavar="S", help="stop (and checkpoint) after S seconds"
    )

    ex = sub.add_parser("export", help="merge LoRA and write a self-contained from_pretrained model folder")
    ex.add_argument("source", metavar="CHECKPOINT_OR_RUN", help="a run folder, checkpoint or model folder")
    ex.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    ex.add_argument(
        "--adapter",
        action="store_true",
        help="keep LoRA unmerged: write the adapter, token rows and heads, not the base LLM "
        "(rebuilt from mllm.name_or_path when loaded, e.g. smollm2-135m)",
    )
    _add_inference_commands(sub)
    return parser


def _cmd_data_check(args: argparse.Namespace) -> int:
    from mllm_ris.data.check import COUNT_KEYS, check_dataset

    report = check_dataset(
        args.dataset,
        args.root,
        args.split,
        split_by=args.split_by,
        image_root=args.image_root,
        progress=not args.json,
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
    forms = [f.strip() for f in args.negative_forms.split(",") if f.strip()]
    summary = make_synthref(
        args.out,
        images=args.images,
        seed=args.seed,
        size=args.size,
        workers=args.workers,
        negative_forms=("attr", "spatial", "relational") if forms == ["all"] else forms,
    )
    print(summary)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mllm_ris.data.registry import build_dataset
    from mllm_ris.eval.evaluate import Predictor, build_predictor, evaluate

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    dataset = build_dataset(
        args.dataset, args.root, _split(args), split_by=args.split_by, image_root=args.image_root
    )
    if args.checkpoint is not None:
        from mllm_ris.training.artifacts import trained_predictor

        predictor: Predictor = trained_predictor(
            args.checkpoint, device=args.device, batch_size=args.batch_size
        )
        label = Path(args.checkpoint).resolve().name
    else:
        predictor, label = build_predictor(args.predictor), args.predictor
    report = evaluate(dataset, predictor, limit=args.limit, progress=not args.json)
    out = Path(args.out or Path("runs") / "eval" / f"{args.dataset}_{args.split or 'all'}_{label}")
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


def _cmd_train(args: argparse.Namespace) -> int:
    from mllm_ris.config import load_config
    from mllm_ris.training.faults import exit_code_for
    from mllm_ris.training.trainer import train

    if args.time_budget is not None and args.time_budget <= 0:
        raise ConfigError(f"--time-budget: must be > 0, got {args.time_budget}")
    files = [item for item in args.config if "=" not in item]
    overrides = [item for item in args.config if "=" in item]
    if not files:
        raise ConfigError("train: give at least one YAML config file before the KEY=VALUE overrides")
    cfg = load_config(files, overrides)
    summary = train(cfg, resume=args.resume, time_budget_s=args.time_budget)
    from accelerate import PartialState

    if PartialState().is_main_process:
        ran = summary.steps - summary.start_step
        print(
            f"step {summary.steps}/{cfg.train.max_steps} ({ran} this run, {summary.samples} samples, "
            f"{summary.seconds:.0f} s); loss {summary.final_loss:.4f}; {summary.bad_steps} skipped step(s)"
        )
        for name, report in summary.eval.items():
            cIoU = report.metrics.get("cIoU")
            shown = "–" if cIoU is None else f"{100 * cIoU:.2f}"
            print(f"{name}: cIoU {shown} % over {report.samples} samples")
        if summary.checkpoint:
            print(f"checkpoint: {summary.checkpoint}")
        if summary.interrupted:
            print(f"stopped by {summary.interrupted}; continue with --resume auto")
    code = exit_code_for(summary.interrupted)
    _end_launched_run(code)
    return code


def _end_launched_run(code: int) -> None:
    """A launched rank (a process group is initialised) ends here with ``code``, without the
    interpreter's teardown; a single-process run returns and exits as usual.

    Every rank calls it once ``train`` has returned (finished, or stopped by a signal at the same step on
    all ranks), its model, checkpoint and logs written and closed. A rank that raised never gets here;
    the launcher then ends the others.

    Left to the interpreter's teardown, gloo's worker threads are destroyed while joinable and a rank
    aborts ("terminate called without an active exception", SIGABRT) after the run finished and wrote
    its model: the launcher then reports the whole run failed (pytorch/pytorch#190489). Destroying the
    process group first made it rarer, not impossible: CI of 2026-12-07 saw rank 0 abort that way after
    ``barrier`` + ``destroy_process_group``. So the rank flushes its output and leaves with
    ``os._exit``: the C++ objects are never destructed, and nothing is left to write.
    """
    import logging
    import os

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_export(args: argparse.Namespace) -> int:
    from mllm_ris.training.artifacts import export_model

    loaded = export_model(args.source, args.out, overwrite=args.overwrite, adapter=args.adapter)
    kind = "LoRA adapter over its base LLM" if args.adapter else "self-contained"
    print(f"exported {loaded.source} -> {args.out} (RISModel.from_pretrained folder, {kind})")
    return 0


def _pipeline_loader(args: argparse.Namespace, **kwargs: object) -> Callable[[], Any]:
    """``RISPipeline.from_pretrained`` with the command's --model / --device / --dtype, called later."""
    import functools

    from mllm_ris.inference.pipeline import RISPipeline

    return functools.partial(
        RISPipeline.from_pretrained, args.model, device=args.device, dtype=args.dtype, **kwargs
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    from mllm_ris.inference.segment import segment_batch, segment_image

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {args.batch_size}")
    load = _pipeline_loader(args, batch_size=args.batch_size)
    if args.batch is not None:
        if args.image is not None:
            raise ConfigError("segment: give either IMAGE QUERY or --batch FILE, not both")
        report = segment_batch(load, args.batch, args.out, stdout=sys.stdout)
        print(f"{len(report.written)} segmented, {len(report.errors)} failed; outputs in {args.out}")
        return 0 if report.ok else 2
    if args.image is None or args.query is None:
        raise ConfigError('segment: needs IMAGE and QUERY (e.g. mllm-ris segment scene.png "the red circle")')
    segment_image(load, args.image, args.query, args.out, stdout=sys.stdout)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from mllm_ris.inference.chat import run_chat
    from mllm_ris.inference.pipeline import load_image

    load_image(args.image)  # a bad image fails before the model loads
    return run_chat(
        _pipeline_loader(args)(),
        args.image,
        lines=sys.stdin,
        stdout=sys.stdout,
        stderr=sys.stderr,
        out_dir=args.out,
        interactive=sys.stdin.isatty(),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from mllm_ris.inference.demo import run_demo

    report = run_demo(_pipeline_loader(args)(), args.out)
    print(f"{report.answers} answers on the bundled scenes; open {report.index}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from mllm_ris.inference.app import launch

    launch(_pipeline_loader(args)(), host=args.host, port=args.port, max_file_size=args.max_file_size)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mllm-ris`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            return _cmd_data_check(args)
        handlers = {
            "make-synthref": _cmd_make_synthref,
            "eval": _cmd_eval,
            "config": _cmd_config,
            "train": _cmd_train,
            "export": _cmd_export,
            "segment": _cmd_segment,
            "chat": _cmd_chat,
            "demo": _cmd_demo,
            "app": _cmd_app,
        }
        return handlers[args.command](args)
    except MllmRisError as exc:
        print(f"mllm-ris: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mllm-ris: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
