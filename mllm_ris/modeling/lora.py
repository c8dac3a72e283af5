"""Adapting the base LLM for training: LoRA via ``peft`` (settings: ``LoraSettings`` in
:mod:`mllm_ris.modeling.model_config`), k-bit preparation (QLoRA), gradient checkpointing, adapter-free
base weights for saving, and merging for export. Imported only where a model trains, has an adapter
or is exported: inference of a model without LoRA (the bundled one) does not import it, nor ``peft``.
The base LLM itself (folder, GGUF, random, quantized) is :mod:`mllm_ris.modeling.llm`'s.

Which weights train:

* LoRA matrices on ``target_modules`` (``peft.LoraConfig``);
* the rows of the grounding tokens in the input embeddings and (untied) LM head, through peft's
  ``trainable_token_indices`` (``TrainableTokensWrapper``): only those rows, never the whole vocab;
* the grounding MLP and reject head live outside the peft model (in ``GroundingMLLM``) and
  always train in full, so they need no ``modules_to_save``.

QLoRA = a 4-bit NF4 base (``BitsAndBytesConfig``) + ``prepare_model_for_kbit_training`` + LoRA.

**DeepSpeed ZeRO-3 and the token rows.** peft's ``TrainableTokensLayer`` reads its delta rows and
the base weight as tensors (``get_merged_weights``) instead of calling the modules that own them
(a ``ParameterDict`` and the wrapped ``Embedding`` / ``Linear``), so ZeRO-3's module hooks never
gather them for it. In forward DeepSpeed's attribute getter gathers them anyway, but it registers
them with whatever module is running when they are first read: ``RISModel`` when it reads
``get_input_embeddings().weight.dtype``, a module whose dataclass output ZeRO-3 cannot hook, so
the rows were not gathered again for the backward (``IndexCopyBackward`` on a size-0 parameter:
``expand(FloatTensor{[3, 64]}, size=[0])``). :func:`zero3_external_parameters` names them and the
trainer registers them with their layer (``deepspeed.zero.register_external_parameter``).
Building the adapter while transformers' ZeRO-3 flag is set sends peft to a CUDA-only gather
(``torch.cuda.current_device()``); :func:`apply_lora` avoids it for weights that are not
partitioned (see :func:`_token_rows_without_zero3_gather`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from mllm_ris.errors import ConfigError

if TYPE_CHECKING:  # peft is imported where it is used: importing it costs seconds (bitsandbytes, inductor)
    from peft import PeftModel

    from mllm_ris.modeling.model_config import LoraSettings

__all__ = [
    "apply_lora",
    "base_state_dict",
    "enable_gradient_checkpointing",
    "merge_lora",
    "peft_deprecations_silenced",
    "prepare_for_training",
    "zero3_external_parameters",
]

_GC_KWARGS = {"use_reentrant": False}  # no need for inputs that require grad (frozen embeddings are fine)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of the decoder layers; the KV cache is off while training."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_GC_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_GC_KWARGS))
    model.config.use_cache = False


def prepare_for_training(model: PreTrainedModel, *, gradient_checkpointing: bool) -> PreTrainedModel:
    """A k-bit model goes through ``prepare_model_for_kbit_training`` (base frozen, norms in fp32,
    optional checkpointing); a full-precision one only gets checkpointing when asked."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # checkpointing is switched on below, by its transformers 5 name (peft calls the deprecated one);
        # non-reentrant checkpointing needs none of peft's input-grad hooks
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _module_suffix(model: nn.Module, target: nn.Module) -> str:
    """The last name component of ``target`` inside ``model`` (e.g. ``embed_tokens``, ``lm_head``)."""
    for name, module in model.named_modules():
        if module is target:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def apply_lora(
    model: PreTrainedModel,
    settings: LoraSettings,
    *,
    token_ids: list[int],
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the rows ``token_ids`` of the embeddings / LM head train too.

    The model is first passed through :func:`prepare_for_training` (k-bit preparation, checkpointing).
    """
    model = prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
    token_indices: dict[str, list[int]] | None = None
    if settings.train_token_rows:
        embed = model.get_input_embeddings()
        token_indices = {_module_suffix(model, embed): list(token_ids)}
        head = model.get_output_embeddings()
        # an untied LM head gets its own trainable rows; a tied one follows the embeddings (peft ties them)
        if isinstance(head, nn.Linear) and head.weight is not embed.weight:
            token_indices[_module_suffix(model, head)] = list(token_ids)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        trainable_token_indices=token_indices,
        task_type="CAUSAL_LM",
    )
    rows = _token_rows_without_zero3_gather(model) if token_indices else contextlib.nullcontext()
    with rows, peft_deprecations_silenced():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """Silence the one deprecation that peft itself triggers: peft <= 0.21 reads transformers'
    deprecated ``is_gradient_checkpointing`` in ``PeftModel.__init__`` (transformers 5.x warns on
    every LoRA build and load). Its value is right; the call is peft's, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _token_rows_without_zero3_gather(model: nn.Module) -> Iterator[None]:
    """Let peft read the token rows of unpartitioned weights directly while transformers' ZeRO-3 flag is set.

    With the flag set (accelerate / HF Trainer register their DeepSpeed config globally) peft's
    ``TrainableTokensLayer.update_layer`` gathers the rows with ``deepspeed.zero.GatheredParameters``
    and broadcasts them from a tensor on ``torch.cuda.current_device()``: CUDA only. That gather is
    needed only for weights already partitioned by ``deepspeed.zero.Init``; whole weights (how the
    trainer builds every model, partitioned later by ``accelerator.prepare``) give the same rows
    read directly, so the flag is switched off for that call. Partitioned weights without CUDA
    raise a :class:`ConfigError` instead of peft's CUDA error.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_config = ref() if ref is not None else None
    if hf_config is None or not hf_config.is_zero3():
        yield
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # built under deepspeed.zero.Init
        if not torch.cuda.is_available():
            raise ConfigError(
                "lora.train_token_rows: peft gathers the token rows of a ZeRO-3-partitioned LLM on CUDA "
                "only; build the LLM whole (outside deepspeed.zero.Init, as `mllm-ris train` does) or set "
                "model.mllm.lora.train_token_rows=false"
            )
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)


def zero3_external_parameters(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """``(module, parameter)`` pairs ZeRO-3 must gather for ``module`` though ``module`` does not own them.

    Each peft ``TrainableTokensLayer`` with every parameter below it (its delta rows and the wrapped
    weight, read as tensors in its forward; see the module doc). Empty for a model without peft's
    token rows. Register them before ``deepspeed.initialize`` with
    ``deepspeed.zero.register_external_parameter(module, parameter)``.
    """
    if "peft" not in sys.modules:  # no peft model can exist
        return []
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return [
        (module, param)
        for module in model.modules()
        if isinstance(module, TrainableTokensLayer)
        for param in module.parameters()
    ]


def base_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights without adapters, keyed as in the plain model (what its
    ``save_pretrained`` needs): LoRA matrices and token deltas are dropped, the wrapped weights
    ``….base_layer.weight`` / ``….token_adapter.base_layer.weight`` renamed ``….weight``."""
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" in key or "trainable_tokens_delta" in key:
            continue
        out[key.replace(".token_adapter.", ".").replace(".base_layer.", ".")] = value
    return out


def merge_lora(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """Fold LoRA and trainable-token rows into the base weights (export); a plain model is returned as is.

    Merging into a 4-bit base dequantizes and re-quantizes the touched weights (lossy); merge a
    full-precision reload of the base for an exact export.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
