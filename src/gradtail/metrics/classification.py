"""Evaluation metrics (docs/methods/protocol.md §4): top-1, per-class accuracy, Many/Medium/Few,
ECE/MCE, confusion.

All functions take logits (n, C) and integer targets (n,) as tensors on any device and return plain
Python numbers / lists, so results serialise straight to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

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


# The confusion matrix is kept in the results (and final.json) up to this many classes: at iNaturalist's
# 8,142 it would be 66 million entries, about 700 MB of JSON and 1.7 GB as Python lists (docs/runs.md)
CONFUSION_MAX_CLASSES = 1000


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


PROTOCOL_MANY_THRESHOLD = 100  # docs/methods/protocol.md §4 (CIFAR-LT): Many > 100 training images
PROTOCOL_FEW_THRESHOLD = 20  # Few < 20
GROUP_RULES = ("configured", "protocol thresholds", "terciles")


@dataclass(frozen=True)
class GroupRule:
    """The Many / Medium / Few thresholds a run uses, how they were chosen and the group sizes.

    ``rule``: ``"configured"`` (both thresholds set in the config), ``"protocol thresholds"`` (> 100 Many,
    < 20 Few, kept because they leave no group empty) or ``"terciles"`` (of the class counts; see
    :func:`resolve_shot_groups`). ``sizes``: classes in (Many, Medium, Few).
    """

    rule: str
    many_threshold: int
    few_threshold: int
    sizes: tuple[int, int, int]

    def groups(self, train_counts: Sequence[int]) -> dict[str, list[int]]:
        return shot_groups(train_counts, self.many_threshold, self.few_threshold)

    def to_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "many_threshold": self.many_threshold,
            "few_threshold": self.few_threshold,
            "sizes": list(self.sizes),
        }


def _sizes(train_counts: Sequence[int], many_threshold: int, few_threshold: int) -> tuple[int, int, int]:
    g = shot_groups(train_counts, many_threshold, few_threshold)
    return len(g["many"]), len(g["medium"]), len(g["few"])


def resolve_shot_groups(
    train_counts: Sequence[int], many_threshold: int | None = None, few_threshold: int | None = None
) -> GroupRule:
    """The Many / Medium / Few thresholds for these training counts (Many: > many_threshold, Few: <
    few_threshold, Medium: the rest, both ends inclusive, as :func:`shot_groups`).

    - Both thresholds given: they are used as they are (``"configured"``), even if a group is empty.
    - Both ``None`` (the default of ``eval.many_threshold`` / ``eval.few_threshold``): the protocol's
      > 100 / < 20 (``"protocol thresholds"``) when they leave all three groups non-empty (CIFAR-100-LT,
      ImageNet-LT, Places-LT, iNaturalist), otherwise ``"terciles"`` of the class counts:

      * counts sorted in decreasing order s_0 >= ... >= s_{C-1}, k = C // 3: ``many_threshold = s_k`` and
        ``few_threshold = s_{C-1-k}``, i.e. the largest and the smallest count of the middle C - 2k
        classes, so Many = the k largest classes, Few = the k smallest, Medium = the rest (C = 10:
        3 / 4 / 3; C = 100: 33 / 34 / 33).
      * Ties: the thresholds are counts and Medium includes them, so equal counts always share a group
        and a tie across a cut goes to Medium (Many or Few then hold fewer than k classes). When that
        would leave Many (or Few) empty although the counts take at least three distinct values, the
        thresholds are clamped to the second largest (second smallest) distinct count, so every group
        keeps a class: with three or more distinct counts, all three groups are non-empty.
      * Fewer than three distinct counts (C < 3 included): no thresholds give three groups; both are the
        integer midpoint (max + min) // 2 of the largest and the smallest count, so two distinct counts
        give Many (the larger) and Few (the smaller) with Medium empty, unless they differ by 1 (then
        Many and Medium); one distinct count (balanced data, or one class) puts every class in Medium.

    Only one threshold given is an :class:`InputError` (set both or neither).

    Example:
        >>> from gradtail.metrics import resolve_shot_groups
        >>> resolve_shot_groups([int(500 * 100 ** (-i / 99)) for i in range(100)]).to_dict()
        {'rule': 'protocol thresholds', 'many_threshold': 100, 'few_threshold': 20, 'sizes': [35, 35, 30]}
        >>> resolve_shot_groups([5980, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]).to_dict()
        {'rule': 'terciles', 'many_threshold': 1292, 'few_threshold': 278, 'sizes': [3, 4, 3]}
        >>> resolve_shot_groups([300, 30]).to_dict()
        {'rule': 'terciles', 'many_threshold': 165, 'few_threshold': 165, 'sizes': [1, 0, 1]}
        >>> resolve_shot_groups([5980, 60], many_threshold=1200, few_threshold=240).rule
        'configured'
    """
    if (many_threshold is None) != (few_threshold is None):
        raise InputError(
            "set both the Many and the Few thresholds, or neither (None: protocol thresholds or terciles); "
            f"got many_threshold={many_threshold}, few_threshold={few_threshold}"
        )
    counts = [int(n) for n in train_counts]
    if many_threshold is not None and few_threshold is not None:
        many, few = int(many_threshold), int(few_threshold)
        return GroupRule("configured", many, few, _sizes(counts, many, few))
    if not counts:
        raise InputError("no class counts to form Many / Medium / Few groups from")
    protocol = _sizes(counts, PROTOCOL_MANY_THRESHOLD, PROTOCOL_FEW_THRESHOLD)
    if all(protocol):
        return GroupRule("protocol thresholds", PROTOCOL_MANY_THRESHOLD, PROTOCOL_FEW_THRESHOLD, protocol)
    s = sorted(counts, reverse=True)
    distinct = sorted(set(counts), reverse=True)
    if len(distinct) < 3:
        many = few = (distinct[0] + distinct[-1]) // 2
    else:
        k = len(s) // 3
        lo, hi = distinct[-2], distinct[1]  # any thresholds in [lo, hi] leave Many and Few non-empty
        many = min(max(s[k], lo), hi)
        few = min(max(s[len(s) - 1 - k], lo), hi)
    return GroupRule("terciles", many, few, _sizes(counts, many, few))


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


def classwise_calibration_error(logits: torch.Tensor, targets: torch.Tensor, num_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019): the ECE of every class's predicted probability against the
    indicator of that class, averaged over classes.

    cwECE = (1 / C) sum_j sum_b (|B_jb| / n) |mean_{i in B_jb} 1[y_i = j] - mean_{i in B_jb} p_ij|, where
    B_jb are the samples whose probability of class j falls into bin b ((lo, hi], 0 in the first bin).
    Unlike ECE (top-label confidence only) it sees the tail classes' probabilities on every sample.

    Example:
        >>> import torch
        >>> from gradtail.metrics import classwise_calibration_error
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> round(classwise_calibration_error(logits, torch.tensor([0, 1, 2, 2])), 4)
        0.1844
    """
    c = _check(logits, targets)
    n = int(targets.numel())
    if n == 0:
        return 0.0
    probs = torch.softmax(logits.double(), dim=1)  # (n, C)
    onehot = torch.nn.functional.one_hot(targets.long(), c).double()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64, device=logits.device)
    bins = torch.clamp(torch.bucketize(probs, edges[1:-1], right=False), 0, num_bins - 1)  # (n, C)
    flat = (bins + num_bins * torch.arange(c, device=logits.device)).flatten()  # (class, bin) cells
    size = c * num_bins
    count = torch.zeros(size, dtype=torch.float64, device=logits.device)
    count.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64, device=logits.device))
    prob_sum = torch.zeros_like(count).index_add_(0, flat, probs.flatten())
    hit_sum = torch.zeros_like(count).index_add_(0, flat, onehot.flatten())
    gap = (hit_sum - prob_sum).abs()  # |B| * |acc - conf| per cell
    return float(gap.sum() / n / c)


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class EvalResult:
    """Everything one evaluation reports; ``to_dict`` is what runs write as JSON."""

    primary_metric: ClassVar[str] = "balanced_accuracy"

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
    classwise_ece: float
    confusion: list[list[int]] | None  # None above CONFUSION_MAX_CLASSES classes
    calibration_bins: dict[str, object]

    def to_dict(self, include_confusion: bool = True) -> dict[str, object]:
        d = dict(self.__dict__)
        if not include_confusion:
            d.pop("calibration_bins")
        if not include_confusion or self.confusion is None:
            d.pop("confusion")
        return d

    @property
    def primary(self) -> float:
        """The validation metric that selects the epoch (:class:`gradtail.contracts.EvalReport`)."""
        return self.balanced_accuracy

    def val_record(self) -> dict[str, float | None]:
        """The ``val`` entry of an epoch record (``gradtail tune`` reads its objective there: balanced
        accuracy, top-1 or Few)."""
        return self.summary() | {"balanced_accuracy": self.balanced_accuracy}

    def summary(self) -> dict[str, float | None]:
        return {
            "top1": self.top1,
            "many": self.many,
            "medium": self.medium,
            "few": self.few,
            "ece": self.ece,
            "classwise_ece": self.classwise_ece,
        }


def evaluate_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    train_counts: Sequence[int],
    many_threshold: int | None = PROTOCOL_MANY_THRESHOLD,
    few_threshold: int | None = PROTOCOL_FEW_THRESHOLD,
    num_bins: int = 15,
) -> EvalResult:
    """All docs/methods/protocol.md §4 metrics from logits. Many/Medium/Few average per-class accuracy;
    empty = None. Thresholds ``None`` (both) pick them by :func:`resolve_shot_groups`.

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
    groups = resolve_shot_groups(train_counts, many_threshold, few_threshold).groups(train_counts)
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
        classwise_ece=classwise_calibration_error(logits, targets, num_bins),
        confusion=cm.tolist() if c <= CONFUSION_MAX_CLASSES else None,
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
