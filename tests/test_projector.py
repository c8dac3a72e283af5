"""Visual projectors: shapes, masks and padding, the max_tokens cap, gradients, errors at the
modality boundary, and LLaVA weight reuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.projector import (
    GEOMETRY_FEATURES,
    PatchProjector,
    ProjectorConfig,
    SuperpixelProjector,
    _geometry,
    build_projector,
)

CV, D = 16, 24


def _cfg(**kw: object) -> ProjectorConfig:
    return ProjectorConfig(**{"vision_dim": CV, "llm_dim": D, "num_heads": 4, **kw})  # type: ignore[arg-type]


def _grid_labels(h: int, w: int, gy: int, gx: int) -> torch.Tensor:
    """``(h, w)`` long: a ``gy x gx`` grid of regions, row-major ids."""
    rows = torch.arange(h) * gy // h
    cols = torch.arange(w) * gx // w
    return rows[:, None] * gx + cols[None, :]


@pytest.fixture
def sp() -> SuperpixelProjector:
    torch.manual_seed(0)
    proj = build_projector(_cfg())
    assert isinstance(proj, SuperpixelProjector)
    return proj


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", "qformer"), ("vision_dim", 0), ("llm_dim", 0), ("grid", (4, 0)), ("grid", (4,)),
     ("max_tokens", 0), ("num_heads", 5)],
)  # fmt: skip
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        _cfg(**{field: value})


def test_patch_projector_is_the_llava_mlp() -> None:
    proj = build_projector(_cfg(kind="patch"))
    assert isinstance(proj, PatchProjector)
    assert [type(m) for m in proj.mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert set(proj.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    feats = torch.randn(2, 36, CV)
    out = proj(feats)
    assert out.embeds.shape == (2, 36, D) and out.mask.all() and out.counts.tolist() == [36, 36]
    assert proj.num_tokens(36) == 36
    torch.testing.assert_close(out.embeds, proj.mlp(feats))


@pytest.mark.parametrize("bias", [True, False])
def test_llava_projector_weights_load_onto_both_projectors(bias: bool) -> None:
    """``LlavaCheckpoint.projector_state`` keys: ``mlp.0.*`` / ``mlp.2.*`` (biases optional)."""
    state = {"mlp.0.weight": torch.randn(D, CV), "mlp.2.weight": torch.randn(D, D)}
    if bias:
        state |= {"mlp.0.bias": torch.randn(D), "mlp.2.bias": torch.randn(D)}
    build_projector(_cfg(kind="patch", mlp_bias=bias)).load_state_dict(state)  # strict
    result = build_projector(_cfg(mlp_bias=bias)).load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not any(k.startswith("mlp.") for k in result.missing_keys)


def test_shapes_padding_and_counts(sp: SuperpixelProjector) -> None:
    feats = torch.randn(3, 64, CV)
    labels = torch.stack([_grid_labels(40, 40, 1, 2), _grid_labels(40, 40, 3, 3), _grid_labels(40, 40, 2, 2)])
    out = sp(feats, labels)
    assert out.embeds.shape == (3, 9, D) and out.counts.tolist() == [2, 9, 4]
    assert out.mask.tolist()[0] == [True] * 2 + [False] * 7
    assert (out.embeds[~out.mask] == 0).all() and (out.embeds[out.mask].abs().sum(-1) > 0).all()
    assert sp.num_tokens(labels).tolist() == [2, 9, 4] and sp.last_dropped.tolist() == [0, 0, 0]


def test_each_image_is_independent_of_its_batch(sp: SuperpixelProjector) -> None:
    feats = torch.randn(2, 64, CV)
    labels = torch.stack([_grid_labels(24, 24, 2, 3), _grid_labels(24, 24, 4, 4)])
    both = sp(feats, labels)
    alone = sp(feats[:1], labels[:1])
    torch.testing.assert_close(both.embeds[0, :6], alone.embeds[0])


def test_label_ids_need_not_be_consecutive(sp: SuperpixelProjector) -> None:
    feats = torch.randn(1, 64, CV)
    labels = _grid_labels(32, 32, 3, 3)[None]
    out = sp(feats, labels)
    torch.testing.assert_close(sp(feats, labels * 7 + 1000).embeds, out.embeds)  # same id order
    torch.testing.assert_close(sp(feats, labels.int()).embeds, out.embeds)


@pytest.mark.parametrize("hw", [(37, 53), (5, 3), (8, 8), (1, 1), (200, 120)])
def test_any_label_map_size(sp: SuperpixelProjector, hw: tuple[int, int]) -> None:
    h, w = hw
    labels = _grid_labels(h, w, min(h, 3), min(w, 2))[None]
    out = sp(torch.randn(1, 64, CV), labels)
    assert out.counts.item() == min(h, 3) * min(w, 2)
    assert torch.isfinite(out.embeds).all()


def test_non_square_grid() -> None:
    proj = build_projector(_cfg(grid=(4, 6)))
    out = proj(torch.randn(2, 24, CV), _grid_labels(16, 24, 2, 2).expand(2, -1, -1))
    assert out.embeds.shape == (2, 4, D)


def test_patch_sized_regions_reduce_to_the_patch_projector() -> None:
    """Without aggregator / positions, one region per patch cell gives exactly LLaVA's tokens."""
    torch.manual_seed(0)
    sp = SuperpixelProjector(cfg=_cfg(aggregator=False, pos_embed=False))
    patch = PatchProjector(cfg=_cfg(kind="patch"))
    patch.load_state_dict(sp.state_dict())
    feats = torch.randn(2, 64, CV)
    labels = _grid_labels(32, 32, 8, 8).expand(2, -1, -1)  # (2, 32, 32): 4 x 4 pixels per patch cell
    torch.testing.assert_close(sp(feats, labels).embeds, patch(feats).embeds)


