"""Assemble the parts of a :class:`~mllm_ris.modeling.model.RISModel` from one ``ModelConfig``.

Derived widths (default null: config files choose parts and their sizes, not the widths between
them); each is filled in from the built parts:

* ``head.in_channels`` ← the built pixel encoder's ``channels``;
* ``head.lang_dim`` ← the text encoder's ``dim`` (classic) or ``mllm.seg_dim`` (mllm);
* classic with ``pointer.dim``: ``projector.llm_dim`` ← ``pointer.dim`` (the region tokens' width);
* ``projector.vision_dim`` / ``grid`` ← the built vision tower's ``dim`` / ``grid`` (no tower is
  built with ``projector.tower: false``: tokens come from the region descriptors alone);
  ``projector.llm_dim`` ← the LLM's hidden size;
* ``prompts.grounding_dim`` ← ``head.lang_dim`` (the SAM sparse prompt reads the same queries).

A value given for one of them (YAML, override, a saved folder's ``config.json``) must equal the
derived one, else a :class:`~mllm_ris.errors.ConfigError` names the field
(``head.in_channels: [1, 1, 1, 1] disagrees with the pixel encoder's channels [16, 32, 64, 128];
remove it (it is derived)``); equal values are accepted, so folders saved with the resolved widths
load. A part that is not built derives nothing: its derived widths are null in the resolved config
(a value given for them is dropped: e.g. ``head.*`` in output mode prior, ``projector.vision_dim`` /
``grid`` without a tower, ``prompts.grounding_dim`` without SAM). The resolved config
(``RISModel.cfg``) is what a model folder's ``config.json`` holds.

Classic mode builds the text encoder before the pixel encoder (so a seed gives the initial weights the
pointer-less classic model always had) and freezes its word projection ``text.token_proj`` when
nothing reads the words (a head without ``uses_words``, e.g. LTS, and no ``pointer.words``).

The SAM stage and prompt builder exist only for ``output_mode`` ``sam`` / ``auto``. A ``sam-vit``
pixel encoder whose ``pixel.path`` is null or ``sam.checkpoint`` then **shares SAM's image encoder**
(its ``pixel.sam_*`` sizes are ignored: SAM's ViT and weights are used, and one ViT pass feeds both);
with ``output_mode: direct`` the same config builds its own ViT from ``pixel.path``.
With ``output_mode: prior`` the pixel side (pixel encoder, head, SAM) is not built: the mask is the
region pointer's painted prior, and ``pixel`` / ``sam`` / ``prompts`` stay as given (nothing is
derived for them; ``head``'s and ``prompts``' derived widths are null).

With ``mllm.llava_path`` the LLaVA folder is read once: its LLM and tokenizer go to the grounding
LLM, its vision tower is used unless ``vision.name_or_path`` is set, and its projector weights are
loaded onto ``projector.mlp`` (``strict=False``; what loaded is recorded in ``notes``).

**Query sources.** A :class:`~mllm_ris.modeling.model.RISModel` is a query source and a segmenter
(pixel encoder + head, optional SAM stage; none in output mode prior). The query source is chosen here,
once, by ``model.mode``::

    TextQueries (classic)  texts ──TextEncoder──► words (B, L, D) + one query (B, 1, D)
        (pointer.dim)      region descriptors ──projector──► regions (B, K, Dp)
                           query, words, regions ──RegionPointer──► region logits (B, 1, K)
    LLMQueries (mllm)      images ──VisionTower (projector.tower)──► (B, N, Cv) ──projector──► VisualTokens
                           chat ──GroundingMLLM──► [SEG] embeddings (B, T, Dg), reject logit (B,), LM loss
        (mllm.pointer_dim) region logits (B, T, K)

Region logits are painted through the superpixels into the prior ``(B, T, S, S)`` the head refines.
Each source answers what the model asks of it (:class:`QuerySource`): the queries of a training batch
(``teacher_forced``) or of an inference batch (``decode``), the targets its queries are trained on
(and its language-side loss terms), the prior-mode masks and the "no target" probability. A source is
a plain object, not a module: its parts stay registered on the model under their own names
(``parts()``: ``text_encoder``, ``vision``, ``projector``, ``mllm``, ``pointer``), so the state-dict
keys are those of the parts alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.projector import (
    MASKED_LOGIT,
    RegionPointer,
    VisualProjector,
    VisualTokens,
    build_projector,
    paint_regions,
)
from mllm_ris.processing.processor import MLLMBatch, RISBatch, answer_text
from s2rm_head.types import LanguageFeatures

# the parts a config may not use are imported where they are built
if TYPE_CHECKING:
    from torch import nn

    from mllm_ris.modeling.mllm import GroundingMLLM
    from mllm_ris.modeling.model_config import LossConfig, ModelConfig
    from mllm_ris.modeling.vision import VisionTower
    from s2rm_head.encoders.pixel import PixelEncoder
    from s2rm_head.encoders.text import TextEncoder
    from s2rm_head.sam.stage import SAMStage

__all__ = [
    "PRIOR_CLAMP",
    "QUERY_PARTS",
    "BuiltParts",
    "LLMQueries",
    "PairTargets",
    "Queries",
    "QuerySource",
    "TextQueries",
    "build_parts",
    "tower_features",
]


@dataclass
class BuiltParts:
    """Keyword arguments of ``RISModel(...)`` and one line per weight file loaded on the way."""

    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` (re-runs the config's checks)."""
    return dataclasses.replace(cfg, **changes)


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _derive(section: str, cfg: Any, **derived: tuple[Any, str]) -> Any:
    """``cfg`` with each derived field ``name`` set to ``derived[name] = (value, where it comes from)``.

    Raises:
        ConfigError: a field already set to another value (``section.name: ... disagrees with ...``).
    """
    for name, (value, source) in derived.items():
        given = getattr(cfg, name)
        if given is not None and given != value:
            raise ConfigError(
                f"{section}.{name}: {_shown(given)} disagrees with {source} {_shown(value)}; "
                "remove it (it is derived)"
            )
    return _replace(cfg, **{name: value for name, (value, _) in derived.items()})


