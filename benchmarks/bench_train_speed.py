"""Training throughput: samples/s of a training step, superpixel vs patch projector, same batch.

Usage::

    python benchmarks/bench_train_speed.py [--batch 8] [--repeats 10] [--device cpu|cuda] [--quick]

Both models are ``configs/model/tiny-synth.yaml`` (random init, its trainable parts: projector, LLM
fully, head, pixel encoder; the vision tower frozen) with ``projector.kind`` superpixel / patch. One
SynthRef batch (128 px, answered chats) is collated once and reused, so the step time is forward +
backward + AdamW only: superpixels are a one-off with ``SuperpixelCache`` and are reported apart
(collate per batch uncached, i.e. the first epoch, and through the cache). Writes the
``bench_train_speed_<device>`` section of ``docs/benchmarks.md`` (plus the link to the accuracy
benchmark) and ``benchmarks/results/train_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import replace_section
from _perf import (
    Peak,
    RunInfo,
    build_tiny,
    command_line,
    common_args,
    device_label,
    peak_memory,
    set_threads,
    synthref_samples,
    timed,
    write_json,
)

from mllm_ris.modeling.predictor import build_processor
from mllm_ris.processing.regions import SuperpixelCache

SPEEDUP_TARGET = 3.0


def measure_kind(kind: str, samples: list[Any], args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """Step time, collate times and peak memory of one projector kind."""
    model = build_tiny(kind, device=args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    collate = build_processor(model, image_size=args.size, answers=True)
    kw = {"warmup": args.warmup, "repeats": args.repeats}
    out: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    out["collate"] = timed(lambda: collate(samples), **kw)  # superpixels computed: the first epoch
    if kind == "superpixel":
        collate.superpixels = SuperpixelCache(cache_dir / kind, collate.superpixels)
        collate(samples)  # fills the cache
        out["collate_cached"] = timed(lambda: collate(samples), **kw)
    batch = collate(samples).to(args.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch).loss
        loss.backward()
        optimizer.step()

    step()  # optimizer state allocated before the memory measurement
    with peak_memory(args.device) as mem:
        step()
    out["step"] = timed(step, **kw, device=args.device)
    out["memory"] = mem
    with torch.no_grad():
        vis = model.visual_tokens(batch)
    out["tokens_mean"] = float(vis.mask.sum(1).float().mean())
    out["sequence"] = int(batch.attention_mask.shape[1] - 1 + vis.mask.shape[1])
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(
            f"--- profile: {kind}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_train_speed_") as tmp:
        root = args.synthref or Path(tmp) / "synthref"
        samples = synthref_samples(root, args.batch, size=args.size, seed=args.seed)
        kinds = {}
        for kind in ("superpixel", "patch"):
            kinds[kind] = measure_kind(kind, samples, args, Path(tmp))
            gc.collect()  # the model of the previous kind is gone before the next is built
    for k, r in kinds.items():
        r["samples_per_s"] = args.batch / r["step"].median
        print(f"train {k:10s} step {r['step'].ms()} ms, {r['samples_per_s']:.1f} samples/s")
    return {"kinds": kinds, "speedup": kinds["superpixel"]["samples_per_s"] / kinds["patch"]["samples_per_s"]}


def format_section(args: argparse.Namespace, res: dict[str, Any], info: RunInfo) -> str:
    sp, pa = res["kinds"]["superpixel"], res["kinds"]["patch"]
    ok = res["speedup"] >= SPEEDUP_TARGET
    lines = [
        f"## Training throughput — tiny-synth, {args.device.split(':')[0].upper()}",
        "",
        f"One training step (forward with all losses, backward, AdamW) on the same {args.batch} SynthRef "
        f"samples ({args.size} px, seed {args.seed}, answered chats), collated once: superpixels are "
        "computed once per image in training (`SuperpixelCache`), so they are left out of the step and "
        f"reported below. Random init. {args.warmup} warm-up + {args.repeats} timed steps, median (IQR).",
        "",
        f"**Target: training samples/s ≥ {SPEEDUP_TARGET:.0f}× the patch baseline** — "
        f"{'met' if ok else 'MISSED'}: {res['speedup']:.2f}×.",
        "",
        "| projector | visual tokens (mean) | LLM sequence | step ms, median (IQR) | samples/s | × patch "
        "| peak memory MiB (Δ) | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, r in (("superpixel", sp), ("patch", pa)):
        mem: Peak = r["memory"]
        ratio = f"{res['speedup']:.2f}" if kind == "superpixel" else "1"
        lines.append(
            f"| {kind} | {r['tokens_mean']:.1f} | {r['sequence']} | {r['step'].ms()} "
            f"| {r['samples_per_s']:.1f} | {ratio} | {mem.peak:.0f} ({mem.delta:+.0f}) "
            f"| {r['trainable_params']:,} |"
        )
    first = args.batch / (sp["step"].median + sp["collate"].median)
    cached = args.batch / (sp["step"].median + sp["collate_cached"].median)
    patch_all = args.batch / (pa["step"].median + pa["collate"].median)
    lines += [
        "",
        "Collate per batch (letterbox, masks, chat tokens; superpixels for the superpixel model):",
        "",
        "| collate | ms per batch, median (IQR) | samples/s with the step |",
        "|---|---:|---:|",
        f"| patch | {pa['collate'].ms()} | {patch_all:.1f} |",
        f"| superpixel, SLIC computed (first epoch) | {sp['collate'].ms()} | {first:.1f} |",
        f"| superpixel, from the cache (later epochs) | {sp['collate_cached'].ms()} | {cached:.1f} |",
        "",
        "In training the collate runs in DataLoader workers, beside the step, so it costs wall time only "
        "when it is slower than the step.",
        "",
        info.line(),
        "",
    ]
    return "\n".join(lines)


ACCURACY = """## Accuracy at equal training budget

Superpixel vs patch projector trained for the same budget on SynthRef and evaluated with the same
protocol: produced by `benchmarks/bench_mllm.py` into the `bench_mllm` section of docs/results.md,
[*MLLM mode on SynthRef: superpixel vs patch tokens*][accuracy].
Together with *Visual tokens per image* above it answers the first target (superpixel tokens ≤ 5 %
of the patch tokens at ≥ equal cIoU).

[accuracy]: results.md#mllm-mode-on-synthref-superpixel-vs-patch-tokens
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="SynthRef image side = canvas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthref", type=Path, default=None, help="an existing SynthRef build to reuse")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top operators per projector")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.repeats = 2, 1, 1
    info = RunInfo(
        command_line("bench_train_speed.py", argv), device_label(args.device), set_threads(args.threads)
    )
    res = run(args)
    if not args.no_docs:
        device = torch.device(args.device).type
        section = format_section(args, res, info)
        replace_section(args.doc, f"bench_train_speed_{device}", section, title="# Benchmarks")
        replace_section(args.doc, "bench_accuracy", ACCURACY, title="# Benchmarks")
        write_json(args.results, f"train_speed_{device}", {"run": info, **res})
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
