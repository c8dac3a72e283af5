"""The region pointer: each query (a ``[SEG]`` state) scores every region token; the scores, painted
through the superpixel label map, are the region prior that the segmentation head refines.

``region_logits (B, T, K) = exp(s) * <W_q q, W_k r> / sqrt(dim) + b`` with a learned log-scale ``s`` and bias
``b`` (both scalars, optional). With ``layers > 0`` a small transformer first runs, per query, over the
sequence ``[W_q q, W_k r_1 + W_q q, ..., W_k r_K + W_q q]`` (``1 + K`` tokens, padded regions masked) and
a linear layer scores each region's output instead of the bilinear product: in a causal LLM the visual
tokens come before the sentence, so their states cannot depend on it, and a bilinear score alone cannot
express "the leftmost of these" or "the one left of that"; these layers let the regions compare each
other under the query. Invalid regions (padding, empty ids) and label ``-1`` pixels get
:data:`MASKED_LOGIT` = ``-1e4``: finite in float16 / bfloat16 / float32 (no ``inf - inf`` NaNs), and
``sigmoid(-1e4) == 0`` exactly in float32, so a masked region is never chosen and its pixels never painted.
Consumers that feed the painted logits to a convolution rather than a sigmoid should clamp them first
(e.g. to ``[-20, 20]``), since ``-1e4`` is far outside a feature's usual range.

Losses (:func:`pointer_loss`): region BCE against region targets (1 where the target mask covers ≥ 50 % of the
region, :func:`mllm_ris.processing.regions.region_targets`) over valid regions and valid targets, and a soft
Dice of the painted prior against the target masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mllm_ris.errors import ConfigError

__all__ = [
    "MASKED_LOGIT",
    "PointerConfig",
    "PointerLosses",
    "RegionPointer",
    "paint_regions",
    "pointer_loss",
]

MASKED_LOGIT = -1.0e4
_MIX_HEADS = 4  # attention heads of the pointer's optional transformer layers


@dataclass
class PointerConfig:
    """Classic mode's region pointer (mllm mode's is ``mllm.pointer_dim`` / ``pointer_layers``).

    The sentence query of the text encoder scores the region tokens of the superpixel projector
    (``projector.kind: superpixel``, ``descriptors: true``, ``tower: false``; no LLM): a
    :class:`RegionPointer` whose mixing layers read ``[query, words, regions + query]``.
    """

    dim: int | None = field(
        default=None, metadata={"help": "width of the pointer and of the region tokens; null = no pointer"}
    )
    layers: int = field(default=2, metadata={"help": "transformer layers over query, words and regions"})
    words: bool = field(default=True, metadata={"help": "the text encoder's word states join those layers"})

    def __post_init__(self) -> None:
        if self.dim is not None and (self.dim < 4 or self.dim % 4):
            raise ConfigError(f"dim: must be a multiple of 4 (>= 4) or null, got {self.dim}")
        if self.layers < 0 or (self.words and self.layers == 0):
            raise ConfigError(f"layers: must be >= 0, and >= 1 with words: true; got {self.layers}")


class RegionPointer(nn.Module):
    """Scores ``T`` queries against ``K`` regions: ``(B, T, Dq), (B, K, Dr) -> (B, T, K)`` logits.

    Args:
        query_dim: ``Dq``, width of the query states (the LLM hidden size for ``[SEG]`` states).
        region_dim: ``Dr``, width of the region states (LLM output states at the visual-token positions).
        dim: ``D``, width of the shared matching space.
        learn_scale: learn a scalar log-temperature ``s`` (initialised to 0, i.e. scale 1).
        learn_bias: learn a scalar bias ``b`` (initialised to ``bias_init``).
        bias_init: initial bias; ``-log(K - 1)`` for about ``K`` regions with one positive gives the prior
            probability ``1 / K`` at initialisation (0 by default).
        layers: transformer layers (pre-norm, 4 heads, feed-forward ``2 * dim``) over query + regions per
            query before the score; 0 = the bilinear score alone. ``dim`` must be divisible by 4.
        word_dim: width of word states that join the layers' sequence (``[q, words, regions + q]``),
            given to :meth:`forward` as ``words``; None = no words. Needs ``layers > 0``.
    """

    def __init__(
        self,
        *,
        query_dim: int,
        region_dim: int,
        dim: int,
        learn_scale: bool = True,
        learn_bias: bool = True,
        bias_init: float = 0.0,
        layers: int = 0,
        word_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("region_dim", region_dim), ("dim", dim)):
            if value <= 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if layers < 0 or (layers and dim % _MIX_HEADS):
            raise ConfigError(
                f"layers: must be >= 0 with dim divisible by {_MIX_HEADS}, got {layers}, dim {dim}"
            )
        self.dim = dim
        self.mix: nn.TransformerEncoder | None = None
        if layers:
            layer = nn.TransformerEncoderLayer(
                dim, _MIX_HEADS, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            self.mix = nn.TransformerEncoder(
                layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
            )
            self.score = nn.Linear(dim, 1)  # each region's mixed state -> its score
        if word_dim is not None and not layers:
            raise ConfigError("word_dim: words are read by the mixing layers; set layers > 0")
        self.word_proj = nn.Linear(word_dim, dim) if word_dim is not None else None
        self.query_proj = nn.Linear(query_dim, dim)
        self.region_proj = nn.Linear(region_dim, dim)
        scale = torch.zeros(())
        bias = torch.full((), float(bias_init))
        # fixed values are non-persistent buffers under the same names: one forward, state dicts unchanged
        if learn_scale:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale, persistent=False)
        if learn_bias:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias, persistent=False)

    def forward(
        self,
        queries: torch.Tensor,
        regions: torch.Tensor,
        region_mask: torch.Tensor,
        words: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Region logits.

        Args:
            queries: ``(B, T, Dq)``.
            regions: ``(B, K, Dr)``.
            region_mask: ``(B, K)`` bool, True for real regions.
            words: ``(B, W, Dw)`` word states (built with ``word_dim``), else None.
            word_mask: ``(B, W)`` bool, True for real words.

        Returns:
            ``(B, T, K)`` logits; ``MASKED_LOGIT`` where ``region_mask`` is False.
        """
        if queries.dim() != 3 or regions.dim() != 3:
            raise ValueError(
                f"queries (B, T, Dq) and regions (B, K, Dr) must be 3-d, got {tuple(queries.shape)} "
                f"and {tuple(regions.shape)}"
            )
        b, _, _ = queries.shape
        _, k, _ = regions.shape
        if regions.shape[0] != b or tuple(region_mask.shape) != (b, k):
            raise ValueError(
                f"batch / region counts differ: queries {tuple(queries.shape)}, "
                f"regions {tuple(regions.shape)}, region_mask {tuple(region_mask.shape)}"
            )
        q = self.query_proj(queries)  # (B, T, D)
        r = self.region_proj(regions)  # (B, K, D)
        if self.mix is None:
            logits = torch.einsum("btd,bkd->btk", q, r) / math.sqrt(self.dim)  # (B, T, K)
        else:
            w = None
            if self.word_proj is not None:
                if words is None or word_mask is None:
                    raise ValueError(
                        "words: this pointer was built with word_dim and needs words + word_mask"
                    )
                w = (self.word_proj(words), word_mask.bool())  # (B, W, D), (B, W)
            logits = self._mixed_scores(q, r, region_mask.bool(), w)
        logits = logits * self.log_scale.exp() + self.bias
        # (B, K) -> (B, 1, K): the same regions are masked for every query
        return logits.masked_fill(~region_mask.bool()[:, None, :], MASKED_LOGIT)

    def _mixed_scores(
        self,
        q: torch.Tensor,
        r: torch.Tensor,
        region_mask: torch.Tensor,
        words: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``q (B, T, D)``, ``r (B, K, D)``, ``region_mask (B, K)`` (+ projected words ``(B, W, D)`` and
        their ``(B, W)`` mask) → ``(B, T, K)`` mixed scores."""
        assert self.mix is not None
        b, t, d = q.shape
        k = r.shape[1]
        if t == 0 or k == 0:  # nothing to mix; zeros keep the graph
            zero = (q.sum() + r.sum() + (words[0].sum() if words is not None else 0.0)) * 0.0
            return q.new_zeros(b, t, k) + zero
        w, w_mask = words if words is not None else (q.new_zeros(b, 0, d), region_mask.new_zeros(b, 0))
        n = w.shape[1]
        # per query: [q, words, regions + q]: (B, T, 1 + W + K, D) -> (B*T, 1 + W + K, D)
        x = torch.cat(
            [q[:, :, None], w[:, None].expand(b, t, n, d), r[:, None] + q[:, :, None]], dim=2
        ).flatten(0, 1)
        keep = torch.cat([region_mask.new_ones(b, 1), w_mask, region_mask], dim=1)  # (B, 1 + W + K)
        pad = ~keep[:, None].expand(b, t, 1 + n + k).flatten(0, 1)  # (B*T, 1 + W + K), True = ignored
        x = self.mix(x, src_key_padding_mask=pad).view(b, t, 1 + n + k, d)
        return self.score(x[:, :, 1 + n :]).squeeze(-1)  # (B, T, K, D) -> (B, T, K)


def paint_regions(region_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paint region logits through label maps: each pixel gets its region's logit.

    Uses ``torch.gather`` on the flattened label map (memory ``B*T*H*W``, never a ``(B, T, K, H, W)``
    one-hot); differentiable w.r.t. ``region_logits`` (the gradient of a region is the sum over its pixels).

    Args:
        region_logits: ``(B, T, K)``.
        labels: ``(B, H, W)`` long, ids ``0..K-1``, ``-1`` = padding.

    Returns:
        ``(B, T, H, W)`` region-prior logits; ``MASKED_LOGIT`` at ``-1`` pixels.
    """
    if region_logits.dim() != 3 or labels.dim() != 3 or labels.shape[0] != region_logits.shape[0]:
        raise ValueError(
            f"expected region_logits (B, T, K) and labels (B, H, W) with the same B, got "
            f"{tuple(region_logits.shape)} and {tuple(labels.shape)}"
        )
    b, t, k = region_logits.shape
    _, h, w = labels.shape
    labels = labels.long()
    if labels.numel() and int(labels.max()) >= k:
        raise ValueError(f"labels: id {int(labels.max())} does not fit region_logits with K = {k}")
    flat = labels.reshape(b, 1, h * w)  # (B, H, W) -> (B, 1, H*W)
    pad = flat < 0  # (B, 1, H*W)
    if k == 0:  # nothing to gather from: every pixel is padding (kept connected to the graph)
        out = region_logits.new_full((b, t, h * w), MASKED_LOGIT) + region_logits.sum() * 0
        return out.reshape(b, t, h, w)
    index = flat.clamp(min=0).expand(b, t, h * w)  # (B, T, H*W), a view: no copy per query
    out = torch.gather(region_logits, 2, index)  # (B, T, H*W)
    out = out.masked_fill(pad, MASKED_LOGIT)  # pad (B, 1, H*W) broadcasts over T
    return out.reshape(b, t, h, w)  # (B, T, H*W) -> (B, T, H, W)


class PointerLosses(NamedTuple):
    """Weighted scalar losses (unpack as ``bce, dice = pointer_loss(...)``)."""

    bce: torch.Tensor
    dice: torch.Tensor


def pointer_loss(
    region_logits: torch.Tensor,
    region_targets: torch.Tensor,
    region_mask: torch.Tensor,
    target_valid: torch.Tensor,
    labels: torch.Tensor | None = None,
    target_masks: torch.Tensor | None = None,
    *,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> PointerLosses:
    """Region BCE and soft Dice of the painted prior.

    Args:
        region_logits: ``(B, T, K)`` from :class:`RegionPointer`.
        region_targets: ``(B, T, K)`` float in {0, 1} (region ≥ 50 % inside target ``t``).
        region_mask: ``(B, K)`` bool, True for real regions.
        target_valid: ``(B, T)`` bool, True for real targets (padding and no-target queries False).
        labels: ``(B, H, W)`` long with ``-1`` padding; needed for the Dice.
        target_masks: ``(B, T, H, W)`` in {0, 1}; ``None`` skips the Dice.
        bce_weight, dice_weight: scales of the two terms; 0 skips a term.

    Returns:
        :class:`PointerLosses` ``(bce, dice)``, weighted scalars. BCE is the mean over valid (region, target)
        pairs; Dice (smoothed by 1) the mean over valid targets. With no valid pair (e.g. ``T == 0``) or a
        skipped term the value is ``0`` and still attached to the graph of ``region_logits``.
    """
    b, t, k = region_logits.shape
    if tuple(region_targets.shape) != (b, t, k) or tuple(region_mask.shape) != (b, k):
        raise ValueError(
            f"region_logits {tuple(region_logits.shape)} needs region_targets (B, T, K) and region_mask "
            f"(B, K), got {tuple(region_targets.shape)} and {tuple(region_mask.shape)}"
        )
    if tuple(target_valid.shape) != (b, t):
        raise ValueError(f"target_valid: expected ({b}, {t}), got {tuple(target_valid.shape)}")
    zero = region_logits.sum() * 0.0  # a zero that keeps the graph (DDP sees every parameter used)

    bce = zero
    # (B, T, 1) & (B, 1, K) -> (B, T, K): pairs of a real target and a real region
    pair = target_valid.bool()[:, :, None] & region_mask.bool()[:, None, :]
    if bce_weight > 0 and bool(pair.any()):
        per = F.binary_cross_entropy_with_logits(
            region_logits, region_targets.to(region_logits), reduction="none"
        )
        bce = bce_weight * torch.where(pair, per, torch.zeros_like(per)).sum() / pair.sum()

    dice = zero
    if dice_weight > 0 and target_masks is not None and bool(target_valid.any()):
        if labels is None:
            raise ValueError("labels: needed for the Dice when target_masks are given")
        if tuple(target_masks.shape) != (b, t, *labels.shape[1:]):
            raise ValueError(
                f"target_masks: expected (B, T, H, W) = ({b}, {t}, {labels.shape[1]}, {labels.shape[2]}), "
                f"got {tuple(target_masks.shape)}"
            )
        prob = torch.sigmoid(paint_regions(region_logits, labels)).flatten(2)  # (B, T, H, W) -> (B, T, H*W)
        gt = target_masks.to(prob).flatten(2)  # (B, T, H*W)
        inter = (prob * gt).sum(-1)  # (B, T)
        denom = prob.sum(-1) + gt.sum(-1)  # (B, T)
        dice_each = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)  # (B, T)
        valid = target_valid.bool()
        dice = dice_weight * dice_each[valid].mean()
    return PointerLosses(bce=bce, dice=dice)
