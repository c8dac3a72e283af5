"""Small accelerate / torch helpers of the trainer (kept apart so the loop stays readable)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from mllm_ris.config import TrainConfig

__all__ = [
    "bare_model",
    "fill_deepspeed_auto",
    "launch_kwargs",
    "param_digest",
    "register_zero3_external_parameters",
    "rng_preserved",
]


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    import accelerate.utils as au

    names = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available")
    return any(getattr(au, name, lambda: False)() for name in names)


def launch_kwargs() -> dict[str, Any]:
    """``Accelerator`` arguments that make ``accelerate launch`` work on a machine without GPUs.

    Under torchrun (``LOCAL_RANK`` set) accelerate 1.x sets up no process group when it finds no
    accelerator: plain DDP then needs ``cpu=True`` (gloo), DeepSpeed an explicit gloo backend.
    """
    if int(os.environ.get("LOCAL_RANK", -1)) == -1 or _has_accelerator():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def fill_deepspeed_auto(ds_config: dict[str, Any], train: TrainConfig, world_size: int) -> None:
    """Fill the DeepSpeed "auto" entries accelerate would take from a prepared DataLoader."""
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = train.batch_size
        ds_config["train_batch_size"] = train.batch_size * train.grad_accum_steps * world_size
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = train.max_grad_norm


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block (evaluation) without moving the python / numpy / torch CPU RNG streams."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(np_state)


@contextlib.contextmanager
def hf_zero3_init_off(accelerator: Accelerator) -> Iterator[None]:
    """Build models without transformers' ``deepspeed.zero.Init`` under ZeRO-3.

    accelerate registers its DeepSpeed config with transformers even with ``zero3_init_flag: false``;
    transformers then partitions every ``from_pretrained`` / random HF model at construction, which
    needs all ranks (a rank-0-only rebuild hangs) and breaks loading a full state dict. Our models
    are built whole on every rank and partitioned by ``accelerator.prepare``.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # restore what accelerate set


def register_zero3_external_parameters(model: nn.Module) -> int:
    """Tell ZeRO-3 which module needs the parameters it reads without owning them; returns their count.

    ZeRO-3 gathers a module's own parameters around its forward and backward. peft's token rows
    (:func:`mllm_ris.modeling.lora.zero3_external_parameters`) are read by a layer that does not
    own them; registered with that layer, they are gathered for its backward too. Call before
    ``accelerator.prepare``.
    """
    from mllm_ris.modeling.lora import zero3_external_parameters

    pairs = zero3_external_parameters(model)
    if pairs:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for module, param in pairs:
            register_external_parameter(module, param)
    return len(pairs)


def bare_model(
    accelerator: Accelerator, model: nn.Module, rebuild: Callable[[], nn.Module] | None
) -> nn.Module | None:
    """The full, unwrapped model on the main process (None elsewhere).

    With ``rebuild`` (ZeRO-3, where every rank holds a shard) the weights are gathered —
    every rank must call — and loaded into a freshly built model.
    """
    if rebuild is None:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # collective
    if not accelerator.is_main_process:
        return None
    with hf_zero3_init_off(accelerator):
        full = rebuild()
    full.load_state_dict(state)
    return full.to(accelerator.device)


def param_digest(model: nn.Module) -> str:
    """A short fingerprint of the trainable parameters (equal on ranks that are in sync)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
