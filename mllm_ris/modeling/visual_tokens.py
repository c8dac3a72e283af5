"""The contract between a visual projector and the grounding LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualTokens:
    """Visual tokens for a batch of images, padded to the longest image.

    Attributes:
        embeds: ``(B, K, D)`` float, token embeddings at the LLM width ``D``; padded rows are zero.
        mask: ``(B, K)`` bool, True where a token is real. ``K`` varies per image for superpixel
            projectors (``mask.sum(1)`` gives each image's token count) and is constant for patches.
    """

    embeds: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"VisualTokens: embeds {tuple(self.embeds.shape)} must be (B, K, D) "
                f"and mask {tuple(self.mask.shape)} must be (B, K)"
            )

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` long: real tokens per image."""
        return self.mask.sum(dim=1)
