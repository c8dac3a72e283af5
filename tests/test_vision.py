"""Vision tower: tiny default ViT, CLIP / SigLIP folders, feature layer, CLS drop, freezing, preprocessing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    SiglipVisionConfig,
)

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.vision import VisionTowerConfig, build_vision_tower

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def test_default_tower_is_tiny_vit_with_1024_patches() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig())
    assert tower.grid == (32, 32) and tower.num_patches == 1024 and tower.dim == 32
    assert tower.image_size == 128
    feats = tower(torch.randn(2, 3, 128, 128))
    assert feats.shape == (2, 1024, 32)  # CLS dropped
    # frozen: no trainable weights, eval mode survives .train()
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert tower.training and not tower.model.training


@pytest.mark.parametrize("layer", [0, -1, -2])
def test_feature_layer_selects_hidden_state(layer: int) -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(feature_layer=layer, random_image_size=32))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = tower.model(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 1:]
    torch.testing.assert_close(tower(x), ref)


def test_out_of_range_feature_layer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="feature_layer"):
        VisionTowerConfig(feature_layer=5)


def _save(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize(
    ("config", "mean0"),
    [
        (CLIPVisionConfig(image_size=32, patch_size=8, **TINY), 0.48145466),  # CLS token dropped
        (SiglipVisionConfig(image_size=32, patch_size=8, **TINY), 0.5),  # no CLS token
    ],
    ids=["clip", "siglip"],
)
def test_hf_vision_folders_load(tmp_path: Path, config: object, mean0: float) -> None:
    torch.manual_seed(0)
    folder = _save(AutoModel.from_config(config), tmp_path / "tower")
    tower = build_vision_tower(VisionTowerConfig(name_or_path=folder))
    assert tower.grid == (4, 4) and tower.dim == 32
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    assert tower.image_mean.flatten()[0].item() == pytest.approx(mean0)


def test_composite_clip_folder_gives_its_vision_half(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            vision_config={"image_size": 32, "patch_size": 8, **TINY},
            text_config={"vocab_size": 64, **TINY},
            projection_dim=16,
        )
    )
    folder = _save(clip, tmp_path / "clip")
    tower = build_vision_tower(VisionTowerConfig(name_or_path=folder, feature_layer=-1))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(tower(x), ref)


def test_preprocessor_config_overrides_stats_and_save_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(random_image_size=32))
    tower.save_pretrained(tmp_path / "t")
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "t" / "preprocessor_config.json").write_text(json.dumps(stats))
    again = build_vision_tower(VisionTowerConfig(name_or_path=str(tmp_path / "t")))
    assert again.image_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(x), tower(x))


def test_unfrozen_tower_trains_only_used_weights() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(freeze=False, feature_layer=-2, random_image_size=32))
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert any(".layers.0." in n for n in trainable)  # the layer that feeds hidden_states[-2]
    assert not any(".layers.1." in n or "pooler" in n or n.startswith("model.layernorm") for n in trainable)
    tower(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)


def test_preprocess_resizes_and_normalises() -> None:
    tower = build_vision_tower(VisionTowerConfig(random_image_size=32))
    image = np.full((50, 70, 3), 255, dtype=np.uint8)  # white, any size
    x = tower.preprocess(image)
    assert x.shape == (1, 3, 32, 32)
    expected = (1.0 - tower.image_mean) / tower.image_std  # ViT default: mean = std = 0.5 → 1.0
    torch.testing.assert_close(x, expected.expand_as(x))
    floats = tower.preprocess(torch.zeros(2, 3, 64, 64))
    assert floats.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 64, 64))


def test_feature_memo_reuses_features_of_seen_images() -> None:
    """feature_memo_mb: the same pixels give the same features without running the model again; the
    memo stays within its size; it needs a frozen tower and is cleared by a state-dict load."""
    cfg = VisionTowerConfig(random_image_size=32, random_patch_size=4, random_hidden_size=16)
    torch.manual_seed(0)
    plain = build_vision_tower(cfg)
    memo = build_vision_tower(replace(cfg, feature_memo_mb=1.0))
    memo.load_state_dict(plain.state_dict())
    calls: list[int] = []
    memo.model.register_forward_pre_hook(
        lambda m, a, k: calls.append(len(k["pixel_values"])), with_kwargs=True
    )
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(memo(x), plain(x))
    y = torch.cat([x[1:], torch.randn(1, 3, 32, 32)])  # two seen, one new
    torch.testing.assert_close(memo(y), plain(y))
    assert calls == [3, 1]
    per_image = 64 * 16 * 4  # (h*w, Cv) float32
    small = build_vision_tower(replace(cfg, feature_memo_mb=2.5 * per_image / 2**20))
    small(torch.randn(4, 3, 32, 32))
    assert len(small._memo) == 2 and small._memo.used == 2 * per_image
    memo.load_state_dict(plain.state_dict())
    assert not memo._memo
    with pytest.raises(ConfigError, match="feature_memo_mb: needs freeze"):
        VisionTowerConfig(freeze=False, feature_memo_mb=1.0)