def _cleared(cfg: Any, *names: str) -> Any:
    """``cfg`` with the derived fields ``names`` null: their part is not built, nothing derives them."""
    return _replace(cfg, **dict.fromkeys(names))


def _pixel_encoder(cfg: ModelConfig, stage: SAMStage | None) -> tuple[PixelEncoder, bool]:
    """The pixel encoder, and whether it shares the SAM stage's ViT."""
    from s2rm_head.encoders.pixel import SAMViTEncoder, build_pixel_encoder

    pixel = cfg.pixel
    if pixel.name == "sam-vit" and stage is not None and pixel.path in (None, cfg.sam.checkpoint):
        if pixel.sam_freeze_vit != cfg.sam.freeze_image_encoder:
            raise ConfigError(
                f"pixel.sam_freeze_vit: {pixel.sam_freeze_vit}, sam.freeze_image_encoder: "
                f"{cfg.sam.freeze_image_encoder}; the pixel encoder shares SAM's ViT, set both the same"
            )
        vit = stage.sam.image_encoder
        encoder = SAMViTEncoder(
            vit=vit, pyramid_channels=pixel.sam_pyramid_channels, freeze_vit=pixel.sam_freeze_vit
        )
        return encoder, True
    return build_pixel_encoder(pixel), False


def _load_projector_mlp(projector: VisualProjector, state: dict[str, torch.Tensor], source: str) -> str:
    """Load LLaVA's ``mlp.*`` tensors onto ``projector.mlp`` (non-strict); return a report line."""
    sub = {k.removeprefix("mlp."): v for k, v in state.items()}
    try:
        result = projector.mlp.load_state_dict(sub, strict=False)
    except RuntimeError as exc:  # mis-shaped tensors
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(f"llava_path {source!r}: projector weights do not fit: {first}") from None
    loaded = sorted(f"mlp.{k}" for k in sub if k not in result.unexpected_keys)
    return (
        f"projector.mlp: {len(loaded)} tensors from {source} ({', '.join(loaded)}); "
        f"missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}"
    )


def _mllm_side(
    cfg: ModelConfig, mllm: GroundingMLLM | None, notes: list[str]
) -> tuple[VisionTower | None, GroundingMLLM, dict[str, torch.Tensor]]:
    """Vision tower (None when ``projector.tower`` is off), grounding LLM and (from a LLaVA folder)
    projector weights; LLaVA read at most once."""
    from mllm_ris.modeling.mllm import build_grounding_mllm

    m = cfg.mllm
    vision: VisionTower | None = None
    projector_state: dict[str, torch.Tensor] = {}
    if m.llava_path is not None and (mllm is None or cfg.vision.name_or_path is None):
        from mllm_ris.modeling.llava import load_llava_checkpoint

        parts = load_llava_checkpoint(m.llava_path, freeze_vision=cfg.vision.freeze, dtype=m.dtype)
        if mllm is None:
            mllm = build_grounding_mllm(m, llm=parts.llm, tokenizer=parts.tokenizer)
            notes.append(f"mllm: language model from {m.llava_path}")
        if cfg.vision.name_or_path is None:
            vision = parts.vision
            notes.append(f"vision: tower from {m.llava_path} (feature layer {parts.vision.feature_layer})")
        projector_state = parts.projector_state
    if mllm is None:
        mllm = build_grounding_mllm(m)
    if not cfg.projector.tower:  # region tokens from the descriptors alone: no tower to build or run
        return None, mllm, {}
    if vision is None:
        from mllm_ris.modeling.vision import build_vision_tower

        vision = build_vision_tower(cfg.vision)
        if cfg.vision.name_or_path is not None:
            notes.append(f"vision: tower from {cfg.vision.name_or_path}")
    if mllm.seg_dim != m.seg_dim:
        raise ConfigError(f"mllm.seg_dim: {m.seg_dim}, the given grounding LLM has {mllm.seg_dim}")
    return vision, mllm, projector_state


def _check_classic_pointer(cfg: ModelConfig) -> None:
    """Classic mode's pointer needs the descriptor-only superpixel projector (checked before it is built)."""
    proj = cfg.projector
    if proj.kind != "superpixel" or not proj.descriptors or proj.tower:
        raise ConfigError(
            "pointer.dim: classic mode's pointer reads region tokens from the descriptors alone; set "
            "projector.kind superpixel, projector.descriptors true, projector.tower false"
        )


def _classic_pointer(cfg: ModelConfig, text_dim: int) -> RegionPointer:
    """Classic mode's region pointer: the sentence query (and words) of width ``text_dim`` against the
    superpixel projector's region tokens of width ``pointer.dim`` (descriptors alone, no tower)."""
    ptr = cfg.pointer  # the projector was checked first (_check_classic_pointer)
    assert ptr.dim is not None
    return RegionPointer(
        query_dim=text_dim,
        region_dim=ptr.dim,
        dim=ptr.dim,
        layers=ptr.layers,
        word_dim=text_dim if ptr.words else None,
        presence=ptr.presence,
    )


