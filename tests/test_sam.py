"""SAM stage: builds, official checkpoint layout, loader errors, freezing, gradients, overfit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.utils.transforms import ResizeLongestSide

from mllm_ris.errors import CheckpointError
from s2rm_head.sam.prompts import PromptConfig, SAMPrompts, build_prompt_builder
from s2rm_head.sam.stage import (
    SAM_ARCHS,
    SAMConfig,
    SAMStage,
    build_sam,
    build_sam_stage,
    infer_sam_arch,
    load_sam_checkpoint,
    save_sam_checkpoint,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _tiny(seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam(SAMConfig(**kwargs))


# ----------------------------------------------------------------------------- config / builds


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("variant", {"variant": "vit_x"}),
        ("checkpoint", {"checkpoint": " "}),
        ("img_size", {"img_size": 48}),
        ("tiny_depth", {"tiny_depth": 0}),
        ("tiny_window_size", {"tiny_window_size": -1}),
        ("tiny_embed_dim", {"tiny_embed_dim": 30, "tiny_num_heads": 4}),
        ("tiny_prompt_dim", {"tiny_prompt_dim": 12}),
        ("tiny_decoder_heads", {"tiny_decoder_heads": 3}),
        ("tiny_global_attn_indexes", {"tiny_global_attn_indexes": (2,)}),
        ("tiny_depth", {"variant": "vit_b", "tiny_depth": 0}),  # tiny fields are checked for every variant
    ],
)
def test_config_rejects_bad_values(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SAMConfig(**kwargs)


def test_variant_selects_official_hyper_parameters() -> None:
    """No allocation: the arch table, and the resolved input side."""
    assert SAMConfig(variant="vit_h").arch == SAM_ARCHS["vit_h"]
    assert (SAM_ARCHS["vit_l"].depth, SAM_ARCHS["vit_l"].embed_dim) == (24, 1024)
    assert SAMConfig(variant="vit_b").image_size == 1024
    assert SAMConfig().image_size == 64
    assert SAMConfig(variant="vit_b", img_size=512).image_size == 512


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_official_key_layout_on_meta(variant: str) -> None:
    """Our build has exactly the keys and shapes of segment-anything's own build (= the .pth files)."""
    with torch.device("meta"):
        ours = build_sam(SAMConfig(variant=variant))
        official = sam_model_registry[variant]()
    assert _shapes(ours) == _shapes(official)
    assert infer_sam_arch(ours.state_dict()) == (SAM_ARCHS[variant].depth, SAM_ARCHS[variant].embed_dim)


def test_vit_b_official_format_round_trip(tmp_path: Path) -> None:
    """Random vit_b weights saved by us load strictly into segment-anything's builder, and back."""
    torch.manual_seed(0)
    ours = build_sam(SAMConfig(variant="vit_b"))
    path = save_sam_checkpoint(ours, tmp_path / "sam_vit_b_01ec64.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(path))  # strict load_state_dict upstream
    for key, value in ours.state_dict().items():
        assert torch.equal(value, official.state_dict()[key]), key
    with torch.no_grad():
        official.mask_decoder.iou_token.weight.zero_()
    report = load_sam_checkpoint(official, path)
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(official.mask_decoder.iou_token.weight, ours.mask_decoder.iou_token.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tiny_round_trip(tmp_path: Path, suffix: str) -> None:
    src = _tiny(seed=0)
    path = save_sam_checkpoint(src, tmp_path / f"tiny{suffix}")
    dst = _tiny(seed=1)
    report = load_sam_checkpoint(dst, path)
    assert report.path == str(path) and report.missing_keys == [] and report.unexpected_keys == []
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key]), key
    built = build_sam(SAMConfig(checkpoint=str(path)))  # through the config
    assert torch.equal(built.mask_decoder.iou_token.weight, src.mask_decoder.iou_token.weight)


def test_non_strict_load_reports_keys(tmp_path: Path) -> None:
    state = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("mask_decoder.")}
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing keys"):
        load_sam_checkpoint(_tiny(), tmp_path / "partial.pth")
    report = load_sam_checkpoint(_tiny(), tmp_path / "partial.pth", strict=False)
    assert report.missing_keys and all(k.startswith("mask_decoder.") for k in report.missing_keys)
    assert report.unexpected_keys == ["extra.weight"]


