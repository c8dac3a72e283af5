"""What the pipeline returns: :class:`Prediction` (one mask) and :class:`RISResult` (one query's answer)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from mllm_ris.data.conversation import Turn

__all__ = ["Prediction", "RISResult"]


@dataclass(eq=False)  # masks are arrays: compare fields explicitly
class Prediction:
    """One segmented object.

    Attributes:
        mask: ``(H, W)`` bool at the original image size.
        score: the model's predicted IoU of the mask.
        rle: COCO RLE of ``mask`` (``{"size": [H, W], "counts": str}``).
        box: COCO ``[x, y, w, h]`` of the mask (``[0, 0, 0, 0]`` when it is empty).
        answer_text: the model's answer this mask belongs to.
    """

    mask: np.ndarray
    score: float
    rle: dict[str, Any]
    box: list[int]
    answer_text: str

    def to_json(self) -> dict[str, Any]:
        """``score``, ``box``, ``area`` and ``rle`` (no pixel array)."""
        return {"score": self.score, "box": self.box, "area": int(self.mask.sum()), "rle": self.rle}


@dataclass(eq=False)
class RISResult(Sequence[Prediction]):
    """The result of one (image, query): a sequence of :class:`Prediction` (empty = "no such object").

    Attributes:
        predictions: one per ``[SEG]`` the model generated (mllm) or the one mask (classic).
        answer_text: the model's answer (``"Sure, it is [SEG]."``, ``"… [REJ]."``); classic mode
            writes ``"[SEG]"`` / ``"[REJ]"``.
        no_target_prob: the model's probability that nothing matches.
        image_hw: ``(H, W)`` of the input image.
        question: the question the model answered (the last turn).
    """

    predictions: list[Prediction]
    answer_text: str
    no_target_prob: float
    image_hw: tuple[int, int]
    question: str = ""
    turns: list[Turn] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.predictions)

    @overload
    def __getitem__(self, i: int) -> Prediction: ...
    @overload
    def __getitem__(self, i: slice) -> list[Prediction]: ...
    def __getitem__(self, i: int | slice) -> Prediction | list[Prediction]:
        return self.predictions[i]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    @property
    def rejected(self) -> bool:
        """True when the model found nothing (``[REJ]``, no ``[SEG]``, or an empty classic mask)."""
        return not self.predictions

    def union_mask(self) -> np.ndarray:
        """``(H, W)`` bool: every mask together (all False when rejected)."""
        out = np.zeros(self.image_hw, dtype=bool)
        for p in self.predictions:
            out |= p.mask
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (no pixel arrays)."""
        h, w = self.image_hw
        return {
            "question": self.question,
            "answer": self.answer_text,
            "no_target_prob": self.no_target_prob,
            "height": h,
            "width": w,
            "predictions": [p.to_json() for p in self.predictions],
        }
