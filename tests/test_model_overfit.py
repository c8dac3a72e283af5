"""A real (tiny) training run: one batch overfit through the SAM path, then the predictor on the same
samples (generated [SEG] / [REJ] decide the masks) and the evaluation loop on it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_model_kit import SIZE, TEMPLATE, synth_samples, target_iou, tiny_cfg

from mllm_ris.eval.evaluate import evaluate
from mllm_ris.modeling.model import RISModel, build_model
from mllm_ris.modeling.predictor import RISPredictor, build_processor
from mllm_ris.processing.processor import answer_text

MAX_STEPS = 300


@dataclass
class Run:
    model: RISModel
    start_iou: list[float]
    final_iou: list[float]
    lm: float
    steps: int
    seconds: float


@pytest.fixture(scope="module")
def run() -> Run:
    """mllm mode, output_mode sam, the tiny LLM fully trained (LoRA cannot teach a random LLM its
    answers: docs/model.md); AdamW 5e-3 on every trainable part until every target's SAM mask has
    IoU > 0.9 and the LM loss is < 0.1 (checked before each update, so these are the final weights)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("mllm", "sam", "model.mllm.lora.enabled=false")).train()
    batch = build_processor(model, image_size=SIZE, template=TEMPLATE)(synth_samples())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    start, t0 = [], time.perf_counter()
    for step in range(MAX_STEPS):
        out = model(batch)
        iou = target_iou(out.sam_logits.detach(), out.matched_targets, batch.valid, out.target_valid)
        if step == 0:
            start = iou.tolist()
        if iou.min() > 0.9 and out.loss_terms["lm"] < 0.1:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    return Run(model.eval(), start, iou.tolist(), float(out.loss_terms["lm"].detach()), step, seconds)


def test_one_batch_overfit_through_sam_reaches_iou_09(run: Run) -> None:
    print(f"steps {run.steps}, {run.seconds:.1f} s, IoU {run.start_iou} -> {run.final_iou}, lm {run.lm:.3f}")
    assert max(run.start_iou) < 0.5 and len(run.final_iou) == 3  # three targets: 1 + 2, none for [REJ]
    assert min(run.final_iou) > 0.9 and run.steps < MAX_STEPS


def test_predictor_generates_seg_and_rej(run: Run) -> None:
    samples = synth_samples()
    predictor = RISPredictor(run.model, image_size=SIZE, batch_size=3)
    preds = predictor.predict(samples)
    assert [p.text for p in preds] == [answer_text(1), answer_text(2), answer_text(0)]
    for pred, sample in zip(preds, samples, strict=True):
        assert pred.masks.dtype == np.bool_ and pred.masks.shape == sample.masks.shape  # (T, H, W) original
        assert pred.scores.shape == (len(sample.masks),)
    assert preds[2].no_target_prob > 0.5 > max(preds[0].no_target_prob, preds[1].no_target_prob)
    # each [SEG] mask covers one target (in the order the queries were matched in training)
    for pred, sample in zip(preds[:2], samples[:2], strict=True):
        for mask in pred.masks:
            best = max((mask & t).sum() / (mask | t).sum() for t in sample.masks)
            assert best > 0.8
    report = evaluate(samples, predictor, progress=False)  # batched through predict_batch
    assert report.metrics["n_acc"] == 1.0 and report.metrics["t_acc"] == 1.0
    assert report.metrics["gIoU"] > 0.85
