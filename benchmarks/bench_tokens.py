"""Visual tokens per image: superpixel generators vs patch projectors, on SynthRef and real photos.

Usage::

    python benchmarks/bench_tokens.py [--images 200] [--photos astronaut,coffee,...]
        [--sam-checkpoint models/sam_vit_b_01ec64.pth --sam-variant vit_b] [--quick]

Counts only (no timing), so any machine gives the same numbers. For every image the generator's
label map is letterboxed into the model canvas (``--image-size``, the tiny model's 128 px) exactly
as ``Processor`` does, and the tokens are the regions the superpixel projector then sees. The
patch projector's tokens are fixed by the vision tower. SAM superpixels are counted only with a real
checkpoint: a random-weight SAM keeps no mask, so its labels would be SLIC's (say so, count nothing).
Writes the ``bench_tokens`` section of ``docs/benchmarks.md``, ``benchmarks/results/tokens.json``
and ``docs/img/tokens_per_image.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import replace_section
from _perf import (
    PHOTOS,
    RunInfo,
    agg_pyplot,
    command_line,
    common_args,
    device_label,
    image_dir,
    photo,
    set_threads,
    synthref_objects,
    write_json,
)

from mllm_ris.processing.processor import RISTransform, letterbox_labels
from mllm_ris.processing.regions import SuperpixelConfig, build_superpixel_generator

# patch tokens per image of the vision towers the configs use
PATCH_TOWERS = {
    "tiny ViT 128/4 (tiny-synth)": 1024,
    "CLIP ViT-L/14-336 (LLaVA-1.5)": 576,
    "SigLIP-B/16-224 (qwen2 config)": 196,
}
BUDGET = 0.05  # target: superpixel tokens <= 5 % of patch tokens


def object_iou(labels: np.ndarray, masks: np.ndarray) -> list[float]:
    """Per target: IoU of the union of regions lying > 50 % inside it, vs the target."""
    out = []
    area = np.bincount(labels.ravel())
    for m in masks:
        chosen = np.bincount(labels[m], minlength=area.size) / np.maximum(area, 1) > 0.5
        union = chosen[labels]
        out.append(float((union & m).sum() / max((union | m).sum(), 1)))
    return out


def count_tokens(
    gen: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray], canvas: int
) -> tuple[list[int], list[int], list[np.ndarray]]:
    """``(K from the generator, tokens after letterboxing to canvas, label maps)`` per image."""
    transform = RISTransform(canvas)
    k_gen, k_tok, maps = [], [], []
    for image in images:
        labels = gen(image)
        boxed = letterbox_labels(labels, transform)
        k_gen.append(int(labels.max()) + 1)
        k_tok.append(int(boxed[boxed >= 0].unique().numel()))
        maps.append(labels)
    return k_gen, k_tok, maps


def summarise(k_tok: list[int]) -> dict[str, Any]:
    ks = np.asarray(k_tok)
    row: dict[str, Any] = {"mean": float(ks.mean()), "median": float(np.median(ks)), "max": int(ks.max())}
    for tower, n in PATCH_TOWERS.items():
        row[f"pct_mean[{tower}]"] = 100 * float(ks.mean()) / n
        row[f"pct_max[{tower}]"] = 100 * int(ks.max()) / n
    row["within_budget_tiny"] = int(ks.max()) <= BUDGET * PATCH_TOWERS["tiny ViT 128/4 (tiny-synth)"]
    return row


def generators(args: argparse.Namespace) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    gens: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "slic (default)": build_superpixel_generator(SuperpixelConfig()),
        "slic, no merging": build_superpixel_generator(SuperpixelConfig(merge_threshold=0.0, max_regions=0)),
    }
    if args.sam_checkpoint:
        from s2rm_head.sam.stage import SAMConfig, build_sam

        sam = build_sam(SAMConfig(variant=args.sam_variant, checkpoint=str(args.sam_checkpoint)))
        gens[f"sam ({args.sam_variant}, {Path(args.sam_checkpoint).name})"] = build_superpixel_generator(
            SuperpixelConfig(method="sam"), sam=sam
        )
    return gens


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_tokens_") as tmp:
        root = args.synthref or Path(tmp) / "synthref"
        objects = synthref_objects(root, args.images, size=args.size, seed=args.seed)
    synth_images = [image for image, _ in objects]
    synth_masks = [masks for _, masks in objects]
    names = args.photos.split(",") if args.photos else list(PHOTOS)
    photos = [photo(n) for n in names]
    record: dict[str, Any] = {"synthref": {}, "photos": {}, "per_photo": {n: {} for n in names}}
    for gname, gen in generators(args).items():
        _, k_tok, maps = count_tokens(gen, synth_images, args.image_size)
        row = summarise(k_tok)
        ious = [v for lab, m in zip(maps, synth_masks, strict=True) for v in object_iou(lab, m)]
        row["object_iou"] = float(np.mean(ious)) if ious else float("nan")
        row["objects"], row["images"], row["k"] = len(ious), len(k_tok), k_tok
        record["synthref"][gname] = row
        k_gen, k_tok, _ = count_tokens(gen, photos, args.image_size)
        record["photos"][gname] = summarise(k_tok) | {"images": len(k_tok), "k": k_tok}
        for n, kg, kt, im in zip(names, k_gen, k_tok, photos, strict=True):
            record["per_photo"][n][gname] = {"k_generator": kg, "tokens": kt, "size": list(im.shape[:2])}
    return record


def _table(rows: dict[str, dict[str, Any]], with_iou: bool) -> list[str]:
    towers = list(PATCH_TOWERS)
    head = "| generator | images | tokens mean | median | max | " + " | ".join(
        f"% of {PATCH_TOWERS[t]} ({t.split(' (')[0]}) mean / max" for t in towers
    )
    lines = [head + (" | object IoU |" if with_iou else " |")]
    lines.append("|---|" + "---:|" * (4 + len(towers) + with_iou))
    for name, r in rows.items():
        pct = " | ".join(f"{r[f'pct_mean[{t}]']:.1f} / {r[f'pct_max[{t}]']:.1f}" for t in towers)
        iou = f" | {r['object_iou']:.3f}" if with_iou else ""
        lines.append(
            f"| {name} | {r['images']} | {r['mean']:.1f} | {r['median']:.1f} | {r['max']} | {pct}{iou} |"
        )
    return lines


def format_section(args: argparse.Namespace, record: dict[str, Any], info: RunInfo, plot: str | None) -> str:
    names = list(record["per_photo"])
    gens = list(record["synthref"])
    default = record["synthref"]["slic (default)"]
    ph = record["photos"]["slic (default)"]
    ok = default["within_budget_tiny"] and ph["within_budget_tiny"]
    llava = "CLIP ViT-L/14-336 (LLaVA-1.5)"
    llava_max = max(default[f"pct_max[{llava}]"], ph[f"pct_max[{llava}]"])
    lines = [
        "## Visual tokens per image",
        "",
        f"Tokens the superpixel projector produces per image: the generator's label map letterboxed into "
        f"the {args.image_size}-px canvas of the tiny model (as `Processor` does), regions counted. "
        "Patch projectors emit one token per ViT patch whatever the image: "
        + ", ".join(f"{n} for {t}" for t, n in PATCH_TOWERS.items())
        + ". *object IoU* (SynthRef): per target object, the union of regions lying more than half "
        "inside it vs its mask — how well the tokens' regions can represent the objects. Counts do not "
        "depend on the machine.",
        "",
        f"**Target: superpixel tokens ≤ 5 % of patch tokens** — {'met' if ok else 'MISSED'} for the "
        f"default SLIC against the tiny tower's 1024 (max {default['max']} on SynthRef, {ph['max']} on "
        f"photos, budget {int(BUDGET * 1024)}). Against LLaVA-1.5's 576 tokens the same regions are "
        f"{default[f'pct_mean[{llava}]']:.1f} % (SynthRef) and {ph[f'pct_mean[{llava}]']:.1f} % (photos) "
        f"on average and at most {llava_max:.1f} %: a 5 % budget there means at most "
        f"{int(BUDGET * 576)} tokens (`superpixels.max_regions` or the projector's `max_tokens`). The "
        '"≥ equal cIoU" half of the target is the accuracy benchmark\'s (see *Accuracy at equal training '
        "budget*).",
        "",
        f"### SynthRef ({default['images']} images, {args.size} px, seed {args.seed}; "
        f"{default['objects']} target objects)",
        "",
        *_table(record["synthref"], with_iou=True),
        "",
        f"### scikit-image photographs ({len(names)})",
        "",
        *_table(record["photos"], with_iou=False),
        "",
        "| photo | size (H×W) | " + " | ".join(f"{g}: tokens (generator K)" for g in gens) + " |",
        "|---|---|" + "---:|" * len(gens),
    ]
    for n, row in record["per_photo"].items():
        h, w = next(iter(row.values()))["size"]
        cells = " | ".join(f"{row[g]['tokens']} ({row[g]['k_generator']})" for g in gens)
        lines.append(f"| `{n}` | {h}×{w} | {cells} |")
    lines.append("")
    if not any(g.startswith("sam") for g in gens):
        lines += [
            "**SAM superpixels are not counted here.** No SAM checkpoint can be downloaded in this "
            "environment, and SAM's automatic mask generator with random weights keeps no mask "
            "(predicted-IoU and stability filters), so `SAMSuperpixels` falls back to plain SLIC: its "
            "counts would be SLIC's, not SAM's. With a checkpoint, `--sam-checkpoint PATH "
            "--sam-variant vit_b|vit_l|vit_h` adds SAM rows. SAM's *cost* is measured (random weights "
            "are fine for cost) in *Superpixel generation cost*.",
            "",
        ]
    if plot:
        lines += [f"![tokens per image]({plot})", ""]
    lines += [info.line(), ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    data = [record["synthref"]["slic (default)"]["k"], record["photos"]["slic (default)"]["k"]]
    ax.boxplot(data, orientation="horizontal", tick_labels=["SynthRef", "photos"], showmeans=True)
    for tower, n in PATCH_TOWERS.items():
        ax.axvline(n, ls="--", lw=1, color="grey")
        ax.text(n, 2.45, f"{n}: {tower.split(' (')[0]}", rotation=90, va="top", ha="right", fontsize=7)
    ax.axvline(BUDGET * 1024, color="red", lw=1)
    ax.text(BUDGET * 1024, 0.55, "5 % of 1024", color="red", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens per image (log)")
    ax.set_title("Superpixel (SLIC default) tokens vs patch tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--images", type=int, default=200, help="SynthRef images")
    parser.add_argument("--size", type=int, default=128, help="SynthRef image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthref", type=Path, default=None, help="an existing SynthRef build to reuse")
    parser.add_argument("--photos", default=None, help="comma-separated skimage.data names (default: 10)")
    parser.add_argument("--image-size", type=int, default=128, help="model canvas S (letterbox)")
    parser.add_argument("--sam-checkpoint", type=Path, default=None)
    parser.add_argument("--sam-variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.photos = 2, args.photos or "astronaut,coffee"
    info = RunInfo(command_line("bench_tokens.py", argv), device_label("cpu"), set_threads(args.threads))
    record = run(args)
    for source in ("synthref", "photos"):
        for g, r in record[source].items():
            print(f"{source:8s} {g:18s} tokens mean {r['mean']:.1f} max {r['max']}")
    if not args.no_docs:
        png = image_dir(args.doc) / "tokens_per_image.png"
        plot(record, png)
        section = format_section(args, record, info, plot=f"img/{png.name}")
        replace_section(args.doc, "bench_tokens", section, title="# Benchmarks")
        write_json(args.results, "tokens", {"run": info, **record})
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
