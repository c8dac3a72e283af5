"""Evaluation: metrics with the field's conventions, and the evaluation loop."""
