"""Fusion heads: the shared :class:`FusionHead` base, the :class:`S2RMHead` and :func:`build_head`.

Every head has the same contract (see ``s2rm_head/types.py``)::

    head(pyramid: list[(B, C_i, H_i, W_i)] x 4, lang: LanguageFeatures, prior=None) -> HeadOutput
        mask_logits (B, T, H_0, W_0)   # H_0, W_0 = the stride-4 level's size
        iou_pred    (B, T)

**A region prior as input** (``cfg.prior_input``; refining a region pointer's painted prior
``(B, T, H, W)`` logits): every head, S²RM and the baselines alike, gets it the same way, in this
base class. Its sigmoid is area-pooled to each level, embedded by a 1x1 conv ``1 -> dim`` and added
to the pair's projected pixel features before :meth:`FusionHead.decode` (so S²RM distributes the
language over features that already mark the chosen regions, and CASG's guidance and every decoder
merge read them). The decoded logits are multiplied by a learned scale that starts at 0: the
caller adds them to the prior as a residual, so a refiner starts exactly at the prior.

**Targets are folded into the batch.** A sample with ``T`` queries is segmented ``T`` times: after
the per-level input projection (done once per image), the real (image, query) pairs
(``query_mask`` True) are gathered sample-major (``b0t0, b0t1, ..., b1t0, ...``): each pair gets
its image's pixel maps and word states and its query. Fusion and decoding see ``N`` independent
pairs, ``N`` = the number of real queries, and the outputs are scattered back to ``(B, T, ...)``.
Cost and memory of the fusion grow linearly in ``N``. Padded query slots (``query_mask`` False)
are not computed: their logits and predicted IoU are 0, and losses and metrics must ignore them
(when a batch has no real query at all, every slot is computed, so each parameter gets a
gradient). A batch with ``T = 0`` slots returns empty ``(B, 0, H_0, W_0)`` / ``(B, 0)`` outputs,
computed from one padded slot so that every call runs the same modules (DeepSpeed ZeRO-3's ranks
gather parameters module by module, and must all do so).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from s2rm_head.config import HEAD_NAMES, NUM_LEVELS, HeadConfig, require_width
from s2rm_head.heads._blocks import LayerNorm2d
from s2rm_head.heads.casg import CASGDecoder
from s2rm_head.heads.s2rm import S2RM
from s2rm_head.types import HeadOutput, LanguageFeatures, pad_query_slot

__all__ = ["HEAD_NAMES", "NUM_LEVELS", "FoldedInputs", "FusionHead", "HeadConfig", "S2RMHead"]


@dataclass
class FoldedInputs:
    """Projected inputs with targets folded into the batch, ``N = B * T`` (sample-major).

    Attributes:
        feats: 4 maps ``(N, C, H_i, W_i)``, finest first.
        tokens: ``(N, L, C)`` word states (``L = 0`` for heads that do not read words).
        token_mask: ``(N, L)`` bool, True for real words.
        queries: ``(N, C)`` one query per (image, target) pair.
    """

    feats: list[torch.Tensor]
    tokens: torch.Tensor
    token_mask: torch.Tensor
    queries: torch.Tensor


class FusionHead(nn.Module, ABC):
    """Base of every fusion head: input checks, projections to ``cfg.dim``, target folding.

    Subclasses implement :meth:`decode` on :class:`FoldedInputs` and return per-pair mask logits
    ``(N, 1, H_0, W_0)`` and IoU predictions ``(N,)``.
    """

    uses_words: bool = True  # heads that only read the sentence/query set this to False

    def __init__(self, *, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        in_channels = require_width(cfg.in_channels, "in_channels", "the pixel pyramid's 4 widths")
        lang_dim = require_width(cfg.lang_dim, "lang_dim", "the language queries' width")
        # per level: (B, C_i, H_i, W_i) -> (B, dim, H_i, W_i)
        self.pixel_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, cfg.dim, kernel_size=1, bias=False), LayerNorm2d(cfg.dim))
            for c in in_channels
        )
        self.query_proj = nn.Sequential(nn.Linear(lang_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        self.token_proj: nn.Sequential | None = None
        if self.uses_words:
            self.token_proj = nn.Sequential(nn.Linear(lang_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        self.prior_embed: nn.ModuleList | None = None
        self.prior_scale: nn.Parameter | None = None
        if cfg.prior_input:  # per level: sigmoid(prior) (N, 1, H_i, W_i) -> (N, dim, H_i, W_i)
            self.prior_embed = nn.ModuleList(nn.Conv2d(1, cfg.dim, kernel_size=1) for _ in in_channels)
            # shape (1,), not 0-d (DeepSpeed views parameters as uint8, see TwoStageHead)
            self.prior_scale = nn.Parameter(torch.zeros(1))

    @abstractmethod
    def decode(self, inputs: FoldedInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse and decode folded inputs -> ``(mask_logits (N, 1, H_0, W_0), iou_pred (N,))``."""

    def forward(
        self, pyramid: list[torch.Tensor], lang: LanguageFeatures, prior: torch.Tensor | None = None
    ) -> HeadOutput:
        """Segment every query of every image.

        Args:
            pyramid: 4 maps ``(B, C_i, H_i, W_i)`` at strides 4, 8, 16, 32, finest first.
            lang: :class:`LanguageFeatures` with tokens ``(B, L, D)`` and queries ``(B, T, D)``.
            prior: ``(B, T, H, W)`` region-prior logits, one map per query slot (any resolution);
                required exactly when ``cfg.prior_input``.

        Returns:
            :class:`HeadOutput`: ``mask_logits (B, T, H_0, W_0)``, ``iou_pred (B, T)``; with a prior
            input the logits are a residual to add to the prior (0 at initialisation).
        """
        self._check_inputs(pyramid, lang, prior)
        b, t = lang.queries.shape[:2]
        if t == 0:  # no query slot in the whole batch (e.g. every sample answered [REJ])
            # segment one padded slot and return none of it: every call runs the same modules (ZeRO-3
            # ranks must), and the empty outputs stay in the graph (zero gradients, not missing ones)
            if prior is not None:  # (B, 0, H, W) -> (B, 1, H, W), the padded slot's prior: logit 0
                prior = prior.new_zeros(b, 1, *prior.shape[-2:])
            out = self.forward(pyramid, pad_query_slot(lang), prior)
            return HeadOutput(mask_logits=out.mask_logits[:, :0], iou_pred=out.iou_pred[:, :0])
        feats = [proj(x) for proj, x in zip(self.pixel_proj, pyramid, strict=True)]  # (B, dim, H_i, W_i)
        real = lang.query_mask.bool().flatten()  # (B*T,) sample-major
        if not real.any():  # only padded slots: fold them all (every parameter still gets a gradient)
            real = torch.ones_like(real)
        pairs = real.nonzero().flatten()  # (N,) indices into B*T
        image_of = torch.div(pairs, t, rounding_mode="floor")  # (N,) the pair's sample
        queries = self.query_proj(lang.queries).reshape(b * t, -1)[pairs]  # (B, T, dim) -> (N, dim)
        if self.token_proj is not None:
            tokens = self.token_proj(lang.tokens)[image_of]  # (B, L, dim) -> (N, L, dim)
            token_mask = lang.mask.bool()[image_of]  # (B, L) -> (N, L)
        else:
            tokens = queries.new_zeros(len(pairs), 0, self.cfg.dim)  # (N, 0, dim): this head reads no words
            token_mask = torch.zeros(len(pairs), 0, dtype=torch.bool, device=queries.device)
        # image features gathered once per pair: (B, dim, H, W) -> (N, dim, H, W)
        pair_feats = [f[image_of] for f in feats]
        if prior is not None and self.prior_embed is not None:
            p = torch.sigmoid(prior.float()).to(feats[0].dtype).reshape(b * t, 1, *prior.shape[-2:])[pairs]
            pair_feats = [  # (N, 1, H, W) area-pooled to (N, 1, H_i, W_i), embedded to (N, dim, H_i, W_i)
                x + embed(F.adaptive_avg_pool2d(p, x.shape[-2:]))
                for embed, x in zip(self.prior_embed, pair_feats, strict=True)
            ]
        folded = FoldedInputs(feats=pair_feats, tokens=tokens, token_mask=token_mask, queries=queries)
        logits, iou = self.decode(folded)  # (N, 1, H_0, W_0), (N,)
        if self.prior_scale is not None:  # a refiner's residual starts at 0
            logits = logits * self.prior_scale
        h0, w0 = logits.shape[-2:]
        if len(pairs) < b * t:  # scatter back; padded slots stay 0
            logits = logits.new_zeros(b * t, 1, h0, w0).index_copy(0, pairs, logits)
            iou = iou.new_zeros(b * t).index_copy(0, pairs, iou)
        return HeadOutput(mask_logits=logits.view(b, t, h0, w0), iou_pred=iou.view(b, t))

    def _check_inputs(
        self, pyramid: list[torch.Tensor], lang: LanguageFeatures, prior: torch.Tensor | None = None
    ) -> None:
        """Fail loudly at the modality boundary (counts and shapes printed on both sides)."""
        if len(pyramid) != NUM_LEVELS:
            raise ValueError(f"pyramid: expected {NUM_LEVELS} levels, got {len(pyramid)}")
        b = lang.queries.shape[0]
        if self.cfg.prior_input != (prior is not None):
            raise ValueError(
                f"prior: cfg.prior_input is {self.cfg.prior_input} but a prior was "
                f"{'given' if prior is not None else 'not given'}"
            )
        want = tuple(lang.queries.shape[:2])
        if prior is not None and (prior.dim() != 4 or tuple(prior.shape[:2]) != want):
            raise ValueError(f"prior: shape {tuple(prior.shape)}, expected (B, T) = {want} + (H, W)")
        if lang.queries.shape[-1] != self.cfg.lang_dim:
            raise ValueError(f"lang: width D={lang.queries.shape[-1]} != cfg.lang_dim={self.cfg.lang_dim}")
        for i, (x, c) in enumerate(zip(pyramid, self.cfg.in_channels, strict=True)):
            if x.dim() != 4 or x.shape[0] != b or x.shape[1] != c:
                raise ValueError(
                    f"pyramid[{i}]: shape {tuple(x.shape)}, expected (B={b}, C={c}, H, W) "
                    f"(batch from lang.queries, channels from cfg.in_channels)"
                )
            if i and (x.shape[2] > pyramid[i - 1].shape[2] or x.shape[3] > pyramid[i - 1].shape[3]):
                raise ValueError(
                    f"pyramid[{i}]: size {tuple(x.shape[2:])} larger than pyramid[{i - 1}] "
                    f"{tuple(pyramid[i - 1].shape[2:])}; levels must be finest first"
                )


