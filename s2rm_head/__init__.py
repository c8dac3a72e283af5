"""s2rm_head: S²RM spatial-semantic fusion, CASG decoder and baseline fusion heads.

The package knows nothing about LLMs: a head takes a pixel-feature pyramid and
:class:`LanguageFeatures` and returns :class:`HeadOutput`. Build one with
``build_head(HeadConfig(name="s2rm" | "lts" | "cmsa" | "two-stage", ...))``.
"""

from s2rm_head.baselines import CMSAHead, LTSHead, TwoStageHead
from s2rm_head.casg import CASGDecoder, CASGOutput
from s2rm_head.head import HEAD_NAMES, FoldedInputs, FusionHead, HeadConfig, S2RMHead
from s2rm_head.prompts import PromptBuilder, PromptConfig, SAMPrompts, build_prompt_builder
from s2rm_head.registry import build_head
from s2rm_head.s2rm import S2RM, BiSliceScan, LanguageDistributor, ParsedSemanticBalance, S2RMOutput
from s2rm_head.sam import SAMConfig, SAMOutput, SAMStage, build_sam, build_sam_stage
from s2rm_head.sam_checkpoint import load_sam_checkpoint, save_sam_checkpoint
from s2rm_head.types import HeadOutput, LanguageFeatures

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
