"""Baseline fusion heads for ablation tables, with the same interface as :class:`S2RMHead`.

Our own compact re-implementations of three fusion families (not the original code):

* :class:`LTSHead` — locate-then-segment (Jing et al., CVPR 2021): concat fusion with coordinates,
  an explicit position prior from cross-modal correlation, a light segmentation branch.
* :class:`CMSAHead` — cross-modal self-attention (Ye et al., CVPR 2019): joint self-attention over
  pixel + word tokens at one coarse level, then gated multi-level fusion.
* :class:`TwoStageHead` — multi-level fusion, then a global alignment stage that re-weights the
  decoded map by sentence-pixel similarity.

All three build on the shared pieces of ``_blocks.py`` (concat fusion, top-down decoder,
mask/IoU predictor). Every tensor below is batch x targets folded, ``N = B*T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from s2rm_head.config import NUM_LEVELS, HeadConfig
from s2rm_head.heads._blocks import (
    NUM_COORD_CHANNELS,
    ConcatFusion,
    MaskIoUPredictor,
    TopDownDecoder,
    conv_norm_act,
    coord_features,
    upsample_to,
)
from s2rm_head.heads.fusion import FoldedInputs, FusionHead

__all__ = ["CMSAHead", "LTSHead", "TwoStageHead"]


class LTSHead(FusionHead):
    """Locate-then-segment.

    1. Every level: ``[V, tiled query, coords] -> conv`` (concat fusion).
    2. Locate, at ``cfg.coarse_level``: the cosine correlation between the raw vision features and
       the query, with the fused features, gives a localisation heatmap (position prior).
    3. Segment: every fused level reads the prior (resized) as an extra channel; a top-down
       decoder and the mask/IoU predictor follow.
    Reads only the query (no word states). Cost ``O(sum_i H_i W_i C^2)``.
    """

    uses_words = False

    def __init__(self, *, cfg: HeadConfig) -> None:
        super().__init__(cfg=cfg)
        d = cfg.dim
        self.loc_level = cfg.coarse_level
        self.fuse = nn.ModuleList(ConcatFusion(dim=d) for _ in range(NUM_LEVELS))
        self.corr_pix = nn.Conv2d(d, d, kernel_size=1)
        self.corr_query = nn.Linear(d, d)
        self.locate = nn.Sequential(conv_norm_act(d + 1, d), nn.Conv2d(d, 1, kernel_size=1))
        self.prior_in = nn.ModuleList(conv_norm_act(d + 1, d, kernel_size=1) for _ in range(NUM_LEVELS))
        self.decoder = TopDownDecoder(dim=d, num_levels=NUM_LEVELS)
        self.predict = MaskIoUPredictor(dim=d)

    def decode(self, inputs: FoldedInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Locate, then segment -> ``(mask_logits (N, 1, H_0, W_0), iou_pred (N,))``."""
        q = inputs.queries  # (N, C)
        fused = [f(x, q) for f, x in zip(self.fuse, inputs.feats, strict=True)]  # (N, C, H_i, W_i)
        vis = inputs.feats[self.loc_level]  # (N, C, h, w) raw vision at the localisation level
        key = self.corr_query(q)[:, :, None, None]  # (N, C) -> (N, C, 1, 1)
        corr = F.cosine_similarity(self.corr_pix(vis), key, dim=1).unsqueeze(1)  # (N, 1, h, w)
        heat = self.locate(torch.cat([fused[self.loc_level], corr], dim=1))  # (N, 1, h, w) position logits
        prior = torch.sigmoid(heat)
        # each level: (N, C + 1, H_i, W_i) with the prior resized to it -> (N, C, H_i, W_i)
        primed = [
            p(torch.cat([x, upsample_to(prior, x)], 1)) for p, x in zip(self.prior_in, fused, strict=True)
        ]
        return self.predict(self.decoder(primed))