def test_geometry_of_a_rectangle() -> None:
    labels = torch.full((10, 20), 0)
    labels[2:6, 4:12] = 1  # rows 2..5, cols 4..11
    g = dict(zip(GEOMETRY_FEATURES, _geometry(labels, 2)[1].tolist(), strict=True))
    assert g["cx"] == pytest.approx(8 / 20) and g["cy"] == pytest.approx(4 / 10)
    assert (g["x0"], g["y0"], g["x1"], g["y1"]) == pytest.approx((0.2, 0.2, 0.6, 0.6))
    assert g["area"] == pytest.approx(32 / 200) and g["corr_xy"] == pytest.approx(0.5, abs=1e-5)
    assert 0 < g["std_y"] < g["std_x"] <= 1
    assert (_geometry(labels, 2) >= 0).all() and (_geometry(labels, 2) <= 1).all()


def test_max_tokens_keeps_the_largest_regions() -> None:
    torch.manual_seed(0)
    proj = build_projector(_cfg(max_tokens=2))
    labels = torch.zeros(1, 16, 16, dtype=torch.long)  # region 0: 124 px
    labels[0, :, 10:] = 5  # 96 px
    labels[0, :2, :2] = 3  # 4 px: dropped
    labels[0, 8:, :4] = 9  # 32 px: dropped
    feats = torch.randn(1, 16, CV)
    out = proj(feats, labels)
    assert out.counts.tolist() == [2] and proj.last_dropped.tolist() == [2]
    assert proj.num_regions(labels).tolist() == [4] and proj.num_tokens(labels).tolist() == [2]
    kept = labels.clone()
    kept[(kept == 3) | (kept == 9)] = -1  # only the two largest regions (ids 0 and 5, in id order)
    torch.testing.assert_close(out.embeds, proj(feats, kept).embeds)
    assert not torch.allclose(out.embeds, proj(feats, labels.where(labels != 9, 5)).embeds)


def test_negative_labels_are_ignored_and_empty_maps_give_no_tokens(sp: SuperpixelProjector) -> None:
    feats = torch.randn(2, 64, CV)
    labels = torch.full((2, 16, 16), -1)
    labels[0, :8] = 4
    out = sp(feats, labels)
    assert out.counts.tolist() == [1, 0] and out.embeds.shape == (2, 1, D)
    empty = sp(feats, torch.full((2, 16, 16), -1))
    assert empty.embeds.shape == (2, 0, D) and empty.counts.tolist() == [0, 0]


def test_gradients_reach_every_parameter(sp: SuperpixelProjector) -> None:
    feats = torch.randn(2, 64, CV, requires_grad=True)
    labels = torch.stack([_grid_labels(32, 32, 3, 3), _grid_labels(32, 32, 2, 5)])
    out = sp(feats, labels)
    (out.embeds**2).sum().backward()
    missing = [n for n, p in sp.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and feats.grad is not None
    assert len(list(sp.parameters())) > 4  # mlp + aggregator + positional MLP


def test_bfloat16(sp: SuperpixelProjector) -> None:
    sp = sp.to(torch.bfloat16)
    out = sp(torch.randn(1, 64, CV, dtype=torch.bfloat16), _grid_labels(16, 16, 2, 2)[None])
    assert out.embeds.dtype == torch.bfloat16 and torch.isfinite(out.embeds.float()).all()


def test_modality_boundary_errors(sp: SuperpixelProjector) -> None:
    feats = torch.randn(2, 64, CV)
    labels = _grid_labels(16, 16, 2, 2)
    with pytest.raises(ValueError, match=r"superpixels: shape \(3, 16, 16\), expected \(B=2"):
        sp(feats, labels.expand(3, -1, -1))
    with pytest.raises(ValueError, match=r"superpixels: shape \(2, 0, 16\)"):
        sp(feats, labels[:0].expand(2, -1, -1))
    with pytest.raises(ValueError, match="superpixels: None"):
        sp(feats, None)
    with pytest.raises(ValueError, match="integer label map"):
        sp(feats, labels.expand(2, -1, -1).float())
    with pytest.raises(ValueError, match=r"N=65 is not a square grid.*N-1=64"):
        sp(torch.randn(2, 65, CV), labels.expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"Cv=16"):
        sp(torch.randn(2, 64, CV + 1), labels.expand(2, -1, -1))
    with pytest.raises(ValueError, match=r"N=64 patches, but cfg.grid=4x6 gives 24"):
        build_projector(_cfg(kind="patch", grid=(4, 6)))(feats)


def test_conv_descriptor_encoder_ignores_padding_and_reads_the_crop() -> None:
    """``descriptor_encoder: conv``: a region's token does not depend on how many padding rows its image
    has; padding rows get no shape features; the shape crop reaches every conv weight."""
    from mllm_ris.modeling.projector import ConvDescriptorEncoder

    torch.manual_seed(0)
    width = 16 * 16 + 17
    enc = ConvDescriptorEncoder(width, D)
    feats = torch.rand(2, 3, width)
    padded = torch.cat([feats, torch.zeros(2, 4, width)], 1)  # 4 padding rows (zeros)
    torch.testing.assert_close(enc(padded)[:, :3], enc(feats))
    base = enc.mlp(torch.cat([torch.zeros(1, 1, width), torch.zeros(1, 1, D)], -1))
    torch.testing.assert_close(enc(padded)[:, 3:], base.expand(2, 4, D))
    enc(feats).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.conv.parameters())
