"""RISModel: every part of mllm-ris wired from one :class:`~mllm_ris.config.ModelConfig`.

Two modes share the pixel side (pixel encoder → fusion head → optional SAM stage) and differ in
where the queries come from (``S`` = canvas side of the batch, ``T`` = queries per image)::

    classic  texts ──TextEncoder──► words (B, L, D) + one query (B, 1, D)
             (pointer.dim) region descriptors ──projector──► regions (B, K, Dp)
             query, words, regions ──RegionPointer──► region logits (B, 1, K) ──painted──► prior (B, 1, S, S)
    mllm     images ──VisionTower──► (B, N, Cv) ──projector(+ superpixels)──► VisualTokens (B, K, D_llm)
             chat ──GroundingMLLM──► [SEG] embeddings (B, T, Dg), reject logit (B,), LM loss
             (pointer) region logits (B, T, K) ──painted through the superpixels──► prior (B, T, S, S)
    both     images ──PixelEncoder──► pyramid ──head(queries)──► mask_logits (B, T, S/4, S/4), iou (B, T)
             [sam | auto] prompts(queries, head logits) ──SAM──► sam_logits (B, T, S, S), sam iou (B, T)

The batch's ``images`` are the letterbox as [0, 1] RGB (:mod:`mllm_ris.processing.processor`); each part
that reads them normalises them its own way: the pixel encoder with ImageNet's mean / std (right before
it is called), the vision tower and SAM with theirs (their ``preprocess``).

Classic mode reads one expression per image (``T = 1``, a plain :class:`RISBatch` without the pointer):
a multi-target expression is trained on the union of its targets, a no-target one on an empty mask
(BCE only, no Dice), and an empty predicted mask means "no target".

With the region pointer (``mllm.pointer_dim`` / ``pointer.dim``) the head refines the prior: its logits
are a residual added to the prior (clamped to ``±PRIOR_CLAMP``), so SAM's prompts and every mask loss
see prior + head.
Output modes: ``direct`` (head masks), ``sam`` (SAM's), ``auto`` (per query, the one with the higher
predicted IoU), ``prior`` (the painted region prior alone; the pixel side is not run). Losses:
:mod:`mllm_ris.modeling.losses`. Saving and loading:
:mod:`mllm_ris.modeling.model_io`; inference on samples: :mod:`mllm_ris.modeling.predictor`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mllm_ris.errors import ConfigError
from mllm_ris.modeling.model_build import build_parts
from mllm_ris.modeling.model_io import load_parts, read_model_config, save_model
from mllm_ris.modeling.projector import MASKED_LOGIT, RegionPointer, VisualTokens, paint_regions
from mllm_ris.processing.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REJ_TOKEN,
    SEG_TOKEN,
    MLLMBatch,
    RISBatch,
    answer_text,
)
from s2rm_head.types import LanguageFeatures, pad_query_slot

# the parts a model may not have (and the losses, for training) are imported where they are used
if TYPE_CHECKING:
    from mllm_ris.modeling.mllm import GroundingMLLM
    from mllm_ris.modeling.model_config import LossConfig, ModelConfig
    from mllm_ris.modeling.projector import VisualProjector
    from mllm_ris.modeling.vision import VisionTower
    from s2rm_head.encoders.pixel import PixelEncoder
    from s2rm_head.encoders.text import TextEncoder
    from s2rm_head.heads.fusion import FusionHead
    from s2rm_head.sam.prompts import PromptBuilder
    from s2rm_head.sam.stage import SAMStage

__all__ = ["PRIOR_CLAMP", "RISModel", "RISOutput", "build_model", "warm_start"]

PRIOR_CLAMP = 20.0  # region-prior logits are clamped to +-this before the head's residual is added


@dataclass
class RISOutput:
    """What :class:`RISModel` returns (``S`` = the batch's canvas side, ``T`` = query slots).

    Attributes:
        loss: ``()`` weighted sum of ``loss_terms``; None from :meth:`RISModel.generate`.
        loss_terms: the weighted terms that apply: ``lm``, ``head_bce``, ``head_dice``, ``iou``,
            ``sam_bce``, ``sam_dice``, ``sam_iou``, ``no_target``.
        mask_logits: ``(B, T, h, w)`` the head's logits on its stride-4 grid (``h = S/4`` for encoders
            that read the ``S x S`` batch; ``img_size/4`` for a SAM-ViT pixel encoder); without the pixel
            side (``segment=False``, output mode ``prior``) the prior ``(B, T, S, S)``.
        iou_pred: ``(B, T)`` the head's predicted IoU.
        masks: ``(B, T, S, S)`` logits of the output mode (auto: per query, head or SAM).
        scores: ``(B, T)`` predicted IoU of the masks in ``masks``.
        target_valid: ``(B, T)`` bool, True for real query slots (classic: all True, ``T = 1``).
        no_target_prob: ``(B,)`` probability that nothing matches (mllm: sigmoid of the reject logit;
            classic: ``1 - sigmoid(max valid logit of masks)``, > 0.5 exactly when the mask is empty).
        sam_logits: ``(B, T, S, S)`` SAM's logits, or None without a SAM stage.
        sam_iou_pred: ``(B, T)`` SAM's predicted IoU, or None.
        from_sam: ``(B, T)`` bool, where ``masks`` came from SAM; None without a SAM stage.
        matched_targets: ``(B, T, S, S)`` the targets in query order (after matching) when a loss was
            computed, else None.
        text: the generated answers (:meth:`RISModel.generate` in mllm mode), else None.
        region_logits: ``(B, T, K)`` the region pointer's scores (mllm with ``pointer_dim``), else None.
        prior: ``(B, T, S, S)`` those scores painted through the superpixels (clamped), else None.
    """

    loss: torch.Tensor | None
    loss_terms: dict[str, torch.Tensor]
    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    masks: torch.Tensor
    scores: torch.Tensor
    target_valid: torch.Tensor
    no_target_prob: torch.Tensor
    sam_logits: torch.Tensor | None = None
    sam_iou_pred: torch.Tensor | None = None
    from_sam: torch.Tensor | None = None
    matched_targets: torch.Tensor | None = None
    text: list[str] | None = None
    region_logits: torch.Tensor | None = None
    prior: torch.Tensor | None = None


@dataclass
class _Queries:
    """Language side of one batch: head input, SAM's sparse-prompt queries and mllm extras."""

    lang: LanguageFeatures
    reject_logit: torch.Tensor | None = None  # (B,) mllm only
    lm_loss: torch.Tensor | None = None
    text: list[str] | None = None
    region_logits: torch.Tensor | None = None  # (B, T, K) pointer scores
    region_mask: torch.Tensor | None = None  # (B, K) real regions
    region_labels: torch.Tensor | None = None  # (B, S, S) region id per pixel, -1 = none
    prior: torch.Tensor | None = None  # (B, T, S, S) clamped painted scores
    presence_logits: torch.Tensor | None = None  # (B, 1, K) mllm.reject_from pointer: the reject query