# ----------------------------------------------------------------------------- loader errors


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = save_sam_checkpoint(_tiny(), tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint\n" * 10)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "nested.pth")
    st = save_sam_checkpoint(_tiny(), tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    save_sam_checkpoint(_tiny(img_size=128), tmp_path / "img128.pth")
    return {p.name: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing.pth", "not found"),
        ("truncated.pth", "cannot read"),
        ("garbage.pth", "cannot read"),
        ("list.pth", "not a state dict"),
        ("nested.pth", "not a state dict"),
        ("truncated.safetensors", "cannot read"),
        ("img128.pth", r"image_encoder\.pos_embed.*img_size 128"),
    ],
)
def test_bad_checkpoint_is_one_line_error_naming_the_file(tmp_path: Path, name: str, match: str) -> None:
    _bad_files(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_sam_checkpoint(_tiny(), tmp_path / name)
    message = str(info.value)
    assert str(tmp_path / name) in message and "\n" not in message


def test_wrong_variant_is_named(tmp_path: Path) -> None:
    """A vit_l-shaped file (24 blocks, width 1024) loaded into a vit_b: named before any copy."""
    state = {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)}
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(1024, 3, 16, 16)
    torch.save(state, tmp_path / "sam_vit_l_0b3195.pth")
    with torch.device("meta"):
        vit_b = build_sam(SAMConfig(variant="vit_b"))
    with pytest.raises(
        CheckpointError, match=r"sam_vit_l_0b3195\.pth looks like a vit_l .* model is a vit_b"
    ):
        load_sam_checkpoint(vit_b, tmp_path / "sam_vit_l_0b3195.pth")


# ----------------------------------------------------------------------------- freezing / stage


def test_freezing_follows_config() -> None:
    stage = build_sam_stage(SAMConfig())
    sam = stage.sam
    assert not any(p.requires_grad for p in sam.image_encoder.parameters())
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())
    assert all(p.requires_grad for p in sam.mask_decoder.parameters())
    stage.train()
    assert not sam.image_encoder.training and not sam.prompt_encoder.training and sam.mask_decoder.training
    cfg = SAMConfig(freeze_image_encoder=False, freeze_prompt_encoder=False, freeze_mask_decoder=True)
    stage = build_sam_stage(cfg).train()
    assert all(p.requires_grad for p in stage.sam.image_encoder.parameters())
    assert stage.sam.image_encoder.training and not stage.sam.mask_decoder.training
    assert not any(p.requires_grad for p in stage.sam.mask_decoder.parameters())


def test_preprocess_matches_segment_anything() -> None:
    """Same size, normalisation and padding as ``ResizeLongestSide.apply_image`` + ``Sam.preprocess``
    (the path SamPredictor uses; PIL resizes uint8, so values agree to about one grey level)."""
    stage = build_sam_stage(SAMConfig())
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 48, 80), dtype=torch.uint8)
    out = stage.preprocess(images)
    assert out.pixels.shape == (2, 3, 64, 64) and out.input_size == (38, 64) and out.original_size == (48, 80)
    resize = ResizeLongestSide(64)
    expected = torch.stack(
        [
            stage.sam.preprocess(
                torch.from_numpy(resize.apply_image(x.permute(1, 2, 0).numpy())).permute(2, 0, 1)
            )
            for x in images  # (3, H, W) -> (H, W, 3) numpy -> resized (h, w, 3) -> (3, h, w)
        ]
    )
    torch.testing.assert_close(out.pixels, expected, atol=0.03, rtol=0)
    assert out.pixels[:, :, 38:].abs().max() == 0  # zero padding (the mean colour)
    torch.testing.assert_close(stage.preprocess(images.float()).pixels, out.pixels)  # float 0..255 too


def test_upsample_matches_postprocess_masks_and_keeps_grad() -> None:
    stage = build_sam_stage(SAMConfig())
    low = torch.randn(3, 1, 16, 16, requires_grad=True)
    up = stage.upsample(low, (48, 80))
    with torch.no_grad():
        ref = stage.sam.postprocess_masks(low, input_size=(38, 64), original_size=(48, 80))
    torch.testing.assert_close(up, ref)
    up.sum().backward()
    assert low.grad is not None and low.grad.abs().sum() > 0


def _prompts(stage: SAMStage, b: int, t: int, seed: int = 0) -> SAMPrompts:
    torch.manual_seed(seed)
    builder = build_prompt_builder(PromptConfig(grounding_dim=8), stage.sam)
    return builder(torch.randn(b, t, 8), torch.randn(b, t, 16, 16))


@pytest.mark.parametrize("multimask", [False, True])
def test_stage_folds_targets_per_image(multimask: bool) -> None:
    """N = B*T pairs, sample-major; pair (b, t) equals running image b alone with its prompts."""
    torch.manual_seed(0)
    stage = build_sam_stage(SAMConfig(multimask=multimask)).eval()
    emb = torch.randn(2, 32, 4, 4)
    prompts = _prompts(stage, 2, 3)
    out = stage(emb, prompts)
    k = 3 if multimask else 1
    assert out.mask_logits.shape == (6, 1, 16, 16) and out.iou_pred.shape == (6,)
    assert out.candidate_logits.shape == (6, k, 16, 16) and out.candidate_iou.shape == (6, k)
    best = out.candidate_iou.argmax(1)
    torch.testing.assert_close(out.mask_logits[:, 0], out.candidate_logits[torch.arange(6), best])
    second = SAMPrompts(
        num_pairs=3,
        sparse=prompts.sparse[3:],
        point_coords=prompts.point_coords[3:],
        point_labels=prompts.point_labels[3:],
        boxes=prompts.boxes[3:],
        dense=prompts.dense[3:],
    )
    alone = stage(emb[1:], second)
    torch.testing.assert_close(alone.mask_logits, out.mask_logits[3:], atol=1e-5, rtol=1e-5)


