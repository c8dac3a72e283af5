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

from typing import NamedTuple

import torch

__all__ = ["HeadOutput", "LanguageFeatures", "pad_query_slot"]


class _LanguageFields(NamedTuple):
    tokens: torch.Tensor
    mask: torch.Tensor
    queries: torch.Tensor
    query_mask: torch.Tensor


class LanguageFeatures(_LanguageFields):
    """Language side of the fusion.

    A ``NamedTuple`` (checked on construction), not a dataclass: the classic text encoder returns it
    and every head takes it, and DeepSpeed ZeRO-3's module hooks see tensors only in tensors,
    tuples (named ones too), lists and dicts (see :class:`HeadOutput`).

    Attributes:
        tokens: ``(B, L, D)`` word states (may be empty, ``L = 0``, when only queries exist).
        mask: ``(B, L)`` bool, True for real tokens.
        queries: ``(B, T, D)`` one embedding per target to segment.
        query_mask: ``(B, T)`` bool, True for real queries (padding when samples have different T).

    Raises:
        ValueError: the shapes do not fit together.
    """

    __slots__ = ()

    def __new__(
        cls, tokens: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor, query_mask: torch.Tensor
    ) -> LanguageFeatures:
        b, length, d = tokens.shape
        if mask.shape != (b, length):
            raise ValueError(f"mask shape {tuple(mask.shape)} != tokens (B, L) = {(b, length)}")
        if queries.dim() != 3 or queries.shape[0] != b or queries.shape[2] != d:
            raise ValueError(f"queries shape {tuple(queries.shape)} does not fit (B={b}, T, D={d})")
        if query_mask.shape != queries.shape[:2]:
            want = tuple(queries.shape[:2])
            raise ValueError(f"query_mask shape {tuple(query_mask.shape)} != queries (B, T) = {want}")
        return super().__new__(cls, tokens, mask, queries, query_mask)

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


def pad_query_slot(lang: LanguageFeatures) -> LanguageFeatures:
    """``lang`` with one more query slot, zero and padded (``query_mask`` False): ``(B, T, D)`` →
    ``(B, T + 1, D)``. The zeros are appended to ``lang.queries`` itself, so whatever produced the
    queries stays in the graph even when ``T = 0`` (its gradients are zeros, not missing)."""
    queries = torch.nn.functional.pad(lang.queries, (0, 0, 0, 1))  # (B, T + 1, D)
    pad = lang.query_mask.new_zeros(lang.query_mask.shape[0], 1)  # (B, 1) False
    return LanguageFeatures(
        tokens=lang.tokens, mask=lang.mask, queries=queries, query_mask=torch.cat([lang.query_mask, pad], 1)
    )
