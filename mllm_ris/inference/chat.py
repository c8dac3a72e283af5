"""Multi-turn grounded chat about one image: :class:`ChatSession` and the ``mllm-ris chat`` REPL.

Each question is asked with the conversation so far (the model's own earlier answers included, in
the multi-turn chat template), so "and the shape left of it?" reaches the model after "segment the
red circle" and its answer. Questions are used as typed (plain ``segment`` queries instead say
"Please segment {query}."). The history keeps the last ``max_history`` answered turns.

REPL: one question per line; ``reset`` forgets the conversation; ``quit`` / ``exit`` / end of input
ends it; empty lines are ignored. A question the pipeline refuses (too long, only control
characters …) prints one ``mllm-ris: error: …`` line on stderr, is not added to the history, and
the session goes on; the exit code is then 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from mllm_ris.errors import MllmRisError
from mllm_ris.inference.pipeline import RISPipeline, check_query, load_image
from mllm_ris.inference.results import RISResult, ensure_out_dir, write_result_files
from mllm_ris.inference.segment import summary_line
from mllm_ris.processing.processor import Turn

__all__ = ["ChatSession", "run_chat"]

_QUIT = {"quit", "exit", ":q"}


class ChatSession:
    """A conversation about one image.

    Args:
        pipeline: the model.
        image: a path, PIL image or array (read once, validated).
        max_history: answered turns kept as context (older ones are dropped).
    """

    def __init__(self, pipeline: RISPipeline, image: Any, *, max_history: int = 8) -> None:
        if max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {max_history}")
        self.pipeline = pipeline
        self.image: np.ndarray = load_image(image, max_pixels=pipeline.max_pixels)
        self.max_history = max_history
        self.history: list[Turn] = []

    def ask(self, question: str) -> RISResult:
        """Ask ``question`` with the history; the answered turn joins the history.

        Raises:
            InputError: the question (or the conversation with it) is refused; the history is unchanged.
        """
        question = check_query(question, what="question")
        context = self.history[-self.max_history :] if self.max_history else []
        turns = [*context, Turn(question)]
        result = self.pipeline(self.image, turns)
        self.history.append(Turn(result.question, result.answer_text))
        return result

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()


def run_chat(
    pipeline: RISPipeline,
    image: str | Path,
    *,
    lines: Iterable[str],
    stdout: TextIO,
    stderr: TextIO,
    out_dir: str | Path | None = None,
    interactive: bool = False,
) -> int:
    """The REPL (module docstring): read ``lines``, print answers; with ``out_dir`` write
    ``<stem>_turn<N>_mask.png`` / ``_overlay.png`` / ``.json`` per answered turn.

    Returns:
        0, or 2 when any question was refused.
    """
    path = Path(image)
    session = ChatSession(pipeline, path)
    out = ensure_out_dir(out_dir) if out_dir is not None else None
    h, w = session.image.shape[:2]
    print(f"chat about {path} ({w}x{h}); model {pipeline.source}. 'reset' forgets, 'quit' ends.", file=stdout)
    failed, turn = False, 0
    prompt = "> " if interactive else ""
    for raw in _prompted(lines, prompt, stdout):
        text = raw.strip()
        if not text:
            continue
        if text.lower() in _QUIT:
            break
        if text.lower() == "reset":
            session.reset()
            print("(conversation cleared)", file=stdout)
            continue
        try:
            result = session.ask(text)
        except MllmRisError as exc:
            print(f"mllm-ris: error: {exc}", file=stderr)
            failed = True
            continue
        turn += 1
        line = f"[{turn}] {summary_line(result)}"
        if out is not None:
            files = write_result_files(
                out,
                f"{path.stem}_turn{turn}",
                session.image,
                result,
                dict(
                    image=str(path),
                    question=result.question,
                    turn=turn,
                    model=pipeline.source,
                    history=[{"question": t.question, "answer": t.answer} for t in result.turns[:-1]],
                ),
            )
            line += f" → {files.overlay}"
        print(line, file=stdout, flush=True)
    return 2 if failed else 0


def _prompted(lines: Iterable[str], prompt: str, stdout: TextIO) -> Iterable[str]:
    """Yield ``lines``, printing ``prompt`` before each read (interactive sessions only)."""
    iterator = iter(lines)
    while True:
        if prompt:
            print(prompt, end="", file=stdout, flush=True)
        try:
            yield next(iterator)
        except StopIteration:
            if prompt:
                print(file=stdout)
            return