def _text_queries(cfg: ModelConfig, text: TextEncoder) -> tuple[TextQueries, Any]:
    """Classic mode's query source around the built ``text`` encoder (with ``pointer.dim``: the
    descriptor-only projector and the region pointer) and the resolved projector config."""
    if cfg.pointer.dim is None:  # no projector
        return TextQueries(text), _cleared(cfg.projector, "vision_dim", "llm_dim", "grid")
    _check_classic_pointer(cfg)
    proj_cfg = _derive("projector", cfg.projector, llm_dim=(cfg.pointer.dim, "pointer.dim"))
    proj_cfg = _cleared(proj_cfg, "vision_dim", "grid")  # no tower
    return TextQueries(text, build_projector(proj_cfg), _classic_pointer(cfg, text.dim)), proj_cfg


def _llm_queries(cfg: ModelConfig, mllm: GroundingMLLM | None, notes: list[str]) -> tuple[LLMQueries, Any]:
    """Mllm mode's query source (vision tower when ``projector.tower``, projector, grounding LLM) and
    the resolved projector config."""
    if cfg.pointer.dim is not None:
        raise ConfigError("pointer.dim: the classic-mode pointer; in mllm mode set mllm.pointer_dim instead")
    if cfg.mllm.pointer_dim is not None and cfg.projector.kind != "superpixel":
        raise ConfigError(
            "mllm.pointer_dim: the region pointer needs projector.kind superpixel, "
            f"got {cfg.projector.kind!r}"
        )
    vision, mllm, projector_state = _mllm_side(cfg, mllm, notes)
    proj_cfg = _derive("projector", cfg.projector, llm_dim=(mllm.hidden_size, "the LLM's hidden size"))
    if vision is not None:
        where = "the vision tower's"
        proj_cfg = _derive(
            "projector",
            proj_cfg,
            vision_dim=(vision.dim, f"{where} width"),
            grid=(vision.grid, f"{where} grid"),
        )
    else:
        proj_cfg = _cleared(proj_cfg, "vision_dim", "grid")
    projector = build_projector(proj_cfg)
    if projector_state:
        notes.append(_load_projector_mlp(projector, projector_state, str(cfg.mllm.llava_path)))
    return LLMQueries(vision, projector, mllm), proj_cfg


def build_parts(cfg: ModelConfig, *, mllm: GroundingMLLM | None = None) -> BuiltParts:
    """Build every part ``cfg`` asks for (rules in the module doc); ``mllm`` replaces ``cfg.mllm``'s."""
    notes: list[str] = []
    stage = builder = None
    if cfg.output_mode in ("sam", "auto"):
        from s2rm_head.sam.stage import build_sam_stage

        stage = build_sam_stage(cfg.sam)
        if cfg.sam.checkpoint is not None:
            notes.append(f"sam: {cfg.sam.variant} weights from {cfg.sam.checkpoint}")
    # classic: the text encoder is built before the pixel encoder (the order the pointer-less classic
    # model has always drawn its random initial weights in: a seed gives the same model as before)
    text = None
    if cfg.mode == "classic":
        from s2rm_head.encoders.text import build_text_encoder

        text = build_text_encoder(cfg.text)
    pixel, share = _pixel_encoder(cfg, stage) if cfg.output_mode != "prior" else (None, False)
    if share:
        notes.append("pixel: sam-vit pyramid over SAM's image encoder (shared)")
    resolved: dict[str, Any] = {}
    queries: QuerySource
    if text is not None:
        queries, resolved["projector"] = _text_queries(cfg, text)
        lang_dim, lang_source = text.dim, "the text encoder's width"
    else:
        llm_queries, resolved["projector"] = _llm_queries(cfg, mllm, notes)
        queries, lang_dim, lang_source = llm_queries, llm_queries.mllm.seg_dim, "the grounding LLM's seg_dim"
    head = None
    if pixel is not None:  # the pixel side (not in output mode prior)
        from s2rm_head.heads.registry import build_head

        head_cfg = _derive(
            "head",
            cfg.head,
            in_channels=(tuple(pixel.channels), "the pixel encoder's channels"),
            lang_dim=(lang_dim, lang_source),
        )
        head = build_head(head_cfg)
    else:
        head_cfg = _cleared(cfg.head, "in_channels", "lang_dim")
    head_words = head is not None and head.uses_words
    pointer_words = cfg.pointer.dim is not None and cfg.pointer.words
    if text is not None and not head_words and not pointer_words:  # e.g. LTS reads only the sentence
        text.token_proj.requires_grad_(False)  # query: the unused word projection stays out of training
    if stage is not None:
        from s2rm_head.sam.prompts import build_prompt_builder

        resolved["prompts"] = _derive(
            "prompts", cfg.prompts, grounding_dim=(lang_dim, f"head.lang_dim ({lang_source})")
        )
        builder = build_prompt_builder(resolved["prompts"], stage.sam)
    else:
        resolved["prompts"] = _cleared(cfg.prompts, "grounding_dim")
    kwargs: dict[str, Any] = dict(
        cfg=_replace(cfg, head=head_cfg, **resolved),
        queries=queries,
        pixel_encoder=pixel,
        head=head,
        loss=cfg.loss,
        sam_stage=stage,
        prompt_builder=builder,
        share_sam_vit=share,
    )
    return BuiltParts(kwargs=kwargs, notes=notes)


