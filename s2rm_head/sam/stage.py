"""SAM refinement stage: segment-anything's modules built from a config, official checkpoints, a
differentiable prompt → mask path.

* :class:`SAMConfig` / :func:`build_sam` — a segment-anything ``Sam`` (``ImageEncoderViT``,
  ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``) with the official hyper-parameters of
  ``vit_b`` / ``vit_l`` / ``vit_h`` (those of ``segment_anything/build_sam.py``) or a ``tiny`` one
  (same classes, small widths) for CPU tests and the default model; freezing by config.
* :func:`load_sam_checkpoint` / :func:`save_sam_checkpoint` — the official state-dict layout
  (``sam_vit_b_01ec64.pth``: exactly ``Sam.state_dict()``), read with ``torch.load(weights_only=True)``
  or safetensors; every failure is a one-line :class:`~s2rm_head.errors.CheckpointError` naming the file.
* :class:`SAMStage` — calls ``prompt_encoder`` and ``mask_decoder`` directly (``Sam.forward`` is
  ``no_grad``), ``N = B * T`` (image, query) pairs, sample-major like the fusion heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from s2rm_head.config import SAM_ARCHS, SAM_VARIANTS, PixelEncoderConfig, SAMArch, SAMConfig
from s2rm_head.encoders.pixel import build_sam_vit
from s2rm_head.sam.checkpoint import (
    SAMLoadReport,
    infer_sam_arch,
    load_sam_checkpoint,
    save_sam_checkpoint,
)
from s2rm_head.sam.prompts import SAMPrompts

__all__ = [
    "SAM_ARCHS",
    "SAM_VARIANTS",
    "SAMArch",
    "SAMConfig",
    "SAMImages",
    "SAMLoadReport",
    "SAMOutput",
    "SAMStage",
    "build_sam",
    "build_sam_stage",
    "infer_sam_arch",
    "load_sam_checkpoint",
    "save_sam_checkpoint",
]

_PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's, on 0..255 RGB
_PIXEL_STD = (58.395, 57.12, 57.375)


def _set_trainable(sam: Sam, cfg: SAMConfig) -> None:
    """``requires_grad`` of each part from ``cfg.freeze_*``."""
    sam.image_encoder.requires_grad_(not cfg.freeze_image_encoder)
    sam.prompt_encoder.requires_grad_(not cfg.freeze_prompt_encoder)
    sam.mask_decoder.requires_grad_(not cfg.freeze_mask_decoder)


def build_sam(cfg: SAMConfig) -> Sam:
    """A segment-anything ``Sam`` as ``segment_anything.build_sam`` assembles it, sized by ``cfg``.

    Weights come from ``cfg.checkpoint`` when set (:func:`load_sam_checkpoint`, ``strict=cfg.strict``);
    ``requires_grad`` follows ``cfg.freeze_*`` (eval mode of frozen parts is kept by :class:`SAMStage`).
    Works under ``with torch.device("meta"):`` (no memory) for key-layout checks.
    """
    arch, size = cfg.arch, cfg.image_size
    vit = build_sam_vit(  # the pixel encoder's builder: same ViT settings as build_sam.py
        PixelEncoderConfig(
            name="sam-vit",
            sam_img_size=size,
            sam_embed_dim=arch.embed_dim,
            sam_depth=arch.depth,
            sam_num_heads=arch.num_heads,
            sam_global_attn_indexes=list(arch.global_attn_indexes),
            sam_window_size=arch.window_size,
            sam_out_chans=arch.prompt_dim,
        )
    )
    embed = size // 16  # patch size 16
    sam = Sam(
        image_encoder=vit,
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(embed, embed),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_heads,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_hidden_dim,
        ),
        pixel_mean=list(_PIXEL_MEAN),
        pixel_std=list(_PIXEL_STD),
    )
    if cfg.checkpoint is not None:
        load_sam_checkpoint(sam, cfg.checkpoint, strict=cfg.strict)
    _set_trainable(sam, cfg)
    return sam


# ----------------------------------------------------------------------------- stage


@dataclass
class SAMImages:
    """Images ready for SAM's image encoder.

    Attributes:
        pixels: ``(B, 3, S, S)`` normalised with SAM's mean / std, resized (long side ``S``) and
            zero-padded bottom / right; ``S = img_size``.
        input_size: ``(h, w)`` of the resized image inside the ``S x S`` canvas.
        original_size: ``(H, W)`` of the input images.
    """

    pixels: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


class SAMOutput(NamedTuple):
    """What :class:`SAMStage` returns for ``N = B * T`` (image, query) pairs, ``M = 4 * img_size / 16``.

    A ``NamedTuple``, not a dataclass, so that DeepSpeed ZeRO-3's module hooks see its tensors
    (see ``s2rm_head.types.HeadOutput``).

    Attributes:
        mask_logits: ``(N, 1, M, M)`` low-resolution logits over SAM's padded canvas (256 for 1024 px).
        iou_pred: ``(N,)`` SAM's predicted IoU of that mask.
        candidate_logits: ``(N, K, M, M)`` every decoded mask (``K = 3`` with ``multimask``, else 1).
        candidate_iou: ``(N, K)``.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    candidate_logits: torch.Tensor
    candidate_iou: torch.Tensor


