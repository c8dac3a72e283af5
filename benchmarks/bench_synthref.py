"""Benchmark SynthRef generation: time ``make_synthref`` into a temporary folder.

Usage::

    python benchmarks/bench_synthref.py --images 2000 --size 128 [--seed 0] [--workers N] [--repeats 1]

Prints images/s and total seconds, and writes (or replaces) the "SynthRef generation" section of
``docs/benchmarks.md`` with a table naming the command, the machine (``nproc``, CPU model from
``/proc/cpuinfo``) and the date. ``--no-docs`` only prints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import cpu_model, nproc, replace_section

from mllm_ris.data.synthetic import make_synthref

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TARGET_SECONDS = 120.0


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass(frozen=True)
class BenchResult:
    """Best wall time over the repeats and what the last build produced."""

    seconds: float
    all_seconds: list[float]
    cpu_seconds: float
    load_before: float
    images_per_s: float
    workers: int
    refs: int
    sentences: int
    counts: dict[str, Any]


def run(images: int, size: int, seed: int, workers: int | None, repeats: int) -> BenchResult:
    """Time ``repeats`` builds of ``images`` images into fresh temporary folders."""
    times, loads, cpus = [], [], []
    summary = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench_synthref_") as tmp:
            loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
            cpu_start = _cpu_seconds()
            start = time.perf_counter()
            summary = make_synthref(
                Path(tmp) / "synthref", images=images, seed=seed, size=size, workers=workers, progress=False
            )
            times.append(time.perf_counter() - start)
            cpus.append(_cpu_seconds() - cpu_start)
    assert summary is not None
    best = min(times)
    return BenchResult(
        seconds=best,
        all_seconds=times,
        cpu_seconds=cpus[times.index(best)],
        load_before=loads[times.index(best)],
        images_per_s=images / best,
        workers=summary.workers,
        refs=summary.refs,
        sentences=summary.sentences,
        counts=summary.counts,
    )


def update_docs(path: Path, section: str) -> None:
    """Replace the SynthRef section of ``path`` (append it when absent)."""
    replace_section(path, "bench_synthref", section, title="# Benchmarks")


def format_section(args: argparse.Namespace, result: BenchResult, command: str) -> str:
    """The markdown section: a results table and the output counts."""
    verdict = "yes" if result.seconds < TARGET_SECONDS else "NO"
    diff = " / ".join(f"{k} {v}" for k, v in result.counts["sentences"].items())
    refs = " / ".join(f"{k} {v}" for k, v in result.counts["refs"].items())
    return "\n".join(
        [
            "## SynthRef generation",
            "",
            "`make_synthref` wall time (render, verify expressions, PNG + RLE, write all three layouts), "
            f"best of {args.repeats}. Target: {args.images} images at {args.size} px in under "
            f"{TARGET_SECONDS:.0f} s on 2 cores. *load before*: the 1-minute load average when the best "
            "run started (the machine may be shared; a load above the CPU count slows the run). "
            "*CPU s*: user + system time of the build and its worker processes, which contention "
            "changes far less.",
            "",
            "| command | machine | load before | workers | images | size | seconds | images/s | CPU s "
            "| < 120 s | date |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| `{command}` | {nproc()} CPUs, {cpu_model()} | {result.load_before:.2f} | {result.workers} | "
            f"{args.images} | {args.size} px | {result.seconds:.1f} | {result.images_per_s:.1f} | "
            f"{result.cpu_seconds:.1f} | {verdict} | {dt.date.today().isoformat()} |",
            "",
            f"Output: {result.refs} refs ({refs}), {result.sentences} sentences ({diff}).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the benchmark, print and record it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="default: every available CPU")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    result = run(args.images, args.size, args.seed, args.workers, args.repeats)
    print(
        f"synthref: {args.images} images at {args.size} px, {result.workers} workers: "
        f"{result.seconds:.2f} s total, {result.images_per_s:.1f} images/s, {result.cpu_seconds:.1f} CPU s "
        f"({result.refs} refs, {result.sentences} sentences)"
    )
    if not args.no_docs:
        command = "python benchmarks/bench_synthref.py " + " ".join(
            shlex.quote(a) for a in (argv or sys.argv[1:])
        )
        update_docs(DOCS, format_section(args, result, command.strip()))
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
