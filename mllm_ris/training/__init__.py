"""Training: a model-agnostic accelerate trainer and the pieces it is built from.

``trainer`` (the loop, :class:`Trainer` / :func:`train` / :func:`train_classic`), ``task`` (the
:class:`TrainTask` contract a model family implements), ``tasks`` (:func:`build_task`),
``ris_task`` (every :class:`~mllm_ris.modeling.model.RISModel`: mllm mode, classic with the
region pointer), ``classic_task`` (the legacy pointer-less classic model), ``artifacts`` (what
training wrote, loaded back; ``mllm-ris export``),
``sampling`` (dataset mixing), ``optim`` (AdamW + LR schedule), ``checkpoint`` (atomic
checkpoints, resume lookup, ZeRO consolidation), ``faults`` (NaN / inf steps, signals),
``tracking`` (jsonl, TensorBoard, progress bar). See docs/training.md.

Nothing is imported here, so ``import mllm_ris.training.sampling`` does not pull in accelerate.
"""
