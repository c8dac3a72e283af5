"""Training: a model-agnostic accelerate trainer and the pieces it is built from.

``trainer`` (the loop, :class:`Trainer` / :func:`train`), ``task`` (the :class:`TrainTask`
contract a model family implements), ``classic`` (classic mode as a task + ``train_classic``),
``sampling`` (dataset mixing), ``optim`` (AdamW + LR schedule), ``checkpoint`` (atomic
checkpoints, resume lookup, ZeRO consolidation), ``faults`` (NaN / inf steps, signals),
``tracking`` (jsonl, TensorBoard, progress bar). See docs/training.md.

Nothing is imported here, so ``import mllm_ris.training.sampling`` does not pull in accelerate.
"""