class CMSAHead(FusionHead):
    """Cross-modal self-attention + gated multi-level fusion.

    1. Every level: concat fusion with the tiled query and coordinates.
    2. At ``cfg.coarse_level`` only (1/32 by default, 1/16 allowed): one pre-norm transformer layer
       over the joint sequence ``[pixels (HW) ; words (L) ; query (1)]`` with coordinate and
       token-type embeddings. Memory ``O((HW + L)^2)`` at that level only: 1/32 of a 512 px image
       is 16x16 = 256 pixel tokens.
    3. Gated top-down fusion: ``g = sigmoid(conv[x_i, up(y)])``, ``y_i = conv(g x_i + (1-g) up(y))``.
    """

    def __init__(self, *, cfg: HeadConfig) -> None:
        super().__init__(cfg=cfg)
        d = cfg.dim
        self.attn_level = cfg.coarse_level
        self.fuse = nn.ModuleList(ConcatFusion(dim=d) for _ in range(NUM_LEVELS))
        self.coord_embed = nn.Linear(NUM_COORD_CHANNELS, d)
        self.type_embed = nn.Parameter(torch.zeros(3, d))  # pixel, word, query
        nn.init.normal_(self.type_embed, std=0.02)
        self.attn = nn.TransformerEncoderLayer(
            d, cfg.num_heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.gate = nn.ModuleList(nn.Conv2d(2 * d, d, kernel_size=1) for _ in range(NUM_LEVELS - 1))
        self.refine = nn.ModuleList(conv_norm_act(d, d) for _ in range(NUM_LEVELS - 1))
        self.predict = MaskIoUPredictor(dim=d)

    def _self_attend(self, x: torch.Tensor, inputs: FoldedInputs) -> torch.Tensor:
        """Joint pixel-word-query self-attention on ``x (N, C, h, w)`` -> ``(N, C, h, w)``."""
        n, c, h, w = x.shape
        coords = coord_features(n, h, w, like=x).flatten(2).transpose(1, 2)  # (N, 8, h, w) -> (N, hw, 8)
        pix = x.flatten(2).transpose(1, 2) + self.coord_embed(coords) + self.type_embed[0]  # (N, hw, C)
        words = inputs.tokens + self.type_embed[1]  # (N, L, C)
        query = inputs.queries[:, None, :] + self.type_embed[2]  # (N, 1, C)
        seq = torch.cat([pix, words, query], dim=1)  # (N, hw + L + 1, C)
        ones = inputs.token_mask.new_ones(n, h * w + 1)  # (N, hw + 1) pixels and the query are always kept
        keep = torch.cat([ones[:, : h * w], inputs.token_mask, ones[:, h * w :]], dim=1)  # (N, hw + L + 1)
        out = self.attn(seq, src_key_padding_mask=~keep)  # (N, hw + L + 1, C)
        return out[:, : h * w].transpose(1, 2).reshape(n, c, h, w)  # pixel tokens -> (N, C, h, w)

    def decode(self, inputs: FoldedInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attend at the coarse level, gated top-down fusion -> ``(logits (N,1,H_0,W_0), iou (N,))``."""
        x = [f(v, inputs.queries) for f, v in zip(self.fuse, inputs.feats, strict=True)]  # (N, C, H_i, W_i)
        x[self.attn_level] = self._self_attend(x[self.attn_level], inputs)
        y = x[-1]
        for i in range(NUM_LEVELS - 2, -1, -1):
            up = upsample_to(y, x[i])  # (N, C, H_i, W_i)
            g = torch.sigmoid(self.gate[i](torch.cat([x[i], up], dim=1)))  # (N, 2C, ...) -> (N, C, ...) gate
            y = self.refine[i](g * x[i] + (1.0 - g) * up)
        return self.predict(y)


class TwoStageHead(FusionHead):
    """Multi-level fusion, then global alignment.

    Stage 1: concat fusion at every level + top-down decoder -> ``D (N, C, H_0, W_0)``.
    Stage 2 (global alignment): a channel gate from the pooled image feature and the sentence,
    and a per-pixel sentence-pixel cosine similarity ``s`` (learned temperature) that re-weights
    the map, ``D' = D + conv(D * sigmoid(s))``; ``s`` is also added to the mask logits.
    Reads only the query (no word states). Cost ``O(sum_i H_i W_i C^2)``.
    """

    uses_words = False

    def __init__(self, *, cfg: HeadConfig) -> None:
        super().__init__(cfg=cfg)
        d = cfg.dim
        self.fuse = nn.ModuleList(ConcatFusion(dim=d) for _ in range(NUM_LEVELS))
        self.decoder = TopDownDecoder(dim=d, num_levels=NUM_LEVELS)
        self.channel_gate = nn.Linear(2 * d, d)
        self.pix_embed = nn.Conv2d(d, d, kernel_size=1)
        self.sent_embed = nn.Linear(d, d)
        # shape (1,), not 0-d: DeepSpeed broadcasts parameters as `p.data.view(torch.uint8)`,
        # which fails on a 0-d tensor (engine start-up, every ZeRO stage)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.align_bias = nn.Parameter(torch.zeros(1))
        self.refine = conv_norm_act(d, d)
        self.predict = MaskIoUPredictor(dim=d)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # weights written before the scalars became shape (1,) hold them 0-d
        for name in ("logit_scale", "align_bias"):
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 0:
                state_dict[prefix + name] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def decode(self, inputs: FoldedInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse, decode, align -> ``(mask_logits (N, 1, H_0, W_0), iou_pred (N,))``."""
        q = inputs.queries  # (N, C)
        fused = [f(x, q) for f, x in zip(self.fuse, inputs.feats, strict=True)]  # (N, C, H_i, W_i)
        dec = self.decoder(fused)  # (N, C, H_0, W_0)
        # global alignment of the whole image with the sentence: per-channel gate from [mean(D), q] (N, 2C)
        gate = torch.sigmoid(self.channel_gate(torch.cat([dec.mean((2, 3)), q], dim=1)))  # (N, C)
        dec = dec * gate[:, :, None, None]
        sent = self.sent_embed(q)[:, :, None, None]  # (N, C) -> (N, C, 1, 1)
        sim = F.cosine_similarity(self.pix_embed(dec), sent, dim=1).unsqueeze(1)  # (N, 1, H_0, W_0)
        sim = sim * self.logit_scale.exp() + self.align_bias
        dec = dec + self.refine(dec * torch.sigmoid(sim))  # sentence-pixel similarity re-weighting
        logits, iou = self.predict(dec)
        return logits + sim, iou