class SAMStage(nn.Module):
    """SAM's prompt encoder + mask decoder on head prompts, differentiable end to end.

    Args:
        sam: a segment-anything ``Sam`` (from :func:`build_sam`).
        cfg: its :class:`SAMConfig` (``freeze_*`` keep frozen parts in eval mode; ``multimask``).
    """

    def __init__(self, *, sam: Sam, cfg: SAMConfig) -> None:
        super().__init__()
        self.sam = sam
        self.cfg = cfg
        _set_trainable(sam, cfg)
        self.img_size = int(sam.image_encoder.img_size)
        self.prompt_dim = int(sam.prompt_encoder.embed_dim)
        self.embed_size = tuple(sam.prompt_encoder.image_embedding_size)  # (S/16, S/16)
        self.train(self.training)

    def train(self, mode: bool = True) -> SAMStage:
        super().train(mode)
        for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
            if getattr(self.cfg, f"freeze_{name}"):
                getattr(self.sam, name).eval()  # a frozen part keeps eval behaviour while the rest trains
        return self

    def preprocess(self, images: torch.Tensor) -> SAMImages:
        """``(B, 3, H, W)`` uint8 or float RGB **on the 0..255 scale** → :class:`SAMImages`.

        Resize so the long side is ``img_size`` (``ResizeLongestSide``: bilinear, antialiased),
        normalise with SAM's pixel mean / std, pad bottom / right with zeros (``Sam.preprocess``).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: shape {tuple(images.shape)}, expected (B, 3, H, W) RGB")
        h, w = images.shape[-2:]
        nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, self.img_size)
        x = images.to(self.sam.pixel_mean.dtype)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std  # (B, 3, nh, nw)
        x = F.pad(x, (0, self.img_size - nw, 0, self.img_size - nh))  # (B, 3, S, S)
        return SAMImages(pixels=x, input_size=(nh, nw), original_size=(int(h), int(w)))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels (B, 3, S, S)`` (from :meth:`preprocess`) → image embeddings ``(B, C, S/16, S/16)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_image_encoder):
            return self.sam.image_encoder(pixels)

    def forward(self, image_embeddings: torch.Tensor, prompts: SAMPrompts) -> SAMOutput:
        """Decode one mask per (image, query) pair.

        Args:
            image_embeddings: ``(B, C, E, E)``, ``C`` = prompt width, ``E = img_size / 16``.
            prompts: :class:`SAMPrompts` for ``N = B * T`` pairs, sample-major (``b0t0, b0t1, ...``).

        Returns:
            :class:`SAMOutput`; reshape with ``.view(B, T, ...)``.
        """
        b, n = image_embeddings.shape[0], prompts.num_pairs
        want = (self.prompt_dim, *self.embed_size)
        if image_embeddings.dim() != 4 or tuple(image_embeddings.shape[1:]) != want:
            raise ValueError(f"image_embeddings: shape {tuple(image_embeddings.shape)}, expected (B, {want})")
        if b == 0 or n % b:
            raise ValueError(f"prompts: {n} pairs for {b} images; need B * T pairs (T queries per image)")
        t = n // b
        if t == 0:  # no query slot in the batch: nothing to decode
            m = 4 * self.embed_size[0]
            empty = image_embeddings.new_zeros(0, 1, m, m)  # (0, 1, M, M)
            return SAMOutput(empty, empty.new_zeros(0), empty, empty.new_zeros(0, 1))
        points = None if prompts.point_coords is None else (prompts.point_coords, prompts.point_labels)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.dense)
        # the prompt encoder gives batch 1 when it got no point / box / mask: expand to N pairs
        sparse = sparse.expand(n, -1, -1)  # (N, P_pts + 2 * box, C)
        dense = dense.expand(n, -1, -1, -1)  # (N, C, E, E)
        if prompts.sparse is not None:
            sparse = torch.cat([sparse.to(prompts.sparse.dtype), prompts.sparse], dim=1)  # (N, P + k, C)
        image_pe = self.sam.prompt_encoder.get_dense_pe()  # (1, C, E, E)
        logits, ious = [], []
        # MaskDecoder repeats its image embedding once per prompt (repeat_interleave over the
        # prompt batch), so it is called once per image with that image's T prompts.
        for i in range(b):
            rows = slice(i * t, (i + 1) * t)
            masks, iou = self.sam.mask_decoder(
                image_embeddings=image_embeddings[i : i + 1],  # (1, C, E, E)
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[rows],  # (T, P + k, C)
                dense_prompt_embeddings=dense[rows],  # (T, C, E, E)
                multimask_output=self.cfg.multimask,
            )  # (T, K, M, M), (T, K)
            logits.append(masks)
            ious.append(iou)
        cand_logits, cand_iou = torch.cat(logits), torch.cat(ious)  # (N, K, M, M), (N, K)
        best = cand_iou.argmax(dim=1)  # (N,) the identity when K = 1
        rows = torch.arange(n, device=best.device)
        return SAMOutput(
            mask_logits=cand_logits[rows, best][:, None],  # (N, 1, M, M)
            iou_pred=cand_iou[rows, best],  # (N,)
            candidate_logits=cand_logits,
            candidate_iou=cand_iou,
        )

    def upsample(
        self,
        logits: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``Sam.postprocess_masks`` without its ``no_grad`` caller: ``(N, K, M, M)`` → ``(N, K, H, W)``.

        Upsample to ``img_size``, crop the padding (``input_size``, the resized image inside the canvas),
        resize to ``original_size``. ``input_size=None`` computes it from ``original_size`` as
        :meth:`preprocess` does — so ``original_size=(S_head, S_head)`` maps onto a square head canvas.
        """
        if input_size is None:
            input_size = ResizeLongestSide.get_preprocess_shape(*original_size, self.img_size)
        x = F.interpolate(logits, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]  # crop the bottom / right padding
        return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)


def build_sam_stage(cfg: SAMConfig) -> SAMStage:
    """:func:`build_sam` wrapped in a :class:`SAMStage`."""
    return SAMStage(sam=build_sam(cfg), cfg=cfg)
