"""Optimizer and learning-rate schedule from ``Config.train``.

AdamW over the trainable parameters; biases and 1-D weights (norms, embeddings' scales) get no
weight decay. The schedule is a ``LambdaLR`` (linear warmup, then cosine / linear decay to 0,
or constant) written here so importing it does not pull in ``transformers.Trainer``; warmup and
cosine follow ``transformers.get_cosine_schedule_with_warmup`` (the factor is 0 at step 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mllm_ris.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "keep_config_schedule", "lr_factor", "schedule_of"]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW on ``model``'s parameters with ``requires_grad``; no decay on biases and 1-D weights.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter (every requires_grad is False)")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps."""
    if step < warmup:  # the transformers convention: 0 at step 0
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Warmup over ``cfg.warmup_steps`` then ``cfg.lr_schedule`` decay over ``cfg.max_steps``."""
    fn: Callable[[int], float] = schedule_of(cfg)
    return LambdaLR(optimizer, fn)


def keep_config_schedule(scheduler: LambdaLR, cfg: TrainConfig) -> dict[str, Any] | None:
    """Make a restored ``scheduler`` follow ``cfg`` (peak lr, warmup, length, kind) from its step on.

    ``LambdaLR`` restores its schedule object's fields and base lrs from a checkpoint, so without
    this a resume with a larger ``train.max_steps`` would keep the old length (a cosine at 0).
    Returns the checkpoint's schedule fields when they differed from ``cfg``'s, else None.
    """
    fn, wanted = scheduler.lr_lambdas[0], schedule_of(cfg)
    old = dict(fn.__dict__) | {"lr": scheduler.base_lrs[0]}  # before they are replaced below
    changed = old != wanted.__dict__ | {"lr": cfg.lr} or any(lr != cfg.lr for lr in scheduler.base_lrs)
    fn.__dict__.update(wanted.__dict__)
    scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    lrs = [cfg.lr * fn(scheduler.last_epoch)] * len(scheduler.base_lrs)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    return old if changed else None


def schedule_of(cfg: TrainConfig) -> _Schedule:
    """The ``step -> factor`` object of ``cfg``'s schedule."""
    return _Schedule(cfg.warmup_steps, cfg.max_steps, cfg.lr_schedule)


class _Schedule:
    """A picklable ``step -> factor`` (LambdaLR keeps it in its state only when it is an object)."""

    def __init__(self, warmup: int, total: int, kind: str) -> None:
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        return lr_factor(step, warmup=self.warmup, total=self.total, kind=self.kind)
