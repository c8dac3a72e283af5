"""Build a fusion head by name: S²RM (:mod:`s2rm_head.heads.fusion`) or a baseline
(:mod:`s2rm_head.heads.baselines`).

Its own module because the baselines subclass :class:`~s2rm_head.heads.fusion.FusionHead`: ``fusion``
cannot import them back.
"""

from __future__ import annotations

from s2rm_head.heads.baselines import CMSAHead, LTSHead, TwoStageHead
from s2rm_head.heads.fusion import FusionHead, HeadConfig, S2RMHead

__all__ = ["HEADS", "build_head"]

HEADS: dict[str, type[FusionHead]] = {
    "s2rm": S2RMHead,
    "lts": LTSHead,
    "cmsa": CMSAHead,
    "two-stage": TwoStageHead,
}
"""``HeadConfig.name`` -> head class (the names are :data:`s2rm_head.heads.fusion.HEAD_NAMES`)."""


def build_head(cfg: HeadConfig) -> FusionHead:
    """Build the fusion head named by ``cfg.name`` (one of :data:`~s2rm_head.heads.fusion.HEAD_NAMES`)."""
    return HEADS[cfg.name](cfg=cfg)
