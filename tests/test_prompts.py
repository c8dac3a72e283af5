"""Prompts from the head: geometry of boxes / points / dense, shapes, and every combination through SAM."""

from __future__ import annotations

import itertools

import pytest
import torch

from s2rm_head.sam.prompts import (
    PromptBuilder,
    PromptConfig,
    build_prompt_builder,
    coarse_to_boxes,
    coarse_to_dense,
    coarse_to_points,
)
from s2rm_head.sam.stage import SAMConfig, build_sam_stage

KINDS = ("sparse", "box", "points", "dense")


def _mask(h: int, w: int, *cells: tuple[int, int, int, int], value: float = 5.0) -> torch.Tensor:
    """``(1, 1, h, w)`` logits: -5 background, ``value`` inside each ``(r0, r1, c0, c1)`` block."""
    x = torch.full((1, 1, h, w), -5.0)
    for r0, r1, c0, c1 in cells:
        x[..., r0:r1, c0:c1] = value
    return x


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("sparse", {"sparse": False, "box": False, "points": False, "dense": False}),
        ("grounding_dim", {"grounding_dim": 0}),
        ("num_sparse_tokens", {"num_sparse_tokens": 0}),
        ("num_neg_points", {"num_neg_points": -1}),
        ("num_pos_points", {"num_pos_points": 0, "num_neg_points": 0}),
    ],
)
def test_config_rejects_bad_values(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        PromptConfig(**kwargs)


def test_box_in_sam_pixels() -> None:
    """16x16 head cells on a 64 px SAM canvas: 4 SAM pixels per cell, inclusive pixel corners."""
    logits = torch.cat([_mask(16, 16, (2, 6, 3, 10)), _mask(16, 16)])  # an object, then an empty mask
    boxes = coarse_to_boxes(logits, img_size=64)
    assert boxes.tolist() == [[12.0, 8.0, 39.0, 23.0], [0.0, 0.0, 63.0, 63.0]]  # empty -> whole canvas
    # a 12x16 (non-square) head canvas: the long side still maps to 64 px, so 4 px per cell
    wide = coarse_to_boxes(_mask(12, 16, (0, 12, 0, 16)), img_size=64)
    assert wide.tolist() == [[0.0, 0.0, 63.0, 47.0]]


def test_points_positive_inside_hard_negative_outside() -> None:
    logits = _mask(16, 16, (4, 8, 4, 8))
    logits[..., 6, 5] = 9.0  # the strongest cell of the object
    logits[..., 12, 13] = -1.0  # a distractor the head half-believed (below threshold)
    logits[..., 8, 8] = -0.5  # higher, but touching the mask: excluded by the one-cell dilation
    coords, labels = coarse_to_points(logits, img_size=64, num_pos=1, num_neg=1)
    assert labels.tolist() == [[1, 0]]
    assert coords.tolist() == [[[5 * 4 + 1.5, 6 * 4 + 1.5], [13 * 4 + 1.5, 12 * 4 + 1.5]]]  # (x, y)


def test_points_padding_for_empty_and_full_masks() -> None:
    empty, full = _mask(8, 8), _mask(8, 8, (0, 8, 0, 8))
    empty[..., 3, 2] = -1.0
    coords, labels = coarse_to_points(torch.cat([empty, full]), img_size=32, num_pos=2, num_neg=2)
    assert coords.shape == (2, 4, 2) and labels.dtype == torch.int64
    # empty mask: no positive, hard negatives at the highest cells; full mask: no negative
    assert labels.tolist() == [[-1, -1, 0, 0], [1, 1, -1, -1]]
    assert coords[0, 2].tolist() == [2 * 4 + 1.5, 3 * 4 + 1.5]
    assert coords[labels < 0].abs().sum() == 0
    # more points than cells: padded with "no point"
    _, few = coarse_to_points(_mask(1, 2, (0, 1, 0, 1)), img_size=32, num_pos=3, num_neg=0)
    assert few.tolist() == [[1, -1, -1]]


def test_dense_resize_pad_and_grad() -> None:
    logits = torch.randn(3, 1, 16, 16, requires_grad=True)
    assert coarse_to_dense(logits, mask_input_size=16) is logits  # already SAM's size: unchanged
    up = coarse_to_dense(logits, mask_input_size=64)
    assert up.shape == (3, 1, 64, 64)
    up.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    wide = coarse_to_dense(torch.zeros(1, 1, 12, 16), mask_input_size=32, pad_logit=-7.0)
    assert wide.shape == (1, 1, 32, 32)
    assert (wide[..., :24, :] == 0).all() and (wide[..., 24:, :] == -7.0).all()


def test_builder_shapes_and_folding() -> None:
    builder = PromptBuilder(
        cfg=PromptConfig(grounding_dim=8, num_sparse_tokens=2, num_neg_points=2), prompt_dim=32, img_size=64
    )
    queries, coarse = torch.randn(2, 3, 8), torch.randn(2, 3, 16, 16)
    out = builder(queries, coarse)  # (B, T, ...) inputs
    assert out.num_pairs == 6
    assert out.sparse.shape == (6, 2, 32)
    assert out.point_coords.shape == (6, 3, 2) and out.point_labels.shape == (6, 3)
    assert out.boxes.shape == (6, 4) and out.dense.shape == (6, 1, 16, 16)
    flat = builder(queries.reshape(6, 8), coarse.reshape(6, 1, 16, 16))  # (N, ...) inputs
    torch.testing.assert_close(flat.sparse, out.sparse)
    torch.testing.assert_close(flat.boxes, out.boxes)
    torch.testing.assert_close(flat.dense[4], coarse[1, 1][None])  # pair 4 = image 1, target 1


def test_builder_checks_inputs() -> None:
    builder = PromptBuilder(cfg=PromptConfig(grounding_dim=8), prompt_dim=32, img_size=64)
    with pytest.raises(ValueError, match="queries"):
        builder(None, torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="coarse_logits"):
        builder(torch.randn(2, 8))
    with pytest.raises(ValueError, match="queries: shape"):
        builder(torch.randn(2, 7), torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="2 pairs, coarse_logits: 3"):
        builder(torch.randn(2, 8), torch.randn(3, 1, 16, 16))
    sparse_only = PromptBuilder(
        cfg=PromptConfig(grounding_dim=8, box=False, points=False, dense=False), prompt_dim=32, img_size=64
    )
    assert sparse_only(torch.randn(2, 8)).boxes is None


COMBOS = [c for r in range(1, 5) for c in itertools.combinations(KINDS, r)]


@pytest.mark.parametrize("kinds", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_every_prompt_combination_runs_forward_backward(kinds: tuple[str, ...]) -> None:
    """Each of the 15 non-empty subsets through the tiny SAM: shapes, and where the gradient goes."""
    torch.manual_seed(0)
    stage = build_sam_stage(SAMConfig())
    builder = build_prompt_builder(PromptConfig(grounding_dim=8, **{k: k in kinds for k in KINDS}), stage.sam)
    queries = torch.randn(2, 2, 8, requires_grad=True)
    coarse = torch.randn(2, 2, 16, 16, requires_grad=True)
    prompts = builder(queries, coarse)
    out = stage(torch.randn(2, 32, 4, 4), prompts)
    assert out.mask_logits.shape == (4, 1, 16, 16) and out.iou_pred.shape == (4,)
    (stage.upsample(out.mask_logits, (64, 64)).sum() + out.iou_pred.sum()).backward()
    decoder_grads = [p.grad for p in stage.sam.mask_decoder.parameters() if p.grad is not None]
    assert decoder_grads and any(g.abs().sum() > 0 for g in decoder_grads)
    assert all(p.grad is None for p in stage.sam.image_encoder.parameters())  # frozen
    assert (queries.grad is not None) == ("sparse" in kinds)  # only the sparse path reads queries
    assert (coarse.grad is not None) == ("dense" in kinds)  # boxes / points are not differentiable
    for name in ("sparse", "dense"):
        if name in kinds:
            grad = (queries if name == "sparse" else coarse).grad
            assert grad.abs().sum() > 0, name