# ----------------------------------------------------------------------------- query sources

PRIOR_CLAMP = 20.0  # region-prior logits are clamped to +-this before the head's residual is added
QUERY_PARTS = ("text_encoder", "vision", "projector", "mllm", "pointer")  # names on RISModel, in order
_BEST_REGION_LOGIT = 0.01  # the logit a query's best region is raised to when none is above 0 (prior mode)


@dataclass
class Queries:
    """Language side of one batch: head input, SAM's sparse-prompt queries and the source's extras."""

    lang: LanguageFeatures
    reject_logit: torch.Tensor | None = None  # (B,) mllm only
    lm_loss: torch.Tensor | None = None
    text: list[str] | None = None
    region_logits: torch.Tensor | None = None  # (B, T, K) pointer scores
    region_mask: torch.Tensor | None = None  # (B, K) real regions
    region_labels: torch.Tensor | None = None  # (B, S, S) region id per pixel, -1 = none
    prior: torch.Tensor | None = None  # (B, T, S, S) clamped painted scores
    presence_logits: torch.Tensor | None = None  # (B, 1, K) mllm.reject_from pointer: the reject query
    # (B, T) bool: queries whose mask is the prior alone, no head residual: with mllm.complete_groups
    # the queries of group answers, whose regions that rule shares out (LLMQueries.decode)
    prior_only: torch.Tensor | None = None


@dataclass
class PairTargets:
    """What a batch's query slots are trained on: ``targets (B, T, S, S)`` in query order,
    ``pair_valid (B, T)`` (the slots with a loss), ``has_target (B, T)`` and the source's own
    language-side loss ``terms`` (weighted; mllm: ``lm``, ``no_target``)."""

    targets: torch.Tensor
    pair_valid: torch.Tensor
    has_target: torch.Tensor
    terms: dict[str, torch.Tensor]


