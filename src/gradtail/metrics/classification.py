"""Evaluation metrics (docs/methods/protocol.md §4): top-1, per-class accuracy, Many/Medium/Few,
ECE/MCE, confusion.

All functions take logits (n, C) and integer targets (n,) as tensors on any device and return plain
Python numbers / lists, so results serialise straight to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradtail.errors import InputError


def _check(logits: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None) -> int:
    if logits.dim() != 2:
        raise InputError(f"logits must be (n, C), got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise InputError(f"targets must be ({logits.shape[0]},), got shape {tuple(targets.shape)}")
    c = logits.shape[1] if num_classes is None else num_classes
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c):
        raise InputError(
            f"labels must be in [0, {c}); got range [{int(targets.min())}, {int(targets.max())}]"
        )
    if not torch.isfinite(logits).all():
        raise InputError("logits contain NaN or inf")
    return c


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C int64 matrix; row = true class, column = predicted class.

    Example:
        >>> import torch
        >>> from gradtail.metrics import confusion_matrix
        >>> confusion_matrix(torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 2, 2]), num_classes=3).tolist()
        [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    """
    idx = targets.long() * num_classes + predictions.long()
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    """Accuracy of each class over its test samples (None for a class absent from the set).

    Example:
        >>> import torch
        >>> from gradtail.metrics import per_class_accuracy
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> per_class_accuracy(logits, torch.tensor([0, 1, 2, 2]))
        [1.0, 1.0, 0.5]
        >>> per_class_accuracy(logits[:2], torch.tensor([0, 1]))  # class 2 absent from the set
        [1.0, 1.0, None]
    """
    c = _check(logits, targets)
    cm = confusion_matrix(logits.argmax(dim=1), targets, c)
    support = cm.sum(dim=1)
    return [float(cm[j, j] / support[j]) if support[j] > 0 else None for j in range(c)]


def shot_groups(
    train_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, list[int]]:
    """Many: > many_threshold training images; Medium: few..many inclusive; Few: < few_threshold.

    Example:
        >>> from gradtail.metrics import shot_groups
        >>> shot_groups([500, 100, 50, 20, 5])
        {'many': [0], 'medium': [1, 2, 3], 'few': [4]}
    """
    if few_threshold > many_threshold:
        raise InputError(f"few_threshold {few_threshold} must be <= many_threshold {many_threshold}")
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for j, n in enumerate(train_counts):
        key = "many" if n > many_threshold else ("few" if n < few_threshold else "medium")
        groups[key].append(j)
    return groups


