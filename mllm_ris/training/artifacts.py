"""What training wrote, loaded back: model folders, run folders and checkpoints; export of a model folder.

A *source* is one of:

* a model folder (``config.json`` + part files: :meth:`RISModel.save_pretrained`, or a finished run
  folder, which holds its final model);
* a run folder whose final model is missing or older than its newest checkpoint (interrupted, or
  resumed and interrupted: ``summary.json`` says so): its newest complete checkpoint is used;
* a training checkpoint ``checkpoints/step_N`` (accelerate's ``model.safetensors`` or DeepSpeed
  ZeRO shards, merged with :func:`~mllm_ris.training.checkpoint.consolidated_state_dict`): the model
  is rebuilt from the checkpoint's ``config.json`` and the weights that stayed out of it (frozen
  pretrained parts) are reloaded from their own files. A folder with one whole-model
  ``model.safetensors`` beside the run's ``config.json`` (the final model of classic runs trained
  before classic mode became a RISModel run: the same state-dict keys) is read the same way.

:func:`export_model` turns a source into a self-contained :meth:`RISModel.from_pretrained` folder: LoRA
merged into the LLM (``mllm/llm/``, ``lora.enabled: false``), SAM and a SAM-ViT pixel encoder written
in full (``sam.checkpoint`` / ``pixel.path`` set to null), so only a frozen pretrained vision tower,
HF pixel backbone or text transformer is still read from the files the config names. It is
written into a temporary folder beside ``out`` and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mllm_ris.config import Config, load_config
from mllm_ris.errors import CheckpointError, ConfigError, NotAvailableError
from mllm_ris.modeling.model import RISModel, build_model, refine_start, warm_start
from mllm_ris.modeling.model_io import CONFIG_NAME, DEFAULT_IMAGE_SIZE, is_pixel_side, read_config_tree
from mllm_ris.modeling.predictor import RISPredictor
from mllm_ris.training.checkpoint import (
    STATE_FILE,
    CheckpointManager,
    consolidated_state_dict,
    read_trainer_state,
)
from mllm_ris.training.ris_task import external_state_keys, write_model_folder

__all__ = [
    "SourceKind",
    "TrainedModel",
    "export_model",
    "find_source",
    "load_trained_model",
    "trained_predictor",
]

SourceKind = Literal["model", "checkpoint"]
_STATE_DICT_FILE = "model.safetensors"  # a whole-model state dict (checkpoints, older classic runs)


@dataclass
class TrainedModel:
    """A model loaded back from a source (see the module doc).

    Attributes:
        model: the :class:`RISModel`, frozen, in eval mode.
        config: the config tree the source holds (``model`` resolved for model folders).
        source: the folder the weights came from (a checkpoint when a run folder had no final model).
        kind: ``model`` (a RISModel folder) or ``checkpoint`` (one whole-model state dict).
    """

    model: RISModel
    config: dict[str, Any]
    source: Path
    kind: SourceKind

    @property
    def image_size(self) -> int:
        """``data.image_size`` the model was trained at (128 when the source does not record it)."""
        return int((self.config.get("data") or {}).get("image_size", DEFAULT_IMAGE_SIZE))


def find_source(path: str | Path) -> tuple[SourceKind, Path]:
    """Classify ``path``: a model folder, or a checkpoint (a run folder's newest, or a folder holding
    one whole-model state dict with its config).

    Raises:
        CheckpointError: none of these (one line naming the folder).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if (folder / STATE_FILE).is_file():
        return "checkpoint", folder
    latest = CheckpointManager(folder, keep_last=1).latest()
    if (folder / CONFIG_NAME).is_file() and (latest is None or _final_is_current(folder, latest)):
        if (folder / _STATE_DICT_FILE).is_file() and not (folder / "head.safetensors").is_file():
            return "checkpoint", folder  # one state dict + the run config: an older classic run
        if any(folder.glob("*.safetensors")) or (folder / "mllm").is_dir():
            return "model", folder
    if latest is not None:
        return "checkpoint", latest
    raise CheckpointError(
        f"{folder} is neither a model folder (config.json + weights), a run folder with a final model "
        "or checkpoints, nor a training checkpoint"
    )