class QuerySource(Protocol):
    """What :class:`~mllm_ris.modeling.model.RISModel` asks of the part that makes its queries."""

    mode: str  # the ``model.mode`` it implements: classic / mllm

    def parts(self) -> dict[str, nn.Module]:
        """The modules it holds by their names on the model (a subset of :data:`QUERY_PARTS`)."""
        ...

    def visual_tokens(self, batch: MLLMBatch) -> VisualTokens:
        """The batch's region / patch tokens ``(B, K, D)`` (those its pointer or LLM reads)."""
        ...

    def teacher_forced(self, batch: RISBatch) -> Queries:
        """The queries of a training batch (mllm: answered chats, with the LM loss)."""
        ...

    def decode(self, batch: RISBatch, *, max_new_tokens: int, reject_threshold: float | None) -> Queries:
        """The queries of an inference batch (mllm: the answers are generated)."""
        ...

    def pair_targets(
        self, batch: RISBatch, q: Queries, mask_logits: torch.Tensor | None, loss: LossConfig
    ) -> PairTargets:
        """The targets of ``q``'s query slots; ``mask_logits (B, T, h, w)`` (None without the pixel
        side) may reorder them (``loss.match_targets``)."""
        ...

    def prior_masks(self, q: Queries) -> torch.Tensor:
        """Output mode ``prior``: the mask logits ``(B, T, S, S)`` from ``q``'s (non-empty) region logits."""
        ...

    def no_target_prob(self, q: Queries, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(B,)`` probability that nothing matches, from ``q`` or the final ``masks (B, T, S, S)``."""
        ...


def tower_features(
    vision: VisionTower | None, projector: VisualProjector | None, images: torch.Tensor
) -> torch.Tensor | None:
    """Images ``(B, 3, S, S)`` (the letterbox, [0, 1] RGB) → the vision tower's patch features
    ``(B, N, Cv)`` in the projector's dtype; None without a tower (``projector.tower`` false)."""
    if vision is None or projector is None:
        return None
    feats = vision(vision.preprocess(images))  # (B, N, Cv): resized, the tower's mean / std
    return feats.to(next(projector.parameters()).dtype)  # a bf16 tower feeds a fp32 projector


def _project(projector: VisualProjector, feats: torch.Tensor | None, batch: MLLMBatch) -> VisualTokens:
    """Tower features ``(B, N, Cv)`` (None: descriptors alone) → ``VisualTokens (B, K, D)``."""
    if projector.cfg.kind == "superpixel" and batch.superpixels is None:
        raise ValueError("superpixels: the batch has none, but projector.kind is superpixel")
    if projector.cfg.kind == "superpixel":  # + region descriptors, and the image image_encoder reads
        return projector(feats, batch.superpixels, batch.regions, batch.images)  # (B, K, D), (B, K)
    return projector(feats, batch.superpixels)


def _canvas_labels(projector: VisualProjector, batch: MLLMBatch) -> torch.Tensor:
    """The batch's superpixels as region ids in token order ``(B, S, S)`` (-1 = none), on the canvas."""
    assert batch.superpixels is not None
    labels = projector.region_labels(batch.superpixels)
    if labels.shape[-2:] != batch.images.shape[-2:]:
        raise ValueError(
            f"superpixels: {tuple(labels.shape[-2:])} label maps, but the canvas is "
            f"{tuple(batch.images.shape[-2:])}: the prior is painted on the canvas"
        )
    return labels


def _add_prior(
    q: Queries,
    projector: VisualProjector,
    batch: MLLMBatch,
    region_logits: torch.Tensor,
    region_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> None:
    """Paint ``region_logits (B, T, K)`` through the batch's superpixels (in token order) into the
    region prior ``(B, T, S, S)`` the head refines; ``labels``: :func:`_canvas_labels` when the caller
    has them already."""
    if labels is None:
        labels = _canvas_labels(projector, batch)
    q.region_logits, q.region_mask, q.region_labels = region_logits, region_mask, labels
    q.prior = paint_regions(region_logits, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)


class TextQueries:
    """Classic mode: one expression per image (``T = 1``) through the text encoder; with the region
    pointer (``pointer.dim``, a descriptor-only ``projector``) also its scores of the batch's regions.

    A multi-target expression is trained on the union of its targets. Without ``pointer.presence`` a
    no-target one is trained on an empty mask (all its regions negatives) and an empty predicted mask
    means "no target"; with it the pointer's presence logit decides "no target" (``reject_logit``, the
    ``no_target`` loss) and the regions and masks train on targeted expressions only."""

    mode = "classic"

    def __init__(
        self,
        text_encoder: TextEncoder,
        projector: VisualProjector | None = None,
        pointer: RegionPointer | None = None,
    ) -> None:
        if text_encoder is None:
            raise ConfigError("mode: classic needs a text encoder and no vision tower / mllm")
        if (projector is None) != (pointer is None):
            raise ConfigError("mode: classic takes a projector exactly with its region pointer (pointer.dim)")
        self.text_encoder, self.projector, self.pointer = text_encoder, projector, pointer

    def parts(self) -> dict[str, nn.Module]:
        found = {"text_encoder": self.text_encoder, "projector": self.projector, "pointer": self.pointer}
        return {name: part for name, part in found.items() if part is not None}

    def visual_tokens(self, batch: MLLMBatch) -> VisualTokens:
        """The pointer's region tokens ``(B, K, pointer.dim)`` from the descriptors (and the image CNN's
        pooled features, ``projector.image_encoder``; no tower), in the projector's dtype."""
        assert self.projector is not None
        return _project(self.projector, None, batch)

    def teacher_forced(self, batch: RISBatch) -> Queries:
        """The text encoder's words ``(B, L, D)`` and sentence query ``(B, 1, D)``; with the region
        pointer also its scores ``(B, 1, K)`` of the batch's region tokens and their painted prior."""
        if batch.images.shape[0] != len(batch.texts):
            raise ValueError(
                f"images: {batch.images.shape[0]}, texts: {len(batch.texts)}; need one expression per image"
            )
        q = Queries(lang=self.text_encoder.encode(batch.texts, device=batch.images.device))
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
        logits, found = self.pointer.scores(
            lang.queries, vis.embeds, vis.mask, words=lang.tokens, word_mask=lang.mask
        )  # (B, 1, K), (B, 1) or None
        if found is not None:
            q.reject_logit = -found[:, 0]  # (B,) > 0: nothing named is here
        _add_prior(q, self.projector, batch, logits, vis.mask)  # (B, 1, K) -> prior (B, 1, S, S)
        return q

    def decode(self, batch: RISBatch, *, max_new_tokens: int, reject_threshold: float | None) -> Queries:
        """The same queries as for training (nothing is generated; both options are the LLM's)."""
        return self.teacher_forced(batch)

    def pair_targets(
        self, batch: RISBatch, q: Queries, mask_logits: torch.Tensor | None, loss: LossConfig
    ) -> PairTargets:
        """One query per expression, trained on the union. Without a presence logit: no-target ones on
        an empty mask (their regions all negatives of the pointer's losses), no terms of its own; with
        it: targeted ones only, and the ``no_target`` term on the presence logit."""
        has = batch.has_target[:, None]  # (B, 1)
        if q.reject_logit is None:
            terms, valid = {}, torch.ones_like(has)
        else:
            from mllm_ris.modeling.losses import no_target_loss

            reject = q.reject_logit
            term = no_target_loss(reject, batch.has_target, loss.no_target, loss.no_target_pos_weight)
            terms, valid = {"no_target": term}, has
        return PairTargets(
            targets=batch.targets[:, None],  # (B, S, S) -> (B, 1, S, S)
            pair_valid=valid,  # (B, 1)
            has_target=has,
            terms=terms,
        )

    def prior_masks(self, q: Queries) -> torch.Tensor:
        """The prior itself (no region above 0 means no target); with a presence logit also nothing
        where it finds no target (``reject_logit > 0``)."""
        assert q.prior is not None
        if q.reject_logit is None:
            return q.prior
        return q.prior.masked_fill((q.reject_logit > 0)[:, None, None, None], -PRIOR_CLAMP)

    def no_target_prob(self, q: Queries, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``1 - sigmoid(max valid logit of masks)``, > 0.5 exactly when the mask is empty; with a
        presence logit the larger of that and ``sigmoid(reject_logit)`` (the predictor then answers "no
        target" above 0.5: an empty mask or the presence logit)."""
        best = masks[:, 0].masked_fill(~valid, float("-inf")).flatten(1).amax(1)  # (B,)
        empty = 1.0 - torch.sigmoid(best.float())
        if q.reject_logit is None:
            return empty
        return torch.maximum(empty, torch.sigmoid(q.reject_logit.float()))


class LLMQueries:
    """Mllm mode: the visual tokens (vision tower when ``projector.tower``, projector) spliced into the
    chat; the grounding LLM gives one query per ``[SEG]``, its reject logit and (``mllm.pointer_dim``)
    its region pointer's scores."""

    mode = "mllm"

    def __init__(self, vision: VisionTower | None, projector: VisualProjector, mllm: GroundingMLLM) -> None:
        if projector is None or mllm is None:
            raise ConfigError("mode: mllm needs a projector and mllm and no text encoder")
        if (vision is None) == projector.cfg.tower:
            raise ConfigError("mode: mllm needs a vision tower exactly when projector.tower is on")
        self.vision, self.projector, self.mllm = vision, projector, mllm

    def parts(self) -> dict[str, nn.Module]:
        found = {"vision": self.vision, "projector": self.projector, "mllm": self.mllm}
        return {name: part for name, part in found.items() if part is not None}

    def visual_tokens(self, batch: MLLMBatch) -> VisualTokens:
        """Images ``(B, 3, S, S)`` (the letterbox, [0, 1] RGB) → ``VisualTokens (B, K, D_llm)`` in the
        LLM's embedding dtype."""
        feats = tower_features(self.vision, self.projector, batch.images)  # None: descriptors alone
        vis = _project(self.projector, feats, batch)
        # parameters(), not .weight: on peft's token-row wrapper .weight builds the merged matrix
        dtype = next(self.mllm.llm.get_input_embeddings().parameters()).dtype
        return VisualTokens(embeds=vis.embeds.to(dtype), mask=vis.mask)

    @staticmethod
    def _checked(batch: RISBatch) -> MLLMBatch:
        if not isinstance(batch, MLLMBatch) or batch.input_ids is None or batch.attention_mask is None:
            raise ValueError("batch: mllm mode needs an MLLMBatch with input_ids (use Processor)")
        return batch

    def teacher_forced(self, batch: RISBatch) -> Queries:
        """The ``[SEG]`` states of the answered chats (``Processor(answers=True)``), with the LM loss."""
        batch = self._checked(batch)
        vis = self.visual_tokens(batch)
        labels = batch.labels
        if labels is None or not (labels != -100).any(dim=1).all():
            raise ValueError(
                "batch: forward() trains on answered chats (Processor(answers=True)); "
                "use generate() for prompts"
            )
        counts = batch.target_counts if batch.target_valid is not None else None
        out = self.mllm(
            batch.input_ids, batch.attention_mask, vis, labels, target_counts=counts, answer_logits=True
        )
        q = self._queries(out.seg_embeds, out.seg_valid, out.word_states, out.word_mask)
        q.reject_logit, q.lm_loss, q.presence_logits = out.reject_logit, out.loss, out.presence_logits
        if out.region_logits is not None:
            _add_prior(q, self.projector, batch, out.region_logits, vis.mask)
        return q

    def decode(self, batch: RISBatch, *, max_new_tokens: int, reject_threshold: float | None) -> Queries:
        """Generate the answers of the prompts (``Processor(answers=False)``): one query per ``[SEG]``;
        ``reject_threshold`` (``model.reject_threshold``) lets the reject head overrule the text."""
        batch = self._checked(batch)
        vis = self.visual_tokens(batch)
        gen = self.mllm.generate(batch.input_ids, batch.attention_mask, vis, max_new_tokens=max_new_tokens)
        seg, seg_valid, reject, text = gen.seg_embeds, gen.seg_valid, gen.reject_logit, gen.text
        region_logits = gen.region_logits
        if gen.presence_logits is not None and gen.presence_embed is not None:
            seg, seg_valid, region_logits, text = _answer_present(
                reject_threshold,
                reject,
                gen.presence_logits,
                gen.presence_embed,
                seg,
                seg_valid,
                region_logits,
                text,
            )
        seg_valid, text = _apply_reject_threshold(reject_threshold, reject, seg_valid, text)
        labels = None if region_logits is None else _canvas_labels(self.projector, batch)  # (B, S, S)
        presence, presence_embed = gen.presence_logits, gen.presence_embed
        added = None
        if self.mllm.cfg.complete_groups and presence is not None and presence_embed is not None:
            assert region_logits is not None and labels is not None  # the presence query is the pointer's
            seg, seg_valid, region_logits, text, added = _complete_groups(
                GroupAnswer(seg, seg_valid, region_logits, text),
                presence,
                presence_embed,
                labels,
                vis.mask,
            )
        q = self._queries(seg, seg_valid, gen.word_states, gen.word_mask)
        q.reject_logit, q.text, q.presence_logits = reject, text, gen.presence_logits
        if added is not None and added.any():  # nor are they words a head reads (B, L = L_words + T)
            t = added.shape[1]
            mask = q.lang.mask.clone()
            mask[:, -t:] &= ~added
            q.lang = q.lang._replace(mask=mask)
        if added is not None:  # a group answer (two or more queries after completion) keeps its prior:
            # its regions were shared out by _complete_groups, while a head trained with one target per
            # [SEG] cuts a query's prior down to one object, and the objects it drops go missing
            q.prior_only = group_queries(seg_valid)
        if region_logits is not None:
            _add_prior(q, self.projector, batch, region_logits, vis.mask, labels)
        return q

    @staticmethod
    def _queries(
        seg: torch.Tensor, seg_valid: torch.Tensor, words: torch.Tensor | None, word_mask: torch.Tensor | None
    ) -> Queries:
        """Each (image, ``[SEG]``) pair is one query; the head's "words" are the sample's ``[SEG]``
        embeddings, after the prompt's text-token states when ``mllm.word_states`` is on."""
        tokens, mask = seg, seg_valid
        if words is not None and word_mask is not None:
            tokens, mask = torch.cat([words, seg], dim=1), torch.cat([word_mask, seg_valid], dim=1)
        return Queries(lang=LanguageFeatures(tokens=tokens, mask=mask, queries=seg, query_mask=seg_valid))

    def pair_targets(
        self, batch: RISBatch, q: Queries, mask_logits: torch.Tensor | None, loss: LossConfig
    ) -> PairTargets:
        """One slot per target mask (matched to the queries by ``mask_logits`` when
        ``loss.match_targets``); terms ``lm`` and ``no_target``."""
        from mllm_ris.modeling.losses import match_targets, no_target_loss

        assert isinstance(batch, MLLMBatch) and batch.target_masks is not None
        assert q.lm_loss is not None and q.reject_logit is not None and batch.target_valid is not None
        targets, pair_valid = batch.target_masks, batch.target_valid  # (B, T, S, S), (B, T)
        if loss.match_targets and mask_logits is not None:
            order = match_targets(mask_logits, targets, pair_valid, batch.valid)  # (B, T)
            targets = targets.gather(1, order[..., None, None].expand_as(targets))
        terms = {
            "lm": loss.lm * q.lm_loss,
            "no_target": no_target_loss(
                q.reject_logit, batch.has_target, loss.no_target, loss.no_target_pos_weight
            ),
        }
        return PairTargets(targets=targets, pair_valid=pair_valid, has_target=pair_valid, terms=terms)

    def prior_masks(self, q: Queries) -> torch.Tensor:
        """Each query's best region at least painted: the answer decided that there is a target."""
        assert q.region_logits is not None and q.region_labels is not None
        return _best_region_painted(q.region_logits, q.region_labels)

    def no_target_prob(self, q: Queries, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The sigmoid of the reject logit."""
        assert q.reject_logit is not None
        return torch.sigmoid(q.reject_logit.float())


def _answer_present(
    threshold: float | None,
    reject_logit: torch.Tensor,
    presence: torch.Tensor,
    presence_embed: torch.Tensor,
    seg: torch.Tensor,
    seg_valid: torch.Tensor,
    region_logits: torch.Tensor | None,
    text: list[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
    """``mllm.reject_from: pointer``: the pointer decides both ways. A row whose answer has no
    ``[SEG]`` although its presence query finds a region (``sigmoid(reject_logit) <= threshold``)
    answers :func:`answer_text` (1) with one query: the prompt state's embedding ``presence_embed
    (B, Dg)`` and region logits ``presence (B, 1, K)`` (the union of what the sentence names). The
    other way, an answer with ``[SEG]`` whose presence query finds nothing, is
    :func:`_apply_reject_threshold`'s.
    ``seg (B, T, Dg)``, ``seg_valid (B, T)`` and ``region_logits (B, T, K)`` grow to ``T = 1`` when
    needed. With ``threshold`` (``model.reject_threshold``) null the answer's text decides alone."""
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


class GroupAnswer(NamedTuple):
    """The generated queries of a batch: ``seg (B, T, Dg)``, ``seg_valid (B, T)``, ``region_logits
    (B, T, K)`` and the answers' ``text``."""

    seg: torch.Tensor
    seg_valid: torch.Tensor
    region_logits: torch.Tensor
    text: list[str]
    added: torch.Tensor | None = None  # (B, T) bool: a query _complete_groups added (not a [SEG])


def group_queries(seg_valid: torch.Tensor) -> torch.Tensor:
    """``seg_valid (B, T)`` → ``(B, T)`` bool: the real queries of rows with two or more of them."""
    return seg_valid & (seg_valid.sum(1, keepdim=True) >= 2)


def _complete_groups(
    answer: GroupAnswer,
    presence: torch.Tensor,
    presence_embed: torch.Tensor,
    labels: torch.Tensor,
    region_mask: torch.Tensor,
) -> GroupAnswer:
    """``mllm.complete_groups``: a row whose answer has two or more ``[SEG]`` (a group)
    - gives each ``[SEG]`` regions of its own (:func:`_distinct_regions`) and drops one that repeats
      another's object: the tiny LLM repeats an object ("all crosses": the same cross twice);
    - adds one query per connected group of regions (4-neighbours in ``labels (B, S, S)``) that the
      presence query ``presence (B, 1, K)`` selects (logit > 0) and no ``[SEG]`` covers: the LLM's
      count falls short on groups of three or more. Its embedding is ``presence_embed (B, Dg)`` and its
      region logits the presence logits on the group (``MASKED_LOGIT`` elsewhere).
    ``region_mask (B, K)``: the real regions. Other rows are unchanged; the text of a changed row is
    :func:`answer_text` of its new count."""
    seg, seg_valid, region_logits, text, _ = answer
    if region_logits.shape[-1] == 0:
        return answer
    entries: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per row: (embedding, logits (K,))
    added: list[int] = []  # per row: how many group queries were appended
    text, changed = list(text), False
    for b in range(seg.shape[0]):
        slots = seg_valid[b].nonzero()[:, 0].tolist()
        row = [(seg[b, t], region_logits[b, t]) for t in slots]
        added.append(0)
        if len(slots) >= 2:
            real = region_mask[b]
            own = _distinct_regions(torch.stack([logits for _, logits in row]), real)  # (n, K)
            kept = [(row[i][0], row[i][1].masked_fill(~regions, MASKED_LOGIT)) for i, regions in own]
            covered = torch.stack([regions for _, regions in own]).any(0)  # (K,)
            dropped = len(kept) < len(row)
            groups = _connected_regions((presence[b, 0] > 0) & real & ~covered, labels[b])
            for group in groups:
                logits = presence[b, 0].masked_fill(~group, MASKED_LOGIT).to(region_logits.dtype)
                kept.append((presence_embed[b].to(seg.dtype), logits))
                added[b] += 1
            changed = True
            if dropped or groups:
                text[b] = answer_text(len(kept))
            row = kept
        entries.append(row)
    if not changed:
        return answer
    width = max(len(row) for row in entries)
    new_seg = seg.new_zeros(seg.shape[0], width, seg.shape[2])
    new_valid = seg_valid.new_zeros(seg.shape[0], width)
    new_logits = region_logits.new_full((seg.shape[0], width, region_logits.shape[2]), MASKED_LOGIT)
    new_added = seg_valid.new_zeros(seg.shape[0], width)
    for b, row in enumerate(entries):
        for t, (emb, logits) in enumerate(row):
            new_seg[b, t], new_logits[b, t], new_valid[b, t] = emb, logits, True
        new_added[b, len(row) - added[b] : len(row)] = True  # the group queries come last
    return GroupAnswer(new_seg, new_valid, new_logits, text, new_added)


def _distinct_regions(logits: torch.Tensor, real: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """The regions of each ``[SEG]`` of a group answer, ``logits (n, K)``, ``real (K,)``: every
    ``[SEG]`` first gets a seed region of its own, greedily by logit over the pairs of a free
    ``[SEG]`` and a free region; one whose seed scores <= 0 repeats an object another ``[SEG]`` names
    and is dropped (the best pair always stays). Every other region a kept ``[SEG]`` selects (logit > 0)
    goes to the kept one scoring it highest. Returns ``(index, regions (K,) bool)`` per kept ``[SEG]``,
    in answer order."""
    scores = logits.float().masked_fill(~real, float("-inf"))  # (n, K)
    free = scores.clone()
    seeds: dict[int, int] = {}
    for _ in range(min(scores.shape)):
        best = free.argmax()
        i, k = divmod(int(best), scores.shape[1])
        if free[i, k] == float("-inf") or (seeds and free[i, k] <= 0):
            break
        seeds[i] = k
        free[i, :], free[:, k] = float("-inf"), float("-inf")
    order = sorted(seeds)
    mine = scores[order]  # (m, K)
    owner = mine.argmax(0)  # (K,) the kept [SEG] scoring each region highest
    shared = (mine > 0).any(0) & real
    shared[list(seeds.values())] = False
    out = []
    for j, i in enumerate(order):
        regions = shared & (owner == j)
        regions[seeds[i]] = True
        out.append((i, regions))
    return out


def _connected_regions(chosen: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The connected groups ``(K,)`` bool of the regions ``chosen (K,)``, two regions being
    connected when their pixels touch (4-neighbours) in ``labels (S, S)`` (ids, -1 = none); in
    order of their first region."""
    ids = chosen.nonzero()[:, 0].tolist()
    if not ids:
        return []
    neighbours: dict[int, set[int]] = {k: set() for k in ids}
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        touch = (a != b) & (a >= 0) & (b >= 0)
        for x, y in zip(a[touch].tolist(), b[touch].tolist(), strict=True):
            if x in neighbours and y in neighbours:
                neighbours[x].add(y)
                neighbours[y].add(x)
    groups, seen = [], set()
    for start in ids:
        if start in seen:
            continue
        stack, members = [start], []
        seen.add(start)
        while stack:
            k = stack.pop()
            members.append(k)
            for n in neighbours[k] - seen:
                seen.add(n)
                stack.append(n)
        group = torch.zeros_like(chosen)
        group[members] = True
        groups.append(group)
    return groups


def _apply_reject_threshold(
    threshold: float | None, reject_logit: torch.Tensor, seg_valid: torch.Tensor, text: list[str]
) -> tuple[torch.Tensor, list[str]]:
    """Rows whose no-target probability ``sigmoid(reject_logit) (B,)`` exceeds ``threshold``
    (``model.reject_threshold``) answer :func:`answer_text` (0) and keep no ``[SEG]``: ``seg_valid
    (B, T)`` all False there. The reject head is a binary classifier on the same state that starts the
    answer; it is trained with a class weight (``loss.no_target_pos_weight``), which the LM's
    next-token loss over the whole vocabulary has no counterpart of."""
    if threshold is None:
        return seg_valid, text
    rejected = torch.sigmoid(reject_logit.float()) > threshold  # (B,)
    if not rejected.any():
        return seg_valid, text
    text = [answer_text(0) if r else t for r, t in zip(rejected.tolist(), text, strict=True)]
    return seg_valid & ~rejected[:, None], text


def _best_region_painted(region_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The prior-mode mask logits ``(B, T, S, S)``: the region logits ``(B, T, K)`` painted through
    ``labels (B, S, S)``, each query's logits shifted up (when needed) so its best region is at least
    ``_BEST_REGION_LOGIT``: a ``[SEG]`` always points at one region at least (whether there is a target
    at all is the reject head's and the answer's decision, not the pointer's confidence)."""
    logits = region_logits.float()
    best = logits.amax(-1, keepdim=True)  # (B, T, 1)
    shifted = logits + (_BEST_REGION_LOGIT - best).clamp_min(0.0)  # masked regions stay ~ -1e4
    return paint_regions(shifted, labels).clamp(-PRIOR_CLAMP, PRIOR_CLAMP)  # (B, T, S, S)
