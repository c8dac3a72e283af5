"""Shared helpers of the RISModel tests (no tests here): tiny configs and SynthRef-like samples."""

from __future__ import annotations

import numpy as np
import torch

from mllm_ris.config import ModelConfig, load_config
from mllm_ris.data.sample import RISSample
from mllm_ris.processing.processor import QUESTION_TEMPLATES, ChatTemplate

SIZE = 64  # canvas side S of every test batch
TINY = [  # hidden 16-32, 2 layers, 64 px: every mode builds in well under a second
    "model.pixel.cnn_widths=[8, 8, 16, 16]",
    "model.pixel.cnn_norm=gn",  # batch-size independent: train / eval give the same masks
    "model.head.dim=16",
    "model.head.num_heads=2",
    "model.text.init=random",
    "model.text.dim=16",
    "model.vision.random_image_size=32",
    "model.vision.random_hidden_size=16",
    "model.projector.num_heads=2",
    "model.mllm.seg_dim=16",
    "model.mllm.random_hidden_size=32",
    "model.mllm.random_intermediate_size=64",
    "model.mllm.lora.dropout=0.0",
    "model.sam.img_size=64",
]
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)
TEMPLATE = ChatTemplate(questions=QUESTION_TEMPLATES[:1])  # "Please segment {expr}." as the predictor asks


def tiny_cfg(mode: str = "mllm", output_mode: str = "direct", *extra: str) -> ModelConfig:
    """A tiny model config (see ``TINY``) in ``mode`` / ``output_mode`` plus ``extra`` overrides."""
    return load_config(None, [*TINY, f"model.mode={mode}", f"model.output_mode={output_mode}", *extra]).model


def scene(
    seed: int, shapes: list[tuple[str, tuple[int, int, int], int, int, int, bool]], text: str, h: int = SIZE
) -> RISSample:
    """A SynthRef-like sample: discs / squares ``(kind, colour, cy, cx, radius, is_target)`` on a
    noisy horizontal gradient, ``h x 64`` px; the targets' masks in drawing order."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :SIZE]
    base = rng.uniform(60, 120, 3)[None, None] + 40 * (xx / SIZE)[..., None] + rng.normal(0, 4, (h, SIZE, 3))
    image = base.clip(0, 255).astype(np.uint8)
    masks = []
    for kind, colour, cy, cx, r, target in shapes:
        if kind == "disc":
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            m = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        image[m] = colour
        if target:
            masks.append(m)
    stack = np.stack(masks) if masks else np.zeros((0, h, SIZE), dtype=bool)
    return RISSample(
        image=image, masks=stack, text=text, dataset="synth", split="train", image_id=seed, ref_id=seed,
        sent_id=seed, exist=bool(masks), difficulty="simple",
    )  # fmt: skip


def synth_samples() -> list[RISSample]:
    """One target, two targets (one image taller than wide: letterbox padding), no target."""
    return [
        scene(0, [("disc", RED, 20, 22, 12, True), ("square", BLUE, 44, 44, 10, False)], "the red circle"),
        scene(
            1,
            [
                ("square", BLUE, 16, 18, 9, True),
                ("square", BLUE, 60, 40, 11, True),
                ("disc", GREEN, 20, 48, 8, False),
            ],
            "the blue squares",
            h=80,
        ),
        scene(2, [("disc", GREEN, 30, 30, 14, False)], "the yellow star"),
    ]


def target_iou(
    masks: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """IoU of ``masks (B, T, S, S)`` > 0 vs ``targets`` inside ``valid (B, S, S)``, for the real ``pairs``."""
    pred, gt, v = masks > 0, targets > 0.5, valid[:, None]
    inter = (pred & gt & v).flatten(2).sum(2).float()
    union = ((pred | gt) & v).flatten(2).sum(2).float()
    return (inter / union.clamp_min(1.0))[pairs]
