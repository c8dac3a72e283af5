"""``ModelConfig``: which :class:`~mllm_ris.modeling.model.RISModel` to build, from its parts' configs.

Here, in ``modeling``, so a model folder (:mod:`mllm_ris.modeling.model_io`) reads its config without
the whole-run tree of :mod:`mllm_ris.config` (which re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mllm_ris.config_tree import check
from mllm_ris.modeling.lora import MLLMConfig
from mllm_ris.modeling.losses import LossConfig
from mllm_ris.modeling.pointer import PointerConfig
from mllm_ris.modeling.projector import ProjectorConfig
from mllm_ris.modeling.superpixels import SuperpixelConfig
from mllm_ris.modeling.vision import VisionTowerConfig
from s2rm_head.head import HeadConfig
from s2rm_head.pixel_encoder import PixelEncoderConfig
from s2rm_head.prompts import PromptConfig
from s2rm_head.sam import SAMConfig
from s2rm_head.text_encoder import TextEncoderConfig

__all__ = ["ModelConfig"]


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
