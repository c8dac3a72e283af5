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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mllm_ris.errors import CheckpointError, ConfigError
from mllm_ris.modeling.projector import RegionPointer, VisualProjector, build_projector

# the parts a config may not use are imported where they are built
if TYPE_CHECKING:
    from mllm_ris.modeling.mllm import GroundingMLLM
    from mllm_ris.modeling.model_config import ModelConfig
    from mllm_ris.modeling.vision import VisionTower
    from s2rm_head.encoders.pixel import PixelEncoder
    from s2rm_head.sam.stage import SAMStage

__all__ = ["BuiltParts", "build_parts"]


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
    )


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
    kwargs: dict[str, Any] = {}
    resolved: dict[str, Any] = {}
    lang_source = "the text encoder's width"
    if text is not None:
        kwargs["text_encoder"], lang_dim = text, text.dim
        if cfg.pointer.dim is not None:
            _check_classic_pointer(cfg)
            proj_cfg = _derive("projector", cfg.projector, llm_dim=(cfg.pointer.dim, "pointer.dim"))
            resolved["projector"] = proj_cfg = _cleared(proj_cfg, "vision_dim", "grid")  # no tower
            kwargs.update(projector=build_projector(proj_cfg), pointer=_classic_pointer(cfg, text.dim))
        else:  # no projector
            resolved["projector"] = _cleared(cfg.projector, "vision_dim", "llm_dim", "grid")
    else:
        if cfg.pointer.dim is not None:
            raise ConfigError(
                "pointer.dim: the classic-mode pointer; in mllm mode set mllm.pointer_dim instead"
            )
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
        kwargs.update(vision=vision, projector=projector, mllm=mllm)
        resolved["projector"], lang_dim, lang_source = proj_cfg, mllm.seg_dim, "the grounding LLM's seg_dim"
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
    kwargs.update(
        cfg=_replace(cfg, head=head_cfg, **resolved),
        pixel_encoder=pixel,
        head=head,
        loss=cfg.loss,
        sam_stage=stage,
        prompt_builder=builder,
        share_sam_vit=share,
    )
    return BuiltParts(kwargs=kwargs, notes=notes)
