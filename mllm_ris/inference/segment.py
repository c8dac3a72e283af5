"""``mllm-ris segment``: one image + query, or a JSONL batch, to mask / overlay / JSON files.

Batch file: one JSON object per line, ``{"image": PATH, "query": TEXT}`` with an optional ``"id"``
(the file stem; default ``<line>_<image stem>``); relative image paths are relative to the JSONL
file's folder; blank lines and lines starting with ``#`` are skipped. A bad line (malformed JSON, a
missing / corrupt image, an empty query) is reported as one line on stderr and writes nothing; the
other lines are still segmented, and the command exits non-zero.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mllm_ris.errors import MllmRisError
from mllm_ris.inference.pipeline import InputError, RISPipeline, check_query, load_image
from mllm_ris.inference.results import (
    OutputFiles,
    RISResult,
    ensure_out_dir,
    free_stem,
    write_result_files,
)

__all__ = ["BatchItem", "BatchReport", "read_batch_file", "segment_batch", "segment_image", "summary_line"]

PipelineFactory = Callable[[], RISPipeline]


def summary_line(result: RISResult) -> str:
    """``answer: "Sure, it is [SEG]." — 1 mask (score 0.81), no-target 0.03``."""
    if result.rejected:
        found = "no mask"
    else:
        scores = ", ".join(f"{p.score:.2f}" for p in result)
        found = f"{len(result)} mask{'s' if len(result) > 1 else ''} (score {scores})"
    return f'answer: "{result.answer_text}" — {found}, no-target {result.no_target_prob:.2f}'


def segment_image(
    pipeline: RISPipeline | PipelineFactory,
    image: str | Path,
    query: str,
    out_dir: str | Path,
    *,
    stdout: TextIO | None = None,
) -> tuple[RISResult, OutputFiles]:
    """Segment ``image`` from ``query`` and write ``<stem>_mask.png``, ``<stem>_overlay.png``,
    ``<stem>.json`` into ``out_dir`` (``<stem>_2`` … when that result exists: nothing is overwritten).
    The image and query are checked here, once, before the model is built (``pipeline`` may be a
    factory), so bad input fails fast and writes nothing; the pipeline takes them as checked.

    Raises:
        InputError: a bad image / query / output folder; CheckpointError / NotAvailableError from loading.
    """
    path = Path(image)
    array = load_image(path)
    text = check_query(query)
    out = ensure_out_dir(out_dir)
    pipe = pipeline() if callable(pipeline) and not isinstance(pipeline, RISPipeline) else pipeline
    result = pipe.predict([array], [text], checked=True)[0]
    stem = free_stem(out, path.stem)  # a second query about the image keeps the first one's files
    files = write_result_files(out, stem, array, result, _record_extra(path, text, pipe))
    if stdout is not None:
        print(summary_line(result), file=stdout)
        print(f"wrote {files.mask}, {files.overlay}, {files.json}", file=stdout)
    return result, files


def _record_extra(image: Path, query: str, pipe: RISPipeline) -> dict[str, Any]:
    return {"image": str(image), "query": query, "model": pipe.source}


@dataclass(frozen=True)
class BatchItem:
    """One line of a batch file."""

    line: int
    image: Path
    query: str
    stem: str


@dataclass
class BatchReport:
    """What :func:`segment_batch` did: files per item written, and one message per failed line."""

    written: list[OutputFiles] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every line was segmented."""
        return not self.errors


def read_batch_file(path: str | Path) -> tuple[list[BatchItem], list[str]]:
    """Parse a batch JSONL file → items and one error message per bad line (``line N: …``).

    Raises:
        InputError: the file itself is missing or unreadable.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--batch: cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    items, errors = [], []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                raise InputError('expected {"image": PATH, "query": TEXT}')
            query = check_query(obj.get("query"))
            image = Path(obj["image"])
            image = image if image.is_absolute() else file.parent / image
            stem = str(obj.get("id") or f"{n:04d}_{image.stem}")
            if not stem.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise InputError(f"id {stem!r}: use letters, digits, '-', '_', '.' only")
        except (ValueError, MllmRisError) as exc:
            errors.append(f"{file}: line {n}: {exc}")
            continue
        items.append(BatchItem(n, image, query, stem))
    if not items and not errors:
        errors.append(f"{file}: no items (expected one JSON object per line)")
    return items, errors


def segment_batch(
    pipeline: RISPipeline | PipelineFactory,
    batch_file: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> BatchReport:
    """Segment every line of ``batch_file`` (module docstring) into ``out_dir``, ``pipeline.batch_size``
    images per forward pass; errors are collected per line (and printed to ``stderr`` as they happen).
    Images and queries are checked here (:func:`read_batch_file`, ``load_image``), not again by the
    pipeline.
    """
    items, errors = read_batch_file(batch_file)
    report = BatchReport(errors=list(errors))
    err = stderr if stderr is not None else sys.stderr
    for message in errors:
        print(f"mllm-ris: error: {message}", file=err)
    if not items:
        return report
    out = ensure_out_dir(out_dir)
    pipe = pipeline() if callable(pipeline) and not isinstance(pipeline, RISPipeline) else pipeline
    from tqdm import tqdm

    bar = tqdm(
        total=len(items), desc="segment", unit="img", disable=None if progress else True, file=sys.stderr
    )
    try:
        for start in range(0, len(items), pipe.batch_size):
            chunk = items[start : start + pipe.batch_size]
            ready: list[tuple[BatchItem, np.ndarray]] = []
            for item in chunk:  # decode first: a bad image fails alone
                try:
                    ready.append((item, load_image(item.image)))
                except MllmRisError as exc:
                    _fail(report, err, f"{batch_file}: line {item.line}: {exc}")
            if ready:
                _run_chunk(pipe, ready, out, report, err, str(batch_file), stdout)
            bar.update(len(chunk))
    finally:
        bar.close()
    return report


def _run_chunk(
    pipe: RISPipeline,
    ready: list[tuple[BatchItem, np.ndarray]],
    out: Path,
    report: BatchReport,
    err: TextIO,
    batch_file: str,
    stdout: TextIO | None,
) -> None:
    try:
        results = pipe.predict([a for _, a in ready], [i.query for i, _ in ready], checked=True)
    except InputError:  # e.g. one prompt too long for the LLM: retry one by one to isolate it
        results = []
        for item, array in ready:
            try:
                results.append(pipe.predict([array], [item.query], checked=True)[0])
            except MllmRisError as exc:
                _fail(report, err, f"{batch_file}: line {item.line}: {exc}")
                results.append(None)
    for (item, array), result in zip(ready, results, strict=True):
        if result is None:
            continue
        try:
            files = write_result_files(
                out, item.stem, array, result, _record_extra(item.image, item.query, pipe)
            )
        except MllmRisError as exc:
            _fail(report, err, f"{batch_file}: line {item.line}: {exc}")
            continue
        report.written.append(files)
        if stdout is not None:
            print(f"line {item.line}: {summary_line(result)} → {files.overlay}", file=stdout)


def _fail(report: BatchReport, err: TextIO, message: str) -> None:
    report.errors.append(message)
    print(f"mllm-ris: error: {message}", file=err)
