"""Fusion heads: a pixel-feature pyramid and :class:`~s2rm_head.types.LanguageFeatures` in,
:class:`~s2rm_head.types.HeadOutput` out.

* ``fusion`` — the :class:`FusionHead` base (targets folded into the batch) and the S²RM head;
* ``s2rm`` — S²RM: language distribution, bidirectional row / column co-parsing, balancing gates;
* ``casg`` — the CASG decoder (coarsest fused level guides the finer ones);
* ``baselines`` — LTS, CMSA and two-stage heads (the same interface);
* ``registry`` — :func:`build_head`, a head by ``HeadConfig.name``;
* ``_blocks`` — conv / norm building blocks private to the heads.

Nothing is imported here; the public names load from :mod:`s2rm_head` (``from s2rm_head import
build_head``). The heads use neither the encoders nor SAM.
"""
