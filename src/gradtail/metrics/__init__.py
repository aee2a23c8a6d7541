"""Metrics: top-1, per-class, Many/Medium/Few, calibration, confusion (docs/methods/protocol.md §4)."""

from gradtail.metrics.classification import (
    EvalResult,
    calibration_errors,
    confusion_matrix,
    evaluate_logits,
    format_percent,
    per_class_accuracy,
    shot_groups,
)

__all__ = [
    "EvalResult",
    "calibration_errors",
    "confusion_matrix",
    "evaluate_logits",
    "format_percent",
    "per_class_accuracy",
    "shot_groups",
]
