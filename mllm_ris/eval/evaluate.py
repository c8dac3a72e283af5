"""The evaluation loop: run a predictor over a dataset and report the metrics.

A *predictor* is any callable ``sample -> (N, H, W) bool masks``; the evaluated prediction is
the union of its ``N`` masks (``N == 0`` means "no object"). :func:`evaluate` accumulates
:class:`~mllm_ris.eval.metrics.RISMetrics` overall, per split and per SynthRef difficulty and
returns an :class:`EvalReport` that renders as JSON, markdown and a rich console table.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from rich.table import Table
from tqdm import tqdm

from mllm_ris.data.sample import ReferringDataset, RISSample
from mllm_ris.errors import ConfigError, MllmRisError
from mllm_ris.eval.metrics import METRIC_KEYS, MetricsDict, RISMetrics, mask_counts

__all__ = [
    "CONVENTIONS_LINE",
    "PREDICTORS",
    "EmptyPredictor",
    "EvalReport",
    "GTBoxPredictor",
    "PredictionError",
    "Predictor",
    "build_predictor",
    "evaluate",
]

CONVENTIONS_LINE = (
    "Conventions: values in %; cIoU = ΣI/ΣU over all samples (a no-target sample adds its "
    "predicted pixels to ΣU); mIoU and prec@X over samples with a target (IoU ≥ X); gIoU = mean "
    "IoU over all samples, a no-target sample scoring 1 if predicted empty else 0; "
    "n_acc = TP/(TP+FN), t_acc = TN/(TN+FP) with no-target as positive class, no +1; "
    "r, rIoU per ref (R-RefCOCO); ignore pixels excluded; – = undefined. See docs/metrics.md."
)
"""One-line statement of the conventions, printed beneath every markdown report."""

# SynthRef difficulty levels in reporting order; unknown levels follow alphabetically.
_DIFFICULTY_ORDER = ("simple", "spatial", "relational", "multi", "negative")


class PredictionError(MllmRisError, ValueError):
    """A predictor returned masks that do not fit the sample (the message names both shapes)."""


@runtime_checkable
class Predictor(Protocol):
    """Anything that segments one sample.

    ``__call__(sample)`` returns ``(N, H, W)`` bool masks with ``(H, W) == sample.image.shape[:2]``;
    ``N == 0`` means "the expression refers to nothing". An optional ``name`` attribute labels
    the report. A model-backed predictor may also define ``batch_size: int`` and
    ``predict_batch(samples) -> list[np.ndarray]``; :func:`evaluate` then hands it samples in
    chunks of ``batch_size`` (same results, fewer forward passes).
    """

    def __call__(self, sample: RISSample) -> np.ndarray: ...


class EmptyPredictor:
    """Baseline that always answers "no object": ``(0, H, W)`` masks.

    It scores cIoU 0, n_acc 1 and t_acc 0, and its gIoU equals the fraction of no-target samples.
    """

    name = "empty"

    def __call__(self, sample: RISSample) -> np.ndarray:
        h, w = sample.image.shape[:2]
        return np.zeros((0, h, w), dtype=bool)


class GTBoxPredictor:
    """Oracle baseline: one filled bounding box per ground-truth instance; no target → no mask.

    Its cIoU measures how box-shaped the targets are (1.0 for rectangular targets) and bounds
    what a perfect box grounder followed by box filling could reach.
    """

    name = "gt-box"

    def __call__(self, sample: RISSample) -> np.ndarray:
        masks = np.asarray(sample.masks, dtype=bool)  # (T, H, W)
        rows = masks.any(axis=2)  # (T, H): rows touched by each instance
        cols = masks.any(axis=1)  # (T, W): columns touched by each instance
        rows, cols = _fill_span(rows), _fill_span(cols)
        return rows[:, :, None] & cols[:, None, :]  # (T, H, 1) & (T, 1, W) -> (T, H, W)


def _fill_span(flags: np.ndarray) -> np.ndarray:
    """Set every entry between the first and last True of each row: ``(T, L)`` -> ``(T, L)``.

    A running OR from the start AND a running OR from the end; an all-False row stays False.
    """
    forward = np.logical_or.accumulate(flags, axis=1)
    backward = np.logical_or.accumulate(flags[:, ::-1], axis=1)[:, ::-1]
    return forward & backward


PREDICTORS: dict[str, Callable[[], Predictor]] = {
    "empty": EmptyPredictor,
    "gt-box": GTBoxPredictor,
}
"""Built-in baselines by name."""


def build_predictor(name: str) -> Predictor:
    """Build a baseline predictor by name (``"empty"`` or ``"gt-box"``).

    Raises:
        ConfigError: unknown name (the message lists the choices).
    """
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise ConfigError(f"predictor: unknown name {name!r}; choices: {', '.join(PREDICTORS)}") from None
    return factory()


def _name_of(obj: Any) -> str:
    """A display name: ``obj.name``, else ``obj.__name__`` (functions), else the type's name."""
    for attr in ("name", "__name__"):
        value = getattr(obj, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(obj).__name__


def _prediction_union(masks: Any, sample: RISSample, index: int, predictor: str) -> np.ndarray:
    """Check a predictor's output against the sample and return the union, ``(H, W)`` bool.

    Raises:
        PredictionError: not an array, not ``(N, H, W)`` with the image's ``(H, W)``, or not binary.
    """
    where = f"sample {index} (ref_id {sample.ref_id!r}, sent_id {sample.sent_id!r})"
    h, w = sample.image.shape[:2]
    if not isinstance(masks, np.ndarray):
        raise PredictionError(
            f"predictor {predictor!r} returned {type(masks).__name__} for {where}; "
            f"expected a numpy array of shape (N, {h}, {w})"
        )
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise PredictionError(
            f"predictor {predictor!r} returned masks of shape {masks.shape} for {where} whose image "
            f"has shape {sample.image.shape}; expected (N, {h}, {w})"
        )
    if masks.dtype != bool:
        if not np.issubdtype(masks.dtype, np.integer):
            raise PredictionError(
                f"predictor {predictor!r} returned {masks.dtype} masks for {where}; expected bool "
                "(threshold probabilities before returning)"
            )
        if masks.size and (masks.min() < 0 or masks.max() > 1):
            raise PredictionError(
                f"predictor {predictor!r} returned {masks.dtype} masks with values outside {{0, 1}} "
                f"for {where}"
            )
    return masks.any(axis=0)  # (N, H, W) -> (H, W); N == 0 gives all False


def _difficulty_key(level: str) -> tuple[int, str]:
    order = _DIFFICULTY_ORDER.index(level) if level in _DIFFICULTY_ORDER else len(_DIFFICULTY_ORDER)
    return order, level


def evaluate(
    dataset: ReferringDataset,
    predictor: Predictor,
    *,
    limit: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Run ``predictor`` on every sample of ``dataset`` and accumulate the metrics.

    Args:
        dataset: the samples to evaluate, in order.
        predictor: ``sample -> (N, H, W)`` bool masks; their union is the prediction.
        limit: evaluate only the first ``limit`` samples (None: all).
        progress: show a progress bar on stderr.

    Returns:
        The report: metrics overall, per split and per SynthRef difficulty (samples whose
        ``difficulty`` is not None).

    Raises:
        ConfigError: ``limit`` is not a positive integer.
        PredictionError: the predictor returned masks that do not fit a sample's image.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: must be a positive integer or None, got {limit!r}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    dataset_name = _name_of(dataset)
    predictor_name = _name_of(predictor)
    overall = RISMetrics()
    splits: dict[str, RISMetrics] = {}
    levels: dict[str, RISMetrics] = {}
    bar = tqdm(
        range(n), total=n, desc=f"eval {dataset_name}", unit="sample", file=sys.stderr, disable=not progress
    )
    chunk = max(1, int(getattr(predictor, "batch_size", 1)))
    batched = chunk > 1 and callable(getattr(predictor, "predict_batch", None))
    pending: list[tuple[int, RISSample]] = []
    for idx in bar:
        pending.append((idx, dataset[idx]))
        if len(pending) < (chunk if batched else 1) and idx < n - 1:
            continue
        samples = [sample for _, sample in pending]
        outputs = predictor.predict_batch(samples) if batched else [predictor(samples[0])]  # type: ignore[attr-defined]
        if len(outputs) != len(samples):
            raise PredictionError(
                f"predictor {predictor_name!r} returned {len(outputs)} predictions for {len(samples)} samples"
            )
        for (i, sample), raw in zip(pending, outputs, strict=True):
            pred = _prediction_union(raw, sample, i, predictor_name)
            inter, union, n_pred = mask_counts(pred, sample.target, ignore=sample.ignore)
            groups = [overall, splits.setdefault(sample.split, RISMetrics())]
            if sample.difficulty is not None:
                groups.append(levels.setdefault(sample.difficulty, RISMetrics()))
            for acc in groups:
                acc.update_counts(
                    intersection=inter,
                    union=union,
                    pred_pixels=n_pred,
                    has_target=not sample.no_target,
                    ref_id=sample.ref_id,
                )
        pending = []
    bar.close()
    return EvalReport(
        dataset=dataset_name,
        predictor=predictor_name,
        metrics=overall.compute(),
        splits={s: m.compute() for s, m in splits.items()},
        difficulty={k: levels[k].compute() for k in sorted(levels, key=_difficulty_key)},
        samples=overall.samples,
    )


def _pct(value: float | int | None) -> str:
    """A metric as a percentage with 2 decimals, ``–`` when undefined."""
    return "–" if value is None else f"{100.0 * value:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class EvalReport:
    """The result of :func:`evaluate`.

    Attributes:
        dataset: the dataset's name.
        metrics: overall metrics (:data:`~mllm_ris.eval.metrics.METRIC_KEYS` + ``samples``),
            fractions in [0, 1] or None where undefined.
        splits: split → metrics dict, in order of first appearance.
        difficulty: SynthRef difficulty level → metrics dict; empty for real datasets.
        samples: number of samples evaluated.
        predictor: the predictor's name.
    """

    dataset: str
    metrics: MetricsDict
    splits: dict[str, MetricsDict] = field(default_factory=dict)
    difficulty: dict[str, MetricsDict] = field(default_factory=dict)
    samples: int = 0
    predictor: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: the metric keys and ``samples`` at top level, then ``dataset``,
        ``predictor``, ``splits`` and ``difficulty`` (group → metrics dict). Fractions, not %."""
        out: dict[str, Any] = {k: self.metrics.get(k) for k in METRIC_KEYS}
        out["samples"] = self.samples
        out["dataset"] = self.dataset
        out["predictor"] = self.predictor
        out["splits"] = {k: dict(v) for k, v in self.splits.items()}
        out["difficulty"] = {k: dict(v) for k, v in self.difficulty.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        """Rebuild a report from :meth:`to_json` output (e.g. a loaded ``metrics.json``)."""
        metrics: MetricsDict = {k: data.get(k) for k in METRIC_KEYS}
        metrics["samples"] = int(data.get("samples", 0))
        return cls(
            dataset=str(data.get("dataset", "")),
            metrics=metrics,
            splits=dict(data.get("splits", {})),
            difficulty=dict(data.get("difficulty", {})),
            samples=int(data.get("samples", 0)),
            predictor=str(data.get("predictor", "")),
        )

    def _group_rows(self) -> list[tuple[str, MetricsDict]]:
        """(label, metrics) for overall, each split and each difficulty level."""
        rows = [("overall", self.metrics)]
        rows += [(f"split {k}", v) for k, v in self.splits.items()]
        rows += [(f"difficulty {k}", v) for k, v in self.difficulty.items()]
        return rows

    def to_markdown(self) -> str:
        """Markdown: an overall table, a per-split table, a per-difficulty table when there are
        levels, and the conventions in one line beneath. Metrics in % with 2 decimals."""

        def row(name: str | None, m: MetricsDict) -> list[str]:
            cells = [str(m.get("samples", 0))] + [_pct(m.get(k)) for k in METRIC_KEYS]
            return cells if name is None else [name, *cells]

        header = ["samples", *METRIC_KEYS]
        parts = [
            f"# Evaluation: {self.dataset} — predictor {self.predictor}",
            f"{self.samples} samples.",
            "## Overall",
            _md_table(header, [row(None, self.metrics)]),
            "## Per split",
            _md_table(["split", *header], [row(k, v) for k, v in self.splits.items()]),
        ]
        if self.difficulty:
            parts += [
                "## Per difficulty",
                _md_table(["difficulty", *header], [row(k, v) for k, v in self.difficulty.items()]),
            ]
        parts.append(f"_{CONVENTIONS_LINE}_")
        return "\n\n".join(parts) + "\n"

    def render_table(self) -> Table:
        """A rich :class:`~rich.table.Table` for the console: one row per metric (in %), one
        column per group (overall, each split, each SynthRef difficulty), so it fits 80 columns."""
        rows = self._group_rows()
        table = Table(title=f"{self.dataset} — {self.predictor}", caption="values in %; see docs/metrics.md")
        table.add_column("metric", style="bold")
        for label, _ in rows:
            table.add_column(label, justify="right")
        table.add_row("samples", *(str(m.get("samples", 0)) for _, m in rows))
        for key in METRIC_KEYS:
            table.add_row(key, *(_pct(m.get(key)) for _, m in rows))
        return table

    def save(self, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (created if needed), each
        atomically (temporary file, then ``os.replace``).

        Returns:
            ``(json_path, markdown_path)``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "metrics.json", out / "metrics.md"
        _atomic_write(json_path, json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        _atomic_write(md_path, self.to_markdown())
        return json_path, md_path
