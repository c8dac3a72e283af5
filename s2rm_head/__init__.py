"""s2rm_head: S²RM spatial-semantic fusion, CASG decoder and baseline fusion heads.

The package knows nothing about LLMs: a head takes a pixel-feature pyramid and
:class:`LanguageFeatures` and returns :class:`HeadOutput`. Build one with
``build_head(HeadConfig(name="s2rm" | "lts" | "cmsa" | "two-stage", ...))``.

Nothing is imported here: each public name below is loaded from its module on first access
(``from s2rm_head import build_head`` imports :mod:`s2rm_head.heads.registry` then), so reading a config
(:mod:`s2rm_head.config`) or an error class (:mod:`s2rm_head.errors`) does not build the heads' code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from s2rm_head.config import HEAD_NAMES, HeadConfig, PromptConfig, SAMConfig
    from s2rm_head.heads.baselines import CMSAHead, LTSHead, TwoStageHead
    from s2rm_head.heads.casg import CASGDecoder, CASGOutput
    from s2rm_head.heads.fusion import FoldedInputs, FusionHead, S2RMHead
    from s2rm_head.heads.registry import build_head
    from s2rm_head.heads.s2rm import S2RM, BiSliceScan, LanguageDistributor, ParsedSemanticBalance, S2RMOutput
    from s2rm_head.sam.checkpoint import load_sam_checkpoint, save_sam_checkpoint
    from s2rm_head.sam.prompts import PromptBuilder, SAMPrompts, build_prompt_builder
    from s2rm_head.sam.stage import SAMOutput, SAMStage, build_sam, build_sam_stage
    from s2rm_head.types import HeadOutput, LanguageFeatures

_HOMES: dict[str, tuple[str, ...]] = {
    "config": ("HEAD_NAMES", "HeadConfig", "PromptConfig", "SAMConfig"),
    "heads.baselines": ("CMSAHead", "LTSHead", "TwoStageHead"),
    "heads.casg": ("CASGDecoder", "CASGOutput"),
    "heads.fusion": ("FoldedInputs", "FusionHead", "S2RMHead"),
    "heads.registry": ("build_head",),
    "heads.s2rm": ("S2RM", "BiSliceScan", "LanguageDistributor", "ParsedSemanticBalance", "S2RMOutput"),
    "sam.checkpoint": ("load_sam_checkpoint", "save_sam_checkpoint"),
    "sam.prompts": ("PromptBuilder", "SAMPrompts", "build_prompt_builder"),
    "sam.stage": ("SAMOutput", "SAMStage", "build_sam", "build_sam_stage"),
    "types": ("HeadOutput", "LanguageFeatures"),
}

__all__ = [
    "HEAD_NAMES",
    "S2RM",
    "BiSliceScan",
    "CASGDecoder",
    "CASGOutput",
    "CMSAHead",
    "FoldedInputs",
    "FusionHead",
    "HeadConfig",
    "HeadOutput",
    "LTSHead",
    "LanguageDistributor",
    "LanguageFeatures",
    "ParsedSemanticBalance",
    "PromptBuilder",
    "PromptConfig",
    "S2RMHead",
    "S2RMOutput",
    "SAMConfig",
    "SAMOutput",
    "SAMPrompts",
    "SAMStage",
    "TwoStageHead",
    "build_head",
    "build_prompt_builder",
    "build_sam",
    "build_sam_stage",
    "load_sam_checkpoint",
    "save_sam_checkpoint",
]


# each public name is imported from its module (_HOMES) on first access (PEP 562, lazy_loader)
__getattr__, __dir__, _ = lazy_loader.attach(__name__, submod_attrs={m: list(n) for m, n in _HOMES.items()})
