"""Fusion heads: S²RM (+ CASG) and the baselines, on tiny CPU configs (dim 32, 64 px input).

Pyramids are the sizes a 64x64 image gives at strides 4, 8, 16, 32: 16, 8, 4, 2.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2rm_head import (
    HEAD_NAMES,
    S2RM,
    BiSliceScan,
    CASGDecoder,
    FusionHead,
    HeadConfig,
    LanguageFeatures,
    ParsedSemanticBalance,
    S2RMHead,
    build_head,
)

IN_CHANNELS = (8, 16, 24, 32)
SIZES = (16, 8, 4, 2)
LANG_DIM = 24
DIM = 32


def _cfg(name: str = "s2rm", **kw: object) -> HeadConfig:
    return HeadConfig(name=name, dim=DIM, in_channels=IN_CHANNELS, lang_dim=LANG_DIM, **kw)


def _pyramid(b: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(IN_CHANNELS, SIZES, strict=True)]


def _lang(b: int = 2, t: int = 1, num_words: int = 5, seed: int = 1) -> LanguageFeatures:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, num_words, dtype=torch.bool)
    if num_words > 2:
        mask[-1, -2:] = False  # the last sample has 2 padded words
    return LanguageFeatures(
        tokens=torch.randn(b, num_words, LANG_DIM, generator=g),
        mask=mask,
        queries=torch.randn(b, t, LANG_DIM, generator=g),
        query_mask=torch.ones(b, t, dtype=torch.bool),
    )


def _head(name: str, **kw: object) -> FusionHead:
    torch.manual_seed(0)
    return build_head(_cfg(name, **kw)).eval()


# ---------------------------------------------------------------------------------------------
# contract: shapes, gradients, folding, query sensitivity


@pytest.mark.parametrize("num_words", [0, 5])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_output_shapes(name: str, t: int, num_words: int) -> None:
    head = _head(name)
    with torch.no_grad():
        out = head(_pyramid(), _lang(t=t, num_words=num_words))
    assert out.mask_logits.shape == (2, t, SIZES[0], SIZES[0])
    assert out.iou_pred.shape == (2, t)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.iou_pred).all()


def test_no_query_slots_give_empty_outputs() -> None:
    """``T = 0``: empty outputs, computed from one padded slot (every parameter in the graph)."""
    head = _head("s2rm").train()
    lang = _lang(t=0)
    lang = lang._replace(queries=lang.queries.requires_grad_())
    out = head(_pyramid(), lang)
    assert out.mask_logits.shape == (2, 0, 16, 16) and out.iou_pred.shape == (2, 0)
    (out.mask_logits.sum() + out.iou_pred.sum()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing and not any(p.grad.abs().sum() for p in head.parameters())  # zeros, not None
    assert lang.queries.grad is not None  # the (empty) queries' producer stays in the graph


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_padded_query_slots_are_not_computed(name: str) -> None:
    """Only real (image, query) pairs are folded: each equals its own pair alone; padded slots give 0."""
    head = _head(name)
    pyramid, lang = _pyramid(), _lang(t=3)
    lang = lang._replace(query_mask=torch.tensor([[True, True, False], [True, False, False]]))
    with torch.no_grad():
        out = head(pyramid, lang)
        full = head(pyramid, lang._replace(query_mask=torch.ones(2, 3, dtype=torch.bool)))
    real = lang.query_mask
    torch.testing.assert_close(out.mask_logits[real], full.mask_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.iou_pred[real], full.iou_pred[real], atol=1e-4, rtol=1e-4)
    assert (out.mask_logits[~real] == 0).all() and (out.iou_pred[~real] == 0).all()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_build_head_picks_the_named_class(name: str) -> None:
    head = build_head(_cfg(name))
    assert isinstance(head, FusionHead)
    assert (name == "s2rm") == isinstance(head, S2RMHead)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    head = _head(name).train()
    out = head(_pyramid(), _lang(t=2))
    loss = out.mask_logits.sigmoid().mean() + out.iou_pred.pow(2).mean()
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in head.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    assert sum(p.grad.abs().sum().item() for p in head.parameters()) > 0


def _prior(b: int = 2, t: int = 2, size: int = 64, seed: int = 2) -> torch.Tensor:
    """Region-prior logits ``(B, T, size, size)``: a square per slot, +8 inside, -8 outside."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.full((b, t, size, size), -8.0)
    for i in range(b):
        for j in range(t):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            prior[i, j, y : y + size // 3, x : x + size // 3] = 8.0
    return prior


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_a_refiner_reads_the_prior_and_starts_at_zero(name: str) -> None:
    """``prior_input``: the residual is 0 at initialisation (the refined mask starts as the prior);
    once its scale moves, the prior changes the logits, and every parameter gets a gradient."""
    head = _head(name, prior_input=True).train()
    pyramid, lang, prior = _pyramid(), _lang(t=2), _prior()
    out = head(pyramid, lang, prior)
    assert out.mask_logits.shape == (2, 2, SIZES[0], SIZES[0])
    assert (out.mask_logits == 0).all()
    with torch.no_grad():
        head.prior_scale.fill_(1.0)
    out = head(pyramid, lang, prior)
    (out.mask_logits.sigmoid().mean() + out.iou_pred.pow(2).mean()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing}"
    head.eval()
    with torch.no_grad():
        moved = head(pyramid, lang, _prior(seed=3)).mask_logits - head(pyramid, lang, prior).mask_logits
    assert moved.abs().amax() > 1e-3


def test_a_refiner_needs_its_prior_and_a_plain_head_refuses_one() -> None:
    with pytest.raises(ValueError, match="prior_input is True but a prior was not given"):
        _head("s2rm", prior_input=True)(_pyramid(), _lang(t=2))
    with pytest.raises(ValueError, match="prior_input is False but a prior was given"):
        _head("s2rm")(_pyramid(), _lang(t=2), _prior())
    with pytest.raises(ValueError, match=r"prior: shape \(2, 3, 64, 64\), expected \(B, T\) = \(2, 2\)"):
        _head("lts", prior_input=True)(_pyramid(), _lang(t=2), _prior(t=3))


def test_a_refiner_with_no_query_slots() -> None:
    """``T = 0`` with a ``(B, 0, H, W)`` prior: empty outputs, every parameter in the graph."""
    head = _head("s2rm", prior_input=True).train()
    out = head(_pyramid(), _lang(t=0), _prior(t=0))
    assert out.mask_logits.shape == (2, 0, 16, 16) and out.iou_pred.shape == (2, 0)
    (out.mask_logits.sum() + out.iou_pred.sum()).backward()
    assert not [n for n, p in head.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_queries_give_different_masks(name: str) -> None:
    head = _head(name)
    with torch.no_grad():
        out = head(_pyramid(), _lang(t=3))
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        diff = (out.mask_logits[:, a] - out.mask_logits[:, b]).abs().amax().item()
        assert diff > 1e-3, f"queries {a} and {b} gave the same mask (max diff {diff})"


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_targets_fold_sample_major(name: str) -> None:
    """(B=2, T=2) in one call == each (image, query) pair on its own."""
    head = _head(name)
    pyramid, lang = _pyramid(), _lang(t=2)
    with torch.no_grad():
        out = head(pyramid, lang)
        for b in range(2):
            for t in range(2):
                single = LanguageFeatures(
                    tokens=lang.tokens[b : b + 1],
                    mask=lang.mask[b : b + 1],
                    queries=lang.queries[b : b + 1, t : t + 1],
                    query_mask=lang.query_mask[b : b + 1, t : t + 1],
                )
                one = head([x[b : b + 1] for x in pyramid], single)
                torch.testing.assert_close(one.mask_logits[0, 0], out.mask_logits[b, t], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(one.iou_pred[0, 0], out.iou_pred[b, t], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["s2rm", "cmsa"])
def test_padded_words_are_ignored(name: str) -> None:
    head = _head(name)
    lang = _lang(t=2)
    noisy = LanguageFeatures(
        tokens=torch.where(lang.mask[..., None], lang.tokens, torch.randn_like(lang.tokens) * 100),
        mask=lang.mask,
        queries=lang.queries,
        query_mask=lang.query_mask,
    )
    with torch.no_grad():
        a, b = head(_pyramid(), lang), head(_pyramid(), noisy)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)


# ---------------------------------------------------------------------------------------------
# S²RM internals


def _s2rm_inputs(n: int = 2, size: int = 8, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    vis = torch.randn(n, DIM, size, size, generator=g, dtype=dtype)
    tokens = torch.randn(n, 4, DIM, generator=g, dtype=dtype)
    mask = torch.ones(n, 4, dtype=torch.bool)
    query = torch.randn(n, DIM, generator=g, dtype=dtype)
    return vis, tokens, mask, query


def _corner_response(block: S2RM) -> tuple[float, float]:
    """Perturb the input only at the top-left pixel; max change at the bottom-right / next to it."""
    vis, tokens, mask, query = _s2rm_inputs()
    moved = vis.clone()
    moved[:, :, 0, 0] += 1.0
    with torch.no_grad():
        diff = (block(moved, tokens, mask, query).fused - block(vis, tokens, mask, query).fused).abs()
    return diff[:, :, -1, -1].max().item(), diff[:, :, 1, 1].max().item()


@pytest.mark.parametrize("balance", [False, True])
def test_coparsing_reaches_the_far_corner(balance: bool) -> None:
    # balance=False isolates the recurrence: the gates' global-mean branch is the only other global path
    torch.manual_seed(0)
    block = S2RM(dim=DIM, coparse=True, balance=balance).double().eval()
    far, near = _corner_response(block)
    assert far > 1e-6, f"bottom-right did not see the top-left perturbation ({far:.2e})"
    assert near > far


def test_without_coparsing_the_block_is_local() -> None:
    torch.manual_seed(0)
    block = S2RM(dim=DIM, coparse=False).double().eval()
    far, near = _corner_response(block)
    assert far == 0.0  # no global path: language distribution is per pixel, convs are at most 3x3
    assert near > 1e-6  # ... but the perturbation does reach its neighbourhood


def test_balance_weights_are_a_softmax() -> None:
    torch.manual_seed(0)
    vis, tokens, mask, query = _s2rm_inputs(dtype=torch.float32)
    out = S2RM(dim=DIM).eval()(vis, tokens, mask, query)
    assert out.weights is not None and out.weights.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out.weights.sum(1), torch.ones(2, 8, 8))
    assert out.language.shape == out.fused.shape == vis.shape


def test_scan_directions_are_causal() -> None:
    """Forward scan at slice i sees slices <= i only; backward scan sees slices >= i only."""
    torch.manual_seed(0)
    scan = BiSliceScan(dim=DIM, kernel_size=3).double()
    vis, lang = torch.randn(2, 1, DIM, 6, 5, dtype=torch.float64).unbind(0)  # each (1, C, S=6, W=5)
    fwd, bwd = scan(vis, lang)
    moved = vis.clone()
    moved[:, :, 3] += 1.0  # change slice 3 only
    fwd2, bwd2 = scan(moved, lang)
    fwd_changed = [not torch.equal(fwd[:, :, i], fwd2[:, :, i]) for i in range(6)]
    bwd_changed = [not torch.equal(bwd[:, :, i], bwd2[:, :, i]) for i in range(6)]
    assert fwd_changed == [False, False, False, True, True, True]
    assert bwd_changed == [True, True, True, True, False, False]


def test_s2rm_memory_is_linear_in_pixels() -> None:
    """No tensor saved for backward is anywhere near an (HW)^2 attention map."""
    torch.manual_seed(0)
    n, c, size = 1, 8, 32
    block = S2RM(dim=c, num_heads=2)
    vis = torch.randn(n, c, size, size)
    largest = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        block(vis, torch.randn(n, 3, c), torch.ones(n, 3, dtype=torch.bool), torch.randn(n, c)).fused.sum()
    hw = size * size
    assert largest <= 8 * n * c * hw < hw * hw, f"largest saved tensor has {largest} elements"


def test_ablation_flags_change_the_module_set() -> None:
    def kinds(block: nn.Module) -> set[type]:
        return {type(m) for m in block.modules()}

    full, no_balance, no_coparse = S2RM(dim=DIM), S2RM(dim=DIM, balance=False), S2RM(dim=DIM, coparse=False)
    assert {BiSliceScan, ParsedSemanticBalance} <= kinds(full)
    assert BiSliceScan in kinds(no_balance) and ParsedSemanticBalance not in kinds(no_balance)
    assert not {BiSliceScan, ParsedSemanticBalance} & kinds(no_coparse)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (full, no_balance, no_coparse)]
    assert sizes[0] > sizes[1] > sizes[2]
    heads = [
        build_head(_cfg(coparse=cp, balance=bl)) for cp, bl in [(True, True), (True, False), (False, True)]
    ]
    assert [BiSliceScan in kinds(h) for h in heads] == [True, True, False]
    assert [ParsedSemanticBalance in kinds(h) for h in heads] == [True, False, False]


def test_fuse_levels_choose_where_s2rm_runs() -> None:
    def count(h: nn.Module) -> int:
        return sum(isinstance(m, S2RM) for m in h.modules())

    assert count(build_head(_cfg())) == 3
    head = _head("s2rm", fuse_levels=(0, 1, 2, 3))
    assert count(head) == 4
    with torch.no_grad():
        assert head(_pyramid(), _lang(t=2)).mask_logits.shape == (2, 2, 16, 16)


def test_casg_guidance_shapes() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(3, DIM, s, s) for s in SIZES]
    out = CASGDecoder(dim=DIM)(feats)
    assert out.mask_logits.shape == (3, 1, 16, 16)
    assert out.iou_pred.shape == (3,)
    assert out.guidance_logits.shape == (3, 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# config and input validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "unet"}, "name"),
        ({"dim": 0}, "dim"),
        ({"dim": 30, "num_heads": 4}, "dim"),
        ({"in_channels": (8, 16, 24)}, "in_channels"),
        ({"lang_dim": 0}, "lang_dim"),
        ({"fuse_levels": ()}, "fuse_levels"),
        ({"fuse_levels": (3, 1)}, "fuse_levels"),
        ({"fuse_levels": (1, 4)}, "fuse_levels"),
        ({"scan_kernel": 2}, "scan_kernel"),
        ({"coarse_level": 1}, "coarse_level"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    base = {"dim": DIM, "in_channels": IN_CHANNELS, "lang_dim": LANG_DIM} | kwargs
    with pytest.raises(ValueError, match=rf"^{field}:"):
        HeadConfig(**base)


def test_config_accepts_lists_from_yaml() -> None:
    cfg = HeadConfig(in_channels=[1, 2, 3, 4], fuse_levels=[2, 3])
    assert cfg.in_channels == (1, 2, 3, 4) and cfg.fuse_levels == (2, 3)


def test_bad_inputs_fail_loudly() -> None:
    head = _head("s2rm")
    pyramid, lang = _pyramid(), _lang()
    with pytest.raises(ValueError, match="expected 4 levels, got 3"):
        head(pyramid[:3], lang)
    with pytest.raises(ValueError, match=r"pyramid\[1\].*C=16"):
        head([pyramid[0], torch.randn(2, 17, 8, 8), *pyramid[2:]], lang)
    with pytest.raises(ValueError, match="finest first"):
        head([*pyramid[:2], torch.randn(2, 24, 16, 16), pyramid[3]], lang)  # level 2 larger than level 1
    wrong_width = LanguageFeatures.from_sentence(torch.randn(2, 3, 7), torch.ones(2, 3), torch.randn(2, 7))
    with pytest.raises(ValueError, match="lang_dim"):
        head(pyramid, wrong_width)


# ---------------------------------------------------------------------------------------------
# a real (tiny) training run


class _TinyEncoder(nn.Module):
    """Strided convs: (B, 3, 64, 64) -> pyramid (B, C_i, 16 / 8 / 4 / 2, same)."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, *IN_CHANNELS)
        # stride 4 stem (64 -> 16), then three stride-2 convs (16 -> 8 -> 4 -> 2)
        convs = [nn.Conv2d(3, widths[1], kernel_size=4, stride=4)]
        convs += [
            nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1) for i in range(1, 4)
        ]
        self.stages = nn.ModuleList(nn.Sequential(conv, nn.ReLU()) for conv in convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_overfits_one_referring_batch(name: str) -> None:
    """2 images x 2 queries: query t refers to the rectangle drawn bright in colour channel t.

    Both rectangles are visible in every image, so masks > 0.9 IoU for both queries need the
    language path (a head ignoring the query gives one mask for both and cannot pass).
    """
    torch.manual_seed(0)
    images = 0.3 * torch.randn(2, 3, 64, 64)
    target = torch.zeros(2, 2, 64, 64)
    boxes = [[(8, 40, 12, 36), (36, 60, 40, 60)], [(24, 56, 28, 60), (4, 28, 4, 20)]]  # (y0, y1, x0, x1)
    for b in range(2):
        for t, (y0, y1, x0, x1) in enumerate(boxes[b]):
            target[b, t, y0:y1, x0:x1] = 1.0
            images[b, t, y0:y1, x0:x1] += 1.5  # rectangle t is bright in channel t ("red" / "green")
    target = F.avg_pool2d(target, 4)  # (2, 2, 16, 16) at the head's 1/4 resolution (edges % 4 == 0)
    g = torch.Generator().manual_seed(5)
    queries = torch.randn(1, 2, LANG_DIM, generator=g).expand(2, -1, -1).contiguous()  # same 2 queries
    lang = LanguageFeatures(
        tokens=torch.randn(2, 4, LANG_DIM, generator=g),
        mask=torch.ones(2, 4, dtype=torch.bool),
        queries=queries,
        query_mask=torch.ones(2, 2, dtype=torch.bool),
    )

    encoder, head = _TinyEncoder(), build_head(_cfg(name))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    start, iou = time.perf_counter(), torch.zeros(2, 2)
    for _ in range(300):
        out = head(encoder(images), lang)
        logits = out.mask_logits  # (2, 2, 16, 16)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((2, 3)) + 1) / (prob.sum((2, 3)) + target.sum((2, 3)) + 1)
        pred = (logits > 0).float()
        iou = (pred * target).sum((2, 3)) / (pred + target).clamp(max=1).sum((2, 3))  # (2, 2)
        loss = F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        loss = loss + F.mse_loss(out.iou_pred, iou)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if iou.min() > 0.95:
            break
    elapsed = time.perf_counter() - start
    assert iou.min() > 0.9, f"IoU {iou.tolist()} after training"
    assert elapsed < 40, f"took {elapsed:.1f} s"
