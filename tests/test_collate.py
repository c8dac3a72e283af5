"""Letterbox transform, batching and the inverse mapping back to the original image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllm_ris.data.sample import RISSample
from mllm_ris.processing.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_COLOR,
    RISTransform,
    collate_ris,
    unletterbox,
)


def _sample(h: int, w: int, *, box: tuple[int, int, int, int] | None, ignore: bool = False) -> RISSample:
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    masks = np.zeros((0 if box is None else 1, h, w), dtype=bool)
    if box is not None:
        x0, y0, x1, y1 = box
        masks[0, y0:y1, x0:x1] = True
        image[y0:y1, x0:x1] = (255, 0, 0)
    ign = None
    if ignore:
        ign = np.zeros((h, w), dtype=bool)
        ign[:, : w // 4] = True
    return RISSample(
        image=image, masks=masks, text="red box", dataset="t", split="val", image_id=1, ref_id=1, sent_id=1,
        exist=box is not None, ignore=ign,
    )  # fmt: skip


def test_letterbox_places_image_top_left() -> None:
    tf = RISTransform(64)
    image, target, valid = tf(_sample(32, 64, box=(0, 0, 16, 8)))
    assert image.shape == (3, 64, 64) and target.shape == (64, 64) and valid.dtype == torch.bool
    assert valid[:32].all() and not valid[32:].any()  # 32x64 -> 32x64 inside a 64x64 canvas
    assert target[:8, :16].eq(1).all() and target.sum() == 8 * 16
    # padding is the ImageNet mean colour: 0 after ImageNet normalisation (what the pixel encoder reads)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(image[:, 40:], torch.tensor(PAD_COLOR).view(3, 1, 1).expand(3, 24, 64))
    assert ((image[:, 40:] - mean) / std).abs().max() == 0
    assert image.min() >= 0 and image.max() <= 1  # [0, 1] RGB, not normalised


def test_ignore_pixels_are_not_valid() -> None:
    _, _, valid = RISTransform(32)(_sample(32, 32, box=(8, 8, 24, 24), ignore=True))
    assert not valid[:, :8].any() and valid[:, 8:].all()


def test_collate_batches_and_flags() -> None:
    tf = RISTransform(32)
    batch = collate_ris([_sample(32, 48, box=(1, 1, 9, 9)), _sample(40, 20, box=None)], tf, keep_samples=True)
    assert batch.images.shape == (2, 3, 32, 32)
    assert batch.has_target.tolist() == [True, False]
    assert batch.hw == [(32, 48), (40, 20)] and len(batch.samples) == 2
    assert batch.targets[1].sum() == 0


@pytest.mark.parametrize(("h", "w"), [(64, 96), (96, 64), (50, 50)])
def test_unletterbox_inverts_the_transform(h: int, w: int) -> None:
    tf = RISTransform(64)
    sample = _sample(h, w, box=(10, 12, 40, 44))
    _, target, _ = tf(sample)
    logits = target * 20 - 10  # (S, S) logits of the letterboxed target
    back = unletterbox(logits[None], (h, w), tf)[0] > 0  # (H, W)
    truth = torch.from_numpy(sample.target)
    iou = (back & truth).sum() / (back | truth).sum()
    assert back.shape == (h, w) and iou > 0.9


def test_transform_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size must be >= 16"):
        RISTransform(8)
