"""What a training run reports: :class:`TrainSummary` (also written as ``output_dir/summary.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mllm_ris.eval.evaluate import EvalReport

__all__ = ["TrainSummary"]


@dataclass
class TrainSummary:
    """What a run (one invocation) did.

    Attributes:
        steps: the optimizer step reached (counted from the start of training).
        samples: samples consumed by this invocation, all ranks together.
        seconds: training time of this invocation, without evaluation and checkpoint writes.
        final_loss: mean loss of the last 20 applied steps.
        losses: loss per step of this invocation (NaN for a skipped step).
        eval: final evaluation reports by dataset label.
        start_step: the step this invocation resumed from (0 for a fresh run).
        bad_steps: steps skipped for a non-finite loss / gradient norm, since the start of training.
        interrupted: ``"SIGTERM"`` / ``"SIGINT"`` when a signal stopped the run.
        checkpoint: the last complete checkpoint written.
        param_digests: a fingerprint of the trainable parameters on each rank (None under ZeRO-3,
            where ranks hold different shards); all equal when the ranks are in sync.
    """

    steps: int
    samples: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    eval: dict[str, EvalReport] = field(default_factory=dict)
    output_dir: str | None = None
    start_step: int = 0
    bad_steps: int = 0
    interrupted: str | None = None
    checkpoint: str | None = None
    param_digests: list[str | None] = field(default_factory=list)

    @classmethod
    def of_run(cls, *, losses: list[float], **fields_: Any) -> TrainSummary:
        """A summary whose ``final_loss`` is the mean of the last 20 applied (finite) losses."""
        applied = [x for x in losses if math.isfinite(x)]
        final = sum(applied[-20:]) / len(applied[-20:]) if applied else math.nan
        return cls(final_loss=final, losses=losses, **fields_)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (evaluation reports as their headline metrics)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "eval"}
        data["losses"] = [None if not math.isfinite(x) else x for x in self.losses]
        data["final_loss"] = self.final_loss if math.isfinite(self.final_loss) else None
        headline = ("cIoU", "mIoU", "gIoU")
        data["eval"] = {k: {m: r.metrics.get(m) for m in headline} for k, r in self.eval.items()}
        return data

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` (``output_dir/summary.json``)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
