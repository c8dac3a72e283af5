"""Run logging on the main process: ``train_log.jsonl``, TensorBoard and a progress bar.

TensorBoard goes through accelerate's tracker (``Accelerator(log_with="tensorboard")``) when the
``tensorboard`` package is installed and ``train.tensorboard`` is true; events land in
``output_dir/tensorboard/``. Every other rank gets no-op calls.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available
from tqdm.auto import tqdm

__all__ = ["RunLog", "flatten_config", "tensorboard_wanted"]

LOG_FILE = "train_log.jsonl"


def tensorboard_wanted(enabled: bool, output_dir: str | None) -> bool:
    """TensorBoard needs the flag, a run folder and the package."""
    return enabled and output_dir is not None and is_tensorboard_available()


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and None become strings (TB hparams)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def _keep_until(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written by a run that died after its last checkpoint)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


class RunLog:
    """One place for what a run reports.

    Args:
        accelerator: decides the main process and owns the TensorBoard tracker.
        output_dir: run folder (None: no files).
        start_step, total_steps: the progress bar's range.
        progress: show the bar (main process only).
        config: the resolved config (stored as TensorBoard hparams).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path | None,
        *,
        start_step: int,
        total_steps: int,
        progress: bool,
        config: dict[str, Any],
    ) -> None:
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.file = None
        if output_dir is not None and self.main:
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / LOG_FILE
            if start_step > 0 and path.is_file():
                _keep_until(path, start_step)
                self.file = path.open("a")
            else:
                self.file = path.open("w")
        self.tensorboard = bool(accelerator.log_with)
        if self.tensorboard:  # on resume, drop events a killed run wrote after its checkpoint
            purge = {"tensorboard": {"purge_step": start_step + 1}} if start_step > 0 else None
            accelerator.init_trackers("tensorboard", config=flatten_config(config), init_kwargs=purge)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not (progress and self.main) or None,
            dynamic_ncols=True,
        )

    def record(self, record: dict[str, Any]) -> None:
        """Append one JSON line and log its numbers to TensorBoard at ``record["step"]``."""
        if not self.main:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard:
            scalars = {
                k: v
                for k, v in record.items()
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
            self.accelerator.log(scalars, step=record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def evaluation(self, reports: dict[str, Any], step: int, output_dir: Path | None) -> None:
        """Log headline metrics of periodic evaluation reports; save them under ``eval/step_N/``."""
        if not self.main:
            return
        record: dict[str, Any] = {"step": step}
        for label, report in reports.items():
            for key in ("cIoU", "mIoU", "gIoU"):
                if report.metrics.get(key) is not None:
                    record[f"eval/{label.replace(':', '/')}/{key}"] = report.metrics[key]
            if output_dir is not None:
                report.save(output_dir / "eval" / f"step_{step:06d}" / label.replace(":", "_"))
        if len(record) > 1:
            self.record(record)

    def advance(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def message(self, text: str) -> None:
        """A line on the console that does not break the bar (main process only)."""
        if self.main:
            self.bar.write(text)

    def close(self) -> None:
        """Close the bar, the file and the trackers."""
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tensorboard:  # not accelerator.end_training(): that also ends the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.tensorboard = False
