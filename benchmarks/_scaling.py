"""Scaling part of ``bench_latency.py``: query latency and memory vs image side and superpixel count."""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path
from typing import Any

from _perf import RunInfo, agg_pyplot, photo, query_sample, resized
from _query import dims_overrides, loglog_slope, make_query_bench, measure_query

from mllm_ris.processing.regions import GridSuperpixels, SuperpixelConfig


def _point(qb: Any, sample: Any, args: argparse.Namespace) -> dict[str, float]:
    r = measure_query(qb, sample, warmup=min(args.warmup, 1), repeats=args.scaling_repeats, stages=False)
    assert r.memory is not None
    return {
        "ms": 1e3 * r.total.median,
        "q1": 1e3 * r.total.q1,
        "q3": 1e3 * r.total.q3,
        "mem_delta_mb": r.memory.delta,
        "mem_peak_mb": r.memory.peak,
        "tokens": r.tokens,
    }


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """``{"sizes": {kind: {canvas mode: [points]}}, "counts": {...}}`` (one model per projector)."""
    from mllm_ris.modeling.predictor import RISPredictor

    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.counts.split(",")]
    base = photo(args.photo)
    overrides = dims_overrides(
        args.dims, layers=args.layers, vision_layers=args.vision_layers, device=args.device
    )
    out: dict[str, Any] = {"sizes": sizes, "counts": counts, "by_size": {}, "by_count": {}}
    for kind in ("superpixel", "patch"):
        qb = make_query_bench(kind, overrides, device=args.device, image_size=args.canvas)
        runs: dict[str, list[dict[str, float]]] = {f"canvas {args.canvas}": [], "canvas = image side": []}
        for side in sizes:
            sample = query_sample(resized(base, side))
            for mode, canvas in ((f"canvas {args.canvas}", args.canvas), ("canvas = image side", side)):
                qb.predictor = RISPredictor(
                    qb.model,
                    image_size=canvas,
                    device=args.device,
                    max_new_tokens=qb.predictor.max_new_tokens,
                )
                runs[mode].append(_point(qb, sample, args) | {"side": side, "canvas": canvas})
                print(f"scaling {kind} side {side} {mode}: {runs[mode][-1]['ms']:.1f} ms")
        out["by_size"][kind] = runs
        qb.predictor = RISPredictor(
            qb.model, image_size=args.canvas, device=args.device, max_new_tokens=qb.predictor.max_new_tokens
        )
        sample = query_sample(resized(base, args.image_side))
        points = []
        for k in counts if kind == "superpixel" else [0]:
            if kind == "superpixel":  # a g x g grid gives exactly g^2 regions
                grid = max(1, round(math.sqrt(k)))
                qb.predictor.processor.superpixels = GridSuperpixels(
                    SuperpixelConfig(method="grid", grid=grid)
                )
            points.append(_point(qb, sample, args) | {"k": k})
        out["by_count"][kind] = points
        del qb
        gc.collect()
    out["slopes"] = slopes(out)
    return out


def slopes(out: dict[str, Any]) -> dict[str, float]:
    """Growth exponents (log-log least squares over the upper half of each range) of the query time and
    of its increment over the smallest setting (the part that grows), vs pixels and vs K."""
    res: dict[str, float] = {}

    def fit(name: str, x: list[float], y: list[float]) -> None:
        lo = len(x) // 2 - (len(x) % 2 == 0) if len(x) > 2 else 0
        res[f"{name} | total"] = loglog_slope(x[lo:], y[lo:])
        inc = [(a, b - y[0]) for a, b in zip(x[lo:], y[lo:], strict=True) if b - y[0] > 0]
        res[f"{name} | increment"] = (
            loglog_slope([a for a, _ in inc], [b for _, b in inc]) if inc else math.nan
        )

    for kind, runs in out["by_size"].items():
        for mode, pts in runs.items():
            fit(f"{kind} | {mode} | pixels", [p["side"] ** 2 for p in pts], [p["ms"] for p in pts])
    sp = out["by_count"]["superpixel"]
    fit("superpixel | K", [p["tokens"] for p in sp], [p["ms"] for p in sp])
    return res


