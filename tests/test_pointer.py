"""RegionPointer, paint_regions, pointer_loss: shapes, masking, loop reference, gradients, T = 0, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.projector import (
    MASKED_LOGIT,
    PointerLosses,
    RegionPointer,
    paint_regions,
    pointer_loss,
)


def _random_labels(g: torch.Generator, b: int, k: int, h: int, w: int) -> torch.Tensor:
    """``(B, H, W)`` long in ``-1..K-1`` (about 1 in ``K + 1`` pixels is padding)."""
    return torch.randint(-1, k, (b, h, w), generator=g)


def test_pointer_shapes_and_masking() -> None:
    torch.manual_seed(0)
    pointer = RegionPointer(query_dim=8, region_dim=12, dim=16)
    queries = torch.randn(2, 3, 8)
    regions = torch.randn(2, 5, 12, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])
    logits = pointer(queries, regions, mask)
    assert logits.shape == (2, 3, 5)
    assert (logits[~mask[:, None, :].expand(2, 3, 5)] == MASKED_LOGIT).all()
    assert (torch.sigmoid(logits)[:, :, 3:][~mask[:, None, 3:].expand(2, 3, 2)] == 0).all()
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert (regions.grad[~mask] == 0).all()  # masked regions get no gradient
    assert (regions.grad[mask].abs().sum(-1) > 0).all()


def test_pointer_layers_mix_regions_under_the_query() -> None:
    """With layers, a region's score depends on the other regions (masked padding excluded) and on the
    query; padded regions change nothing; T = 0 works."""
    torch.manual_seed(0)
    pointer = RegionPointer(query_dim=8, region_dim=12, dim=16, layers=2)
    queries = torch.randn(2, 3, 8)
    regions = torch.randn(2, 5, 12, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, True]])
    logits = pointer(queries, regions, mask)
    assert logits.shape == (2, 3, 5) and torch.isfinite(logits).all()
    assert (logits[~mask[:, None, :].expand(2, 3, 5)] == MASKED_LOGIT).all()
    logits.sum().backward()
    assert (regions.grad[~mask] == 0).all() and (regions.grad[mask].abs().sum(-1) > 0).all()
    with torch.no_grad():
        moved = regions.detach().clone()
        moved[0, 3:] += 100.0  # padding: no effect on real scores
        torch.testing.assert_close(pointer(queries, moved, mask)[0, :, :3], logits[0, :, :3])
        moved = regions.detach().clone()
        moved[0, 2] += 1.0  # another real region: region 0's score changes (they attend to each other)
        assert not torch.allclose(pointer(queries, moved, mask)[0, :, 0], logits[0, :, 0])
        other = pointer(queries.flip(1), regions, mask)  # another query: other scores
        assert not torch.allclose(other[:, 0], logits[:, 0])
    assert pointer(queries[:, :0], regions, mask).shape == (2, 0, 5)
    with pytest.raises(ValueError, match="layers: must be >= 0 with dim divisible by 4"):
        RegionPointer(query_dim=8, region_dim=8, dim=6, layers=1)


def test_pointer_layers_read_words() -> None:
    """word_dim: the words join the layers' sequence; other words give other scores, padded words none."""
    torch.manual_seed(0)
    pointer = RegionPointer(query_dim=8, region_dim=12, dim=16, layers=1, word_dim=6)
    queries, regions = torch.randn(2, 1, 8), torch.randn(2, 4, 12)
    mask = torch.ones(2, 4, dtype=torch.bool)
    words, word_mask = torch.randn(2, 3, 6), torch.tensor([[True, True, False], [True, True, True]])
    logits = pointer(queries, regions, mask, words, word_mask)
    assert logits.shape == (2, 1, 4)
    moved = words.clone()
    moved[0, 2] += 50.0  # a padded word: nothing changes
    torch.testing.assert_close(pointer(queries, regions, mask, moved, word_mask), logits)
    moved[1, 0] += 1.0  # a real word: image 1's scores change
    assert not torch.allclose(pointer(queries, regions, mask, moved, word_mask)[1], logits[1])
    with pytest.raises(ValueError, match="needs words"):
        pointer(queries, regions, mask)
    with pytest.raises(ValueError, match="set layers > 0"):
        RegionPointer(query_dim=8, region_dim=8, dim=8, word_dim=4)


