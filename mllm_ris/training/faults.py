"""Fault handling: non-finite losses and stop signals.

* :class:`BadStepGuard` counts optimizer steps skipped because the loss (or the gradient norm)
  was NaN / inf (:class:`SkipReason`), and raises :class:`NonFiniteLossError` after
  ``max_bad_steps`` in a row.
* :class:`StopSignals` turns SIGTERM / SIGINT into a flag the training loop polls once per
  micro-batch, so the run saves a checkpoint at the end of the current step and exits. A second
  SIGINT at least ``StopSignals.repeat_after_s`` seconds after the first raises
  ``KeyboardInterrupt`` (the usual "press Ctrl-C twice"); a quicker one is the same Ctrl-C
  arriving twice: from the terminal and forwarded by torchrun (``accelerate launch``).
"""

from __future__ import annotations

import signal
import threading
import time
from enum import StrEnum
from types import FrameType, TracebackType
from typing import Any

from mllm_ris.errors import MllmRisError

__all__ = ["BadStepGuard", "NonFiniteLossError", "SkipReason", "StopSignals", "exit_code_for"]


class SkipReason(StrEnum):
    """Why an optimizer step was skipped; the value is the text logs and errors show."""

    NON_FINITE_LOSS = "loss was NaN / inf"
    NON_FINITE_GRAD_NORM = "gradient norm was NaN / inf"


class NonFiniteLossError(MllmRisError):
    """The loss was NaN / inf for ``train.max_bad_steps`` optimizer steps in a row."""


class BadStepGuard:
    """Counts skipped steps; raises after ``max_consecutive`` in a row.

    Args:
        max_consecutive: ``train.max_bad_steps``.
        total, consecutive: counts restored from a checkpoint.
    """

    def __init__(self, max_consecutive: int, *, total: int = 0, consecutive: int = 0) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = total
        self.consecutive = consecutive

    def good(self) -> None:
        """A step was applied: the run of bad steps is over."""
        self.consecutive = 0

    def bad(self, step: int, what: str, checkpoint: str | None = None) -> None:
        """Step ``step`` was skipped because of ``what`` (e.g. ``"loss nan"``).

        Raises:
            NonFiniteLossError: this was the ``max_consecutive``-th bad step in a row.
        """
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            first = step - self.consecutive + 1
            where = f"; the last checkpoint is {checkpoint}" if checkpoint else "; no checkpoint was written"
            raise NonFiniteLossError(
                f"{what} at {self.consecutive} optimizer steps in a row (steps {first}-{step}, "
                f"{self.total} skipped in this run): stopping{where}. Lower train.lr, enable "
                "train.max_grad_norm, check the data, or raise train.max_bad_steps"
            )


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set :attr:`received` instead of killing.

    Handlers are installed only in the main thread (``signal`` allows nothing else) and the
    previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    repeat_after_s = 2.0
    """A SIGINT this long after the first one stops at once (no checkpoint)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_sigint: float | None = None
        self._previous: dict[int, Any] = {}

    @property
    def received_signal(self) -> signal.Signals | None:
        """``Signals.SIGTERM`` / ``Signals.SIGINT`` once one arrived."""
        return None if self.received is None else signal.Signals(self.received)

    @property
    def name(self) -> str | None:
        """``"SIGTERM"`` / ``"SIGINT"`` once one arrived."""
        return None if self.received is None else signal.Signals(self.received).name

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop as if ``signum`` had arrived (used by the handler and by tests)."""
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is None:
                self._first_sigint = now
            elif now - self._first_sigint >= self.repeat_after_s:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None or signum == signal.SIGTERM:
            self.received = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def exit_code_for(signal_name: str | None) -> int:
    """The shell convention for a run stopped by a signal: ``128 + signum`` (SIGINT 130, SIGTERM 143)."""
    if signal_name is None:
        return 0
    return 128 + int(signal.Signals[signal_name])
