"""The SAM refinement stage, built on segment-anything's modules.

* ``stage`` — :func:`build_sam` (vit_b / vit_l / vit_h / tiny from a config) and :class:`SAMStage`
  (prompt encoder + mask decoder called directly, differentiable);
* ``prompts`` — :class:`PromptBuilder`: SAM prompts (sparse, box, points, dense) from a head's output;
* ``checkpoint`` — official-layout SAM checkpoints, read and written, one-line errors naming the file.

Nothing is imported here; the public names load from :mod:`s2rm_head` (``from s2rm_head import
SAMStage``). SAM's image encoder is the ``sam-vit`` pixel encoder's ViT (:mod:`s2rm_head.encoders.pixel`).
"""
