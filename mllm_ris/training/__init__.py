"""Training: a model-agnostic accelerate trainer and the pieces it is built from.

``trainer`` (the loop, :class:`Trainer` / :func:`train` / :func:`train_classic`), ``task`` (the
:class:`TrainTask` contract a model family implements), ``ris_task`` (:class:`RISTask`, the
trainer's default: every :class:`~mllm_ris.modeling.model.RISModel`, classic and mllm mode),
``artifacts`` (what training wrote, loaded back; ``mllm-ris export``),
``sampling`` (dataset mixing), ``optim`` (AdamW + LR schedule), ``checkpoint`` (atomic
checkpoints, resume lookup, ZeRO consolidation), ``faults`` (NaN / inf steps, signals),
``tracking`` (jsonl, TensorBoard, progress bar). See docs/training.md.

Nothing is imported here, so ``import mllm_ris.training.sampling`` does not pull in accelerate.
"""
