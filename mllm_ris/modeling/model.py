"""RISModel: every part of mllm-ris wired from one :class:`~mllm_ris.config.ModelConfig`.

A model is a **query source** and a **segmenter** (``S`` = canvas side of the batch, ``T`` = queries
per image). The query source (:class:`~mllm_ris.modeling.model_build.QuerySource`, chosen once by
``model.mode`` when the model is built) makes the queries: ``TextQueries`` (classic: text encoder,
optional region pointer over descriptor tokens) or ``LLMQueries`` (mllm: vision tower, projector,
grounding LLM with its pointer); :meth:`RISModel.forward` and :meth:`RISModel.generate` call it and
never test the mode. The segmenter is the pixel side (none in output mode ``prior``)::

    queries  (B, T, D), words, [region logits (B, T, K) ──painted through the superpixels──► prior]
    segment  images ──PixelEncoder──► pyramid ──head(queries)──► mask_logits (B, T, S/4, S/4), iou (B, T)
             [sam | auto] prompts(queries, head logits) ──SAM──► sam_logits (B, T, S, S), sam iou (B, T)

The query source's parts are registered on the model under their own names (``text_encoder``,
``vision``, ``projector``, ``mllm``, ``pointer``), so the state-dict keys are those of the parts.

The batch's ``images`` are the letterbox as [0, 1] RGB (:mod:`mllm_ris.processing.processor`); each part
that reads them normalises them its own way: the pixel encoder with ImageNet's mean / std (right before
it is called), the vision tower and SAM with theirs (their ``preprocess``).

Classic mode reads one expression per image (``T = 1``, a plain :class:`RISBatch` without the pointer):
a multi-target expression is trained on the union of its targets, a no-target one on an empty mask
(BCE only, no Dice), and an empty predicted mask means "no target" (``TextQueries``).

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

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.model_build import (
    PRIOR_CLAMP,
    QUERY_PARTS,
    Queries,
    QuerySource,
    build_parts,
    tower_features,
)
from mllm_ris.modeling.model_io import is_pixel_side, load_parts, read_model_config, save_model
from mllm_ris.modeling.projector import VisualTokens
from mllm_ris.processing.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REJ_TOKEN,
    SEG_TOKEN,
    MLLMBatch,
    RISBatch,
)
from s2rm_head.types import LanguageFeatures, pad_query_slot

# the parts a model may not have (and the losses, for training) are imported where they are used
if TYPE_CHECKING:
    from mllm_ris.modeling.mllm import GroundingMLLM
    from mllm_ris.modeling.model_config import LossConfig, ModelConfig
    from mllm_ris.modeling.projector import RegionPointer, VisualProjector
    from mllm_ris.modeling.vision import VisionTower
    from s2rm_head.encoders.pixel import PixelEncoder
    from s2rm_head.encoders.text import TextEncoder
    from s2rm_head.heads.fusion import FusionHead
    from s2rm_head.sam.prompts import PromptBuilder
    from s2rm_head.sam.stage import SAMStage

__all__ = [
    "PRIOR_CLAMP",
    "RISModel",
    "RISOutput",
    "build_model",
    "refine_config",
    "refine_start",
    "warm_start",
]


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
class _Segmentation:
    """Pixel side of one batch (shapes as in :class:`RISOutput`)."""

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    head_up: torch.Tensor  # (B, T, S, S) head logits upsampled to the canvas
    sam_logits: torch.Tensor | None = None
    sam_iou_pred: torch.Tensor | None = None


class RISModel(nn.Module):
    """Referring segmentation model: a query source and a segmenter, injected (see :func:`build_model`).

    Args:
        cfg: the resolved model config (derived widths filled in); saved with the weights.
        queries: where the queries come from (:mod:`mllm_ris.modeling.queries`): ``TextQueries``
            (classic) or ``LLMQueries`` (mllm), of ``cfg.mode``. Its parts are registered here under
            their own names (``text_encoder``, ``vision``, ``projector``, ``mllm``, ``pointer``; None
            where it has none), which are their state-dict keys.
        pixel_encoder, head: the pixel side; both None exactly in output mode ``prior`` (the mask is
            the painted region prior: nothing reads pixels).
        loss: the loss weights (``cfg.loss``, a :class:`~mllm_ris.modeling.model_config.LossConfig`).
        sam_stage, prompt_builder: the SAM refinement (output modes ``sam`` / ``auto``).
        share_sam_vit: the pixel encoder is a SAM-ViT pyramid over ``sam_stage``'s own image encoder
            (one ViT pass feeds both).
    """

    # the query source's parts, registered under these names (None where the source has none)
    text_encoder: TextEncoder | None
    vision: VisionTower | None
    projector: VisualProjector | None
    mllm: GroundingMLLM | None
    pointer: RegionPointer | None

    def __init__(
        self,
        *,
        cfg: ModelConfig,
        queries: QuerySource,
        pixel_encoder: PixelEncoder | None,
        head: FusionHead | None,
        loss: LossConfig,
        sam_stage: SAMStage | None = None,
        prompt_builder: PromptBuilder | None = None,
        share_sam_vit: bool = False,
    ) -> None:
        super().__init__()
        if queries.mode != cfg.mode:
            raise ConfigError(f"mode: {cfg.mode!r} with a {queries.mode}-mode query source")
        parts = queries.parts()
        if set(parts) - set(QUERY_PARTS):
            raise ConfigError(
                f"queries: parts {sorted(set(parts) - set(QUERY_PARTS))} have no place on the model"
            )
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
        self.queries = queries  # a plain object (not a module): its parts are registered below
        for name in QUERY_PARTS:  # this order: the state-dict keys' (tests/test_model_keys.py)
            setattr(self, name, parts.get(name))
        self.pixel_encoder = pixel_encoder
        self.head = head
        self.sam_stage = sam_stage
        self.prompt_builder = prompt_builder
        self.share_sam_vit = share_sam_vit
        self.load_notes: list[str] = []  # what build_model loaded from pretrained files (one line each)
        self.frozen_parts: tuple[str, ...] = ()  # parts kept in eval mode by train() (refine_start)

    @property
    def mode(self) -> str:
        """``classic`` or ``mllm``."""
        return self.cfg.mode

    def train(self, mode: bool = True) -> RISModel:
        """``nn.Module.train``; the :attr:`frozen_parts` (a refiner's language side) stay in eval mode
        (no LoRA dropout: the prior they give the head is the one inference gives)."""
        super().train(mode)
        for name in self.frozen_parts:
            part = getattr(self, name, None)
            if part is not None:
                part.eval()
        return self

    # ------------------------------------------------------------------------------ language side

    def tower_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """Images ``(B, 3, S, S)`` (the letterbox, [0, 1] RGB) → the vision tower's patch features
        ``(B, N, Cv)`` in the projector's dtype; None without a tower (``projector.tower`` false)."""
        return tower_features(self.vision, self.projector, images)

    def visual_tokens(self, batch: MLLMBatch) -> VisualTokens:
        """The batch's ``VisualTokens (B, K, D)`` its query source reads: mllm ``(B, K, D_llm)`` in the
        LLM's dtype; classic mode's pointer ``(B, K, pointer.dim)`` from the descriptors alone."""
        return self.queries.visual_tokens(batch)

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
        self,
        images: torch.Tensor,
        lang: LanguageFeatures,
        prior: torch.Tensor | None = None,
        prior_only: torch.Tensor | None = None,
    ) -> _Segmentation:
        """``images (B, 3, S, S)``, queries ``(B, T, D)`` → head (+ SAM) masks.

        A batch without query slots (``T = 0``: every answer ``[REJ]``) is segmented with one padded
        slot, dropped at the end: the same modules run in the same order whatever ``T`` is (DeepSpeed
        ZeRO-3's ranks gather parameters module by module and must all do the same), and the padded
        query comes from the ``[SEG]`` embeddings (empty), so the grounding MLP stays in the graph.
        With a region ``prior (B, T, S, S)`` the head's logits are a residual on it (the prior is
        area-averaged to the head's grid for ``mask_logits``); ``prior_only (B, T)`` marks queries that
        keep the prior alone (no residual: ``Queries.prior_only``).
        """
        s = images.shape[-1]
        t = lang.queries.shape[1]
        if t == 0:
            lang = pad_query_slot(lang)
        pyramid, sam_embed = self._pyramid(images)
        assert self.head is not None
        if prior is not None:  # the padded slot's prior is 0: (B, T, S, S) -> (B, Tq, S, S), Tq = max(T, 1)
            prior = F.pad(prior, (0, 0, 0, 0, 0, lang.queries.shape[1] - prior.shape[1]))
        if prior is not None and self.cfg.prior_gain != 1.0:  # what the head adds to and reads
            prior = prior * self.cfg.prior_gain
        head_prior = prior if self.head.cfg.prior_input else None  # a refiner also reads it as input
        head = self.head(pyramid, lang, head_prior)  # mask_logits (B, Tq, h, w), iou_pred (B, Tq)
        b, tq, h, w = head.mask_logits.shape
        mask_logits, head_up = head.mask_logits, head.mask_logits
        if (h, w) != (s, s):  # (B, Tq, h, w) -> (B, Tq, S, S)
            head_up = F.interpolate(head.mask_logits, (s, s), mode="bilinear", align_corners=False)
        if prior is not None:  # the head refines the prior: residual logits
            if prior_only is not None and prior_only.any():  # (B, T) -> (B, Tq, 1, 1): no residual there
                keep = prior_only.new_zeros(b, tq)
                keep[:, : prior_only.shape[1]] = prior_only
                keep = keep[..., None, None]
                head_up, mask_logits = head_up.masked_fill(keep, 0.0), mask_logits.masked_fill(keep, 0.0)
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
        q = self.queries.teacher_forced(batch)
        if not segment and q.prior is None:
            raise ConfigError(
                "segment=False (pointer warm-up) needs the region pointer (mllm.pointer_dim / pointer.dim)"
            )
        return self._finish(batch, q, with_loss=True, segment=segment and self.head is not None)

    @torch.no_grad()
    def generate(self, batch: RISBatch, *, max_new_tokens: int = 32) -> RISOutput:
        """Inference: mllm mode decodes the prompts (``Processor(answers=False)``) and segments one
        query per generated ``[SEG]``; classic mode is :meth:`forward` without losses."""
        threshold = self.cfg.reject_threshold
        q = self.queries.decode(batch, max_new_tokens=max_new_tokens, reject_threshold=threshold)
        return self._finish(batch, q, with_loss=False, segment=self.head is not None)

    def _finish(self, batch: RISBatch, q: Queries, *, with_loss: bool, segment: bool = True) -> RISOutput:
        if segment:
            prior = q.prior
            if prior is not None and q.region_logits is not None and q.region_logits.shape[-1]:
                prior = self.queries.prior_masks(q).to(prior.dtype)  # what output mode prior shows
            seg = self._segment(batch.images, q.lang, prior, q.prior_only)
        else:  # the prior is the mask; its score: the most confident region's probability (B, T)
            if q.prior is None or q.region_logits is None or q.region_labels is None:
                raise ConfigError("output_mode prior needs a region pointer (mllm.pointer_dim, pointer.dim)")
            if q.region_logits.shape[-1]:
                iou = torch.sigmoid(q.region_logits.float()).amax(-1).to(q.prior.dtype)
                # mllm: each query's best region at least; classic: the prior (no region above 0 = none)
                mask_logits = self.queries.prior_masks(q)
            else:  # no region in the batch
                iou = q.prior.new_zeros(q.prior.shape[:2])
                mask_logits = q.prior
            mask_logits = mask_logits.to(q.prior.dtype)
            seg = _Segmentation(mask_logits=mask_logits, iou_pred=iou, head_up=mask_logits)
        masks, scores, from_sam = self._choose(seg)
        no_target_prob = self.queries.no_target_prob(q, masks, batch.valid)  # (B,)
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
        self, out: RISOutput, batch: RISBatch, q: Queries, seg: _Segmentation, *, masks: bool = True
    ) -> None:
        """Fill ``loss``, ``loss_terms`` and ``matched_targets`` (terms: :mod:`mllm_ris.modeling.losses`)."""
        from mllm_ris.modeling.losses import pair_mask_losses, region_losses

        cfg, extra = self.cfg.loss, self.loss_cfg
        # the source's slots and targets (classic: one per expression, on the union; mllm: one per
        # target mask, matched) and its own terms (mllm: lm, no_target)
        pairs = self.queries.pair_targets(batch, q, seg.mask_logits if masks else None, extra)
        targets, pair_valid, has_target = pairs.targets, pairs.pair_valid, pairs.has_target
        terms = dict(pairs.terms)
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
            quantized = model.mllm is not None and cfg.mllm.quantization != "none"
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