def _final_is_current(run: Path, latest: Path) -> bool:
    """Whether a run folder's final model is newer than its newest checkpoint: the last invocation
    (``summary.json``) finished without a signal and reached at least the checkpoint's step."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        return summary.get("interrupted") is None and int(summary["steps"]) >= read_trainer_state(latest).step
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return False


def _full_precision(cfg: Config) -> Config:
    """``cfg`` with a quantized LLM base loaded in full precision (the adapter is merged exactly)."""
    m = cfg.model.mllm
    if cfg.model.mode != "mllm" or m.quantization == "none":
        return cfg
    model = dataclasses.replace(cfg.model, mllm=dataclasses.replace(m, quantization="none"))
    return dataclasses.replace(cfg, model=model)


def _from_checkpoint(folder: Path, *, full_precision: bool) -> RISModel:
    """Rebuild the model of a training checkpoint and load its (merged) weights."""
    cfg = load_config(folder / CONFIG_NAME)
    cfg = _full_precision(cfg) if full_precision else cfg
    state = consolidated_state_dict(folder)
    if cfg.model.refine_from is not None:  # its frozen language side is in the state as well
        model = refine_start(cfg.model)
    else:
        model = warm_start(cfg.model) if cfg.model.checkpoint is not None else build_model(cfg.model)
    external = external_state_keys(model)
    expected = set(model.state_dict())
    if cfg.model.output_mode == "prior":  # written before prior mode stopped building the pixel side
        state = {k: v for k, v in state.items() if k in expected or not is_pixel_side(k)}
    missing, unexpected = sorted(expected - set(state) - external), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not fit the model its config.json builds: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return model


def load_trained_model(path: str | Path, *, device: str | torch.device | None = None) -> TrainedModel:
    """Load any source (see :func:`find_source`) as a frozen model in eval mode on ``device``.

    Raises:
        CheckpointError: not a source, or weights that do not fit the model the config builds.
    """
    return _load(*find_source(path), device=device, full_precision=False)


def _load(
    kind: SourceKind, folder: Path, *, device: str | torch.device | None, full_precision: bool
) -> TrainedModel:
    tree = read_config_tree(folder)
    if kind == "model":  # placed on the device by its loader (a quantized base stays where it loads)
        model = RISModel.from_pretrained(folder, device=device)
    else:
        model = _from_checkpoint(folder, full_precision=full_precision)
        model.requires_grad_(False)
        if device is not None:
            model.to(device)
    return TrainedModel(model=model.eval(), config=tree, source=folder, kind=kind)


def trained_predictor(path: str | Path, *, device: str = "cpu", batch_size: int = 8) -> RISPredictor:
    """The evaluation predictor of any source, at its recorded ``data.image_size`` (``eval --checkpoint``)."""
    loaded = load_trained_model(path, device=device)
    return RISPredictor(loaded.model, image_size=loaded.image_size, device=device, batch_size=batch_size)


def _self_contained(model: RISModel, *, merge: bool = True) -> None:
    """Merge LoRA (unless ``merge`` is False) and make SAM / a SAM-ViT pixel encoder saved in full
    (config updated to match); the run's superpixel cache folder is dropped (``superpixels.cache_dir:
    null``)."""
    cfg = model.cfg
    changes: dict[str, Any] = {}
    if model.mllm is not None and merge:
        model.mllm.merge_lora()
        m = dataclasses.replace(model.mllm.cfg, lora=dataclasses.replace(model.mllm.cfg.lora, enabled=False))
        model.mllm.cfg = m
        changes["mllm"] = m
    if model.sam_stage is not None and cfg.sam.checkpoint is not None:
        changes["sam"] = dataclasses.replace(cfg.sam, checkpoint=None)
    if cfg.pixel.name == "sam-vit" and cfg.pixel.path is not None:
        changes["pixel"] = dataclasses.replace(cfg.pixel, path=None)
    if cfg.superpixels.cache_dir is not None:  # the training machine's folder: not the user's
        changes["superpixels"] = dataclasses.replace(cfg.superpixels, cache_dir=None)
    model.cfg = dataclasses.replace(cfg, **changes)


def export_model(
    path: str | Path, out: str | Path, *, overwrite: bool = False, adapter: bool = False
) -> TrainedModel:
    """Write ``path`` (any source) as a :meth:`RISModel.from_pretrained` folder ``out``, self-contained
    unless ``adapter``.

    Args:
        adapter: keep LoRA unmerged and write only the adapter (+ token rows and heads) when the base
            LLM can be rebuilt from ``mllm.name_or_path`` (e.g. ``smollm2-135m``: 12 MB instead of
            172 MB with four SmolLM2 layers); the loader then needs that base. Default: LoRA merged
            into a full copy of the LLM.

    Returns the loaded (and merged) model with ``source`` = where its weights came from.

    Raises:
        CheckpointError: ``out`` exists and is not empty (without ``overwrite``), or a bad source.
        ConfigError: ``adapter`` for a model without LoRA or without a base to rebuild.
        NotAvailableError: a model folder with a quantized LLM base (export one of its training
            checkpoints: they are merged into a full-precision base).
    """
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointError(f"--out {target}: exists and is not empty (pass --overwrite to replace it)")
    kind, folder = find_source(path)
    model_cfg = load_config(folder / CONFIG_NAME).model
    if adapter and (model_cfg.mode != "mllm" or not model_cfg.mllm.lora.enabled):
        raise ConfigError(f"export --adapter: {folder} has no LoRA adapter (mode mllm with LoRA only)")
    if adapter and model_cfg.mllm.name_or_path is None and model_cfg.mllm.llava_path is None:
        raise ConfigError(
            f"export --adapter: {folder} has a random base LLM that no path rebuilds; export it merged"
        )
    if kind == "model" and model_cfg.mllm.quantization != "none":
        raise NotAvailableError(
            f"export: {folder} has a quantized LLM base; export one of its training checkpoints "
            "instead (they are merged into a full-precision base)"
        )
    loaded = _load(kind, folder, device=None, full_precision=True)
    model = loaded.model
    _self_contained(model, merge=not adapter)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        write_model_folder(model, tmp, loaded.config)
        if target.exists():
            old = tmp.with_suffix(".old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded
