"""Encoders that feed a fusion head.

* ``pixel`` — pixel encoders (tiny CNN, any HF ``AutoBackbone``, SAM ViT + simple feature pyramid):
  an image batch → a 4-level pyramid at strides 4, 8, 16, 32;
* ``text`` — classic mode's BERT-like text encoder → :class:`~s2rm_head.types.LanguageFeatures`.

Nothing is imported here (``from s2rm_head.encoders.pixel import build_pixel_encoder``). The encoders
use neither the heads nor SAM.
"""