class _QueryFiLM(nn.Module):
    """Cheap query conditioning for levels without an S²RM block: ``x * (1 + tanh(W q)) + U q``."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.scale = nn.Linear(dim, dim)
        self.shift = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``x (N, C, H, W)``, ``query (N, C)`` -> ``(N, C, H, W)``."""
        scale = 1.0 + torch.tanh(self.scale(query))  # (N, C)
        return x * scale[:, :, None, None] + self.shift(query)[:, :, None, None]


class S2RMHead(FusionHead):
    """S²RM fusion at ``cfg.fuse_levels`` + CASG decoding.

    By default S²RM runs at strides 8, 16, 32 and the stride-4 level gets a query FiLM only: the
    recurrence needs ``H + W`` sequential steps, 4x more at stride 4 than at stride 8 (and 16x
    the pixels of stride 16), while that level mostly carries boundary detail; CASG then
    re-weights it with the foreground guidance from the abstract (fused) levels, so its
    decoding is query-specific anyway. ``fuse_levels=(0, 1, 2, 3)`` fuses every level.
    """

    def __init__(self, *, cfg: HeadConfig) -> None:
        super().__init__(cfg=cfg)
        self.fusers = nn.ModuleDict(
            {
                str(i): S2RM(
                    dim=cfg.dim,
                    num_heads=cfg.num_heads,
                    coparse=cfg.coparse,
                    balance=cfg.balance,
                    scan_kernel=cfg.scan_kernel,
                )
                for i in cfg.fuse_levels
            }
        )
        self.films = nn.ModuleDict(
            {str(i): _QueryFiLM(dim=cfg.dim) for i in range(NUM_LEVELS) if i not in cfg.fuse_levels}
        )
        self.decoder = CASGDecoder(dim=cfg.dim, num_levels=NUM_LEVELS)

    def decode(self, inputs: FoldedInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse each level, then CASG -> ``(mask_logits (N, 1, H_0, W_0), iou_pred (N,))``."""
        fused = []
        for i, x in enumerate(inputs.feats):
            key = str(i)
            if key in self.fusers:
                fused.append(self.fusers[key](x, inputs.tokens, inputs.token_mask, inputs.queries).fused)
            else:
                fused.append(self.films[key](x, inputs.queries))
        out = self.decoder(fused)
        return out.mask_logits, out.iou_pred