def format_scaling(args: argparse.Namespace, sc: dict[str, Any], info: RunInfo, png: str) -> str:
    modes = list(next(iter(sc["by_size"].values())))
    lines = [
        f"## Scaling with image size and superpixel count — {args.dims} dims, "
        f"{args.device.split(':')[0].upper()}",
        "",
        f"Query latency (median of {args.scaling_repeats} after {min(args.warmup, 1)} warm-up) and peak "
        "memory growth "
        f"(Δ over the RSS before the first query; CUDA: max allocated) for `skimage.data.{args.photo}` "
        f"resized to each side. *canvas {args.canvas}*: the default model, everything letterboxed into "
        f"{args.canvas} px, so only superpixels, letterboxing and the output mask grow with the image. "
        "*canvas = image side*: the pixel encoder and head run at the image's size too (the vision "
        "tower always resizes to its own side, so the token counts do not change).",
        "",
        "| image side | " + " | ".join(f"{k}, {m}: ms (Δ MiB)" for k in sc["by_size"] for m in modes) + " |",
        "|---:|" + "---:|" * (len(sc["by_size"]) * len(modes)),
    ]
    for i, side in enumerate(sc["sizes"]):
        cells = [
            f"{sc['by_size'][k][m][i]['ms']:.1f} ({sc['by_size'][k][m][i]['mem_delta_mb']:+.0f})"
            for k in sc["by_size"]
            for m in modes
        ]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    patch = sc["by_count"]["patch"][0]
    lines += [
        "",
        f"Superpixel count: the superpixel model with a `g × g` grid generator instead of SLIC "
        f"({args.image_side}-px image, canvas {args.canvas}); the patch model always has "
        f"{patch['tokens']} tokens: {patch['ms']:.1f} ms.",
        "",
        "| superpixels K | tokens | query ms (IQR) | / patch | peak Δ MiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in sc["by_count"]["superpixel"]:
        lines.append(
            f"| {p['k']} | {p['tokens']} | {p['ms']:.1f} ({p['q1']:.1f}–{p['q3']:.1f}) "
            f"| {p['ms'] / patch['ms']:.2f} | {p['mem_delta_mb']:+.0f} |"
        )
    s = sc["slopes"]
    lines += [
        "",
        "**Growth order** (log-log slopes over the upper half of each range; *increment*: of the "
        "time above the smallest setting, i.e. the part that grows):",
        "",
    ]
    for kind in sc["by_size"]:
        for mode in modes:
            lines.append(_growth(f"{kind}, {mode}", "pixels", s, f"{kind} | {mode} | pixels"))
    lines += [
        _growth("superpixel, grid", "K", s, "superpixel | K"),
        "",
        f"![latency and memory scaling]({png})",
        "",
        info.line(),
        "",
    ]
    return "\n".join(lines)


def _growth(label: str, var: str, s: dict[str, float], key: str) -> str:
    def term(slope: float) -> str:
        return f"{var}^{slope:.2f} ({_order(slope)})" if math.isfinite(slope) else "– (no growth measured)"

    total, inc = s[f"{key} | total"], s[f"{key} | increment"]
    return f"- {label}: query time ∝ {term(total)}; its increment ∝ {term(inc)}"


def _order(slope: float) -> str:
    if not math.isfinite(slope):
        return "not measured"
    if slope < 0.2:
        return "about constant"
    if slope < 0.8:
        return "sub-linear"
    return "about linear" if slope < 1.2 else "super-linear"


def plot_scaling(sc: dict[str, Any], path: Path) -> None:
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for kind, runs in sc["by_size"].items():
        for mode, pts in runs.items():
            style = "-" if kind == "superpixel" else "--"
            sides = [p["side"] for p in pts]
            axes[0].plot(sides, [p["ms"] for p in pts], style, marker="o", label=f"{kind}, {mode}")
            axes[1].plot(
                sides, [max(p["mem_delta_mb"], 0.1) for p in pts], style, marker="o", label=f"{kind}, {mode}"
            )
    sp, patch = sc["by_count"]["superpixel"], sc["by_count"]["patch"][0]
    axes[2].plot([p["tokens"] for p in sp], [p["ms"] for p in sp], "-o", label="superpixel (grid)")
    axes[2].axhline(patch["ms"], ls="--", color="grey", label=f"patch ({patch['tokens']} tokens)")
    for ax, (title, xl, yl) in zip(
        axes,
        [
            ("query latency vs image side", "image side (px)", "ms"),
            ("peak memory growth vs image side", "image side (px)", "Δ MiB"),
            ("query latency vs superpixel count", "visual tokens K", "ms"),
        ],
        strict=True,
    ):
        ax.set(title=title, xlabel=xl, ylabel=f"{yl} (log)", xscale="log", yscale="log")
        ticks = sc["sizes"] if "side" in xl else [p["tokens"] for p in sp]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
