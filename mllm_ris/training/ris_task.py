"""Every :class:`~mllm_ris.modeling.model.RISModel` as a training task: the grounding MLLM
(``model.mode: mllm``) and classic mode (text encoder + pixel encoder + head, with or without the
region pointer ``model.pointer.dim``).

:class:`RISTask` plugs the RISModel into the model-agnostic
:class:`~mllm_ris.training.trainer.Trainer`:

* model: ``build_model(cfg.model)``, or ``RISModel.from_pretrained(model.checkpoint, trainable=True)``
  (then the folder's own model config is used);
* batches: :func:`~mllm_ris.modeling.predictor.build_processor` (mllm: answered chats, one ``[SEG]``
  per target or ``[REJ]``; the superpixel projector: label maps and region descriptors computed in the
  collator; pointer-less classic: letterboxed images, the union target and the expression). Superpixel
  label maps go through a disk cache, ``model.superpixels.cache_dir`` or
  ``<train.output_dir>/superpixel_cache`` when that is null, so only the first epoch runs SLIC / SAM;
* loss: ``model(batch).loss``; every term of ``loss_terms`` is logged;
* evaluation: :class:`~mllm_ris.modeling.predictor.RISPredictor` (mllm: generation, one mask per
  ``[SEG]``; classic: one mask per expression, none when it is empty);
* final model: :meth:`RISModel.save_pretrained` + ``config.json`` holding the whole run config
  (the model section resolved), so ``data.image_size`` travels with the model;
* :meth:`RISTask.external_weights`: frozen weights that ``build_model`` reloads from their own files
  (a LoRA-adapted LLM base, a pretrained frozen vision tower / SAM / pixel ViT / text transformer)
  stay out of training checkpoints.

**Unused parameters under DDP / ZeRO.** A micro-batch whose samples are all no-target has
``T = 0`` queries. The model still runs every module then (the head and the SAM stage segment one
padded query slot and keep none of it, ``RISModel._segment``), because DeepSpeed ZeRO-3's ranks
gather parameters module by module, a collective each, and must all run the same modules (a rank
that skipped them aborted gloo: "Received data size doesn't match expected size", seen here).
Outside ZeRO-3 the loss also gets ``0 * Σ p[0]`` over the trainable parameters
(:func:`tie_all_parameters`): every parameter is in every graph whatever a model skips, so DDP's
default ``find_unused_parameters=False`` never fails ("Expected to have finished reduction in the
prior iteration") and ZeRO-2's ranks reduce the same gradients; the loss value and gradients are
unchanged (a parameter without a gradient gets a zero one), it costs one element read per tensor,
and it is applied in every run, so one process and many follow the same optimizer semantics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from mllm_ris.config import Config, config_to_dict
from mllm_ris.data.sample import ReferringDataset, RISSample
from mllm_ris.errors import ConfigError
from mllm_ris.modeling.model import RISModel, build_model, refine_config, refine_start, warm_start
from mllm_ris.modeling.model_io import CONFIG_NAME, PARTS, owned_state
from mllm_ris.modeling.predictor import RISPredictor, build_processor
from mllm_ris.processing.processor import ChatTemplate, Processor, RISBatch
from mllm_ris.processing.regions import SuperpixelCache
from mllm_ris.training.sampling import build_mixture, open_dataset

__all__ = [
    "RISTask",
    "batch_seed",
    "external_state_keys",
    "resolve_refine",
    "tie_all_parameters",
    "write_model_folder",
]

CACHE_DIR_NAME = "superpixel_cache"


def external_state_keys(model: RISModel) -> set[str]:
    """State-dict keys of ``model`` that :func:`build_model` reloads from pretrained files.

    The parts follow :func:`mllm_ris.modeling.model_io.owned_state` (a frozen pretrained vision
    tower, SAM part, pixel ViT / backbone or text transformer); for the LLM, the frozen base weights
    under LoRA when the base comes from ``mllm.name_or_path`` / ``mllm.llava_path``. A random tiny
    model has none.
    """
    keys: set[str] = set()
    for part in PARTS:
        module = getattr(model, part)
        if module is None:
            continue
        kept = owned_state(model, part)
        keys |= {f"{part}.{k}" for k in module.state_dict() if k not in kept}
    m = model.cfg.mllm
    if model.mllm is not None and m.lora.enabled and (m.name_or_path or m.llava_path):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        keys |= {k for k in model.state_dict() if k.startswith("mllm.llm.") and k not in trainable}
    return keys


def tie_all_parameters(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``loss + 0 * Σ p.flatten()[0]``: the same value and gradients, but every ``p`` in the graph."""
    firsts = [p.reshape(-1)[:1] for p in params if p.numel()]
    if not firsts:
        return loss
    return loss + 0.0 * torch.cat([f.to(loss.dtype) for f in firsts]).sum()


