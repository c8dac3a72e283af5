"""Reuse an HF LLaVA-format checkpoint (``LlavaForConditionalGeneration.save_pretrained``).

In transformers 5 the loaded model is laid out as ``model.vision_tower`` (e.g. ``CLIPVisionModel``),
``model.multi_modal_projector`` (``linear_1`` → act → ``linear_2``), ``model.language_model`` (the
decoder without head, e.g. ``LlamaModel``) and ``lm_head``; on disk the keys keep the legacy
names (``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``), which ``from_pretrained`` converts. The decoder and head are moved
(not copied) into a causal-LM shell of ``text_config``'s class, so the LLM is an ordinary
``AutoModelForCausalLM`` (LoRA targets never reach the vision tower).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.llm import DTYPES, has_tokenizer_files
from mllm_ris.modeling.vision import VisionTower, default_image_stats

__all__ = ["LlavaCheckpoint", "load_llava_checkpoint"]

# LLaVA projector → our projectors' ``mlp = nn.Sequential(Linear(Cv, D), GELU, Linear(D, D))``
_PROJECTOR_KEYS = {"linear_1": "mlp.0", "linear_2": "mlp.2"}


@dataclass
class LlavaCheckpoint:
    """The parts of a LLaVA checkpoint.

    Attributes:
        llm: causal LM of ``text_config``'s class holding the checkpoint's decoder and LM head.
        vision: the vision tower at ``vision_feature_layer`` (CLS dropped).
        projector_state: ``mlp.0.weight (D, Cv)``, ``mlp.0.bias (D,)``, ``mlp.2.weight (D, D)``,
            ``mlp.2.bias (D,)`` (biases only when the checkpoint has them).
        tokenizer: the folder's tokenizer, or None when it has none.
        image_token_id: the checkpoint's ``image_token_index``.
    """

    llm: PreTrainedModel
    vision: VisionTower
    projector_state: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase | None
    image_token_id: int


def load_llava_checkpoint(
    path: str | Path, *, freeze_vision: bool = True, dtype: str = "float32"
) -> LlavaCheckpoint:
    """Load a local LLaVA-format folder and split it into LLM, vision tower and projector weights."""
    from transformers import LlavaForConditionalGeneration

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"llava_path: no config.json in {str(folder)!r} (a local LLaVA folder is needed)")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type != "llava":
        raise ConfigError(f"llava_path: {str(folder)!r} holds a {config.model_type!r} model, not llava")
    if not isinstance(config.vision_feature_layer, int):
        raise ConfigError(
            f"llava_path: vision_feature_layer {config.vision_feature_layer}: only one layer is supported"
        )
    if config.projector_hidden_act != "gelu":
        raise ConfigError(
            f"llava_path: projector activation {config.projector_hidden_act!r}; the projectors use gelu"
        )
    llava = LlavaForConditionalGeneration.from_pretrained(
        str(folder), local_files_only=True, dtype=DTYPES[dtype]
    )

    decoder = llava.model.language_model  # e.g. LlamaModel, (B, L) → (B, L, D)
    with torch.device("meta"):  # a shell: its decoder and head are replaced below, nothing is allocated
        llm = AutoModelForCausalLM.from_config(config.text_config)
    setattr(llm, llm.base_model_prefix, decoder)
    llm.set_output_embeddings(llava.lm_head)
    llm.config = decoder.config
    meta = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(
            f"llava_path: {str(folder)!r}: causal-LM weights not found in the checkpoint: {meta[:3]}"
        )

    mean, std = default_image_stats(config.vision_config, folder)
    vision = VisionTower(
        llava.model.vision_tower,
        feature_layer=config.vision_feature_layer,
        freeze=freeze_vision,
        image_mean=mean,
        image_std=std,
    )
    projector_state = {}
    for name, param in llava.model.multi_modal_projector.state_dict().items():
        layer, _, kind = name.partition(".")  # "linear_1.weight" → ("linear_1", "weight")
        projector_state[f"{_PROJECTOR_KEYS[layer]}.{kind}"] = param.detach().clone()
    tokenizer = None
    if has_tokenizer_files(folder):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return LlavaCheckpoint(
        llm=llm,
        vision=vision,
        projector_state=projector_state,
        tokenizer=tokenizer,
        image_token_id=int(config.image_token_index),
    )
