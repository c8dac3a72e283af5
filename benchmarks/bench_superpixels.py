"""Superpixel generation cost: SLIC vs SAM, computed and through the disk cache.

Usage::

    python benchmarks/bench_superpixels.py [--images 50] [--photos astronaut,coffee,...]
        [--sam-images 2] [--sam-variant vit_b] [--sam-checkpoint PATH] [--repeats 5] [--quick]

Per image: the generator's wall time on the image as given (SynthRef at 128 px, the scikit-image
photos at their own size; the default ``max_side`` 512 downscales larger ones), then the same image
through :class:`SuperpixelCache` — the first call computes and writes, later calls read the ``.npy``
(the path every epoch after the first takes in training). SAM runs ``SamAutomaticMaskGenerator``
(``points_per_side`` 16 → 256 prompts) on a ViT at 1024 px; with random weights (no checkpoint can
be downloaded here) the cost is that of a real SAM but it keeps no mask, so the labels come from the
SLIC fallback (the masks-kept column says so). Writes the ``bench_superpixels`` section of
``docs/benchmarks.md`` and ``benchmarks/results/superpixels.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import replace_section
from _perf import (
    PHOTOS,
    RunInfo,
    Timing,
    command_line,
    common_args,
    device_label,
    peak_memory,
    photo,
    set_threads,
    synthref_objects,
    timed,
    write_json,
)

from mllm_ris.processing.regions import (
    SAMSuperpixels,
    SuperpixelCache,
    SuperpixelConfig,
    build_superpixel_generator,
)


def _per_image(times: list[float]) -> dict[str, float]:
    """Median and IQR (ms) over images of their per-image seconds."""
    t = Timing(times)
    return {"median_ms": 1e3 * t.median, "q1_ms": 1e3 * t.q1, "q3_ms": 1e3 * t.q3}


def measure(
    gen: Any, images: list[np.ndarray], *, warmup: int, repeats: int, cache_dir: Path, once: bool = False
) -> dict[str, Any]:
    """Compute time, cached time, peak RSS and region counts of ``gen`` over ``images``.

    ``once`` (SAM): the cache miss is the only compute call, so ``compute`` = miss (the write is ~1 ms
    next to tens of seconds), and the image encoder is timed once more on its own.
    """
    compute, hit, miss, encoder, ks, kept = [], [], [], [], [], []
    cache = SuperpixelCache(cache_dir, gen)
    if isinstance(gen, SAMSuperpixels):  # count the masks the AMG returns during the timed calls
        amg_masks = gen._masks
        gen._masks = lambda rgb: _count(amg_masks(rgb), kept)  # type: ignore[method-assign]
    with peak_memory("cpu") as mem:
        for image in images:
            start = time.perf_counter()
            labels = cache(image)  # miss: compute + atomic write (and the warm-up of lazy init)
            miss.append(time.perf_counter() - start)
            ks.append(int(labels.max()) + 1)
            if once:
                compute.append(miss[-1])
            else:
                t = timed(lambda im=image: gen(im), warmup=max(warmup - 1, 0), repeats=repeats)
                compute.append(t.median)
            hit.append(timed(lambda im=image: cache(im), warmup=1, repeats=max(repeats, 3)).median)
            if once and isinstance(gen, SAMSuperpixels):
                small = _small(gen, image)
                start = time.perf_counter()
                gen.amg.predictor.set_image(small)
                encoder.append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "images": len(images),
        "compute": _per_image(compute),
        "cache_miss": _per_image(miss),
        "cache_hit": _per_image(hit),
        "speedup_hit": statistics.median(compute) / statistics.median(hit),
        "k_mean": float(np.mean(ks)),
        "k_max": int(np.max(ks)),
        "peak_rss_mb": mem.peak,
        "delta_rss_mb": mem.delta,
        "stats": vars(cache.stats),
    }
    if kept:
        out["amg_masks_kept_mean"] = float(np.mean(kept))
    if encoder:
        out["encoder"] = _per_image(encoder)
        out["encoder_share"] = statistics.median(encoder) / statistics.median(compute)
    return out


def _count(masks: list[np.ndarray], into: list[int]) -> list[np.ndarray]:
    into.append(len(masks))
    return masks


def _small(gen: SAMSuperpixels, image: np.ndarray) -> np.ndarray:
    """The RGB image the generator segments (downscaled to ``max_side``)."""
    from mllm_ris.processing.regions import _downscale, as_rgb

    return _downscale(as_rgb(image), gen.cfg.max_side)


def build_sam_generator(args: argparse.Namespace) -> tuple[str, Any]:
    from s2rm_head.sam.stage import SAMConfig, build_sam

    checkpoint = str(args.sam_checkpoint) if args.sam_checkpoint else None
    sam = build_sam(SAMConfig(variant=args.sam_variant, checkpoint=checkpoint))
    weights = Path(checkpoint).name if checkpoint else "random weights"
    size = sam.image_encoder.img_size
    label = f"sam ({args.sam_variant}, {size} px, {weights})"
    cfg = SuperpixelConfig(method="sam", points_per_side=args.sam_points)
    return label, build_superpixel_generator(cfg, sam=sam)


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = args.photos.split(",") if args.photos else list(PHOTOS)
    photos = [photo(n) for n in names]
    with tempfile.TemporaryDirectory(prefix="bench_superpixels_") as tmp:
        root = args.synthref or Path(tmp) / "synthref"
        synth = [image for image, _ in synthref_objects(root, args.images, size=args.size, seed=args.seed)]
        slic = build_superpixel_generator(SuperpixelConfig())
        rows: dict[str, Any] = {}
        kw = {"warmup": args.warmup, "repeats": args.repeats}
        rows["slic (default) | SynthRef"] = measure(slic, synth, cache_dir=Path(tmp) / "c1", **kw)
        rows["slic (default) | photos"] = measure(slic, photos, cache_dir=Path(tmp) / "c2", **kw)
        if args.sam_images > 0:
            label, sam = build_sam_generator(args)
            sam_photos = photos[: args.sam_images]
            rows[f"{label} | photos"] = measure(
                sam, sam_photos, warmup=0, repeats=1, cache_dir=Path(tmp) / "c3", once=True
            )
            rows[f"{label} | photos"]["photos"] = names[: args.sam_images]
    return {"rows": rows, "photos": names}


def _ms(d: dict[str, float]) -> str:
    return f"{d['median_ms']:.1f} ({d['q1_ms']:.1f}–{d['q3_ms']:.1f})"


def format_section(args: argparse.Namespace, record: dict[str, Any], info: RunInfo) -> str:
    lines = [
        "## Superpixel generation cost",
        "",
        "Wall time per image of each generator, median over images (IQR in brackets) of each image's "
        f"median over {args.repeats} calls after {args.warmup} warm-up; SAM: one call per image (the "
        "cache miss, no warm-up: each call is tens of seconds on a CPU). *cache miss*: first call "
        "through `SuperpixelCache` (compute + atomic `.npy` write); *cache hit*: later calls (hash the "
        "image, read the file) — "
        "what training pays from the second epoch on, so the projector comparison in *Training "
        "throughput* leaves superpixel computation out. *peak RSS*: process high-water mark during the "
        "row (Δ: over the RSS before it).",
        "",
        "| generator | source | images | compute ms / image | cache miss ms | cache hit ms "
        "| hit speed-up | regions mean / max | AMG masks kept | peak RSS MiB (Δ) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in record["rows"].items():
        gen, source = key.split(" | ")
        kept = f"{r['amg_masks_kept_mean']:.1f}" if "amg_masks_kept_mean" in r else "–"
        lines.append(
            f"| {gen} | {source} | {r['images']} | {_ms(r['compute'])} | {_ms(r['cache_miss'])} "
            f"| {_ms(r['cache_hit'])} | {r['speedup_hit']:.0f}× | {r['k_mean']:.1f} / {r['k_max']} "
            f"| {kept} | {r['peak_rss_mb']:.0f} ({r['delta_rss_mb']:+.0f}) |"
        )
    lines.append("")
    sam = [r for k, r in record["rows"].items() if k.startswith("sam")]
    if sam and "encoder" in sam[0]:
        r = sam[0]
        lines += [
            f"SAM breakdown: the image encoder (`SamPredictor.set_image`, timed separately) takes "
            f"{_ms(r['encoder'])} ms, {100 * r['encoder_share']:.0f} % of a generator call; the rest "
            f"is the automatic mask generator decoding its {args.sam_points**2} point prompts in batches "
            "of 64 (the "
            "mask decoder repeats the image embedding once per prompt) and filtering the masks. Photos: "
            + ", ".join(f"`{n}`" for n in r.get("photos", []))
            + ".",
            "",
        ]
        if "random" in next(k for k in record["rows"] if k.startswith("sam")):
            lines += [
                "With random weights the mask generator keeps no mask, so the SAM rows' regions are the "
                "SLIC fallback's and their compute time is a lower bound: a real checkpoint adds the "
                "painting of kept masks and SLIC only in uncovered areas (cheap next to the decoder).",
                "",
            ]
    lines += [info.line(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--images", type=int, default=50, help="SynthRef images (SLIC)")
    parser.add_argument("--size", type=int, default=128, help="SynthRef image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthref", type=Path, default=None, help="an existing SynthRef build to reuse")
    parser.add_argument("--photos", default=None, help="comma-separated skimage.data names (default: 10)")
    parser.add_argument("--sam-images", type=int, default=2, help="photos segmented by SAM (0 = no SAM)")
    parser.add_argument("--sam-variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--sam-checkpoint", type=Path, default=None)
    parser.add_argument("--sam-points", type=int, default=16, help="AMG points per side (default config: 16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.photos, args.repeats, args.warmup = 2, args.photos or "astronaut", 1, 1
        args.sam_images, args.sam_variant, args.sam_points = min(args.sam_images, 1), "tiny", 4
    info = RunInfo(command_line("bench_superpixels.py", argv), device_label("cpu"), set_threads(args.threads))
    record = run(args)
    for key, r in record["rows"].items():
        print(f"{key:50s} compute {_ms(r['compute'])} ms, cache hit {_ms(r['cache_hit'])} ms")
    if not args.no_docs:
        replace_section(
            args.doc, "bench_superpixels", format_section(args, record, info), title="# Benchmarks"
        )
        write_json(args.results, "superpixels", {"run": info, **record})
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
