"""Save / load a whole :class:`~mllm_ris.modeling.model.RISModel` as one folder::

    config.json                the resolved ModelConfig as {"model": {...}} (readable by load_config)
    <part>.safetensors         one file per part: text_encoder, vision, projector, pointer (classic),
                               pixel_encoder, head, prompt_builder, sam_stage (absent parts: no file)
    mllm/                      GroundingMLLM.save_pretrained: tokenizer, LoRA adapter, [SEG] MLP and
                               reject head, and the base LLM only when no path can rebuild it

Each config is written once: the grounding LLM's (``MLLMConfig``) is ``config.json``'s
``model.mllm``, and ``mllm/`` holds no ``mllm_config.json`` (folders written before have one, equal
to ``model.mllm``; it is not read). ``config.json`` holds the resolved config, the derived widths
included (:mod:`mllm_ris.modeling.model_build`): loading rebuilds the parts and checks them.

A weight is left out when it is frozen **and** comes from pretrained files the config names
(they are reloaded from there): a frozen pretrained text transformer (``text.init: pretrained``), a
frozen vision tower from ``vision.name_or_path`` / ``mllm.llava_path``, a frozen SAM part loaded
from ``sam.checkpoint``, a frozen pixel backbone with ``pixel.path``, and a ViT shared with SAM
(saved once, under ``sam_stage``). Everything else — random-init parts included — is written.
Loading checks every file against the rebuilt model: missing / unexpected keys and mis-shaped
tensors are a one-line :class:`~mllm_ris.errors.CheckpointError`. That check and the safetensors
reader (:func:`check_state_fits`, :func:`read_safetensors`) are the ones every loader of ours runs
(the grounding LLM's heads, training checkpoints). :func:`check_model_folder` refuses, in one line, what
cannot be such a folder before anything loads; :func:`recorded_image_size` is the canvas side its
``config.json`` records (``data.image_size``, else :data:`DEFAULT_IMAGE_SIZE`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from mllm_ris.config_tree import config_to_dict, from_dict
from mllm_ris.errors import CheckpointError
from mllm_ris.modeling.model_config import ModelConfig

if TYPE_CHECKING:
    from mllm_ris.modeling.model import RISModel

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_IMAGE_SIZE",
    "PARTS",
    "PIXEL_PARTS",
    "check_model_folder",
    "check_state_fits",
    "is_pixel_side",
    "load_parts",
    "owned_state",
    "read_config_tree",
    "read_model_config",
    "read_safetensors",
    "recorded_image_size",
    "save_model",
]

CONFIG_NAME = "config.json"
PARTS: tuple[str, ...] = (
    "text_encoder",
    "vision",
    "projector",
    "pointer",
    "pixel_encoder",
    "head",
    "prompt_builder",
    "sam_stage",
)
# the parts that read pixels: output mode prior builds none of them (older prior-mode training
# checkpoints, written when it still did, hold their weights)
PIXEL_PARTS: frozenset[str] = frozenset({"pixel_encoder", "head", "prompt_builder", "sam_stage"})


def is_pixel_side(key: str) -> bool:
    """Whether a RISModel state-dict ``key`` belongs to one of :data:`PIXEL_PARTS`."""
    return key.split(".", 1)[0] in PIXEL_PARTS


def check_state_fits(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, name: str
) -> None:
    """Refuse ``state`` unless it has exactly ``expected``'s keys, each with the same shape.

    Args:
        name: how messages name the file, e.g. ``"checkpoint runs/x/model.safetensors"``.

    Raises:
        CheckpointError: one line naming ``name`` and the missing / unexpected keys or the first
            mis-shaped tensor.
    """
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{name} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            raise CheckpointError(f"{name}: {key} has shape {tuple(value.shape)}, the model {want}")


def read_safetensors(file: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors ``file``; ``name`` says which file in the one-line errors.

    Raises:
        CheckpointError: ``cannot read {name}: ...`` for a truncated or foreign file.
    """
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises several types for truncated / foreign files
        raise CheckpointError(f"cannot read {name}: {str(exc).splitlines()[0]}") from None