def resolve_refine(cfg: Config) -> Config:
    """``cfg`` with a ``model.refine_from`` run's model section merged (:func:`refine_config`): the run,
    its checkpoints and its model folder then all describe the model that is trained. Idempotent."""
    if cfg.model.refine_from is None:
        return cfg
    return dataclasses.replace(cfg, model=refine_config(cfg.model))


def batch_seed(samples: Sequence[RISSample], seed: int) -> int:
    """A 63-bit seed from ``seed`` and the samples' identities and texts (stable across processes)."""
    digest = hashlib.sha256(str(seed).encode())
    for s in samples:
        digest.update(repr((s.dataset, s.split, s.image_id, s.ref_id, s.sent_id, s.text)).encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def write_model_folder(model: RISModel, out_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """:meth:`RISModel.save_pretrained` into ``out_dir``, then ``config.json`` = ``config`` with its
    ``model`` section replaced by the model's resolved config (``from_pretrained`` reads the model
    section; the rest, e.g. ``data.image_size``, tells inference how the model was trained)."""
    folder = model.save_pretrained(out_dir)
    tree = {**config, "model": config_to_dict(model.cfg)}
    (folder / CONFIG_NAME).write_text(json.dumps(tree, indent=2))
    return folder


def _cached(collate: Callable, cache_dir: Path) -> Callable:
    """Give a :class:`Processor`'s uncached superpixel generator a disk cache in ``cache_dir``."""
    spx = collate.superpixels if isinstance(collate, Processor) else None
    if spx is not None and not isinstance(spx, SuperpixelCache):
        collate.superpixels = SuperpixelCache(cache_dir, spx)  # type: ignore[arg-type,union-attr]
    return collate


class RISTask:
    """A :class:`RISModel` (either mode) as a :class:`~mllm_ris.training.task.TrainTask`.

    Args:
        cfg: the resolved config.

    Attributes:
        name: ``model.mode`` (``classic`` / ``mllm``), for logs.
    """

    name = "ris"

    def __init__(self, cfg: Config) -> None:
        cfg = resolve_refine(cfg)
        self.name = cfg.model.mode
        if cfg.train.pointer_warmup_steps and cfg.model.pointer_dim is None:
            raise ConfigError(
                "train.pointer_warmup_steps: needs the region pointer (model.mllm.pointer_dim / pointer.dim)"
            )
        self.cfg = cfg
        self._collate: Callable[[Sequence[RISSample]], RISBatch] | None = None
        self._segment = not cfg.train.pointer_warmup_steps  # False during the pointer warm-up

    def begin_step(self, step: int) -> None:
        """Called by the trainer before optimizer step ``step`` (0-based): the pixel side joins after
        ``train.pointer_warmup_steps``."""
        self._segment = step >= self.cfg.train.pointer_warmup_steps

    @property
    def superpixel_cache_dir(self) -> Path | None:
        """Where label maps are cached: ``model.superpixels.cache_dir``, else
        ``<output_dir>/superpixel_cache``; None without either (no cache)."""
        if self.cfg.model.superpixels.cache_dir:
            return Path(self.cfg.model.superpixels.cache_dir)
        if self.cfg.train.output_dir:
            return Path(self.cfg.train.output_dir) / CACHE_DIR_NAME
        return None

    def build_model(self) -> RISModel:
        """``build_model(cfg.model)``, the ``model.checkpoint`` folder (its trainable parts trainable), or
        a new pixel side on ``model.refine_from``'s frozen language side (:func:`refine_start`)."""
        checkpoint = self.cfg.model.checkpoint
        if self.cfg.model.refine_from is not None:
            model = refine_start(self.cfg.model)
        elif checkpoint is not None:
            model = warm_start(self.cfg.model)
            if model.mode != self.cfg.model.mode:
                raise ConfigError(
                    f"model.checkpoint: {checkpoint} holds a {model.mode}-mode model, "
                    f"model.mode is {self.cfg.model.mode}"
                )
        else:
            model = build_model(self.cfg.model)
        collate = build_processor(model, image_size=self.cfg.data.image_size)
        cache = self.superpixel_cache_dir
        self._collate = _cached(collate, cache) if cache is not None else collate
        return model

    def external_weights(self, model: nn.Module) -> set[str]:
        """Frozen pretrained weights reloaded by :meth:`build_model` (see :func:`external_state_keys`)."""
        return external_state_keys(model)  # type: ignore[arg-type]

    def train_data(self) -> tuple[ConcatDataset, torch.Tensor]:
        """The ``data.train`` mixture and its per-sample weights."""
        return build_mixture(self.cfg.data.train)

    def collate(self, samples: list[RISSample]) -> RISBatch:
        """Letterbox and targets of ``samples`` (+ the answered chat, per-target masks and (cached)
        superpixels, as the model needs them: :func:`~mllm_ris.modeling.predictor.build_processor`).

        The question phrasings are drawn with a seed hashed from ``train.seed`` and the samples
        (:func:`batch_seed`): a pure function of the batch, so a resumed run, DataLoader workers and
        every rank see the phrasings an uninterrupted single-process run would.
        """
        if self._collate is None:
            raise RuntimeError("RISTask.collate: call build_model first (the collator needs its tokenizer)")
        if isinstance(self._collate, Processor):
            self._collate.template = ChatTemplate(
                seed=batch_seed(samples, self.cfg.train.seed),
                image_position=self._collate.template.image_position,
            )
        return self._collate(samples)

    def loss(self, model: nn.Module, batch: RISBatch) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """``model(batch).loss`` (mask terms; mllm: + LM and no-target; pointer: + region terms) and its
        terms, detached."""
        partitioned = getattr(model, "zero_optimization_partition_weights", None)  # a DeepSpeed engine
        zero3 = partitioned is not None and partitioned()
        out = model(batch, segment=self._segment)
        loss = out.loss
        if not zero3:  # ZeRO-3 parameters are partitioned outside forward (module doc)
            loss = tie_all_parameters(loss, [p for p in model.parameters() if p.requires_grad])
        return loss, {k: v.detach() for k, v in out.loss_terms.items()}

    def val_data(self) -> dict[str, ReferringDataset]:
        """``data.val`` by ``"name:split"``."""
        return {f"{spec.name}:{spec.split}": open_dataset(spec) for spec in self.cfg.data.val}

    def predictor(self, model: nn.Module, device: torch.device) -> RISPredictor:
        """The model's predictor at ``data.image_size`` (superpixels from the same disk cache)."""
        predictor = RISPredictor(
            model,  # type: ignore[arg-type]
            image_size=self.cfg.data.image_size,
            device=device,
            batch_size=self.cfg.train.batch_size,
        )
        cache = self.superpixel_cache_dir
        if cache is not None:
            _cached(predictor.processor, cache)
        return predictor

    def save_model(self, model: nn.Module, out_dir: Path, config: dict) -> Path:
        """The :meth:`RISModel.save_pretrained` folder (``config.json`` with the whole run config)."""
        return write_model_folder(model, out_dir, config)  # type: ignore[arg-type]