def test_stage_checks_inputs() -> None:
    stage = build_sam_stage(SAMConfig())
    prompts = _prompts(stage, 1, 3)
    with pytest.raises(ValueError, match="3 pairs for 2 images"):
        stage(torch.randn(2, 32, 4, 4), prompts)
    with pytest.raises(ValueError, match="image_embeddings"):
        stage(torch.randn(1, 16, 4, 4), prompts)
    empty = build_prompt_builder(PromptConfig(grounding_dim=8), stage.sam)(
        torch.randn(2, 0, 8), torch.randn(2, 0, 16, 16)
    )
    out = stage(torch.randn(2, 32, 4, 4), empty)  # T = 0 (every sample answered [REJ])
    assert out.mask_logits.shape == (0, 1, 16, 16) and out.iou_pred.shape == (0,)


def test_frozen_image_encoder_gets_no_grad() -> None:
    stage = build_sam_stage(SAMConfig())
    emb = stage.encode_images(stage.preprocess(torch.rand(1, 3, 64, 64) * 255).pixels)
    assert emb.shape == (1, 32, 4, 4) and not emb.requires_grad
    trainable = build_sam_stage(SAMConfig(freeze_image_encoder=False))
    assert trainable.encode_images(torch.randn(1, 3, 64, 64)).requires_grad


# ----------------------------------------------------------------------------- one-batch overfit


def _shape_targets(size: int) -> torch.Tensor:
    """``(2, 2, S, S)`` {0, 1}: two objects per image (rectangles and discs)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).float()

    def disc(cy: int, cx: int, r: int) -> torch.Tensor:
        return (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).float()

    return torch.stack(
        [
            torch.stack([rect(8, 30, 6, 40), disc(44, 44, 12)]),
            torch.stack([disc(20, 22, 14), rect(36, 60, 10, 58)]),
        ]
    )


def test_one_batch_overfit_through_sam() -> None:
    """Tiny SAM (frozen random ViT), 2 images x 2 targets: all four prompt types from a fixed coarse mask
    (the target shifted by one cell) and learned grounding embeddings; mask decoder + prompt projection
    train until every pair's IoU > 0.9."""
    b, t, s = 2, 2, 64
    torch.manual_seed(0)
    stage = build_sam_stage(SAMConfig(img_size=s))
    builder = build_prompt_builder(PromptConfig(grounding_dim=16), stage.sam)
    targets = _shape_targets(s).view(b * t, 1, s, s)  # (N, 1, S, S)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8)
    with torch.no_grad():
        emb = stage.encode_images(stage.preprocess(images).pixels)  # (B, 32, 4, 4)
    coarse = F.avg_pool2d(targets, 4)  # (N, 1, 16, 16): the head's stride-4 view
    coarse = ((torch.roll(coarse, shifts=(1, 1), dims=(2, 3)) * 2 - 1) * 4).view(b, t, 16, 16)
    queries = torch.nn.Parameter(torch.randn(b, t, 16))
    params = [p for p in stage.parameters() if p.requires_grad] + [*builder.parameters(), queries]
    assert {id(p) for p in stage.sam.mask_decoder.parameters()} <= {id(p) for p in params}
    opt = torch.optim.AdamW(params, lr=5e-3)
    stage.train()

    def iou(logits: torch.Tensor) -> torch.Tensor:  # (N, 1, S, S) -> (N,)
        pred, gt = logits.detach() > 0, targets > 0
        return (pred & gt).sum((1, 2, 3)) / (pred | gt).sum((1, 2, 3))

    def predict() -> torch.Tensor:
        return stage.upsample(stage(emb, builder(queries, coarse)).mask_logits, (s, s))  # (N, 1, S, S)

    for step in range(200):
        logits = predict()
        if step == 0:
            start = iou(logits)
        if iou(logits).min() > 0.9:  # checked before the update: these are the final weights
            break
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * targets).sum((1, 2, 3)) + 1) / (prob + targets).sum((1, 2, 3)).add(1)
        loss = F.binary_cross_entropy_with_logits(logits, targets) + dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = iou(predict())
    assert start.max() < 0.5, start
    assert final.min() > 0.9, final