def calibration_errors(logits: torch.Tensor, targets: torch.Tensor, num_bins: int = 15) -> dict[str, object]:
    """ECE and MCE with ``num_bins`` equal-width confidence bins (Guo et al. 2017), plus the bin table.

    ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|;  MCE = max_b |acc(B_b) - conf(B_b)| over non-empty bins.
    A confidence of exactly 0 falls into the first bin; bins are (lo, hi].

    Example:
        >>> import torch
        >>> from gradtail.metrics import calibration_errors
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> calib = calibration_errors(logits, torch.tensor([0, 1, 2, 2]))
        >>> round(calib["ece"], 4), round(calib["mce"], 4), calib["bins"]["count"][11]
        (0.037, 0.037, 4)
    """
    _check(logits, targets)
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets).double()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64, device=logits.device)
    bin_idx = torch.clamp(torch.bucketize(conf, edges[1:-1], right=False), 0, num_bins - 1)
    n = max(int(targets.numel()), 1)
    count = torch.bincount(bin_idx, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=logits.device).index_add_(0, bin_idx, conf)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64, device=logits.device).index_add_(0, bin_idx, correct)
    nonempty = count > 0
    gap = torch.zeros_like(count)
    gap[nonempty] = (acc_sum[nonempty] / count[nonempty] - conf_sum[nonempty] / count[nonempty]).abs()
    ece = float((count / n * gap).sum())
    mce = float(gap[nonempty].max()) if nonempty.any() else 0.0
    safe = count.clamp(min=1)
    return {
        "ece": ece,
        "mce": mce,
        "bins": {
            "edges": edges.tolist(),
            "count": count.long().tolist(),
            "accuracy": (acc_sum / safe).tolist(),
            "confidence": (conf_sum / safe).tolist(),
        },
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class EvalResult:
    """Everything one evaluation reports; ``to_dict`` is what runs write as JSON."""

    top1: float
    balanced_accuracy: float
    per_class: list[float | None]
    many: float | None
    medium: float | None
    few: float | None
    ece: float
    mce: float
    nll: float
    num_samples: int
    confusion: list[list[int]]
    calibration_bins: dict[str, object]

    def to_dict(self, include_confusion: bool = True) -> dict[str, object]:
        d = dict(self.__dict__)
        if not include_confusion:
            d.pop("confusion")
            d.pop("calibration_bins")
        return d

    def summary(self) -> dict[str, float | None]:
        return {
            "top1": self.top1,
            "many": self.many,
            "medium": self.medium,
            "few": self.few,
            "ece": self.ece,
        }


def evaluate_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    train_counts: Sequence[int],
    many_threshold: int = 100,
    few_threshold: int = 20,
    num_bins: int = 15,
) -> EvalResult:
    """All docs/methods/protocol.md §4 metrics from logits. Many/Medium/Few average per-class accuracy;
    empty = None.

    Example:
        >>> import torch
        >>> from gradtail.metrics import evaluate_logits
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> result = evaluate_logits(logits, torch.tensor([0, 1, 2, 2]), train_counts=[500, 50, 5])
        >>> result.top1, result.per_class
        (0.75, [1.0, 1.0, 0.5])
        >>> result.many, result.medium, result.few
        (1.0, 1.0, 0.5)
        >>> round(result.ece, 4), result.num_samples
        (0.037, 4)
        >>> evaluate_logits(logits, torch.tensor([0, 1, 2, 2]), [500, 50, 50]).few is None  # empty group
        True
    """
    c = _check(logits, targets)
    if len(train_counts) != c:
        raise InputError(f"train_counts has {len(train_counts)} entries, logits have {c} classes")
    logits = logits.detach().float()
    pred = logits.argmax(dim=1)
    cm = confusion_matrix(pred, targets, c)
    support = cm.sum(dim=1)
    per_class = [float(cm[j, j] / support[j]) if support[j] > 0 else None for j in range(c)]
    groups = shot_groups(train_counts, many_threshold, few_threshold)
    calib = calibration_errors(logits, targets, num_bins)
    n = int(targets.numel())
    nll = float(torch.nn.functional.cross_entropy(logits.double(), targets.long(), reduction="sum")) / max(
        n, 1
    )
    balanced = _mean_or_none(per_class)
    return EvalResult(
        top1=float((pred == targets).double().mean()) if n else math.nan,
        balanced_accuracy=balanced if balanced is not None else math.nan,
        per_class=per_class,
        many=_mean_or_none([per_class[j] for j in groups["many"]]),
        medium=_mean_or_none([per_class[j] for j in groups["medium"]]),
        few=_mean_or_none([per_class[j] for j in groups["few"]]),
        ece=float(calib["ece"]),  # type: ignore[arg-type]
        mce=float(calib["mce"]),  # type: ignore[arg-type]
        nll=nll,
        num_samples=n,
        confusion=cm.tolist(),
        calibration_bins=calib["bins"],  # type: ignore[arg-type]
    )


def format_percent(value: float | None) -> str:
    """'N/A' for an empty group, else a percentage with one decimal.

    Example:
        >>> from gradtail.metrics import format_percent
        >>> format_percent(0.8), format_percent(None)
        ('80.0', 'N/A')
    """
    return (
        "N/A" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
    )