def _external(model: RISModel, part: str) -> tuple[str, ...] | None:
    """Key prefixes of ``part`` that are reloaded from pretrained files; None = the whole part."""
    cfg = model.cfg
    if part == "text_encoder" and cfg.text.init == "pretrained" and cfg.text.freeze:
        return ("model.",)
    if part == "vision" and cfg.vision.freeze and (cfg.vision.name_or_path or cfg.mllm.llava_path):
        return None
    if part == "pixel_encoder":
        pixel = cfg.pixel
        if model.share_sam_vit or (pixel.name == "sam-vit" and pixel.path and pixel.sam_freeze_vit):
            return ("vit.",)
        if pixel.name == "hf-backbone" and pixel.path and pixel.hf_freeze:
            return ("backbone.",)
    if part == "sam_stage" and cfg.sam.checkpoint is not None:
        kinds = ("image_encoder", "prompt_encoder", "mask_decoder")
        return tuple(f"sam.{k}." for k in kinds if getattr(cfg.sam, f"freeze_{k}"))
    return ()


def owned_state(model: RISModel, part: str) -> dict[str, torch.Tensor]:
    """The weights of ``part`` the folder holds (CPU, contiguous); empty when the part is absent."""
    module = getattr(model, part)
    drop = _external(model, part)
    if module is None or drop is None:
        return {}
    return {
        k: v.detach().contiguous().cpu()
        for k, v in module.state_dict().items()
        if not (drop and k.startswith(drop))
    }


def save_model(model: RISModel, path: str | Path) -> Path:
    """Write ``model`` into the folder ``path`` (created; files replaced); returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps({"model": config_to_dict(model.cfg)}, indent=2))
    for part in PARTS:
        file = folder / f"{part}.safetensors"
        state = owned_state(model, part)
        if state:
            tmp = file.with_suffix(".tmp")
            save_file(state, str(tmp))
            tmp.replace(file)
        else:
            file.unlink(missing_ok=True)
    if model.mllm is not None:
        model.mllm.save_pretrained(folder / "mllm", write_config=False)  # config.json's model.mllm
    return folder


def _load_part(model: RISModel, part: str, folder: Path) -> None:
    expected = owned_state(model, part)
    file = folder / f"{part}.safetensors"
    if not expected:
        return
    if not file.is_file():
        raise CheckpointError(f"{str(file)!r} is missing; the model has {len(expected)} {part} weights")
    state = read_safetensors(file, repr(str(file)))
    check_state_fits(state, expected, name=repr(str(file)))
    getattr(model, part).load_state_dict(state, strict=False)


def read_config_tree(path: str | Path) -> dict[str, Any]:
    """The plain config tree in the folder ``path`` (a model folder, run folder or checkpoint): its
    ``config.json``, which has at least a ``model`` section.

    Raises:
        CheckpointError: no ``config.json``, an unreadable one, or one without a model section.
    """
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{str(Path(path))!r} is not a RISModel folder (no {CONFIG_NAME})")
    try:
        tree = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise CheckpointError(f"{file} has no model section")
    return tree


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of the model folder ``path`` (its ``config.json``'s ``model`` section).

    Raises:
        CheckpointError: not a model folder, or an unreadable ``config.json``.
        ConfigError: a value in it that is not a valid config.
    """
    return from_dict(ModelConfig, read_config_tree(path)["model"], "model")


def load_parts(model: RISModel, path: str | Path) -> None:
    """Load every part file of the folder ``path`` onto ``model`` (built from the folder's config).

    Raises:
        CheckpointError: a missing part file, or one that does not fit the model.
    """
    for part in PARTS:
        _load_part(model, part, Path(path))


DEFAULT_IMAGE_SIZE = 128
"""Canvas side when the model folder does not record ``data.image_size`` (the training default)."""


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
