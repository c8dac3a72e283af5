"""Loading a model folder for inference: device / dtype checks and placement, folder checks, the
recorded canvas size. One-line errors (``ConfigError``, ``CheckpointError``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.model import RISModel
from mllm_ris.modeling.model_io import PARTS

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "as_dtype",
    "check_device",
    "check_model_folder",
    "place",
    "recorded_image_size",
]

DEFAULT_IMAGE_SIZE = 128
"""Canvas side when the model folder does not record ``data.image_size`` (the training default)."""


def place(model: RISModel, device: torch.device, dtype: torch.dtype) -> RISModel:
    """Move ``model`` to ``device``; the LLM and vision tower take ``dtype`` (the heads, projector and
    pixel encoder stay float32: the model casts between them, docs/model.md)."""
    model = model.to(device)
    if dtype != torch.float32:
        if model.mllm is not None and model.cfg.mllm.quantization == "none":
            model.mllm.llm.to(dtype)
        if model.vision is not None:
            model.vision.to(dtype)
    return model.eval()


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16`` or their names → the dtype; else ``ConfigError``."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """A usable ``torch.device``; an unknown or unavailable one → ``ConfigError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested, but no CUDA device is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device} requested, but MPS is not available")
    return dev


def check_model_folder(folder: Path) -> None:
    """Refuse, in one line, what cannot be a ``RISModel.save_pretrained`` folder."""
    if not folder.exists():
        raise CheckpointError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"not a model folder: {folder} is a file")
    has_parts = any((folder / f"{part}.safetensors").is_file() for part in PARTS)  # a RISModel folder
    if (folder / "model.safetensors").is_file() and not has_parts:
        raise CheckpointError(
            f"{folder} holds a classic-trainer model (model.safetensors); the pipeline reads "
            f"RISModel.save_pretrained folders: `mllm-ris export {folder} --out NEW_FOLDER` writes one"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a RISModel folder (no config.json)")


def recorded_image_size(folder: Path) -> int:
    """``data.image_size`` from ``config.json`` when the folder records it, else the default."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("data") or {}
        size = int(data.get("image_size", DEFAULT_IMAGE_SIZE))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {exc}") from None
    if size < 16:
        raise CheckpointError(f"{folder / 'config.json'}: data.image_size {size} < 16")
    return size
