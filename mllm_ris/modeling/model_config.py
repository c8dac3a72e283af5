"""``ModelConfig``: which :class:`~mllm_ris.modeling.model.RISModel` to build, from its parts' configs.

Here, in ``modeling``, so a model folder (:mod:`mllm_ris.modeling.model_io`) reads its config without
the whole-run tree of :mod:`mllm_ris.config` (which re-exports it). The configs of the parts a model
may not use live beside it, so reading a config imports none of their code: :class:`LossConfig`
(the loss weights; the losses are :mod:`mllm_ris.modeling.losses`, which re-exports it),
:class:`VisionTowerConfig` (:mod:`mllm_ris.modeling.vision`, which re-exports it) and ``s2rm_head``'s
(:mod:`s2rm_head.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mllm_ris.config_tree import check
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.lora import MLLMConfig
from mllm_ris.modeling.pointer import PointerConfig
from mllm_ris.modeling.projector import ProjectorConfig
from mllm_ris.modeling.superpixels import SuperpixelConfig
from s2rm_head.config import HeadConfig, PixelEncoderConfig, PromptConfig, SAMConfig, TextEncoderConfig

if TYPE_CHECKING:
    from transformers import ViTConfig

__all__ = ["LossConfig", "ModelConfig", "VisionTowerConfig"]


@dataclass
class LossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    bce: float = field(default=1.0, metadata={"help": "per-pixel binary cross-entropy"})
    dice: float = field(default=1.0, metadata={"help": "soft Dice, on samples that have a target"})
    iou: float = field(default=1.0, metadata={"help": "MSE of the predicted IoU against the measured one"})
    lm: float = field(default=1.0, metadata={"help": "LM cross-entropy on the answer tokens (mllm mode)"})
    no_target: float = field(default=1.0, metadata={"help": "BCE of the reject logit (mllm mode)"})
    no_target_pos_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the no-target class in that BCE; targeted / no-target expressions of the "
            "training data balances the two classes (then reject_threshold 0.5 is a balanced decision)"
        },
    )
    sam: float = field(default=1.0, metadata={"help": "scale of the bce/dice/iou terms on SAM's masks"})
    region_bce: float = field(
        default=1.0, metadata={"help": "BCE of the region pointer's logits against the target's regions"}
    )
    region_dice: float = field(
        default=1.0, metadata={"help": "soft Dice of the pointer's painted region prior"}
    )
    region_threshold: float = field(
        default=0.5, metadata={"help": "a region belongs to a target when the target covers this fraction"}
    )
    match_targets: bool = field(
        default=True, metadata={"help": "assign targets to [SEG] queries by minimum BCE + Dice (Hungarian)"}
    )

    def __post_init__(self) -> None:
        for name in ("bce", "dice", "iou", "lm", "no_target", "sam", "region_bce", "region_dice"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: loss weights must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.region_threshold <= 1.0:
            raise ConfigError(f"region_threshold: must be in (0, 1], got {self.region_threshold}")
        if self.no_target_pos_weight <= 0:
            raise ConfigError(f"no_target_pos_weight: must be > 0, got {self.no_target_pos_weight}")


@dataclass
class VisionTowerConfig:
    """Which vision model to load; ``random_*`` fields only shape the tiny default (no path)."""

    name_or_path: str | None = field(
        default=None, metadata={"help": "local HF vision model folder; null = tiny random ViT"}
    )
    feature_layer: int = field(
        default=-2, metadata={"help": "hidden_states index (0 = patch embeddings, -1 = last layer)"}
    )
    freeze: bool = field(default=True, metadata={"help": "freeze the tower and keep it in eval mode"})
    feature_memo_mb: float = field(
        default=0.0,
        metadata={
            "help": "a frozen tower keeps the features of the images it saw, up to this many MB (least "
            "recently used dropped first), and reuses them for the same pixels; 0 = off. Training sees "
            "each image many times: on CPU the tiny tower is ~60 % of a pointer warm-up step"
        },
    )
    random_image_size: int = field(default=128, metadata={"help": "input side S (random init only)"})
    random_patch_size: int = field(default=4, metadata={"help": "patch side (random init only)"})
    random_hidden_size: int = field(default=32, metadata={"help": "Cv (random init only)"})
    random_num_layers: int = field(default=2, metadata={"help": "random init only"})
    random_num_heads: int = field(default=2, metadata={"help": "random init only"})

    def __post_init__(self) -> None:
        check(
            self.random_image_size % self.random_patch_size == 0,
            "random_image_size",
            f"{self.random_image_size} not divisible by random_patch_size={self.random_patch_size}",
        )
        check(
            self.random_hidden_size % self.random_num_heads == 0,
            "random_hidden_size",
            f"{self.random_hidden_size} not divisible by random_num_heads={self.random_num_heads}",
        )
        check(self.feature_memo_mb >= 0, "feature_memo_mb", f"must be >= 0, got {self.feature_memo_mb}")
        check(
            self.feature_memo_mb == 0 or self.freeze,
            "feature_memo_mb",
            "needs freeze: true (a trained tower's features change)",
        )
        for name in ("random_patch_size", "random_num_layers", "random_num_heads"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        layers = self.random_num_layers + 1  # hidden_states holds the embeddings + every layer
        check(
            self.name_or_path is not None or -layers <= self.feature_layer < layers,
            "feature_layer",
            f"{self.feature_layer} out of range for a {self.random_num_layers}-layer tower",
        )

    def tiny_config(self) -> ViTConfig:
        """The random default: a ViT whose grid is ``(S / patch)^2`` (32 x 32 = 1024 with defaults)."""
        from transformers import ViTConfig

        return ViTConfig(
            image_size=self.random_image_size,
            patch_size=self.random_patch_size,
            hidden_size=self.random_hidden_size,
            num_hidden_layers=self.random_num_layers,
            num_attention_heads=self.random_num_heads,
            intermediate_size=2 * self.random_hidden_size,
        )


@dataclass
class ModelConfig:
    """Which model to build.

    ``head.in_channels`` and ``head.lang_dim`` are taken from the built pixel and text encoders
    (``projector.vision_dim`` / ``grid`` / ``llm_dim`` from the built vision tower and LLM), so YAML
    files only choose the parts and their widths. ``text`` is used in classic mode; ``vision``,
    ``superpixels``, ``projector`` and ``mllm`` in mllm mode.
    """

    mode: Literal["classic", "mllm"] = field(
        default="classic", metadata={"help": "classic: text encoder + head; mllm: grounding LLM + head"}
    )
    output_mode: Literal["direct", "sam", "auto", "prior"] = field(
        default="direct",
        metadata={
            "help": "masks from the head, from SAM, per query by predicted IoU, or the region pointer's "
            "painted prior alone (mllm.pointer_dim; the pixel side is not run)"
        },
    )
    checkpoint: str | None = field(
        default=None,
        metadata={"help": "a model folder to start from (save_pretrained, a run or an export; same mode)"},
    )
    reject_threshold: float | None = field(
        default=0.5,
        metadata={
            "help": "mllm generation answers [REJ] when the reject head's no-target probability is above "
            "this (besides the LLM writing [REJ] itself); null = the LLM's text alone decides"
        },
    )
    pixel: PixelEncoderConfig = field(default_factory=PixelEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # mllm mode: image -> vision tower -> projector (+ superpixels) -> grounding LLM -> [SEG] embeddings
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    pointer: PointerConfig = field(default_factory=PointerConfig)  # classic mode's region pointer
    # SAM stage (built when output_mode is sam or auto): prompts from the head -> SAM's mask decoder
    sam: SAMConfig = field(default_factory=SAMConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        t = self.reject_threshold
        check(t is None or 0.0 < t < 1.0, "reject_threshold", f"must be in (0, 1) or null, got {t}")
