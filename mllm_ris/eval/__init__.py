"""Evaluation: metrics with the field's conventions, and the evaluation loop."""

from mllm_ris.eval.evaluate import EvalReport, PredictionError, Predictor, build_predictor, evaluate
from mllm_ris.eval.metrics import METRIC_KEYS, RISMetrics

__all__ = [
    "METRIC_KEYS",
    "EvalReport",
    "PredictionError",
    "Predictor",
    "RISMetrics",
    "build_predictor",
    "evaluate",
]
