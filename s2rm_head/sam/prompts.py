"""Prompts for SAM's prompt encoder / mask decoder, made from what the fusion head produced.

Four kinds, each switched on by :class:`PromptConfig` (``N = B * T`` (image, query) pairs, ``C`` = SAM's
prompt width (256 official), ``S`` = SAM's ``img_size``, ``M = 4 * (S // 16)`` its mask-input side)::

    sparse  queries (N, Dg) --MLP--> (N, k, C)       learned; appended to the prompt encoder's tokens
    box     coarse logits (N, 1, h, w) -> (N, 4)      x0, y0, x1, y1 in SAM input pixels
    points  coarse logits -> coords (N, P, 2), labels (N, P)   1 positive, 0 negative, -1 none
    dense   coarse logits -> (N, 1, M, M)             bilinear resize; SAM's ``mask_input``

**Geometry.** The coarse map covers the head's whole input canvas, a letterbox of the image padded
bottom / right (see ``mllm_ris/processing/processor.py``); SAM's canvas is the same letterbox at side ``S``.
So one head cell is ``s = S / max(h, w)`` SAM pixels on both axes. Points and box corners are given in
SAM's pixel-index convention (the prompt encoder adds 0.5 to reach pixel centres): a cell ``(r, c)``
has its centre at ``((c + 0.5) s - 0.5, (r + 0.5) s - 0.5)``, and a box spans the first to the last
SAM pixel its cells cover, like ``batched_mask_to_box`` of segment-anything.

**From the coarse mask** (logits ``> mask_threshold``; boxes / points are computed without gradient):

* box: the tight box of the mask; an **empty mask gives the whole image canvas** (SAM cannot take "no
  box" for some pairs of a batch, and "somewhere in the image" is the honest prompt);
* positive points: the highest-logit local maxima (3x3) inside the mask, then the highest remaining
  cells inside it; none (label -1) when the mask has too few cells — an empty mask gets no positive;
* negative points: hard negatives — the highest-logit local maxima outside the mask dilated by one
  cell (a distractor the head half-believed), then the highest remaining cells there; label -1 when
  there are too few such cells;
* dense: the logits themselves, resized (bilinear) so the head canvas fills its part of SAM's ``M x M``
  mask input; the rest (a non-square canvas) is ``dense_pad_logit``. Differentiable in the logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from s2rm_head.config import PromptConfig, require_width

__all__ = [
    "PromptBuilder",
    "PromptConfig",
    "SAMPrompts",
    "build_prompt_builder",
    "coarse_to_boxes",
    "coarse_to_dense",
    "coarse_to_points",
]


class SAMPrompts(NamedTuple):
    """Prompts for ``N`` pairs; a field is ``None`` when its prompt type is off.

    A ``NamedTuple``, not a dataclass: :class:`PromptBuilder` returns it and
    :class:`~s2rm_head.sam.stage.SAMStage` takes it, and DeepSpeed ZeRO-3's module hooks see tensors
    only in tensors, tuples (named ones too), lists and dicts (see ``s2rm_head.types.HeadOutput``).

    Attributes:
        num_pairs: ``N``.
        sparse: ``(N, k, C)`` extra sparse tokens (after the prompt encoder's point / box tokens).
        point_coords: ``(N, P, 2)`` float ``(x, y)`` in SAM input pixels, ``P = pos + neg``.
        point_labels: ``(N, P)`` int64: 1 positive, 0 negative, -1 no point (SAM's padding).
        boxes: ``(N, 4)`` float ``(x0, y0, x1, y1)`` in SAM input pixels.
        dense: ``(N, 1, M, M)`` mask-input logits.
    """

    num_pairs: int
    sparse: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    dense: torch.Tensor | None = None


def _cell_scale(h: int, w: int, img_size: int) -> float:
    """SAM pixels per coarse cell: the coarse map spans the letterboxed canvas, long side = ``img_size``."""
    return img_size / max(h, w)


@torch.no_grad()
def coarse_to_boxes(logits: torch.Tensor, *, img_size: int, threshold: float = 0.0) -> torch.Tensor:
    """Tight box of each thresholded coarse mask in SAM input pixels; empty mask → the whole canvas.

    Args:
        logits: ``(N, 1, h, w)`` coarse logits over the head canvas.

    Returns:
        ``(N, 4)`` float ``(x0, y0, x1, y1)``, first and last covered SAM pixel (inclusive).
    """
    n, _, h, w = logits.shape
    fg = logits[:, 0] > threshold  # (N, h, w)
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # (N, h), (N, w)
    ar_h = torch.arange(h, device=logits.device).expand(n, h)
    ar_w = torch.arange(w, device=logits.device).expand(n, w)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)  # (N,); h when empty
    y1 = torch.where(rows, ar_h, -1).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1)
    empty = ~rows.any(dim=1)  # (N,)
    y0, x0 = y0.masked_fill(empty, 0), x0.masked_fill(empty, 0)
    y1, x1 = y1.masked_fill(empty, h - 1), x1.masked_fill(empty, w - 1)
    s = _cell_scale(h, w, img_size)
    cells = torch.stack([x0, y0, x1 + 1, y1 + 1], dim=1).float()  # (N, 4) cell edges
    return cells * s - torch.tensor([0.0, 0.0, 1.0, 1.0], device=logits.device)  # inclusive pixels


def _top_cells(scores: torch.Tensor, eligible: torch.Tensor, peaks: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices ``(N, k)`` of eligible cells, peaks first, then by score; ``-1`` when too few."""
    n, cells = scores.shape
    if k == 0:
        return scores.new_zeros(n, 0, dtype=torch.long)
    lo = scores.amin(dim=1, keepdim=True)
    span = scores.amax(dim=1, keepdim=True) - lo + 1.0
    # lexicographic key: eligible, then peak, then score (all terms >= 0)
    key = (scores - lo) + span * (peaks.float() + 2.0 * eligible.float())  # (N, cells)
    idx = key.topk(min(k, cells), dim=1).indices  # (N, k')
    idx = idx.masked_fill(~eligible.gather(1, idx), -1)
    if idx.shape[1] < k:
        idx = F.pad(idx, (0, k - idx.shape[1]), value=-1)
    return idx


@torch.no_grad()
def coarse_to_points(
    logits: torch.Tensor, *, img_size: int, num_pos: int, num_neg: int, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive points inside the mask and hard negative points outside it (rules in the module doc).

    Args:
        logits: ``(N, 1, h, w)`` coarse logits over the head canvas.

    Returns:
        ``coords (N, num_pos + num_neg, 2)`` float ``(x, y)`` in SAM input pixels (0 where no point) and
        ``labels (N, num_pos + num_neg)`` int64: 1 positive, 0 negative, -1 no point.
    """
    n, _, h, w = logits.shape
    scores = logits.detach().float()
    fg = scores > threshold  # (N, 1, h, w)
    near = F.max_pool2d(fg.float(), 3, stride=1, padding=1) > 0  # mask dilated by one cell
    peaks = scores == F.max_pool2d(scores, 3, stride=1, padding=1)  # 3x3 local maxima
    flat = scores.reshape(n, h * w)  # (N, 1, h, w) -> (N, h*w), row-major cells
    fg, near, peaks = fg.reshape(n, h * w), near.reshape(n, h * w), peaks.reshape(n, h * w)
    pos = _top_cells(flat, fg, peaks, num_pos)  # (N, num_pos)
    neg = _top_cells(flat, ~near, peaks, num_neg)  # (N, num_neg)
    idx = torch.cat([pos, neg], dim=1)  # (N, P)
    labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)], dim=1).masked_fill(idx < 0, -1)
    idx = idx.clamp(min=0)
    s = _cell_scale(h, w, img_size)
    xy = torch.stack([idx % w, idx // w], dim=-1).float()  # (N, P, 2) cell (col, row)
    coords = ((xy + 0.5) * s - 0.5).masked_fill((labels < 0)[..., None], 0.0)
    return coords, labels


def coarse_to_dense(logits: torch.Tensor, *, mask_input_size: int, pad_logit: float = -10.0) -> torch.Tensor:
    """Coarse logits ``(N, 1, h, w)`` → SAM mask input ``(N, 1, M, M)`` (bilinear; differentiable).

    The head canvas maps onto the top-left ``(M h / L, M w / L)`` of the mask input, ``L = max(h, w)``;
    the rest (only for a non-square canvas) is ``pad_logit``.
    """
    _, _, h, w = logits.shape
    m, long = mask_input_size, max(h, w)
    mh, mw = max(1, round(m * h / long)), max(1, round(m * w / long))
    x = logits
    if (h, w) != (mh, mw):
        x = F.interpolate(x, (mh, mw), mode="bilinear", align_corners=False)  # (N, 1, mh, mw)
    if (mh, mw) != (m, m):
        x = F.pad(x, (0, m - mw, 0, m - mh), value=pad_logit)  # (N, 1, M, M)
    return x


class PromptBuilder(nn.Module):
    """Head outputs → :class:`SAMPrompts` (see the module doc for the rules and the geometry).

    Args:
        cfg: which prompts, how many points, the grounding width.
        prompt_dim: SAM's prompt width ``C`` (``sam.prompt_encoder.embed_dim``; 256 official).
        img_size: SAM's input side ``S``.
    """

    def __init__(self, *, cfg: PromptConfig, prompt_dim: int, img_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.prompt_dim = prompt_dim
        self.img_size = img_size
        self.mask_input_size = 4 * (img_size // 16)  # PromptEncoder.mask_input_size
        self.sparse_proj: nn.Sequential | None = None
        if cfg.sparse:  # (N, Dg) -> (N, k * C)
            grounding_dim = require_width(cfg.grounding_dim, "grounding_dim", "the grounding queries' width")
            self.sparse_proj = nn.Sequential(
                nn.Linear(grounding_dim, prompt_dim),
                nn.GELU(),
                nn.Linear(prompt_dim, cfg.num_sparse_tokens * prompt_dim),
            )

    def forward(self, queries: torch.Tensor | None, coarse_logits: torch.Tensor | None = None) -> SAMPrompts:
        """Build the enabled prompts.

        Args:
            queries: grounding embeddings ``(B, T, Dg)`` or ``(N, Dg)``; needed when ``cfg.sparse``.
            coarse_logits: the head's ``mask_logits (B, T, h, w)`` or ``(N, 1, h, w)``; needed for
                box, points and dense.

        Returns:
            :class:`SAMPrompts` for ``N = B * T`` pairs, sample-major like the head.
        """
        cfg = self.cfg
        if cfg.sparse and queries is None:
            raise ValueError("queries: prompts.sparse is on but no grounding embeddings were given")
        if (cfg.box or cfg.points or cfg.dense) and coarse_logits is None:
            raise ValueError(
                "coarse_logits: box / points / dense prompts are on but no coarse mask was given"
            )
        if queries is not None:
            dg = cfg.grounding_dim  # None: a builder without sparse prompts, alone (not read)
            if queries.dim() not in (2, 3) or (dg is not None and queries.shape[-1] != dg):
                raise ValueError(
                    f"queries: shape {tuple(queries.shape)}, expected (B, T, {dg or 'Dg'}) or (N, Dg)"
                )
            queries = queries.reshape(-1, queries.shape[-1])  # (B, T, Dg) -> (N, Dg)
        if coarse_logits is not None:
            if coarse_logits.dim() != 4:
                raise ValueError(f"coarse_logits: shape {tuple(coarse_logits.shape)}, expected 4-D")
            h, w = coarse_logits.shape[-2:]
            coarse_logits = coarse_logits.reshape(-1, 1, h, w)  # (B, T, h, w) -> (N, 1, h, w)
        n = (queries if queries is not None else coarse_logits).shape[0]  # type: ignore[union-attr]
        if queries is not None and coarse_logits is not None and coarse_logits.shape[0] != n:
            raise ValueError(
                f"queries: {n} pairs, coarse_logits: {coarse_logits.shape[0]}; need one mask per query"
            )
        out: dict[str, torch.Tensor] = {}
        if self.sparse_proj is not None:
            tokens = self.sparse_proj(queries)  # (N, k * C)
            out["sparse"] = tokens.view(n, cfg.num_sparse_tokens, self.prompt_dim)  # (N, k, C)
        if coarse_logits is not None:
            if cfg.box:
                out["boxes"] = coarse_to_boxes(
                    coarse_logits, img_size=self.img_size, threshold=cfg.mask_threshold
                )
            if cfg.points:
                out["point_coords"], out["point_labels"] = coarse_to_points(
                    coarse_logits,
                    img_size=self.img_size,
                    num_pos=cfg.num_pos_points,
                    num_neg=cfg.num_neg_points,
                    threshold=cfg.mask_threshold,
                )
            if cfg.dense:
                out["dense"] = coarse_to_dense(
                    coarse_logits,
                    mask_input_size=self.mask_input_size,
                    pad_logit=cfg.dense_pad_logit,
                )
        return SAMPrompts(num_pairs=n, **out)


def build_prompt_builder(cfg: PromptConfig, sam: Sam) -> PromptBuilder:
    """A :class:`PromptBuilder` sized for ``sam`` (prompt width, input side)."""
    return PromptBuilder(
        cfg=cfg, prompt_dim=int(sam.prompt_encoder.embed_dim), img_size=int(sam.image_encoder.img_size)
    )
