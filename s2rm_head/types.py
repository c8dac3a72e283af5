"""Typed inputs and outputs shared by every fusion head, pixel encoder and text encoder.

Shapes are part of the contract:

* pixel pyramid: ``list`` of 4 tensors ``(B, C_i, H_i, W_i)`` at strides 4, 8, 16, 32 of the
  input image (finest first);
* :class:`LanguageFeatures`: word-level tokens ``(B, L, D)`` with a validity mask ``(B, L)`` and
  one query per target ``(B, T, D)`` (classic mode: the sentence embedding, ``T = 1``; MLLM mode:
  the grounding embeddings of the ``[SEG]`` tokens);
* :class:`HeadOutput`: mask logits ``(B, T, H/4, W/4)`` and a predicted IoU per mask ``(B, T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["HeadOutput", "LanguageFeatures"]


@dataclass
class LanguageFeatures:
    """Language side of the fusion.

    Attributes:
        tokens: ``(B, L, D)`` word states (may be empty, ``L = 0``, when only queries exist).
        mask: ``(B, L)`` bool, True for real tokens.
        queries: ``(B, T, D)`` one embedding per target to segment.
        query_mask: ``(B, T)`` bool, True for real queries (padding when samples have different T).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    queries: torch.Tensor
    query_mask: torch.Tensor

    def __post_init__(self) -> None:
        b, length, d = self.tokens.shape
        if self.mask.shape != (b, length):
            raise ValueError(f"mask shape {tuple(self.mask.shape)} != tokens (B, L) = {(b, length)}")
        if self.queries.dim() != 3 or self.queries.shape[0] != b or self.queries.shape[2] != d:
            raise ValueError(f"queries shape {tuple(self.queries.shape)} does not fit (B={b}, T, D={d})")
        if self.query_mask.shape != self.queries.shape[:2]:
            want = tuple(self.queries.shape[:2])
            raise ValueError(f"query_mask shape {tuple(self.query_mask.shape)} != queries (B, T) = {want}")

    @classmethod
    def from_sentence(
        cls, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor
    ) -> LanguageFeatures:
        """Classic mode: word states ``(B, L, D)`` + sentence embedding ``(B, D)`` as the one query."""
        queries = pooled[:, None, :]  # (B, 1, D)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        return cls(tokens=tokens, mask=mask.bool(), queries=queries, query_mask=query_mask)

    @property
    def num_targets(self) -> int:
        """T, the number of query slots."""
        return self.queries.shape[1]


class HeadOutput(NamedTuple):
    """What a fusion head returns.

    A ``NamedTuple``, not a dataclass: DeepSpeed ZeRO-3 finds a module's output tensors (to hook
    its pre-backward parameter fetch) only in tensors, tuples (named ones included), lists and
    dicts. Inside a dataclass they stay hidden, and the first backward of a ZeRO-3 run fails with
    ``active_backward_submodules is empty`` (see docs/training.md, "ZeRO-3").

    Attributes:
        mask_logits: ``(B, T, H/4, W/4)`` one logit map per query.
        iou_pred: ``(B, T)`` predicted IoU of each mask (sigmoid-free regression target in [0, 1]).
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
