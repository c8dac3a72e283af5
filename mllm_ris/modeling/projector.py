"""The LLM's region interface, both ways: region features in (visual projectors → :class:`VisualTokens`,
the LLM's input) and region scores out (the region pointer → ``region_logits (B, T, K)`` → the
painted region prior). Classic mode uses the same pair without an LLM (the projector's region tokens
scored by the pointer).

**Visual projectors**: patch features ``(B, N, Cv)`` (+ superpixel label maps) → :class:`VisualTokens`.

Two kinds, one interface (:class:`VisualProjector`), built from one :class:`ProjectorConfig`::

    projector(patch_feats (B, N, Cv), superpixels (B, H', W') | None) -> VisualTokens
        embeds (B, K, D)   # D = cfg.llm_dim; padded rows zero
        mask   (B, K)      # True for real tokens

* ``patch`` — :class:`PatchProjector`: the LLaVA-1.5 MLP on every patch, ``K = N`` (the baseline);
* ``superpixel`` — :class:`SuperpixelProjector`: one token per superpixel, ``K`` = regions per image.

Both end in ``mlp = Sequential(Linear(Cv, D), GELU(), Linear(D, D))``: LLaVA checkpoints'
``multi_modal_projector.linear_1`` / ``linear_2`` load onto ``mlp.0`` / ``mlp.2``
(``LlavaCheckpoint.projector_state`` from ``mllm_ris/modeling/llava.py``). Patch features are
row-major over an ``(h, w)`` grid (no CLS token). See docs/superpixels.md.

:class:`VisualTokens` is the contract between a projector and the grounding LLM.

**The region pointer**: each query (a ``[SEG]`` state) scores every region token; the scores, painted
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
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mllm_ris.errors import ConfigError
from mllm_ris.processing.regions import (
    COLOR_DIM,
    GEOMETRY_DIM,
    SHAPE_SIZE,
    RegionDescriptorBatch,
    keep_largest,
    relabel,
    token_order_labels,
)

__all__ = [
    "GEOMETRY_FEATURES",
    "MASKED_LOGIT",
    "PatchProjector",
    "PointerConfig",
    "PointerLosses",
    "ProjectorConfig",
    "RegionPointer",
    "SuperpixelProjector",
    "VisualProjector",
    "VisualTokens",
    "build_projector",
    "descriptor_features",
    "paint_regions",
    "pointer_loss",
]


class _VisualTokenFields(NamedTuple):
    embeds: torch.Tensor
    mask: torch.Tensor


class VisualTokens(_VisualTokenFields):
    """Visual tokens for a batch of images, padded to the longest image.

    A ``NamedTuple`` (checked on construction), not a dataclass: the projector returns it and the
    grounding LLM takes it, and DeepSpeed ZeRO-3 finds a module's output and input tensors (to
    hook its backward parameter fetch and release) only in tensors, tuples (named ones too), lists
    and dicts (see ``s2rm_head.types.HeadOutput`` and docs/training.md, "ZeRO-3").

    Attributes:
        embeds: ``(B, K, D)`` float, token embeddings at the LLM width ``D``; padded rows are zero.
        mask: ``(B, K)`` bool, True where a token is real. ``K`` varies per image for superpixel
            projectors (``mask.sum(1)`` gives each image's token count) and is constant for patches.

    Raises:
        ValueError: ``embeds`` is not ``(B, K, D)`` or ``mask`` is not ``(B, K)``.
    """

    __slots__ = ()

    def __new__(cls, embeds: torch.Tensor, mask: torch.Tensor) -> VisualTokens:
        if embeds.dim() != 3 or mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"VisualTokens: embeds {tuple(embeds.shape)} must be (B, K, D) "
                f"and mask {tuple(mask.shape)} must be (B, K)"
            )
        return super().__new__(cls, embeds, mask)

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` long: real tokens per image."""
        return self.mask.sum(dim=1)


GEOMETRY_FEATURES = (
    "cx", "cy", "x0", "y0", "x1", "y1", "area", "sqrt_area", "std_x", "std_y", "corr_xy",
)  # fmt: skip
_COVERAGE_EPS = 1e-2  # floor of the coverage inside the log bias: log(0 + eps) = -4.6 outside a region


@dataclass
class ProjectorConfig:
    """Config of a visual projector; invalid values raise ConfigError naming the field.

    ``vision_dim``, ``llm_dim`` and ``grid`` are derived widths: ``build_parts`` fills them in from the
    built vision tower and LLM (a set value that disagrees is an error). A projector built alone
    (:func:`build_projector`) needs ``llm_dim``, and ``vision_dim`` when it reads the tower.
    """

    kind: Literal["superpixel", "patch"] = field(
        default="superpixel", metadata={"help": "one token per superpixel, or per patch (LLaVA baseline)"}
    )
    vision_dim: int | None = field(
        default=None,
        metadata={
            "help": "Cv, width of the vision tower's patch features; derived from the tower (leave null)"
        },
    )
    llm_dim: int | None = field(
        default=None,
        metadata={"help": "D, the LLM's hidden size (classic: pointer.dim); derived (leave null)"},
    )
    grid: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "(h, w) patch grid; derived from the tower (leave null); null alone = square from N"
        },
    )
    max_tokens: int | None = field(
        default=None,
        metadata={"help": "superpixel: keep at most this many regions (largest first); null = all"},
    )
    aggregator: bool = field(default=True, metadata={"help": "superpixel: coverage-biased attention pooling"})
    num_heads: int = field(default=4, metadata={"help": "superpixel: aggregator attention heads"})
    pos_embed: bool = field(default=True, metadata={"help": "superpixel: geometry positional embedding"})
    descriptors: bool = field(
        default=False,
        metadata={
            "help": "superpixel: add a region encoder's embedding of each region's descriptors (16x16 "
            "shape crop, CIELAB colour, geometry; computed by the collator) to its token: an MLP "
            "F -> 2D -> D straight into the LLM width"
        },
    )
    descriptor_encoder: Literal["mlp", "conv"] = field(
        default="mlp",
        metadata={
            "help": "superpixel with descriptors: mlp = the MLP over all descriptor features; conv = a "
            "small CNN over the shape crop first, its features joining the MLP's input"
        },
    )
    image_encoder: Literal["none", "cnn"] = field(
        default="none",
        metadata={
            "help": "superpixel with descriptors and no tower: cnn = a small CNN trained with the model "
            "reads the letterboxed image (receptive field 55 px, across region borders) and its "
            "features, averaged over each region, join the region's token; none = descriptors alone"
        },
    )
    tower: bool = field(
        default=True,
        metadata={
            "help": "superpixel: pool the vision tower's patch features into each token (masked mean, "
            "aggregator, geometry); false = tokens from the descriptors alone and the tower is not run "
            "(needs descriptors)"
        },
    )
    mlp_bias: bool = field(default=True, metadata={"help": "biases in mlp (LLaVA multimodal_projector_bias)"})

    def __post_init__(self) -> None:
        if self.kind not in ("superpixel", "patch"):
            raise ConfigError(f"kind: must be superpixel or patch, got {self.kind!r}")
        for name in ("vision_dim", "llm_dim", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        if self.grid is not None:
            self.grid = tuple(self.grid)  # type: ignore[assignment]
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ConfigError(f"grid: need two positive ints (h, w), got {self.grid}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens: must be >= 1 or null, got {self.max_tokens}")
        if self.descriptors and (self.kind != "superpixel" or self.max_tokens is not None):
            raise ConfigError(
                "descriptors: need kind superpixel and max_tokens null (descriptors cover every region)"
            )
        if self.descriptor_encoder not in ("mlp", "conv"):
            raise ConfigError(f"descriptor_encoder: must be mlp or conv, got {self.descriptor_encoder!r}")
        if self.image_encoder not in ("none", "cnn"):
            raise ConfigError(f"image_encoder: must be none or cnn, got {self.image_encoder!r}")
        if self.image_encoder != "none" and (self.tower or not self.descriptors):
            raise ConfigError(
                "image_encoder: cnn needs tower: false and descriptors: true (it replaces the tower)"
            )
        if not self.tower and not (self.kind == "superpixel" and self.descriptors):
            raise ConfigError("tower: false builds tokens from the descriptors alone; set descriptors: true")
        if (
            self.aggregator
            and self.tower
            and self.vision_dim is not None
            and self.vision_dim % self.num_heads
        ):
            raise ConfigError(f"num_heads: vision_dim={self.vision_dim} is not divisible by {self.num_heads}")


_UNUSED_VISION_DIM = 64


def _width(value: int | None, name: str) -> int:
    """A derived width the projector needs (a ConfigError naming it when unset)."""
    if value is None:
        raise ConfigError(f"{name}: null; build_parts derives it from the built parts, set it to build alone")
    return value


class VisualProjector(nn.Module):
    """Base of every projector: input checks, the patch grid and the output ``mlp``."""

    def __init__(self, *, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = _width(cfg.llm_dim, "llm_dim")
        # no tower (the superpixel projector drops the mlp): drawn at the width vision_dim's default
        # had, so a seed gives the initial weights it gave before vision_dim was derived
        cv = _width(cfg.vision_dim, "vision_dim") if cfg.tower else _UNUSED_VISION_DIM
        # indices 0 / 2 match LLaVA's multi_modal_projector.linear_1 / linear_2
        self.mlp = nn.Sequential(
            nn.Linear(cv, d, bias=cfg.mlp_bias),
            nn.GELU(),
            nn.Linear(d, d, bias=cfg.mlp_bias),
        )

    def grid_for(self, n: int) -> tuple[int, int]:
        """The ``(h, w)`` patch grid of ``N = n`` patch features (``cfg.grid`` or a square)."""
        if self.cfg.grid is not None:
            gh, gw = self.cfg.grid
            if gh * gw != n:
                raise ValueError(f"patch_feats: N={n} patches, but cfg.grid={gh}x{gw} gives {gh * gw}")
            return gh, gw
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"patch_feats: N={n} is not a square grid; set cfg.grid, or drop the CLS token (N-1={n - 1})"
            )
        return side, side

    def _check_feats(self, patch_feats: torch.Tensor) -> tuple[int, int]:
        """Return ``(B, N)`` of ``patch_feats (B, N, Cv)``; raise if it is not that shape."""
        if patch_feats.dim() != 3 or patch_feats.shape[-1] != self.cfg.vision_dim:
            raise ValueError(
                f"patch_feats: shape {tuple(patch_feats.shape)}, expected (B, N, Cv={self.cfg.vision_dim})"
            )
        return patch_feats.shape[0], patch_feats.shape[1]


class PatchProjector(VisualProjector):
    """LLaVA-1.5 projector: every patch → one token, ``K = N``; ``superpixels`` is ignored."""

    def num_tokens(self, n_patches: int) -> int:
        """Tokens per image for ``n_patches`` patch features (all of them)."""
        return n_patches

    def forward(self, patch_feats: torch.Tensor, superpixels: torch.Tensor | None = None) -> VisualTokens:
        """``patch_feats (B, N, Cv)`` → ``VisualTokens(embeds (B, N, D), mask (B, N) all True)``."""
        b, n = self._check_feats(patch_feats)
        self.grid_for(n)
        mask = torch.ones(b, n, dtype=torch.bool, device=patch_feats.device)
        return VisualTokens(embeds=self.mlp(patch_feats), mask=mask)


class SuperpixelProjector(VisualProjector):
    """One token per superpixel: masked mean + coverage-biased attention + geometry embedding → ``mlp``.

    For image ``b`` with label map ``(H', W')`` (any integer ids; negative = no region, e.g.
    padding) and patch grid ``(h, w)``:

    1. coverage ``C (K, N)``: fraction of patch ``n`` covered by region ``k`` (the label map is
       resampled nearest to a multiple of the grid, then counted per patch cell);
    2. masked mean ``m_k = sum_n C_kn f_n / sum_n C_kn``;
    3. aggregator: attention from ``m_k`` to all patches with logits ``q.k / sqrt(d) + s_h log(C_kn + eps)``,
       a learned scale ``s_h`` per head (initialised 2 ... 0.5: detail-focused to context-heavy heads);
    4. geometry ``(K, 11)``: centroid, box, area, sqrt area, shape second moments → MLP → ``Cv``;
    5. ``mlp(m + attention + geometry)`` → ``(K, D)``.

    Region statistics (coverage, geometry) are computed for the whole batch at once with a few
    ``bincount`` calls on the label maps' device (CPU from a DataLoader: no GPU sync per image);
    only the projection runs per token. ``max_tokens`` keeps the regions with
    the most pixels (ties: smaller id); dropped regions still feed the aggregator as context.
    Tokens are ordered by region id. Images are padded to the longest ``K`` in the batch (mask
    False, embeds zero). ``last_dropped (B,)`` holds how many regions the cap removed in the
    last forward.
    """

    def __init__(self, *, cfg: ProjectorConfig) -> None:
        super().__init__(cfg=cfg)
        c = cfg.vision_dim
        self.last_dropped: torch.Tensor | None = None
        self.attn: nn.ModuleDict | None = None
        if not cfg.tower:  # tokens from the descriptors alone: no pooling parts, no ``mlp``
            del self.mlp
        if cfg.aggregator and cfg.tower:
            self.attn = nn.ModuleDict(
                {
                    "norm_q": nn.LayerNorm(c),
                    "norm_kv": nn.LayerNorm(c),
                    "q": nn.Linear(c, c),
                    "kv": nn.Linear(c, 2 * c),
                    "out": nn.Linear(c, c),
                }
            )
            self.bias_scale = nn.Parameter(torch.linspace(2.0, 0.5, cfg.num_heads))
        self.pos_mlp: nn.Sequential | None = None
        if cfg.pos_embed and cfg.tower:
            self.pos_mlp = nn.Sequential(nn.Linear(len(GEOMETRY_FEATURES), c), nn.GELU(), nn.Linear(c, c))
        self.desc_mlp: nn.Module | None = None
        if cfg.descriptors:  # the region encoder: descriptors -> the LLM width, beside the tower path
            width, d = SHAPE_SIZE * SHAPE_SIZE + COLOR_DIM + GEOMETRY_DIM, cfg.llm_dim
            if cfg.descriptor_encoder == "conv":
                self.desc_mlp = ConvDescriptorEncoder(width, d)
            else:
                self.desc_mlp = nn.Sequential(nn.Linear(width, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.image_cnn: ImageRegionEncoder | None = (
            ImageRegionEncoder(cfg.llm_dim) if cfg.image_encoder == "cnn" else None
        )

    def num_regions(self, superpixels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` distinct non-negative labels per label map ``(B, H', W')`` (before the cap)."""
        return relabel(superpixels.long())[1].cpu()

    def region_labels(self, superpixels: torch.Tensor) -> torch.Tensor:
        """``(B, H', W')`` label maps → the region id of every pixel in token order ``(B, H', W')`` long:
        region ``k`` is the image's ``k``-th token, ``-1`` = no token (padding, or dropped by
        ``max_tokens``). Painting region scores through this map puts each on its region's pixels."""
        return token_order_labels(superpixels, max_tokens=self.cfg.max_tokens)

    def num_tokens(self, superpixels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` tokens each image gets: regions, capped at ``max_tokens``."""
        counts = self.num_regions(superpixels)
        return counts if self.cfg.max_tokens is None else counts.clamp(max=self.cfg.max_tokens)

    def forward(
        self,
        patch_feats: torch.Tensor | None,
        superpixels: torch.Tensor | None = None,
        descriptors: RegionDescriptorBatch | None = None,
        images: torch.Tensor | None = None,
    ) -> VisualTokens:
        """Pool patch features (and / or encode descriptors) into one token per superpixel.

        Args:
            patch_feats: ``(B, N, Cv)``, row-major over the ``(h, w)`` patch grid; None with
                ``cfg.tower`` false (tokens from the descriptors alone).
            superpixels: ``(B, H', W')`` integer label maps of the same images (any size).
            descriptors: the regions' descriptors ``(B, K, ...)`` in token order (``cfg.descriptors``).
            images: ``(B, 3, S, S)`` [0, 1] RGB letterboxes (``cfg.image_encoder: cnn``).

        Returns:
            ``VisualTokens(embeds (B, K, D), mask (B, K))``, ``K`` = most regions in the batch.
        """
        if self.image_cnn is not None and images is None:
            raise ValueError("images: None, but projector.image_encoder is cnn (B, 3, S, S) needed")
        if self.cfg.tower:
            if patch_feats is None:
                raise ValueError("patch_feats: None, but projector.tower is on (B, N, Cv features needed)")
            b, n = self._check_feats(patch_feats)
            self.grid_for(n)  # raises on a grid that does not fit N
            device, dtype = patch_feats.device, patch_feats.dtype
        else:
            b = superpixels.shape[0] if isinstance(superpixels, torch.Tensor) and superpixels.dim() else 0
            assert self.desc_mlp is not None  # ProjectorConfig: tower false needs descriptors
            weight = next(self.desc_mlp.parameters())
            device, dtype = weight.device, weight.dtype
        self._check_labels(superpixels, b)
        assert isinstance(superpixels, torch.Tensor)
        # region statistics for the whole batch at once, on the maps' device (CPU from a DataLoader)
        dense, total = relabel(superpixels.long())  # (B, H', W') ids 0..K0_b-1 per image, -1 = none
        if self.cfg.max_tokens is not None:  # (region_labels: the same map)
            dense = keep_largest(dense, total, self.cfg.max_tokens)
        counts = dense.flatten(1).amax(1).clamp_min(-1) + 1  # (B,) tokens per image
        k = int(counts.max()) if b else 0
        self.last_dropped = (total - counts).cpu()
        if k == 0:  # no labelled pixel in the whole batch
            return VisualTokens(
                embeds=torch.zeros(b, 0, self.cfg.llm_dim, device=device, dtype=dtype),
                mask=torch.zeros(b, 0, dtype=torch.bool, device=device),
            )
        mask = (torch.arange(k, device=dense.device) < counts[:, None]).to(device)  # (B, K)
        embeds = torch.zeros(b, k, self.cfg.llm_dim, device=device, dtype=dtype)
        if self.cfg.tower:
            assert patch_feats is not None
            embeds = self.mlp(self._pooled(patch_feats, dense, mask, k))  # (B, K, Cv) -> (B, K, D)
        if self.desc_mlp is not None:  # (B, K, D)
            embeds = embeds + self.encode_regions(descriptor_features(descriptors, k, dtype), dense, images)
        return VisualTokens(embeds=embeds * mask[..., None].to(dtype), mask=mask)  # padding zeroed

    def encode_regions(
        self, feats: torch.Tensor, dense: torch.Tensor, images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The region encoder: descriptor features ``(B, K, F)`` (:func:`descriptor_features`), plus with
        ``image_encoder: cnn`` the image CNN's features of ``images (B, 3, S, S)`` pooled over the
        regions of ``dense (B, H', W')`` (ids ``0..K-1`` in token order, -1 = none) → ``(B, K, D)``."""
        assert self.desc_mlp is not None  # cfg.descriptors
        out = self.desc_mlp(feats)
        if self.image_cnn is not None:
            if images is None:
                raise ValueError("images: None, but projector.image_encoder is cnn (B, 3, S, S) needed")
            out = out + self.image_cnn(
                images.to(device=feats.device, dtype=feats.dtype), dense, feats.shape[1]
            )
        return out

    def _check_labels(self, superpixels: torch.Tensor | None, b: int) -> None:
        """Raise ValueError unless ``superpixels`` is an integer ``(B, H', W')`` tensor."""
        if superpixels is None:
            raise ValueError("superpixels: None, but the superpixel projector needs (B, H', W') label maps")
        if not isinstance(superpixels, torch.Tensor):
            raise ValueError(f"superpixels: expected a torch tensor, got {type(superpixels).__name__}")
        if superpixels.dim() != 3 or superpixels.shape[0] != b or 0 in superpixels.shape[1:]:
            raise ValueError(
                f"superpixels: shape {tuple(superpixels.shape)}, expected (B={b}, H' > 0, W' > 0)"
                + ("" if not self.cfg.tower else " (B from patch_feats)")
            )
        if superpixels.dtype.is_floating_point or superpixels.dtype == torch.bool:
            raise ValueError(f"superpixels: expected an integer label map, got {superpixels.dtype}")

    def _pooled(
        self, patch_feats: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Tower path: masked mean + aggregator + geometry embedding of dense labels ``(B, H', W')``
        over ``patch_feats (B, N, Cv)`` → ``(B, K, Cv)``."""
        gh, gw = self.grid_for(patch_feats.shape[1])
        device, dtype = patch_feats.device, patch_feats.dtype
        coverage = _coverage(dense, k, gh, gw).to(device=device, dtype=dtype)  # (B, K, N)
        pooled = _region_mean(coverage, patch_feats)  # (B, K, Cv)
        x = pooled
        if self.attn is not None:
            x = x + self._aggregate(pooled, patch_feats, coverage)
        if self.pos_mlp is not None:
            geometry = _geometry(dense, k).to(device=device, dtype=dtype)  # (B, K, 11)
            x = x + self.pos_mlp(geometry * mask[..., None].to(dtype))  # padding rows zero
        return x

    def _aggregate(self, pooled: torch.Tensor, feats: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
        """``pooled (B, K, C)`` attends over ``feats (B, N, C)``, biased by ``coverage (B, K, N)``.

        Returns ``(B, K, C)``.
        """
        assert self.attn is not None
        b, k, c = pooled.shape
        n, h = feats.shape[1], self.cfg.num_heads
        q = self.attn["q"](self.attn["norm_q"](pooled)).view(b, k, h, c // h).transpose(1, 2)  # (B, h, K, d)
        kv = self.attn["kv"](self.attn["norm_kv"](feats)).view(b, n, 2, h, c // h)
        key, value = kv.permute(2, 0, 3, 1, 4)  # (B, N, 2, h, d) -> 2 x (B, h, N, d)
        log_cov = torch.log(coverage + _COVERAGE_EPS)[:, None]  # (B, 1, K, N)
        bias = log_cov * self.bias_scale.to(log_cov.dtype).view(1, h, 1, 1)  # (B, h, K, N)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=bias)  # (B, h, K, d)
        return self.attn["out"](out.transpose(1, 2).reshape(b, k, c))  # (B, h, K, d) -> (B, K, C)


class ConvDescriptorEncoder(nn.Module):
    """Region encoder with a shape CNN (``projector.descriptor_encoder: conv``): ``(B, K, F) -> (B, K, D)``.

    Two stride-2 3x3 convolutions read each region's ``16 x 16`` shape crop (the first ``SHAPE_SIZE ** 2``
    of the ``F`` features of :func:`descriptor_features`) into ``D`` features, which join the raw
    features in the MLP ``F + D -> 2D -> D``: a shape seen shifted or scaled within its crop shares
    filters that an MLP over the flat crop learns pixel by pixel. Only real regions are convolved
    (padding rows, all zero in :func:`descriptor_features`, get zero shape features).
    """

    def __init__(self, width: int, dim: int, channels: int = 32) -> None:
        super().__init__()
        cells = (SHAPE_SIZE // 4) ** 2
        self.dim = dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels // 2, 3, stride=2, padding=1),  # 16 -> 8
            nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1),  # 8 -> 4
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(channels * cells, dim),
        )
        self.mlp = nn.Sequential(nn.Linear(width + dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats (B, K, F)`` → ``(B, K, D)``."""
        b, k, _ = feats.shape
        real = feats.detach().abs().amax(-1) > 0  # (B, K) rows of real regions
        crops = feats[real][:, : SHAPE_SIZE * SHAPE_SIZE].reshape(-1, 1, SHAPE_SIZE, SHAPE_SIZE)
        shape = feats.new_zeros(b, k, self.dim)  # (B, K, D)
        shape[real] = self.conv(crops)  # (R, 1, 16, 16) -> (R, D)
        return self.mlp(torch.cat([feats, shape], -1))


class ImageRegionEncoder(nn.Module):
    """Image features pooled per region (``projector.image_encoder: cnn``): ``(B, 3, S, S) -> (B, K, D)``.

    Four 3x3 convolutions (two of stride 2, then dilations 2 and 4: a receptive field of 55 pixels of
    the canvas) give ``(B, C, S/4, S/4)`` features that see across region borders: what lies next to a
    region, what covers it. Each region averages them over the feature cells it covers (the
    superpixel projector's coverage, as the tower path pools patch features), then a linear layer
    maps ``C -> D``. Trained with the model from scratch; regions without a cell get zeros.
    """

    def __init__(self, dim: int, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, stride=2, padding=1),  # S -> S/2
            nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),  # S/2 -> S/4
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=4, dilation=4),
            nn.GELU(),
        )
        self.out = nn.Linear(c, dim)

    def forward(self, images: torch.Tensor, dense: torch.Tensor, k: int) -> torch.Tensor:
        """``images (B, 3, S, S)`` in [0, 1], ``dense (B, H', W')`` region ids 0..K-1 (-1 = none) →
        ``(B, K, D)``."""
        feats = self.conv(images * 2 - 1)  # (B, C, h, w)
        gh, gw = feats.shape[-2:]
        coverage = _coverage(dense, k, gh, gw).to(device=feats.device, dtype=feats.dtype)  # (B, K, h*w)
        pooled = _region_mean(coverage, feats.flatten(2).transpose(1, 2))  # (B, K, C)
        return self.out(pooled) * (coverage.sum(-1, keepdim=True) > 0)


def descriptor_features(
    descriptors: RegionDescriptorBatch | None, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, K, 16*16 + 6 + G)``: shape crop, colour and geometry of each region side by side."""
    if descriptors is None:
        raise ValueError(
            "descriptors: None, but projector.descriptors is on (build the collator from the model)"
        )
    if descriptors.shape.shape[1] != k:
        raise ValueError(
            f"descriptors: {descriptors.shape.shape[1]} regions per image, the label maps give {k}"
        )
    shape = descriptors.shape.flatten(2)  # (B, K, 16, 16) -> (B, K, 256)
    feats = torch.cat([shape, descriptors.color, descriptors.geometry], dim=-1)  # (B, K, 256 + 6 + G)
    return feats.to(dtype) * descriptors.mask[..., None].to(dtype)


def _region_mean(coverage: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Each region's mean of ``feats (B, N, C)`` weighted by its ``coverage (B, K, N)`` (a region that
    covers no cell gets zeros) → ``(B, K, C)``."""
    weights = coverage / coverage.sum(-1, keepdim=True).clamp_min(1e-6)  # (B, K, N), rows sum to 1
    return weights @ feats  # (B, K, N) @ (B, N, C) -> (B, K, C)


def _coverage(dense: torch.Tensor, k: int, gh: int, gw: int) -> torch.Tensor:
    """``(B, K, gh*gw)`` fraction of each patch cell covered by each label of ``dense (B, H', W')`` (-1
    ignored; a single ``(H', W')`` map gives ``(K, gh*gw)``).

    The maps are resampled (nearest) to ``(gh*sy, gw*sx)`` with ``sy = ceil(H'/gh)``, ``sx = ceil(W'/gw)``,
    never smaller than the input, so every region keeps at least one pixel.
    """
    if dense.dim() == 2:
        return _coverage(dense[None], k, gh, gw)[0]
    b, height, width = dense.shape
    sy, sx = -(-height // gh), -(-width // gw)
    ry = torch.arange(gh * sy, device=dense.device)  # rows of the resampled map
    rx = torch.arange(gw * sx, device=dense.device)
    rows = ((ry + 0.5) * height / (gh * sy)).long().clamp_max(height - 1)  # source row of each row
    cols = ((rx + 0.5) * width / (gw * sx)).long().clamp_max(width - 1)
    same = gh * sy == height and gw * sx == width  # then rows / cols are the identity
    resampled = dense if same else dense[:, rows[:, None], cols[None, :]]  # (B, gh*sy, gw*sx)
    cell = (ry // sy)[:, None] * gw + (rx // sx)[None, :]  # (gh*sy, gw*sx) patch index, row-major
    n = gh * gw
    image = torch.arange(b, device=dense.device)[:, None, None]
    index = (image * k + resampled) * n + cell  # (B, gh*sy, gw*sx) into (B, K, N)
    counts = torch.bincount(index[resampled >= 0], minlength=b * k * n).view(b, k, n)
    return counts.float() / (sy * sx)


def _geometry(dense: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, K, 11)`` region geometry of ``dense (B, H', W')`` in [0, 1] (order: :data:`GEOMETRY_FEATURES`);
    a single ``(H', W')`` map gives ``(K, 11)``. Rows of absent ids hold meaningless values."""
    if dense.dim() == 2:
        return _geometry(dense[None], k)[0]
    b, height, width = dense.shape
    valid = dense >= 0
    bs, ys, xs = torch.nonzero(valid, as_tuple=True)  # row-major, the order of dense[valid]
    lab = bs * k + dense[valid]  # (P,) region of each labelled pixel, per-image blocks of k
    size = b * k
    x = (xs.float() + 0.5) / width  # pixel centres in (0, 1)
    y = (ys.float() + 0.5) / height
    cnt = torch.bincount(lab, minlength=size).float().clamp_min(1)  # (B*K,)

    def mean(v: torch.Tensor) -> torch.Tensor:
        return torch.bincount(lab, weights=v, minlength=size) / cnt  # (B*K,)

    cx, cy = mean(x), mean(y)
    var_x = (mean(x * x) - cx * cx).clamp_min(0)
    var_y = (mean(y * y) - cy * cy).clamp_min(0)
    cov = mean(x * y) - cx * cy
    corr = cov / (var_x * var_y).sqrt().clamp_min(1e-8)
    big = torch.full((size,), 2.0, device=dense.device)
    x0 = big.scatter_reduce(0, lab, xs.float() / width, "amin")  # left edge of the leftmost pixel
    y0 = big.scatter_reduce(0, lab, ys.float() / height, "amin")
    x1 = torch.zeros(size, device=dense.device).scatter_reduce(0, lab, (xs.float() + 1) / width, "amax")
    y1 = torch.zeros(size, device=dense.device).scatter_reduce(0, lab, (ys.float() + 1) / height, "amax")
    area = cnt / (height * width)
    std_x, std_y, corr01 = 2 * var_x.sqrt(), 2 * var_y.sqrt(), (corr.clamp(-1, 1) + 1) / 2
    feats = [cx, cy, x0, y0, x1, y1, area, area.sqrt(), std_x, std_y, corr01]  # GEOMETRY_FEATURES order
    return torch.stack(feats, dim=1).view(b, k, len(GEOMETRY_FEATURES))


def build_projector(cfg: ProjectorConfig) -> VisualProjector:
    """Build the projector ``cfg.kind`` names."""
    if cfg.kind == "patch":
        return PatchProjector(cfg=cfg)
    return SuperpixelProjector(cfg=cfg)


# ------------------------------------------------------------------ the region pointer

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
    presence: bool = field(
        default=False,
        metadata={
            "help": "decide 'no target' with a presence logit of its own (regions then train on "
            "targeted expressions only); false = no region above 0"
        },
    )

    def __post_init__(self) -> None:
        if self.dim is not None and (self.dim < 4 or self.dim % 4):
            raise ConfigError(f"dim: must be a multiple of 4 (>= 4) or null, got {self.dim}")
        if self.layers < 0 or (self.words and self.layers == 0):
            raise ConfigError(f"layers: must be >= 0, and >= 1 with words: true; got {self.layers}")
        if self.presence and self.layers == 0:
            raise ConfigError("presence: read from the mixing layers; needs layers >= 1")


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
        presence: a "the sentence names something here" logit per query (:meth:`scores`) from the
            mixed query state and the max-pool of the mixed region states, apart from the region
            scores, so those can be trained on positives alone. Needs ``layers > 0``.
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
        presence: bool = False,
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
        if presence and not layers:
            raise ConfigError("presence: read from the mixing layers' states; set layers > 0")
        # [mixed query state, max over the mixed region states] -> one logit
        self.presence = (
            nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, 1)) if presence else None
        )
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
        return self.scores(queries, regions, region_mask, words, word_mask)[0]

    def scores(
        self,
        queries: torch.Tensor,
        regions: torch.Tensor,
        region_mask: torch.Tensor,
        words: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Region logits ``(B, T, K)`` (as :meth:`forward`) and, built with ``presence``, the
        presence logits ``(B, T)`` (> 0: the query names something among the regions), else None."""
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
        presence = None
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
            logits, presence = self._mixed_scores(q, r, region_mask.bool(), w)
        logits = logits * self.log_scale.exp() + self.bias
        # (B, K) -> (B, 1, K): the same regions are masked for every query
        return logits.masked_fill(~region_mask.bool()[:, None, :], MASKED_LOGIT), presence

    def _mixed_scores(
        self,
        q: torch.Tensor,
        r: torch.Tensor,
        region_mask: torch.Tensor,
        words: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``q (B, T, D)``, ``r (B, K, D)``, ``region_mask (B, K)`` (+ projected words ``(B, W, D)`` and
        their ``(B, W)`` mask) → ``(B, T, K)`` mixed scores and, with ``presence``, ``(B, T)`` presence
        logits (else None)."""
        assert self.mix is not None
        b, t, d = q.shape
        k = r.shape[1]
        if t == 0 or k == 0:  # nothing to mix; zeros keep the graph
            zero = (q.sum() + r.sum() + (words[0].sum() if words is not None else 0.0)) * 0.0
            found = None if self.presence is None else q.new_full((b, t), MASKED_LOGIT) + zero
            return q.new_zeros(b, t, k) + zero, found
        w, w_mask = words if words is not None else (q.new_zeros(b, 0, d), region_mask.new_zeros(b, 0))
        n = w.shape[1]
        # per query: [q, words, regions + q]: (B, T, 1 + W + K, D) -> (B*T, 1 + W + K, D)
        x = torch.cat(
            [q[:, :, None], w[:, None].expand(b, t, n, d), r[:, None] + q[:, :, None]], dim=2
        ).flatten(0, 1)
        keep = torch.cat([region_mask.new_ones(b, 1), w_mask, region_mask], dim=1)  # (B, 1 + W + K)
        pad = ~keep[:, None].expand(b, t, 1 + n + k).flatten(0, 1)  # (B*T, 1 + W + K), True = ignored
        x = self.mix(x, src_key_padding_mask=pad).view(b, t, 1 + n + k, d)
        states = x[:, :, 1 + n :]  # (B, T, K, D) the mixed region states
        scores = self.score(states).squeeze(-1)  # (B, T, K, D) -> (B, T, K)
        if self.presence is None:
            return scores, None
        real = region_mask[:, None, :, None]  # (B, 1, K, 1)
        pooled = states.masked_fill(~real, MASKED_LOGIT).amax(2)  # (B, T, D)
        pooled = pooled * real.any(2).to(pooled.dtype)  # an image without regions pools zeros
        return scores, self.presence(torch.cat([x[:, :, 0], pooled], -1)).squeeze(-1)  # (B, T)


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
