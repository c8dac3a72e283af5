"""A minimal accelerate training loop for classic mode (text encoder + pixel encoder + head).

It reads the same config tree as everything else (``model`` / ``data`` / ``train``), mixes the
``data.train`` datasets by their ``weight``, trains with AdamW + cosine schedule, and evaluates
on ``data.val`` with the project's metrics. Checkpoints are ``model.safetensors`` + the resolved
config; resume, DeepSpeed and fault handling belong to the general trainer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import ConcatDataset, DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mllm_ris.config import Config, DatasetSpec, config_to_dict
from mllm_ris.data.collate import RISTransform, collate_ris, unletterbox
from mllm_ris.data.registry import build_dataset
from mllm_ris.data.sample import ReferringDataset, RISSample
from mllm_ris.errors import ConfigError
from mllm_ris.eval.evaluate import EvalReport, evaluate
from mllm_ris.modeling.classic import ClassicRISModel, build_classic_model, save_state

__all__ = ["ClassicPredictor", "TrainSummary", "build_mixture", "train_classic"]


@dataclass
class TrainSummary:
    """What a run did."""

    steps: int
    samples: int
    seconds: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    eval: dict[str, EvalReport] = field(default_factory=dict)
    output_dir: str | None = None


def _open(spec: DatasetSpec) -> ReferringDataset:
    if spec.root is None:
        raise ConfigError(
            f"data: dataset {spec.name!r} needs a root (set data.train.N.root / data.val.N.root)"
        )
    return build_dataset(spec.name, spec.root, spec.split, split_by=spec.split_by)


def build_mixture(specs: list[DatasetSpec]) -> tuple[ConcatDataset, torch.Tensor]:
    """Concatenate datasets; per-sample weights so dataset ``i`` is drawn with probability ∝ ``weight_i``."""
    if not specs:
        raise ConfigError("data.train: no training dataset")
    datasets = [_open(s) for s in specs]
    weights = []
    for spec, ds in zip(specs, datasets, strict=True):
        if len(ds) == 0:
            raise ConfigError(f"data: dataset {spec.name!r} ({spec.root}, split {spec.split}) is empty")
        weights.append(torch.full((len(ds),), spec.weight / len(ds), dtype=torch.double))
    return ConcatDataset(datasets), torch.cat(weights)


class ClassicPredictor:
    """Wraps a classic model as an evaluation :class:`~mllm_ris.eval.evaluate.Predictor`.

    Returns ``(1, H, W)`` bool (the thresholded mask at the original size) or ``(0, H, W)``
    when the mask is empty; :meth:`predict_batch` runs ``batch_size`` samples per forward pass.
    """

    name = "classic"

    def __init__(
        self,
        model: ClassicRISModel,
        transform: RISTransform,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.transform = transform
        self.device = torch.device(device)
        self.batch_size = batch_size

    def __call__(self, sample: RISSample) -> np.ndarray:
        return self.predict_batch([sample])[0]

    @torch.no_grad()
    def predict_batch(self, samples: list[RISSample]) -> list[np.ndarray]:
        """One forward pass over ``samples``; a ``(N, H, W)`` bool array per sample (N in {0, 1})."""
        self.model.eval()
        batch = collate_ris(samples, self.transform).to(self.device)
        out = self.model(batch.images, batch.texts)  # mask_logits (B, 1, S/4, S/4)
        preds = []
        for logits, hw in zip(out.mask_logits, batch.hw, strict=True):
            mask = (unletterbox(logits, hw, self.transform) > 0).cpu().numpy()  # (1, H, W)
            preds.append(mask if mask.any() else mask[:0])
        return preds


def _loader(
    cfg: Config, dataset: ConcatDataset, weights: torch.Tensor, transform: RISTransform
) -> DataLoader:
    total = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum_steps
    generator = torch.Generator().manual_seed(cfg.train.seed)
    sampler = WeightedRandomSampler(weights, num_samples=total, replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=partial(collate_ris, transform=transform),
        num_workers=cfg.data.num_workers,
        drop_last=True,
    )


def train_classic(cfg: Config, *, time_budget_s: float | None = None, progress: bool = True) -> TrainSummary:
    """Train a classic-mode model from ``cfg`` and evaluate it on every ``data.val`` dataset.

    Args:
        cfg: the resolved config (``model.mode`` must be ``classic``).
        time_budget_s: stop early after this many seconds of training (the schedule still spans
            ``train.max_steps``, so a budgeted run is a prefix of the full one).
        progress: show a progress bar.
    """
    if cfg.model.mode != "classic":
        raise ConfigError(f"model.mode: this loop trains classic mode, got {cfg.model.mode!r}")
    set_seed(cfg.train.seed)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum_steps
    )
    transform = RISTransform(cfg.data.image_size)
    dataset, weights = build_mixture(cfg.data.train)
    val_sets = [_open(s) for s in cfg.data.val]
    model = build_classic_model(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
    loader = _loader(cfg, dataset, weights, transform)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    out_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else None
    log_file = None
    if out_dir is not None and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = (out_dir / "train_log.jsonl").open("w")
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", disable=not progress or None)
    model.train()
    micro_steps = 0
    for batch in loader:
        micro_steps += 1
        with accelerator.accumulate(model):
            out = model(batch.images, batch.texts, batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}; lower train.lr")
        losses.append(loss)
        bar.update(1)
        if step % cfg.train.log_every == 0:
            record = {
                "step": step,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - start,
            }
            record.update({k: float(v.detach()) for k, v in out.loss_terms.items()})
            bar.set_postfix(loss=f"{loss:.3f}")
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
        if step >= cfg.train.max_steps or (
            time_budget_s is not None and time.perf_counter() - start > time_budget_s
        ):
            break
    bar.close()
    seconds = time.perf_counter() - start
    if log_file is not None:
        log_file.close()

    unwrapped = accelerator.unwrap_model(model)
    summary = TrainSummary(
        steps=step,
        samples=micro_steps * cfg.train.batch_size,
        seconds=seconds,
        final_loss=float(np.mean(losses[-20:])) if losses else float("nan"),
        losses=losses,
        output_dir=str(out_dir) if out_dir else None,
    )
    if accelerator.is_main_process:
        if out_dir is not None:
            save_state(unwrapped, out_dir, config=config_to_dict(cfg))
        predictor = ClassicPredictor(unwrapped, transform, device=accelerator.device)
        for spec, ds in zip(cfg.data.val, val_sets, strict=True):
            report = evaluate(ds, predictor, limit=cfg.eval.limit, progress=progress)
            summary.eval[f"{spec.name}:{spec.split}"] = report
            if out_dir is not None:
                report.save(out_dir / "eval" / f"{spec.name}_{spec.split}")
    return summary
