"""The contract between a visual projector and the grounding LLM."""

from __future__ import annotations

from typing import NamedTuple

import torch


class _VisualTokenFields(NamedTuple):
    embeds: torch.Tensor
    mask: torch.Tensor


class VisualTokens(_VisualTokenFields):
    """Visual tokens for a batch of images, padded to the longest image.

    A ``NamedTuple`` (checked on construction), not a dataclass: the projector returns it and the
    grounding LLM takes it, and DeepSpeed ZeRO-3 finds a module's output and input tensors (to
    hook its backward parameter fetch and release) only in tensors, tuples (named ones too), lists
    and dicts (see ``s2rm_head.types.HeadOutput`` and docs/training.md, "ZeRO-3").

    Attributes:
        embeds: ``(B, K, D)`` float, token embeddings at the LLM width ``D``; padded rows are zero.
        mask: ``(B, K)`` bool, True where a token is real. ``K`` varies per image for superpixel
            projectors (``mask.sum(1)`` gives each image's token count) and is constant for patches.

    Raises:
        ValueError: ``embeds`` is not ``(B, K, D)`` or ``mask`` is not ``(B, K)``.
    """

    __slots__ = ()

    def __new__(cls, embeds: torch.Tensor, mask: torch.Tensor) -> VisualTokens:
        if embeds.dim() != 3 or mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"VisualTokens: embeds {tuple(embeds.shape)} must be (B, K, D) "
                f"and mask {tuple(mask.shape)} must be (B, K)"
            )
        return super().__new__(cls, embeds, mask)

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` long: real tokens per image."""
        return self.mask.sum(dim=1)
