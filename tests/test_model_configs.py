"""configs/model/*.yaml: the tiny ones build and train a step as written; the large ones build at reduced
size (paths null, tiny widths) with the right wiring; a LLaVA-format folder feeds LLM, tower and projector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_model_kit import SIZE, TEMPLATE, TINY, synth_samples, tiny_cfg
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mllm_ris.config import load_config
from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.llm import train_bpe_tokenizer
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import build_processor
from s2rm_head.encoders.pixel import SAMViTEncoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
LLAVA = CONFIGS / "llava-1.5-7b_sam-vit-h.yaml"
QWEN = CONFIGS / "qwen2-0.5b_siglip_sam-vit-b.yaml"
NO_PATHS = ["model.sam.checkpoint=null", "model.pixel.path=null"]
SMALL_LLM = [
    "model.mllm.random_hidden_size=32",
    "model.mllm.random_intermediate_size=64",
    "model.mllm.dtype=float32",
]


def _step(model: RISModel, image_size: int = SIZE) -> None:
    """One training forward + backward on the SynthRef-like samples; the loss is finite."""
    batch = build_processor(model, image_size=image_size, template=TEMPLATE)(synth_samples())
    out = model.train()(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_every_model_config_is_a_model_section() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= {
        "tiny-synth",
        "tiny-synth-classic",
        "llava-1.5-7b_sam-vit-h",
        "qwen2-0.5b_siglip_sam-vit-b",
    }
    for file in files:
        assert list(yaml.safe_load(file.read_text())) == ["model"], file.name
        load_config(file)


@pytest.mark.parametrize(("name", "mode"), [("tiny-synth", "mllm"), ("tiny-synth-classic", "classic")])
def test_tiny_configs_build_as_written(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(load_config(CONFIGS / f"{name}.yaml").model)
    assert model.mode == mode and model.cfg.output_mode == "direct" and model.sam_stage is None
    assert model.cfg.head.in_channels == (16, 32, 64, 128) and model.cfg.head.lang_dim == 64
    if mode == "mllm":
        assert model.vision.grid == (32, 32) and model.cfg.projector.vision_dim == 32
        assert model.cfg.projector.llm_dim == 64 and model.cfg.projector.grid == (32, 32)
    _step(model, image_size=128)


def test_pointer_overlay_builds_the_bundled_models_architecture() -> None:
    """tiny-synth.yaml + tiny-synth-pointer.yaml: region pointer over descriptor tokens, no tower, prior."""
    torch.manual_seed(0)
    model = build_model(load_config([CONFIGS / "tiny-synth.yaml", CONFIGS / "tiny-synth-pointer.yaml"]).model)
    assert model.vision is None and model.cfg.output_mode == "prior" and model.mllm.pointer is not None
    assert model.cfg.projector.descriptors and not model.cfg.projector.tower
    _step(model, image_size=128)


def test_llava_config_wiring_at_reduced_size_on_meta() -> None:
    """The LISA-scale file, paths nulled and a tiny LLM: vit_h SAM (on the meta device: no memory) whose
    ViT the pixel pyramid shares; widths derived from the built parts."""
    cfg = load_config(LLAVA, ["model.mllm.llava_path=null", *NO_PATHS, *SMALL_LLM]).model
    with torch.device("meta"):
        model = build_model(cfg)
    vit = model.sam_stage.sam.image_encoder
    assert len(vit.blocks) == 32 and vit.patch_embed.proj.out_channels == 1280  # vit_h
    assert isinstance(model.pixel_encoder, SAMViTEncoder) and model.pixel_encoder.vit is vit
    assert model.share_sam_vit and model.cfg.head.in_channels == (256,) * 4
    assert model.cfg.head.lang_dim == model.cfg.prompts.grounding_dim == 256 == model.mllm.seg_dim
    assert model.cfg.projector.llm_dim == 32 and model.cfg.projector.vision_dim == model.vision.dim
    assert model.prompt_builder.prompt_dim == 256 and model.cfg.mllm.lora.r == 8


@pytest.mark.parametrize("file", [LLAVA, QWEN], ids=["llava", "qwen"])
def test_large_configs_train_a_step_at_reduced_size(file: Path) -> None:
    """Same wiring, every part tiny (tiny SAM shared by the pixel pyramid), one forward / backward."""
    small = [
        "model.mllm.llava_path=null",
        "model.mllm.name_or_path=null",
        "model.mllm.tokenizer=bpe",
        "model.vision.name_or_path=null",
        "model.sam.variant=tiny",
        "model.pixel.sam_pyramid_channels=16",
        "model.projector.num_heads=2",
        "model.projector.max_tokens=null",
        "model.head.dim=16",
        "model.head.num_heads=2",
        "model.mllm.gradient_checkpointing=false",
        "model.mllm.seg_dim=16",
        *NO_PATHS,
        *SMALL_LLM,
    ]
    torch.manual_seed(0)
    model = build_model(load_config(file, [*TINY, *small]).model)
    assert model.share_sam_vit and model.pixel_encoder.vit is model.sam_stage.sam.image_encoder
    assert model.cfg.head.in_channels == (16,) * 4 and model.cfg.output_mode == "auto"
    _step(model)
    vit = model.sam_stage.sam.image_encoder
    assert all(p.grad is None for p in vit.parameters())  # shared and frozen
    assert all(p.grad is not None for p in model.pixel_encoder.output.parameters())


def test_qwen_config_selects_vit_b_and_fails_clearly_without_files() -> None:
    cfg = load_config(
        QWEN, ["model.vision.name_or_path=null", "model.vision.random_hidden_size=48", *SMALL_LLM]
    )
    cfg.model.mllm.name_or_path = None
    cfg.model.sam.checkpoint = cfg.model.pixel.path = None
    with torch.device("meta"):
        model = build_model(cfg.model)
    vit = model.sam_stage.sam.image_encoder
    assert len(vit.blocks) == 12 and vit.patch_embed.proj.out_channels == 768  # vit_b
    assert model.cfg.head.in_channels == (128,) * 4 and model.cfg.projector.vision_dim == 48
    with torch.device("meta"):  # the parts built before the failing one take no memory
        with pytest.raises(CheckpointError, match=r"models/sam_vit_b_01ec64\.pth"):
            build_model(load_config(QWEN).model)
        with pytest.raises(ConfigError, match=r"models/Qwen2-0\.5B-Instruct"):
            build_model(load_config(QWEN, NO_PATHS).model)
        with pytest.raises(ConfigError, match="models/siglip-base-patch16-224"):
            build_model(load_config(QWEN, [*NO_PATHS, "model.mllm.name_or_path=null"]).model)


def test_sharing_needs_one_freezing_choice() -> None:
    cfg = tiny_cfg("classic", "sam", "model.pixel.name=sam-vit", "model.pixel.sam_freeze_vit=false")
    with pytest.raises(ConfigError, match=r"^pixel\.sam_freeze_vit: False, sam\.freeze_image_encoder: True"):
        build_model(cfg)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-format folder (CLIP 32 px / patch 8, Llama hidden 32) with a BPE tokenizer."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = train_bpe_tokenizer()
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **tiny),
        text_config=LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **tiny),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    LlavaForConditionalGeneration(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_llava_folder_feeds_llm_tower_and_projector(llava_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mllm", "direct", f"model.mllm.llava_path={llava_dir}"))
    llava = LlavaForConditionalGeneration.from_pretrained(str(llava_dir))
    assert model.vision.grid == (4, 4) and model.cfg.projector.vision_dim == 32 == model.cfg.projector.llm_dim
    torch.testing.assert_close(
        model.projector.mlp[0].weight, llava.model.multi_modal_projector.linear_1.weight
    )
    torch.testing.assert_close(model.projector.mlp[2].bias, llava.model.multi_modal_projector.linear_2.bias)
    assert any(n.startswith("projector.mlp: 4 tensors") and "missing []" in n for n in model.load_notes)
    assert any(n.startswith("vision: tower from") for n in model.load_notes)
    _step(model)
    model.eval().save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "vision.safetensors").exists()  # frozen, reloaded from the LLaVA folder
    assert not (tmp_path / "m" / "mllm" / "llm").exists()
    loaded = RISModel.from_pretrained(tmp_path / "m")
    batch = build_processor(model, image_size=SIZE, template=TEMPLATE)(synth_samples())
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).masks, model(batch).masks)


@pytest.mark.parametrize(
    ("mode", "output_mode", "override", "message"),
    [
        (
            "mllm",
            "direct",
            "model.head.in_channels=[8, 8, 8, 8]",
            "head.in_channels: [8, 8, 8, 8] disagrees with the pixel encoder's channels [8, 8, 16, 16]",
        ),
        (
            "mllm",
            "direct",
            "model.head.lang_dim=32",
            "head.lang_dim: 32 disagrees with the grounding LLM's seg_dim 16",
        ),
        (
            "mllm",
            "direct",
            "model.projector.vision_dim=32",
            "projector.vision_dim: 32 disagrees with the vision tower's width 16",
        ),
        (
            "mllm",
            "direct",
            "model.projector.grid=[4, 16]",
            "projector.grid: [4, 16] disagrees with the vision tower's grid [8, 8]",
        ),
        (
            "mllm",
            "direct",
            "model.projector.llm_dim=16",
            "projector.llm_dim: 16 disagrees with the LLM's hidden size 32",
        ),
        (
            "mllm",
            "sam",
            "model.prompts.grounding_dim=8",
            "prompts.grounding_dim: 8 disagrees with head.lang_dim",
        ),
        (
            "classic",
            "prior",
            "model.projector.llm_dim=64",
            "projector.llm_dim: 64 disagrees with pointer.dim 32",
        ),
    ],
)
def test_a_derived_width_that_disagrees_is_an_error_naming_it(
    mode: str, output_mode: str, override: str, message: str
) -> None:
    pointer = ["model.pointer.dim=32", "model.projector.descriptors=true", "model.projector.tower=false"]
    extra = pointer if mode == "classic" else []
    with pytest.raises(ConfigError) as info:
        build_model(tiny_cfg(mode, output_mode, *extra, override))
    assert str(info.value).startswith(message) and str(info.value).endswith("; remove it (it is derived)")


def test_derived_widths_resolved_equal_values_accepted_unbuilt_parts_null() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mllm", "sam"))
    resolved = model.cfg
    assert resolved.head.in_channels == (8, 8, 16, 16) and resolved.head.lang_dim == 16
    assert (resolved.projector.vision_dim, resolved.projector.grid, resolved.projector.llm_dim) == (
        16,
        (8, 8),
        32,
    )
    assert resolved.prompts.grounding_dim == 16
    given = [  # the resolved values, written out: the same model
        "model.head.in_channels=[8, 8, 16, 16]",
        "model.head.lang_dim=16",
        "model.projector.vision_dim=16",
        "model.projector.grid=[8, 8]",
        "model.projector.llm_dim=32",
        "model.prompts.grounding_dim=16",
    ]
    torch.manual_seed(0)
    assert build_model(tiny_cfg("mllm", "sam", *given)).cfg == resolved
    # parts not built derive nothing: their widths are null, whatever was given (older folders)
    direct = build_model(tiny_cfg("mllm", "direct", "model.prompts.grounding_dim=999")).cfg
    assert direct.prompts.grounding_dim is None
    classic = build_model(tiny_cfg("classic", "direct", "model.projector.vision_dim=6")).cfg
    assert (classic.projector.vision_dim, classic.projector.llm_dim, classic.projector.grid) == (
        None,
        None,
        None,
    )


def test_parts_built_alone_need_their_widths() -> None:
    from mllm_ris.modeling.projector import ProjectorConfig, build_projector
    from s2rm_head.config import HeadConfig, PromptConfig
    from s2rm_head.heads.registry import build_head
    from s2rm_head.sam.prompts import PromptBuilder

    with pytest.raises(ConfigError, match=r"^in_channels: null; set the pixel pyramid's 4 widths"):
        build_head(HeadConfig(lang_dim=8))
    with pytest.raises(ConfigError, match=r"^lang_dim: null"):
        build_head(HeadConfig(in_channels=(4, 4, 4, 4)))
    with pytest.raises(ConfigError, match=r"^grounding_dim: null"):
        PromptBuilder(cfg=PromptConfig(), prompt_dim=32, img_size=64)
    PromptBuilder(cfg=PromptConfig(sparse=False), prompt_dim=32, img_size=64)  # reads no queries
    with pytest.raises(ConfigError, match=r"^llm_dim: null"):
        build_projector(ProjectorConfig(vision_dim=8, num_heads=2))
    with pytest.raises(ConfigError, match=r"^vision_dim: null"):
        build_projector(ProjectorConfig(llm_dim=8))