def refine_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config of a run with ``model.refine_from``: the folder's model (language side, its
    superpixels, reject threshold) with this config's pixel side (``output_mode``, ``pixel``, ``head``,
    ``sam``, ``prompts``, ``loss``, ``prior_gain``; ``superpixels.cache_dir`` too). Idempotent.

    Raises:
        CheckpointError: ``refine_from`` is not a model folder.
        ConfigError: the folder's model has no region pointer (nothing to refine).
    """
    assert model_cfg.refine_from is not None
    base = read_model_config(model_cfg.refine_from)
    if base.pointer_dim is None:
        raise ConfigError(
            f"model.refine_from: {model_cfg.refine_from} has no region pointer (mllm.pointer_dim / "
            "pointer.dim), so there is no prior to refine"
        )
    superpixels = dataclasses.replace(base.superpixels, cache_dir=model_cfg.superpixels.cache_dir)
    return dataclasses.replace(
        base,
        output_mode=model_cfg.output_mode,
        pixel=model_cfg.pixel,
        head=dataclasses.replace(model_cfg.head, in_channels=None, lang_dim=None),
        sam=model_cfg.sam,
        prompts=dataclasses.replace(model_cfg.prompts, grounding_dim=None),
        loss=model_cfg.loss,
        superpixels=superpixels,
        prior_gain=model_cfg.prior_gain,
        checkpoint=None,
        refine_from=model_cfg.refine_from,
    )


def refine_start(model_cfg: ModelConfig) -> RISModel:
    """A new pixel side on the frozen language side of ``model_cfg.refine_from`` (see
    :func:`refine_config`): the folder's query parts (LLM, region encoder, pointer, reject head) are
    loaded and frozen (kept in eval mode by :meth:`RISModel.train`); the pixel encoder, head and SAM
    stage are built from ``model_cfg`` and are the only trainable parts.

    Raises:
        CheckpointError: not a model folder, or weights that do not fit.
        ConfigError: the folder's model has no region pointer.
    """
    cfg = refine_config(model_cfg)
    base = RISModel.from_pretrained(cfg.refine_from)  # frozen, eval mode
    model = build_model(cfg, mllm=base.mllm)
    language = {k: v for k, v in base.state_dict().items() if not is_pixel_side(k)}
    missing = sorted(k for k in model.state_dict() if not is_pixel_side(k) and k not in language)
    if missing:
        raise CheckpointError(
            f"model.refine_from: {cfg.refine_from} does not fit its own config: {len(missing)} missing "
            f"keys (e.g. {missing[:3]})"
        )
    model.load_state_dict(language, strict=False)
    for name in QUERY_PARTS:
        part = getattr(model, name)
        if part is not None:
            part.requires_grad_(False)
    model.frozen_parts = QUERY_PARTS
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
