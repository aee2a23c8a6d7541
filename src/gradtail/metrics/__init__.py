"""Metrics: top-1, per-class, Many/Medium/Few, calibration, confusion (docs/methods/protocol.md §4)."""

from gradtail.metrics.classification import (
    GROUP_RULES,
    PROTOCOL_FEW_THRESHOLD,
    PROTOCOL_MANY_THRESHOLD,
    EvalResult,
    GroupRule,
    calibration_errors,
    confusion_matrix,
    evaluate_logits,
    format_percent,
    per_class_accuracy,
    resolve_shot_groups,
    shot_groups,
)

__all__ = [
    "GROUP_RULES",
    "PROTOCOL_FEW_THRESHOLD",
    "PROTOCOL_MANY_THRESHOLD",
    "EvalResult",
    "GroupRule",
    "calibration_errors",
    "confusion_matrix",
    "evaluate_logits",
    "format_percent",
    "per_class_accuracy",
    "resolve_shot_groups",
    "shot_groups",
]