@dataclass
class _Segmentation:
    """Pixel side of one batch (shapes as in :class:`RISOutput`)."""

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    head_up: torch.Tensor  # (B, T, S, S) head logits upsampled to the canvas
    sam_logits: torch.Tensor | None = None
    sam_iou_pred: torch.Tensor | None = None


class RISModel(nn.Module):
    """Referring segmentation model; parts are injected (see :func:`build_model`), keyword-only.

    Args:
        cfg: the resolved model config (derived widths filled in); saved with the weights.
        pixel_encoder, head: the pixel side; both None exactly in output mode ``prior`` (the mask is
            the painted region prior: nothing reads pixels).
        loss: the loss weights (``cfg.loss``, a :class:`~mllm_ris.modeling.model_config.LossConfig`).
        text_encoder: classic mode's language side.
        vision, projector, mllm: mllm mode's language side.
        pointer: classic mode's region pointer (``pointer.dim``; with a descriptor-only ``projector``).
        sam_stage, prompt_builder: the SAM refinement (output modes ``sam`` / ``auto``).
        share_sam_vit: the pixel encoder is a SAM-ViT pyramid over ``sam_stage``'s own image encoder
            (one ViT pass feeds both).
    """

    def __init__(
        self,
        *,
        cfg: ModelConfig,
        pixel_encoder: PixelEncoder | None,
        head: FusionHead | None,
        loss: LossConfig,
        text_encoder: TextEncoder | None = None,
        vision: VisionTower | None = None,
        projector: VisualProjector | None = None,
        mllm: GroundingMLLM | None = None,
        pointer: RegionPointer | None = None,
        sam_stage: SAMStage | None = None,
        prompt_builder: PromptBuilder | None = None,
        share_sam_vit: bool = False,
    ) -> None:
        super().__init__()
        if cfg.mode == "classic" and (text_encoder is None or vision is not None or mllm is not None):
            raise ConfigError("mode: classic needs a text encoder and no vision tower / mllm")
        if cfg.mode == "classic" and (projector is None) != (pointer is None):
            raise ConfigError("mode: classic takes a projector exactly with its region pointer (pointer.dim)")
        if cfg.mode == "mllm" and (text_encoder is not None or projector is None or mllm is None):
            raise ConfigError("mode: mllm needs a projector and mllm and no text encoder")
        if cfg.mode == "mllm" and pointer is not None:
            raise ConfigError("mode: mllm's region pointer lives in the grounding LLM (mllm.pointer_dim)")
        if cfg.mode == "mllm" and (vision is None) == cfg.projector.tower:
            raise ConfigError("mode: mllm needs a vision tower exactly when projector.tower is on")
        if (cfg.output_mode in ("sam", "auto")) != (sam_stage is not None and prompt_builder is not None):
            raise ConfigError(f"output_mode: {cfg.output_mode!r} with sam_stage={sam_stage is not None}")
        if (cfg.output_mode == "prior") != (pixel_encoder is None and head is None):
            raise ConfigError(
                f"output_mode: {cfg.output_mode!r} with pixel_encoder={pixel_encoder is not None}, "
                f"head={head is not None}; prior has no pixel side, the other modes need both"
            )
        if share_sam_vit:
            from s2rm_head.encoders.pixel import SAMViTEncoder

            if sam_stage is None or not isinstance(pixel_encoder, SAMViTEncoder):
                raise ConfigError("pixel: sharing SAM's ViT needs a SAM stage and a sam-vit pixel encoder")
        self.cfg = cfg
        self.loss_cfg = loss
        self.text_encoder = text_encoder
        self.vision = vision
        self.projector = projector
        self.mllm = mllm
        self.pointer = pointer
        self.pixel_encoder = pixel_encoder
        self.head = head
        self.sam_stage = sam_stage
        self.prompt_builder = prompt_builder
        self.share_sam_vit = share_sam_vit
        self.load_notes: list[str] = []  # what build_model loaded from pretrained files (one line each)

    @property
    def mode(self) -> str:
        """``classic`` or ``mllm``."""
        return self.cfg.mode

    # ------------------------------------------------------------------------------ language side

    def tower_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """Images ``(B, 3, S, S)`` (the letterbox, [0, 1] RGB) → the vision tower's patch features
        ``(B, N, Cv)`` in the projector's dtype; None without a tower (``projector.tower`` false)."""
        if self.vision is None or self.projector is None:
            return None
        feats = self.vision(self.vision.preprocess(images))  # (B, N, Cv): resized, the tower's mean / std
        return feats.to(next(self.projector.parameters()).dtype)  # a bf16 tower feeds a fp32 projector

    def visual_tokens(self, batch: MLLMBatch) -> VisualTokens:
        """Images ``(B, 3, S, S)`` (the letterbox, [0, 1] RGB) → ``VisualTokens (B, K, D_llm)``
        (classic mode's pointer: ``(B, K, pointer.dim)`` from the descriptors alone)."""
        assert self.projector is not None
        feats = self.tower_features(batch.images)  # None with projector.tower false (descriptors alone)
        if self.projector.cfg.kind == "superpixel" and batch.superpixels is None:
            raise ValueError("superpixels: the batch has none, but projector.kind is superpixel")
        if self.projector.cfg.kind == "superpixel":  # (+ region descriptors, projector.descriptors)
            vis = self.projector(feats, batch.superpixels, batch.regions)  # embeds (B, K, D_llm), mask (B, K)
        else:
            vis = self.projector(feats, batch.superpixels)
        if self.mllm is None:  # classic: the pointer reads the tokens in the projector's dtype
            return vis
        # parameters(), not .weight: on peft's token-row wrapper .weight builds the merged matrix
        dtype = next(self.mllm.llm.get_input_embeddings().parameters()).dtype
        return VisualTokens(embeds=vis.embeds.to(dtype), mask=vis.mask)

    def _classic_queries(self, batch: RISBatch) -> _Queries:
        """The text encoder's words ``(B, L, D)`` and sentence query ``(B, 1, D)``; with the region
        pointer also its scores ``(B, 1, K)`` of the batch's region tokens and their painted prior."""
        assert self.text_encoder is not None
        if batch.images.shape[0] != len(batch.texts):
            raise ValueError(
                f"images: {batch.images.shape[0]}, texts: {len(batch.texts)}; need one expression per image"
            )
        q = _Queries(lang=self.text_encoder.encode(batch.texts, device=batch.images.device))
        if self.pointer is None:
            return q
        assert self.projector is not None
        if not isinstance(batch, MLLMBatch) or batch.superpixels is None or batch.regions is None:
            raise ValueError(
                "batch: the classic region pointer needs superpixels and region descriptors "
                "(build_processor(model) makes them)"
            )
        vis = self.visual_tokens(batch)  # embeds (B, K, D), mask (B, K)
        lang = q.lang
        logits = self.pointer(lang.queries, vis.embeds, vis.mask, words=lang.tokens, word_mask=lang.mask)
        self._add_prior(q, batch, logits, vis.mask)  # (B, 1, K) -> prior (B, 1, S, S)
        return q

    def _mllm_queries(self, batch: RISBatch, *, generate: bool, max_new_tokens: int) -> _Queries:
        if not isinstance(batch, MLLMBatch) or batch.input_ids is None or batch.attention_mask is None:
            raise ValueError("batch: mllm mode needs an MLLMBatch with input_ids (use Processor)")
        assert self.mllm is not None
        vis = self.visual_tokens(batch)
        if generate:
            gen = self.mllm.generate(
                batch.input_ids, batch.attention_mask, vis, max_new_tokens=max_new_tokens
            )
            seg, seg_valid, reject, text, lm = gen.seg_embeds, gen.seg_valid, gen.reject_logit, gen.text, None
            words, word_mask, region_logits = gen.word_states, gen.word_mask, gen.region_logits
            presence = gen.presence_logits
            if presence is not None and gen.presence_embed is not None:
                seg, seg_valid, region_logits, text = self._answer_present(
                    reject, presence, gen.presence_embed, seg, seg_valid, region_logits, text
                )
            seg_valid, text = self._apply_reject_threshold(reject, seg_valid, text)
        else:
            labels = batch.labels
            if labels is None or not (labels != -100).any(dim=1).all():
                raise ValueError(
                    "batch: forward() trains on answered chats (Processor(answers=True)); "
                    "use generate() for prompts"
                )
            counts = batch.target_counts if batch.target_valid is not None else None
            out = self.mllm(batch.input_ids, batch.attention_mask, vis, labels, target_counts=counts)
            seg, seg_valid, reject, text, lm = out.seg_embeds, out.seg_valid, out.reject_logit, None, out.loss
            words, word_mask, region_logits = out.word_states, out.word_mask, out.region_logits
            presence = out.presence_logits
        # each (image, [SEG]) pair is one query; the head's "words" are the sample's [SEG] embeddings,
        # after the prompt's text-token states when mllm.word_states is on
        tokens, mask = seg, seg_valid
        if words is not None and word_mask is not None:
            tokens, mask = torch.cat([words, seg], dim=1), torch.cat([word_mask, seg_valid], dim=1)
        lang = LanguageFeatures(tokens=tokens, mask=mask, queries=seg, query_mask=seg_valid)
        q = _Queries(lang=lang, reject_logit=reject, lm_loss=lm, text=text, presence_logits=presence)
        if region_logits is not None:
            self._add_prior(q, batch, region_logits, vis.mask)
        return q

    def _add_prior(
        self, q: _Queries, batch: MLLMBatch, region_logits: torch.Tensor, region_mask: torch.Tensor
    ) -> None:
        """Paint ``region_logits (B, T, K)`` through the batch's superpixels (in token order) into the
        region prior ``(B, T, S, S)`` the head refines."""
        assert self.projector is not None and batch.superpixels is not None
        labels = self.projector.region_labels(batch.superpixels)  # (B, S, S) token order, -1 = none
        if labels.shape[-2:] != batch.images.shape[-2:]:
            raise ValueError(
                f"superpixels: {tuple(labels.shape[-2:])} label maps, but the canvas is "
                f"{tuple(batch.images.shape[-2:])}: the prior is painted on the canvas"
            )
        q.region_logits, q.region_mask, q.region_labels = region_logits, region_mask, labels
        q.prior = paint_regions(region_logits, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)

    def _answer_present(
        self,
        reject_logit: torch.Tensor,
        presence: torch.Tensor,
        presence_embed: torch.Tensor,
        seg: torch.Tensor,
        seg_valid: torch.Tensor,
        region_logits: torch.Tensor | None,
        text: list[str],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
        """``mllm.reject_from: pointer``: the pointer decides both ways. A row whose answer has no
        ``[SEG]`` although its presence query finds a region (``sigmoid(reject_logit) <= reject_threshold``)
        answers :func:`answer_text` (1) with one query: the prompt state's embedding ``presence_embed
        (B, Dg)`` and region logits ``presence (B, 1, K)`` (the union of what the sentence names). The
        other way, an answer with ``[SEG]`` whose presence query finds nothing, is
        :meth:`_apply_reject_threshold`'s.
        ``seg (B, T, Dg)``, ``seg_valid (B, T)`` and ``region_logits (B, T, K)`` grow to ``T = 1`` when
        needed. With ``reject_threshold`` null the answer's text decides alone."""
        threshold = self.cfg.reject_threshold
        if threshold is None:
            return seg, seg_valid, region_logits, text
        rescue = ~seg_valid.any(1) & (torch.sigmoid(reject_logit.float()) <= threshold)  # (B,)
        if not rescue.any():
            return seg, seg_valid, region_logits, text
        if seg.shape[1] == 0:  # no row has a [SEG]: one query slot
            seg = seg.new_zeros(seg.shape[0], 1, seg.shape[2])
            seg_valid = seg_valid.new_zeros(seg_valid.shape[0], 1)
            if region_logits is not None:
                region_logits = presence.new_full(presence.shape, MASKED_LOGIT)
        seg, seg_valid = seg.clone(), seg_valid.clone()
        seg[rescue, 0] = presence_embed[rescue].to(seg.dtype)
        seg_valid[rescue, 0] = True
        if region_logits is not None:
            region_logits = region_logits.clone()
            region_logits[rescue, 0] = presence[rescue, 0].to(region_logits.dtype)
        text = [answer_text(1) if r else t for r, t in zip(rescue.tolist(), text, strict=True)]
        return seg, seg_valid, region_logits, text

    def _apply_reject_threshold(
        self, reject_logit: torch.Tensor, seg_valid: torch.Tensor, text: list[str]
    ) -> tuple[torch.Tensor, list[str]]:
        """Rows whose no-target probability ``sigmoid(reject_logit) (B,)`` exceeds
        ``cfg.reject_threshold`` answer :func:`answer_text` (0) and keep no ``[SEG]``: ``seg_valid (B, T)``
        all False there. The reject head is a binary classifier on the same state that starts the
        answer; it is trained with a class weight (``loss.no_target_pos_weight``), which the LM's
        next-token loss over the whole vocabulary has no counterpart of."""
        threshold = self.cfg.reject_threshold
        if threshold is None:
            return seg_valid, text
        rejected = torch.sigmoid(reject_logit.float()) > threshold  # (B,)
        if not rejected.any():
            return seg_valid, text
        text = [answer_text(0) if r else t for r, t in zip(rejected.tolist(), text, strict=True)]
        return seg_valid & ~rejected[:, None], text

    # ---------------------------------------------------------------------------------- pixel side

    def _pyramid(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``images (B, 3, S, S)`` → 4 maps ``(B, C_i, side/s_i, side/s_i)`` and, when the ViT is shared
        with SAM, SAM's image embeddings ``(B, C, E, E)`` from the same pass (else None)."""
        assert self.pixel_encoder is not None  # the pixel side exists outside output mode prior
        if self.share_sam_vit:
            from s2rm_head.encoders.pixel import SAMViTEncoder

            assert self.sam_stage is not None and isinstance(self.pixel_encoder, SAMViTEncoder)
            embed = self.sam_stage.encode_images(self._sam_pixels(images))  # (B, C, E, E)
            return self.pixel_encoder.pyramid(embed), embed  # the pyramid over the shared ViT output
        s = images.shape[-1]
        x = _imagenet_normalise(images)  # the pixel encoders read ImageNet-normalised pixels
        side = getattr(self.pixel_encoder, "img_size", None)  # a SAM ViT reads one fixed size
        if side is not None and side != s:  # (B, 3, S, S) -> (B, 3, side, side); SAM's stats = ImageNet's
            x = F.interpolate(x, (side, side), mode="bilinear", align_corners=False)
        return self.pixel_encoder(x), None

    def _segment(
        self, images: torch.Tensor, lang: LanguageFeatures, prior: torch.Tensor | None = None
    ) -> _Segmentation:
        """``images (B, 3, S, S)``, queries ``(B, T, D)`` → head (+ SAM) masks.

        A batch without query slots (``T = 0``: every answer ``[REJ]``) is segmented with one padded
        slot, dropped at the end: the same modules run in the same order whatever ``T`` is (DeepSpeed
        ZeRO-3's ranks gather parameters module by module and must all do the same), and the padded
        query comes from the ``[SEG]`` embeddings (empty), so the grounding MLP stays in the graph.
        With a region ``prior (B, T, S, S)`` the head's logits are a residual on it (the prior is
        area-averaged to the head's grid for ``mask_logits``).
        """
        s = images.shape[-1]
        t = lang.queries.shape[1]
        if t == 0:
            lang = pad_query_slot(lang)
        pyramid, sam_embed = self._pyramid(images)
        assert self.head is not None
        head = self.head(pyramid, lang)  # mask_logits (B, Tq, h, w), iou_pred (B, Tq); Tq = max(T, 1)
        b, tq, h, w = head.mask_logits.shape
        mask_logits, head_up = head.mask_logits, head.mask_logits
        if (h, w) != (s, s):  # (B, Tq, h, w) -> (B, Tq, S, S)
            head_up = F.interpolate(head.mask_logits, (s, s), mode="bilinear", align_corners=False)
        if prior is not None:  # the head refines the prior: residual logits (padded slot: prior 0)
            prior = F.pad(prior, (0, 0, 0, 0, 0, tq - prior.shape[1]))  # (B, T, S, S) -> (B, Tq, S, S)
            head_up = head_up + prior
            mask_logits = mask_logits + F.adaptive_avg_pool2d(prior, (h, w))  # (B, Tq, h, w)
        seg = _Segmentation(
            mask_logits=mask_logits[:, :t], iou_pred=head.iou_pred[:, :t], head_up=head_up[:, :t]
        )
        if self.sam_stage is None or self.prompt_builder is None:
            return seg
        if sam_embed is None:
            sam_embed = self.sam_stage.encode_images(self._sam_pixels(images))  # (B, C, E, E)
        queries = lang.queries if self.prompt_builder.cfg.sparse else None
        prompts = self.prompt_builder(queries, mask_logits)  # N = B * Tq pairs, sample-major
        out = self.sam_stage(sam_embed, prompts)  # mask_logits (N, 1, M, M), iou_pred (N,)
        up = self.sam_stage.upsample(out.mask_logits, (s, s))  # (N, 1, S, S) over the same canvas
        seg.sam_logits = up.view(b, tq, s, s)[:, :t]  # (N, 1, S, S) -> (B, T, S, S)
        seg.sam_iou_pred = out.iou_pred.view(b, tq)[:, :t]
        return seg

    def _sam_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The letterbox ``(B, 3, S, S)`` ([0, 1] RGB) → SAM's input ``(B, 3, S_sam, S_sam)``: on SAM's
        0..255 scale through ``SAMStage.preprocess`` (resize, SAM's mean / std)."""
        assert self.sam_stage is not None
        return self.sam_stage.preprocess(images * 255.0).pixels

    def _choose(self, seg: _Segmentation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``masks (B, T, S, S)``, ``scores (B, T)`` and ``from_sam (B, T)`` of the output mode."""
        mode = self.cfg.output_mode
        if mode == "direct" or seg.sam_logits is None or seg.sam_iou_pred is None:
            return seg.head_up, seg.iou_pred, None
        if mode == "sam":
            return seg.sam_logits, seg.sam_iou_pred, torch.ones_like(seg.iou_pred, dtype=torch.bool)
        from_sam = seg.sam_iou_pred > seg.iou_pred  # (B, T) per query: the higher predicted IoU
        masks = torch.where(from_sam[..., None, None], seg.sam_logits, seg.head_up)
        return masks, torch.where(from_sam, seg.sam_iou_pred, seg.iou_pred), from_sam

    # ------------------------------------------------------------------------------------- passes

    def forward(self, batch: RISBatch, *, segment: bool = True) -> RISOutput:
        """Teacher-forced pass with losses (classic: a :class:`RISBatch`; mllm: an answered ``MLLMBatch``).

        Args:
            segment: False skips the pixel side (pixel encoder, head, SAM): the masks are the region
                prior and the loss has only the language-side terms (``lm``, ``no_target``, ``region_*``).
                Needs the region pointer; used for the pointer warm-up (``train.pointer_warmup_steps``),
                which costs about a fifth of a full step on CPU.

        Raises:
            TokenCountError: a sample's ``[SEG]`` count differs from its number of target masks.
            ConfigError: ``segment=False`` without a region pointer.
        """
        if self.mode == "classic":
            q = self._classic_queries(batch)
        else:
            q = self._mllm_queries(batch, generate=False, max_new_tokens=0)
        if not segment and q.prior is None:
            raise ConfigError(
                "segment=False (pointer warm-up) needs the region pointer (mllm.pointer_dim / pointer.dim)"
            )
        return self._finish(batch, q, with_loss=True, segment=segment and self.cfg.output_mode != "prior")

    @torch.no_grad()
    def generate(self, batch: RISBatch, *, max_new_tokens: int = 32) -> RISOutput:
        """Inference: mllm mode decodes the prompts (``Processor(answers=False)``) and segments one
        query per generated ``[SEG]``; classic mode is :meth:`forward` without losses."""
        if self.mode == "classic":
            q = self._classic_queries(batch)
        else:
            q = self._mllm_queries(batch, generate=True, max_new_tokens=max_new_tokens)
        return self._finish(batch, q, with_loss=False, segment=self.cfg.output_mode != "prior")

    def _finish(self, batch: RISBatch, q: _Queries, *, with_loss: bool, segment: bool = True) -> RISOutput:
        if segment:
            seg = self._segment(batch.images, q.lang, q.prior)
        else:  # the prior is the mask; its score: the most confident region's probability (B, T)
            if q.prior is None or q.region_logits is None or q.region_labels is None:
                raise ConfigError("output_mode prior needs a region pointer (mllm.pointer_dim, pointer.dim)")
            if q.region_logits.shape[-1]:
                iou = torch.sigmoid(q.region_logits.float()).amax(-1).to(q.prior.dtype)
                # mllm: the answer decided that there is a target; classic: no region above 0 = none
                answered = q.reject_logit is not None
                mask_logits = _best_region_painted(q.region_logits, q.region_labels) if answered else q.prior
            else:  # no region in the batch
                iou = q.prior.new_zeros(q.prior.shape[:2])
                mask_logits = q.prior
            mask_logits = mask_logits.to(q.prior.dtype)
            seg = _Segmentation(mask_logits=mask_logits, iou_pred=iou, head_up=mask_logits)
        masks, scores, from_sam = self._choose(seg)
        if q.reject_logit is not None:
            no_target_prob = torch.sigmoid(q.reject_logit.float())
        else:  # classic: empty mask <=> every valid logit < 0 <=> this probability > 0.5
            best = masks[:, 0].masked_fill(~batch.valid, float("-inf")).flatten(1).amax(1)  # (B,)
            no_target_prob = 1.0 - torch.sigmoid(best.float())
        out = RISOutput(
            loss=None,
            loss_terms={},
            mask_logits=seg.mask_logits,
            iou_pred=seg.iou_pred,
            masks=masks,
            scores=scores,
            target_valid=q.lang.query_mask,
            no_target_prob=no_target_prob,
            sam_logits=seg.sam_logits,
            sam_iou_pred=seg.sam_iou_pred,
            from_sam=from_sam,
            text=q.text,
            region_logits=q.region_logits,
            prior=q.prior,
        )
        if with_loss:
            self._add_losses(out, batch, q, seg, masks=segment)
        return out

    def _add_losses(
        self, out: RISOutput, batch: RISBatch, q: _Queries, seg: _Segmentation, *, masks: bool = True
    ) -> None:
        """Fill ``loss``, ``loss_terms`` and ``matched_targets`` (terms: :mod:`mllm_ris.modeling.losses`)."""
        from mllm_ris.modeling.losses import match_targets, no_target_loss, pair_mask_losses, region_losses

        cfg, extra = self.cfg.loss, self.loss_cfg
        terms: dict[str, torch.Tensor] = {}
        if self.mode == "classic":  # one query per expression, trained on the union (empty for no-target)
            targets = batch.targets[:, None]  # (B, S, S) -> (B, 1, S, S)
            pair_valid = torch.ones_like(batch.has_target)[:, None]  # (B, 1)
            has_target = batch.has_target[:, None]  # (B, 1)
        else:
            assert isinstance(batch, MLLMBatch) and batch.target_masks is not None
            assert q.lm_loss is not None and q.reject_logit is not None and batch.target_valid is not None
            targets, pair_valid = batch.target_masks, batch.target_valid  # (B, T, S, S), (B, T)
            has_target = pair_valid
            if extra.match_targets and masks:
                order = match_targets(seg.mask_logits, targets, pair_valid, batch.valid)  # (B, T)
                targets = targets.gather(1, order[..., None, None].expand_as(targets))
            terms["lm"] = extra.lm * q.lm_loss
            terms["no_target"] = no_target_loss(
                q.reject_logit, batch.has_target, extra.no_target, extra.no_target_pos_weight
            )
        if q.region_logits is not None:  # classic: a no-target expression's regions are all negatives
            assert q.region_mask is not None and q.region_labels is not None
            terms.update(
                region_losses(q.region_logits, q.region_mask, q.region_labels, targets, pair_valid, extra)
            )
            if q.presence_logits is not None:  # the reject query points at the union of the targets
                union = batch.targets[:, None]  # (B, 1, S, S), empty for a no-target sample
                every = torch.ones_like(batch.has_target)[:, None]  # (B, 1)
                found = region_losses(q.presence_logits, q.region_mask, q.region_labels, union, every, extra)
                terms.update({f"presence_{name}": value for name, value in found.items()})
        args = (targets, pair_valid, has_target, batch.valid, cfg)
        if masks:
            terms.update(pair_mask_losses(seg.head_up, seg.iou_pred, *args, prefix="head"))
        if seg.sam_logits is not None and seg.sam_iou_pred is not None:
            terms.update(
                pair_mask_losses(seg.sam_logits, seg.sam_iou_pred, *args, prefix="sam", scale=extra.sam)
            )
        out.loss = sum(terms.values())  # type: ignore[assignment]
        out.loss_terms = terms
        out.matched_targets = targets

    # ---------------------------------------------------------------------------------- utilities

    @staticmethod
    def rejected(text: str) -> bool:
        """Whether a generated answer means "no target": it has ``[REJ]`` or no ``[SEG]``."""
        return REJ_TOKEN in text or SEG_TOKEN not in text

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model folder (see :func:`mllm_ris.modeling.model_io.save_model`)."""
        return save_model(self, path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, trainable: bool = False, device: str | torch.device | None = None
    ) -> RISModel:
        """Rebuild a model written by :meth:`save_pretrained`, in eval mode.

        Args:
            trainable: keep the config's trainable parts trainable (resume); False freezes everything.
            device: where to put the model (a quantized LLM base is placed by its loader instead).

        Raises:
            CheckpointError: not a model folder, or a file that does not fit the rebuilt model.
        """
        folder = Path(path)
        cfg = read_model_config(folder)
        mllm = None
        if cfg.mode == "mllm":
            from mllm_ris.modeling.mllm import GroundingMLLM

            mllm = GroundingMLLM.from_pretrained(
                folder / "mllm", trainable=trainable, device=device, config=cfg.mllm
            )
        model = build_model(cfg, mllm=mllm)
        load_parts(model, folder)
        if not trainable:
            model.requires_grad_(False)
        if device is not None:
            quantized = cfg.mode == "mllm" and cfg.mllm.quantization != "none"
            for name, child in model.named_children():
                if name != "mllm" or not quantized:
                    child.to(device)
                else:  # a bitsandbytes base stays where its loader put it; the heads follow `device`
                    child.heads_to(device)
        return model.eval()


def warm_start(model_cfg: ModelConfig) -> RISModel:
    """The ``model_cfg.checkpoint`` folder's model, trainable, to go on training under ``model_cfg``.

    The folder fixes the architecture and the weights; the run's config fixes the prompt layout
    (``mllm.image_position``), which holds no weight, so a run can continue a model in another layout.
    """
    assert model_cfg.checkpoint is not None
    model = RISModel.from_pretrained(model_cfg.checkpoint, trainable=True)
    if model.mllm is not None and model_cfg.mode == "mllm":
        position = model_cfg.mllm.image_position
        model.mllm.cfg = dataclasses.replace(model.mllm.cfg, image_position=position)
        model.cfg = dataclasses.replace(model.cfg, mllm=model.mllm.cfg)
    return model


def build_model(
    model_cfg: ModelConfig,
    *,
    mllm: GroundingMLLM | None = None,
) -> RISModel:
    """Build the model ``model_cfg`` describes; widths that follow from the built parts are derived
    (rules in :func:`mllm_ris.modeling.model_build.build_parts`).

    Args:
        mllm: an already built grounding LLM (e.g. :meth:`GroundingMLLM.from_pretrained`) to use
            instead of building ``model_cfg.mllm``.
    """
    parts = build_parts(model_cfg, mllm=mllm)
    model = RISModel(**parts.kwargs)
    model.load_notes = parts.notes
    return model


def _imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """``images (B, 3, H, W)`` [0, 1] RGB → ``(images - mean) / std`` with ImageNet's statistics (the
    letterbox padding, :data:`~mllm_ris.processing.processor.PAD_COLOR`, becomes 0)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images - mean) / std).to(images.dtype)


_BEST_REGION_LOGIT = 0.01  # the logit a query's best region is raised to when none is above 0 (prior mode)


def _best_region_painted(region_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The prior-mode mask logits ``(B, T, S, S)``: the region logits ``(B, T, K)`` painted through
    ``labels (B, S, S)``, each query's logits shifted up (when needed) so its best region is at least
    ``_BEST_REGION_LOGIT``: a ``[SEG]`` always points at one region at least (whether there is a target
    at all is the reject head's and the answer's decision, not the pointer's confidence)."""
    logits = region_logits.float()
    best = logits.amax(-1, keepdim=True)  # (B, T, 1)
    shifted = logits + (_BEST_REGION_LOGIT - best).clamp_min(0.0)  # masked regions stay ~ -1e4
    return paint_regions(shifted, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)  # (B, T, S, S)
