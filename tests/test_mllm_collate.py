"""MLLM-mode batches: per-target masks, letterboxed superpixels and the chat tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllm_ris.data.sample import RISSample
from mllm_ris.modeling.llm import SEG_TOKEN, add_grounding_tokens, load_tokenizer
from mllm_ris.processing.processor import (
    IGNORE_INDEX,
    Processor,
    RISTransform,
    letterbox_labels,
    letterbox_masks,
)


def _sample(h: int, w: int, boxes: list[tuple[int, int, int, int]], text: str = "the red box") -> RISSample:
    image = np.full((h, w, 3), 90, dtype=np.uint8)
    masks = np.zeros((len(boxes), h, w), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
        image[y0:y1, x0:x1] = (255, 0, 0)
    return RISSample(
        image=image, masks=masks, text=text, dataset="t", split="train", image_id=1, ref_id=1, sent_id=1,
        exist=bool(boxes),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer("bpe")
    add_grounding_tokens(tok)
    return tok


def _halves(image: np.ndarray) -> np.ndarray:
    labels = np.zeros(image.shape[:2], dtype=np.int32)
    labels[:, image.shape[1] // 2 :] = 1
    return labels


def test_letterbox_labels_keep_ids_and_pad_with_minus_one() -> None:
    tf = RISTransform(32)
    labels = np.arange(16 * 64, dtype=np.int32).reshape(16, 64) % 7
    out = letterbox_labels(labels, tf)  # 16x64 -> 8x32 inside 32x32
    assert out.shape == (32, 32) and out.dtype == torch.long
    assert (out[8:] == -1).all() and (out[:8] >= 0).all()
    assert set(out[:8].unique().tolist()) <= set(range(7))


def test_letterbox_masks_per_target() -> None:
    tf = RISTransform(32)
    masks = np.zeros((2, 32, 64), dtype=bool)
    masks[0, :, :32] = True
    masks[1, :, 32:] = True
    out = letterbox_masks(masks, tf)
    assert out.shape == (2, 32, 32)
    assert out[0, :16, :16].eq(1).all() and out[0, :16, 16:].eq(0).all() and out[:, 16:].eq(0).all()


def test_collator_batches_targets_tokens_and_superpixels(tokenizer) -> None:
    tf = RISTransform(32)
    collate = Processor(transform=tf, tokenizer=tokenizer, superpixels=_halves)
    samples = [
        _sample(32, 48, [(1, 1, 9, 9), (20, 2, 30, 12)], "both boxes"),
        _sample(40, 20, [], "the blue circle"),
        _sample(32, 32, [(4, 4, 12, 12)]),
    ]
    batch = collate(samples)
    assert batch.target_masks.shape == (3, 2, 32, 32)
    assert batch.target_valid.tolist() == [[True, True], [False, False], [True, False]]
    assert batch.target_counts.tolist() == [2, 0, 1]
    assert batch.has_target.tolist() == [True, False, True]
    # the union target of the classic batch is the union of the per-target masks
    assert torch.equal(batch.targets, batch.target_masks.amax(1))
    seg = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert (batch.input_ids == seg).sum(1).tolist() == [2, 0, 1]
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape
    # answers are labelled, prompts are not; padding is not attended
    answered = (batch.labels != IGNORE_INDEX).sum(1)
    assert (answered > 0).all() and (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    assert batch.superpixels.shape == (3, 32, 32)
    assert (batch.superpixels[1, :, 16:] == -1).all()  # 40x20 -> 32x16: the right half is padding
    assert batch.to("cpu") is batch


def test_prompt_only_batches_have_no_answer(tokenizer) -> None:
    collate = Processor(transform=RISTransform(32), tokenizer=tokenizer, answers=False, keep_samples=True)
    batch = collate([_sample(32, 32, [(4, 4, 12, 12)])])
    assert (batch.labels == IGNORE_INDEX).all() and batch.superpixels is None and len(batch.samples) == 1
    seg = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert (batch.input_ids == seg).sum() == 0