def test_pointer_presence_reads_query_and_regions_not_padding() -> None:
    """``presence``: one logit per query from the mixed query state and the max-pool of the mixed
    region states; padded regions change nothing, real ones do, and an image without regions is finite."""
    torch.manual_seed(0)
    pointer = RegionPointer(query_dim=8, region_dim=12, dim=16, layers=1, presence=True).eval()
    queries, regions = torch.randn(2, 3, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    logits, found = pointer.scores(queries, regions, mask)
    assert logits.shape == (2, 3, 5) and found.shape == (2, 3)
    torch.testing.assert_close(logits, pointer(queries, regions, mask))  # forward = scores()[0]
    moved = regions.clone()
    moved[0, 3:] += 100.0  # padding of image 0
    torch.testing.assert_close(pointer.scores(queries, moved, mask)[1], found)
    moved[1, 0] += 1.0  # a real region of image 1
    assert not torch.allclose(pointer.scores(queries, moved, mask)[1][1], found[1])
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.isfinite(pointer.scores(queries, regions, none)[1]).all()
    plain = RegionPointer(query_dim=8, region_dim=12, dim=16, layers=1)
    assert plain.scores(queries, regions, mask)[1] is None
    with pytest.raises(ConfigError, match="presence: read from the mixing layers"):
        RegionPointer(query_dim=8, region_dim=12, dim=16, presence=True)


def test_pointer_matches_its_formula() -> None:
    torch.manual_seed(1)
    pointer = RegionPointer(query_dim=4, region_dim=6, dim=8, bias_init=-2.0)
    with torch.no_grad():
        pointer.log_scale.fill_(0.5)
    q, r = torch.randn(1, 2, 4), torch.randn(1, 3, 6)
    expected = pointer.query_proj(q) @ pointer.region_proj(r).transpose(1, 2) / 8**0.5 * torch.e**0.5 - 2.0
    torch.testing.assert_close(pointer(q, r, torch.ones(1, 3, dtype=torch.bool)), expected)


def test_fixed_scale_and_bias_are_not_parameters() -> None:
    pointer = RegionPointer(
        query_dim=4, region_dim=4, dim=4, learn_scale=False, learn_bias=False, bias_init=-1
    )
    names = {n for n, _ in pointer.named_parameters()}
    assert names == {"query_proj.weight", "query_proj.bias", "region_proj.weight", "region_proj.bias"}
    assert set(pointer.state_dict()) == names
    out = pointer(torch.zeros(1, 1, 4), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    assert out.shape == (1, 1, 2)


def test_pointer_fails_loudly_on_shapes() -> None:
    pointer = RegionPointer(query_dim=4, region_dim=4, dim=4)
    with pytest.raises(ValueError, match="region_mask"):
        pointer(torch.zeros(2, 1, 4), torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="3-d"):
        pointer(torch.zeros(1, 4), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dim"):
        RegionPointer(query_dim=4, region_dim=4, dim=0)


def test_paint_regions_equals_a_loop() -> None:
    g = torch.Generator().manual_seed(2)
    b, t, k, h, w = 2, 3, 6, 5, 7
    logits = torch.randn(b, t, k, generator=g)
    labels = _random_labels(g, b, k, h, w)
    out = paint_regions(logits, labels)
    assert out.shape == (b, t, h, w)
    ref = torch.empty(b, t, h, w)
    for bi in range(b):
        for ti in range(t):
            for y in range(h):
                for x in range(w):
                    lab = int(labels[bi, y, x])
                    ref[bi, ti, y, x] = MASKED_LOGIT if lab < 0 else logits[bi, ti, lab]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_paint_regions_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = _random_labels(g, 2, 4, 3, 3)
    assert torch.autograd.gradcheck(lambda x: paint_regions(x, labels), (logits,))
    # d sum(painted) / d logit[b, t, k] = number of pixels of region k in image b
    paint_regions(logits, labels).sum().backward()
    counts = torch.stack([torch.bincount(lab[lab >= 0], minlength=4) for lab in labels])  # (B, K)
    torch.testing.assert_close(logits.grad, counts[:, None, :].expand(2, 2, 4).double())


def test_paint_regions_edge_cases() -> None:
    empty = torch.zeros(1, 2, 0, requires_grad=True)
    out = paint_regions(empty, torch.full((1, 3, 3), -1))
    assert out.shape == (1, 2, 3, 3) and (out == MASKED_LOGIT).all()
    out.sum().backward()  # stays connected
    assert paint_regions(torch.zeros(1, 0, 4), torch.zeros(1, 3, 3, dtype=torch.long)).shape == (1, 0, 3, 3)
    for dtype in (torch.float16, torch.bfloat16):  # MASKED_LOGIT is finite in half precision
        half = paint_regions(torch.zeros(1, 1, 2, dtype=dtype), torch.tensor([[[0, -1]]]))
        assert torch.isfinite(half).all() and torch.sigmoid(half.float())[0, 0, 0, 1] == 0
    with pytest.raises(ValueError, match="does not fit"):
        paint_regions(torch.zeros(1, 1, 2), torch.full((1, 2, 2), 2))


def test_pointer_loss_values_and_masking() -> None:
    g = torch.Generator().manual_seed(4)
    b, t, k, h, w = 2, 2, 5, 6, 6
    logits = torch.randn(b, t, k, generator=g, requires_grad=True)
    targets = (torch.rand(b, t, k, generator=g) < 0.4).float()
    region_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target_valid = torch.tensor([[True, True], [True, False]])
    labels = torch.randint(-1, 3, (b, h, w), generator=g)  # only ids valid in both images
    masks = torch.rand(b, t, h, w, generator=g) < 0.5
    bce, dice = pointer_loss(logits, targets, region_mask, target_valid, labels, masks, dice_weight=0.5)
    pair = target_valid[:, :, None] & region_mask[:, None, :]
    ref_bce = F.binary_cross_entropy_with_logits(logits[pair], targets[pair])
    torch.testing.assert_close(bce, ref_bce)
    prob = torch.sigmoid(paint_regions(logits, labels))
    ref_dice = []
    for bi, ti in [(0, 0), (0, 1), (1, 0)]:
        p, m = prob[bi, ti], masks[bi, ti].float()
        ref_dice.append(1 - (2 * (p * m).sum() + 1) / (p.sum() + m.sum() + 1))
    torch.testing.assert_close(dice, 0.5 * torch.stack(ref_dice).mean())
    (bce + dice).backward()
    assert (logits.grad[~pair] == 0).all()  # invalid regions / targets do not move
    assert (logits.grad[pair] != 0).all()
    # the values of invalid pairs do not change the loss
    moved = logits.detach().clone()
    moved[~pair] += 100.0
    bce2, dice2 = pointer_loss(moved, targets, region_mask, target_valid, labels, masks, dice_weight=0.5)
    torch.testing.assert_close((bce2, dice2), (bce.detach(), dice.detach()))


def test_pointer_loss_without_targets_is_zero_and_connected() -> None:
    pointer = RegionPointer(query_dim=4, region_dim=4, dim=4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    region_mask = torch.ones(2, 3, dtype=torch.bool)
    regions = torch.randn(2, 3, 4)
    for t in (0, 2):  # T = 0, and T = 2 with every target invalid
        logits = pointer(torch.randn(2, t, 4), regions, region_mask)
        losses = pointer_loss(
            logits,
            torch.zeros(2, t, 3),
            region_mask,
            torch.zeros(2, t, dtype=torch.bool),
            labels,
            torch.zeros(2, t, 4, 4),
        )
        assert isinstance(losses, PointerLosses)
        assert all(torch.isfinite(x) and x.item() == 0.0 for x in losses)
        pointer.zero_grad()
        sum(losses).backward()
        assert pointer.query_proj.weight.grad is not None  # connected: DDP sees the parameter used


def test_pointer_loss_skips_dice_and_checks_shapes() -> None:
    logits = torch.randn(1, 1, 2, requires_grad=True)
    args = (
        logits,
        torch.ones(1, 1, 2),
        torch.ones(1, 2, dtype=torch.bool),
        torch.ones(1, 1, dtype=torch.bool),
    )
    _, dice = pointer_loss(*args)
    assert dice.item() == 0.0 and dice.requires_grad
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    _, dice = pointer_loss(*args, labels, torch.ones(1, 1, 3, 3), dice_weight=0.0)
    assert dice.item() == 0.0
    with pytest.raises(ValueError, match="target_masks"):
        pointer_loss(*args, labels, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        pointer_loss(*args, None, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="target_valid"):
        pointer_loss(logits, torch.ones(1, 1, 2), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2))


def test_perfect_logits_give_near_zero_losses() -> None:
    labels = torch.tensor([[[0, 0, 1], [2, 2, 1], [-1, -1, -1]]])
    targets = torch.tensor([[[1.0, 0.0, 1.0]]])  # target = regions 0 and 2
    masks = torch.tensor([[[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]]).float()
    logits = (targets * 2 - 1) * 30.0
    bce, dice = pointer_loss(
        logits, targets, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), labels, masks
    )
    assert bce.item() < 1e-6 and dice.item() < 1e-6


def _matching_draw(g: torch.Generator, b: int, k: int, d: int) -> tuple[torch.Tensor, ...]:
    """Random regions ``(B, K, D)``; the query ``(B, 1, D)`` is a noisy copy of one valid region's feature."""
    regions = torch.randn(b, k, d, generator=g)
    mask = torch.rand(b, k, generator=g) > 0.25
    target = torch.randint(0, k, (b,), generator=g)
    mask[torch.arange(b), target] = True
    queries = regions[torch.arange(b), target][:, None] + 0.1 * torch.randn(b, 1, d, generator=g)
    onehot = F.one_hot(target, k).float()[:, None]  # (B, 1, K)
    return queries, regions, mask, target, onehot


def test_pointer_learns_to_match() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    k, d = 12, 16
    pointer = RegionPointer(query_dim=d, region_dim=d, dim=32, bias_init=-2.4)
    opt = torch.optim.Adam(pointer.parameters(), lr=1e-2)
    for _ in range(200):
        queries, regions, mask, _, onehot = _matching_draw(g, 64, k, d)
        logits = pointer(queries, regions, mask)
        bce, _ = pointer_loss(logits, onehot, mask, torch.ones(64, 1, dtype=torch.bool))
        opt.zero_grad()
        bce.backward()
        opt.step()
    with torch.no_grad():
        queries, regions, mask, target, _ = _matching_draw(torch.Generator().manual_seed(123), 2000, k, d)
        top1 = pointer(queries, regions, mask)[:, 0].argmax(-1)
    accuracy = (top1 == target).float().mean().item()
    assert accuracy >= 0.95, accuracy
