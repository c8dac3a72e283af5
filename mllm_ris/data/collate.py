"""From :class:`RISSample` to model-ready tensors: letterbox resize, normalise, batch.

Images are resized so the longest side is ``size`` and padded bottom/right to ``size x size``
(the SAM / LISA convention), so a prediction at model resolution maps back to the original image
by cropping the padding and resizing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mllm_ris.data.sample import RISSample

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RISBatch", "RISTransform", "collate_ris", "unletterbox"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class RISBatch:
    """A batch for training or inference (one expression per item).

    Attributes:
        images: ``(B, 3, S, S)`` float, normalised.
        targets: ``(B, S, S)`` float in {0, 1}: union of the item's target masks.
        valid: ``(B, S, S)`` bool: inside the image (not padding) and not an ignore pixel.
        has_target: ``(B,)`` bool: False for no-target / negative expressions.
        texts: the ``B`` expressions.
        hw: original ``(H, W)`` of each image.
        difficulty: SynthRef difficulty per item (None for real data).
        samples: the source samples when kept (evaluation needs the full-resolution targets).
    """

    images: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    has_target: torch.Tensor
    texts: list[str]
    hw: list[tuple[int, int]]
    difficulty: list[str | None]
    samples: list[RISSample] = field(default_factory=list)

    def to(self, device: torch.device | str) -> RISBatch:
        """Move the tensors to ``device`` (returns self)."""
        for name in ("images", "targets", "valid", "has_target"):
            setattr(self, name, getattr(self, name).to(device))
        return self


class RISTransform:
    """Letterbox one sample to ``size x size`` tensors.

    Args:
        size: output side S in pixels.
        mean, std: per-channel normalisation of the [0, 1] image.
    """

    def __init__(
        self,
        size: int,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def scaled_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size of the resized image inside the ``S x S`` canvas."""
        scale = self.size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))

    def __call__(self, sample: RISSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns image ``(3, S, S)`` float, target ``(S, S)`` float, valid ``(S, S)`` bool."""
        h, w = sample.image.shape[:2]
        nh, nw = self.scaled_hw(h, w)
        s = self.size
        # (H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]
        img = torch.tensor(sample.image, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0  # one copy
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        image = torch.zeros(3, s, s)
        image[:, :nh, :nw] = (img - self.mean) / self.std  # padding stays 0 = the mean colour

        target = torch.zeros(s, s)
        target[:nh, :nw] = _resize_mask(sample.target, nh, nw)
        valid = torch.zeros(s, s, dtype=torch.bool)
        valid[:nh, :nw] = True
        if sample.ignore is not None:
            valid[:nh, :nw] &= _resize_mask(sample.ignore, nh, nw) < 0.5
        return image, target, valid


def _resize_mask(mask: np.ndarray, h: int, w: int) -> torch.Tensor:
    """``(H0, W0)`` bool -> ``(h, w)`` float in {0, 1} (nearest)."""
    m = torch.tensor(mask, dtype=torch.float32)[None, None]  # (1, 1, H0, W0)
    return F.interpolate(m, size=(h, w), mode="nearest")[0, 0]


def collate_ris(
    samples: Sequence[RISSample], transform: RISTransform, *, keep_samples: bool = False
) -> RISBatch:
    """Transform and stack samples into a :class:`RISBatch`."""
    parts = [transform(s) for s in samples]
    return RISBatch(
        images=torch.stack([p[0] for p in parts]),
        targets=torch.stack([p[1] for p in parts]),
        valid=torch.stack([p[2] for p in parts]),
        has_target=torch.tensor([not s.no_target for s in samples], dtype=torch.bool),
        texts=[s.text for s in samples],
        hw=[(int(s.image.shape[0]), int(s.image.shape[1])) for s in samples],
        difficulty=[s.difficulty for s in samples],
        samples=list(samples) if keep_samples else [],
    )


def unletterbox(logits: torch.Tensor, hw: tuple[int, int], transform: RISTransform) -> torch.Tensor:
    """Map model-resolution logits back to the original image.

    Args:
        logits: ``(..., s, s)`` at any resolution ``s`` of the letterboxed canvas (e.g. S/4).
        hw: the original ``(H, W)``.

    Returns:
        ``(..., H, W)`` logits (crop the padding, bilinear resize).
    """
    h, w = hw
    nh, nw = transform.scaled_hw(h, w)
    s = logits.shape[-1]
    ch, cw = max(1, round(nh * s / transform.size)), max(1, round(nw * s / transform.size))
    lead = logits.shape[:-2]
    x = logits[..., :ch, :cw].reshape(-1, 1, ch, cw)  # (N, 1, ch, cw) for interpolate
    x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    return x.reshape(*lead, h, w)
