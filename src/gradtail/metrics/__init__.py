"""Metrics: top-1, per-class, Many/Medium/Few, calibration, confusion (docs/methods/protocol.md §4);
segmentation: mIoU, mAcc, aAcc, per-class and frequency-group IoU (:mod:`gradtail.metrics.segmentation`)."""

from gradtail.metrics.classification import (
    GROUP_RULES,
    PROTOCOL_FEW_THRESHOLD,
    PROTOCOL_MANY_THRESHOLD,
    EvalResult,
    GroupRule,
    calibration_errors,
    classwise_calibration_error,
    confusion_matrix,
    evaluate_logits,
    format_percent,
    per_class_accuracy,
    resolve_shot_groups,
    shot_groups,
)
from gradtail.metrics.segmentation import (
    ConfusionState,
    SegmentationResult,
    pixel_frequency_groups,
    segmentation_metrics,
)

__all__ = [
    "GROUP_RULES",
    "PROTOCOL_FEW_THRESHOLD",
    "PROTOCOL_MANY_THRESHOLD",
    "ConfusionState",
    "EvalResult",
    "GroupRule",
    "SegmentationResult",
    "calibration_errors",
    "classwise_calibration_error",
    "confusion_matrix",
    "evaluate_logits",
    "format_percent",
    "per_class_accuracy",
    "pixel_frequency_groups",
    "resolve_shot_groups",
    "segmentation_metrics",
    "shot_groups",
]
