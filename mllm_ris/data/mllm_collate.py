"""Batches for MLLM mode: letterboxed images, one mask per target, superpixels and the chat tokens.

:class:`MLLMCollator` turns :class:`RISSample` objects into an :class:`MLLMBatch`:

* the image, the union target and the valid area exactly as classic mode (:class:`RISTransform`);
* ``target_masks (B, T, S, S)``: each target instance letterboxed (nearest), zero-padded to the
  largest ``T`` in the batch, ``target_valid (B, T)`` marking real ones (``T = 0`` for negatives);
* ``superpixels (B, S, S)`` long: the generator's label map of the *original* image (so a disk
  cache keyed on image content is hit across epochs and sizes), resized nearest into the
  letterbox, ``-1`` on the padding (the projector ignores negative labels);
* ``regions`` (``descriptors=True``): each region's shape crop, CIELAB colour and geometry
  (:func:`mllm_ris.processing.regions.region_descriptors`) on the letterboxed canvas, regions in
  token order (the superpixel projector's :meth:`region_labels` numbering);
* the conversation: one turn per sample (``ChatTemplate``), answered with one ``[SEG]`` per target
  or ``[REJ]`` when training, left open (a prompt) for inference; right-padded ``input_ids``,
  ``attention_mask`` and ``labels`` (answer tokens only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mllm_ris.data.collate import RISBatch, RISTransform, collate_ris
from mllm_ris.data.conversation import ChatTemplate, collate_conversations
from mllm_ris.data.sample import RISSample
from mllm_ris.processing.labels import token_order_labels
from mllm_ris.processing.memo import LruMemo, digest
from mllm_ris.processing.regions import (
    RegionDescriptorBatch,
    RegionDescriptors,
    batch_region_descriptors,
    region_descriptors,
)

__all__ = ["MLLMBatch", "MLLMCollator", "letterbox_labels", "letterbox_masks"]

DESCRIPTOR_MEMO = 4096  # canvases whose region descriptors a collator keeps (~50 KB each at 48 regions)
SuperpixelFn = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> (H, W) int labels


@dataclass
class MLLMBatch(RISBatch):
    """A :class:`RISBatch` plus what MLLM mode needs (``S`` = canvas side, ``L`` = tokens).

    Attributes:
        target_masks: ``(B, T, S, S)`` float in {0, 1}, one per target, zero-padded.
        target_valid: ``(B, T)`` bool, True for real targets.
        superpixels: ``(B, S, S)`` long labels, ``-1`` outside the image; None without a generator.
        input_ids, attention_mask, labels: ``(B, L)`` long; ``labels`` is -100 off the answers (None
            without a tokenizer).
        regions: region descriptors ``(B, K, ...)`` in token order (``descriptors=True``), else None.
    """

    target_masks: torch.Tensor | None = None
    target_valid: torch.Tensor | None = None
    superpixels: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    regions: RegionDescriptorBatch | None = None

    @property
    def target_counts(self) -> torch.Tensor:
        """``(B,)`` long: targets per sample (0 for no-target)."""
        assert self.target_valid is not None
        return self.target_valid.sum(1)

    def to(self, device: torch.device | str) -> MLLMBatch:
        """Move every tensor to ``device`` (returns self)."""
        super().to(device)
        for name in ("target_masks", "target_valid", "superpixels", "input_ids", "attention_mask", "labels"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.regions is not None:
            self.regions = self.regions.to(device)
        return self


def letterbox_masks(masks: np.ndarray, transform: RISTransform) -> torch.Tensor:
    """``(T, H, W)`` bool → ``(T, S, S)`` float in {0, 1}: resized nearest into the letterbox."""
    t, h, w = masks.shape
    nh, nw = transform.scaled_hw(h, w)
    out = torch.zeros(t, transform.size, transform.size)
    if t:
        m = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]  # (T, 1, H, W)
        out[:, :nh, :nw] = F.interpolate(m, size=(nh, nw), mode="nearest")[:, 0]
    return out


def letterbox_labels(labels: np.ndarray, transform: RISTransform) -> torch.Tensor:
    """``(H, W)`` int labels → ``(S, S)`` long: nearest into the letterbox, ``-1`` on the padding."""
    h, w = labels.shape
    nh, nw = transform.scaled_hw(h, w)
    # nearest-neighbour index sampling keeps label ids exact (no float interpolation of ids)
    rows = (torch.arange(nh) * h // nh).clamp_max(h - 1)
    cols = (torch.arange(nw) * w // nw).clamp_max(w - 1)
    src = torch.from_numpy(np.ascontiguousarray(labels)).long()
    out = torch.full((transform.size, transform.size), -1, dtype=torch.long)
    out[:nh, :nw] = src[rows][:, cols]
    return out


class MLLMCollator:
    """``list[RISSample]`` → :class:`MLLMBatch` (a DataLoader ``collate_fn``).

    Args:
        transform: the letterbox (canvas side ``S``).
        tokenizer: the grounding LLM's tokenizer (with ``<image>``, ``[SEG]``, ``[REJ]`` added); None
            = no chat (classic mode's region pointer: targets, superpixels and descriptors only).
        template: question phrasings (seeded).
        superpixels: label-map generator (e.g. a :class:`SuperpixelCache`); None for patch tokens.
        answers: True to append the answer (training); False leaves the turn open (inference).
        keep_samples: keep the source samples in the batch (evaluation needs them).
        descriptors: also compute region descriptors (needs ``superpixels``).
    """

    def __init__(
        self,
        *,
        transform: RISTransform,
        tokenizer: PreTrainedTokenizerBase | None,
        template: ChatTemplate | None = None,
        superpixels: SuperpixelFn | None = None,
        answers: bool = True,
        keep_samples: bool = False,
        descriptors: bool = False,
    ) -> None:
        if tokenizer is not None and tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer has no pad token; call mllm_ris.modeling.tokens.ensure_special_tokens"
            )
        self.transform = transform
        self.tokenizer = tokenizer
        self.template = template or ChatTemplate()
        self.superpixels = superpixels
        self.answers = answers
        self.keep_samples = keep_samples
        if descriptors and superpixels is None:
            raise ValueError("descriptors: region descriptors need a superpixel generator")
        self.descriptors = descriptors
        # per-canvas descriptors, memoised: rgb2lab and the per-region crops cost ~7 ms per 128 px image,
        # the hash of canvas + label map ~0.05 ms; epochs revisit the same images
        self._memo: LruMemo[RegionDescriptors] = LruMemo(DESCRIPTOR_MEMO)

    def __call__(self, samples: Sequence[RISSample]) -> MLLMBatch:
        base = collate_ris(samples, self.transform, keep_samples=self.keep_samples)
        t_max = max((s.masks.shape[0] for s in samples), default=0)
        size = self.transform.size
        targets = torch.zeros(len(samples), t_max, size, size)
        target_valid = torch.zeros(len(samples), t_max, dtype=torch.bool)
        encoded = []
        for i, sample in enumerate(samples):
            t = sample.masks.shape[0]
            targets[i, :t] = letterbox_masks(sample.masks, self.transform)
            target_valid[i, :t] = True
            if self.tokenizer is not None:
                turns = self.template.turns([sample.text], [t if self.answers else None])
                encoded.append(self.template.encode(turns, self.tokenizer))
        input_ids = attention_mask = labels = None
        if self.tokenizer is not None:
            pad = int(self.tokenizer.pad_token_id)  # type: ignore[arg-type]
            input_ids, attention_mask, labels = collate_conversations(encoded, pad_id=pad)
        superpixels, regions = None, None
        if self.superpixels is not None:
            superpixels = torch.stack(
                [letterbox_labels(self.superpixels(s.image), self.transform) for s in samples]
            )  # (B, S, S)
            if self.descriptors:
                regions = self._descriptors(base.images, superpixels)
        return MLLMBatch(
            **{f: getattr(base, f) for f in RISBatch.__dataclass_fields__},
            target_masks=targets,
            target_valid=target_valid,
            superpixels=superpixels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            regions=regions,
        )

    def _descriptors(self, images: torch.Tensor, superpixels: torch.Tensor) -> RegionDescriptorBatch:
        """Descriptors of the letterboxed canvases ``images (B, 3, S, S)`` (normalised by the transform)
        over ``superpixels (B, S, S)``, regions numbered as the superpixel projector numbers its tokens;
        memoised per (canvas, label map), the last :data:`DESCRIPTOR_MEMO` of them."""
        transform = self.transform
        x01 = images * transform.std + transform.mean  # (B, 3, S, S) back to [0, 1], the transform's stats
        canvas = x01.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()  # (B, S, S, 3) uint8
        dense = token_order_labels(superpixels).numpy()  # (B, S, S), ids 0..K_b-1, -1 = none
        per_image = []
        for c, d in zip(canvas, dense, strict=True):
            key = digest(c, d)
            found = self._memo.get(key)
            if found is None:
                found = region_descriptors(c, d)
                self._memo.put(key, found)
            per_image.append(found)
        return batch_region_descriptors(per_image)
