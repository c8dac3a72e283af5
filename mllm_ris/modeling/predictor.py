"""Inference with a :class:`~mllm_ris.modeling.model.RISModel`: from its batch (or dataset samples) to masks.

:func:`build_processor` gives the :class:`~mllm_ris.processing.processor.Processor` a model needs (its
tokenizer, superpixel generator and descriptors): training's ``collate_fn``, evaluation's and the
pipeline's input path. :class:`RISPredictor` implements the :class:`~mllm_ris.eval.evaluate.Predictor`
protocol for both modes, so ``evaluate(dataset, RISPredictor(model, image_size=S))`` works, and runs
any batch its processor made (:meth:`RISPredictor.run`, the pipeline's way in):

* mllm: the prompts are decoded (``RISModel.generate``); each generated ``[SEG]`` gives one mask; an
  answer with ``[REJ]`` or without ``[SEG]`` gives none, ``(0, H, W)``;
* classic: one mask per expression (the union of its targets), none when it is empty.

Masks are the output mode's logits mapped back to the original image (``unletterbox``), thresholded at 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_ris.modeling.model import RISModel
from mllm_ris.processing.processor import (
    QUESTION_TEMPLATES,
    ChatTemplate,
    Processor,
    RISBatch,
    RISTransform,
    Sample,
    unletterbox,
)
from mllm_ris.processing.regions import build_superpixel_generator

__all__ = ["FROM_CONFIG", "ModelPrediction", "RISPredictor", "build_processor"]

FROM_CONFIG: Any = object()
"""``superpixel_cache`` default of :func:`build_processor`: the model config's ``superpixels.cache_dir``."""


def build_processor(
    model: RISModel,
    *,
    image_size: int,
    answers: bool = True,
    keep_samples: bool = False,
    template: ChatTemplate | None = None,
    superpixel_cache: str | Path | None = FROM_CONFIG,
) -> Processor:
    """The :class:`Processor` of ``model``: letterbox to ``image_size``; in mllm mode also the chat
    (answered for training, open for inference) and, for the superpixel projector (mllm, or classic
    with its region pointer), label maps from ``model.cfg.superpixels`` (``method: sam`` uses the
    model's SAM) and region descriptors. ``superpixel_cache``: a folder caching the label maps, None for
    none; default the config's ``cache_dir``."""
    transform = RISTransform(image_size)
    if model.mode == "classic" and model.pointer is None:
        return Processor(transform=transform, keep_samples=keep_samples)  # a plain RISBatch
    assert model.projector is not None
    superpixels = None
    if model.projector.cfg.kind == "superpixel":
        sam = model.sam_stage.sam if model.sam_stage is not None else None
        cfg = model.cfg.superpixels
        if superpixel_cache is not FROM_CONFIG:
            cfg = dataclasses.replace(
                cfg, cache_dir=None if superpixel_cache is None else str(superpixel_cache)
            )
        superpixels = build_superpixel_generator(cfg, sam=sam)
    if model.mllm is not None:  # the model's layout of the first turn, whatever the phrasings
        template = (template or ChatTemplate()).laid_out(model.mllm.cfg.image_position)
    return Processor(
        transform=transform,
        tokenizer=model.mllm.tokenizer if model.mllm is not None else None,  # classic: no chat
        template=template,
        superpixels=superpixels,
        answers=answers,
        keep_samples=keep_samples,
        descriptors=model.projector.cfg.descriptors,
    )


@dataclass
class ModelPrediction:
    """One sample's result.

    Attributes:
        masks: ``(N, H, W)`` bool at the original image size; ``N = 0`` means "no target".
        scores: ``(N,)`` predicted IoU of each mask.
        no_target_prob: probability that nothing matches (see ``RISOutput.no_target_prob``).
        text: the generated answer (mllm mode), else None.
    """

    masks: np.ndarray
    scores: np.ndarray
    no_target_prob: float
    text: str | None = None


class RISPredictor:
    """A :class:`RISModel` as an evaluation predictor (``sample -> (N, H, W) bool``), batched.

    Args:
        model: the model (put in eval mode by every call).
        image_size: canvas side ``S`` the model was trained at.
        device: where batches go (the model must already be there).
        batch_size: samples per forward pass in :meth:`predict_batch`.
        max_new_tokens: answer length limit of the grounding LLM.
        template: question phrasing; default the first of ``QUESTION_TEMPLATES`` ("Please segment {expr}.").
        superpixel_cache: see :func:`build_processor`.

    Attributes:
        processor: the prompts' :class:`Processor` (open turns).
    """

    name = "ris-model"

    def __init__(
        self,
        model: RISModel,
        *,
        image_size: int,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        max_new_tokens: int = 32,
        template: ChatTemplate | None = None,
        superpixel_cache: str | Path | None = FROM_CONFIG,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        template = template or ChatTemplate(questions=QUESTION_TEMPLATES[:1], seed=None)
        self.processor = build_processor(
            model, image_size=image_size, answers=False, template=template, superpixel_cache=superpixel_cache
        )

    @property
    def transform(self) -> RISTransform:
        """The letterbox of :attr:`processor`."""
        return self.processor.transform

    def __call__(self, sample: Sample) -> np.ndarray:
        return self.predict_batch([sample])[0]

    def predict_batch(self, samples: list[Sample]) -> list[np.ndarray]:
        """One pass over ``samples``: a ``(N, H, W)`` bool array per sample."""
        return [p.masks for p in self.predict(samples)]

    def predict(self, samples: Sequence[Sample]) -> list[ModelPrediction]:
        """Masks, scores, no-target probability and answer text of each sample."""
        return self.run(self.processor(list(samples)))

    @torch.no_grad()
    def run(self, batch: RISBatch) -> list[ModelPrediction]:
        """Masks, scores, no-target probability and answer text of each item of a :attr:`processor` batch."""
        self.model.eval()
        batch = batch.to(self.device)
        out = self.model.generate(batch, max_new_tokens=self.max_new_tokens)
        results = []
        for b, hw in enumerate(batch.hw):
            text = out.text[b] if out.text is not None else None
            n = int(out.target_valid[b].sum())  # real queries: [SEG] count (mllm) or 1 (classic)
            masks = (unletterbox(out.masks[b, :n], hw, self.transform) > 0).cpu().numpy()  # (n, H, W)
            scores = out.scores[b, :n].float().cpu().numpy()
            if text is not None and self.model.rejected(text):
                masks, scores = masks[:0], scores[:0]  # [REJ] or no [SEG]: no target
            elif text is None and (not masks.any() or float(out.no_target_prob[b]) > 0.5):
                masks, scores = masks[:0], scores[:0]  # classic: an empty mask or the presence logit
            results.append(ModelPrediction(masks, scores, float(out.no_target_prob[b]), text))
        return results
