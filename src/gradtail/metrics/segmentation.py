"""Semantic-segmentation metrics from a confusion matrix (docs/segmentation.md; docs/methods/eql.md §9).

mIoU, mAcc and aAcc over a whole split come from one C x C confusion matrix accumulated over every
non-ignored pixel of the split (never averaged per image, docs/methods/eql.md §9), summed across
processes. With ``M[t, p]`` the pixels of true class t predicted as p:

- IoU_c = M[c, c] / (sum_p M[c, p] + sum_t M[t, c] - M[c, c]); mIoU = mean over classes present in the
  ground truth or the predictions (a class absent from both has no IoU: ``None``, left out of the mean);
- Acc_c = M[c, c] / sum_p M[c, p] (classes with ground-truth pixels); mAcc = their mean;
- aAcc = trace(M) / sum(M), the pixel accuracy;
- mIoU per frequency group: classes by their share of the training pixels, ``frequent`` when the share is
  >= ``frequent_threshold``, ``rare`` when < ``rare_threshold``, ``common`` otherwise
  (:func:`pixel_frequency_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gradtail.distributed import all_reduce_sum_, is_distributed
from gradtail.errors import ConfigError, InputError
from gradtail.metrics.classification import CONFUSION_MAX_CLASSES

DEFAULT_FREQUENT_THRESHOLD = 0.01  # >= 1% of the training pixels
DEFAULT_RARE_THRESHOLD = 0.001  # < 0.1% of the training pixels
GROUPS = ("frequent", "common", "rare")


def pixel_frequency_groups(
    pixel_counts: Sequence[int] | Sequence[float],
    frequent_threshold: float = DEFAULT_FREQUENT_THRESHOLD,
    rare_threshold: float = DEFAULT_RARE_THRESHOLD,
) -> dict[str, list[int]]:
    """Class indices of the frequent / common / rare groups by training pixel share.

    share_c = pixels_c / sum pixels; frequent: share >= ``frequent_threshold``; rare: share <
    ``rare_threshold``; common: the rest.

    Example:
        >>> pixel_frequency_groups([900, 95, 5], frequent_threshold=0.5, rare_threshold=0.01)
        {'frequent': [0], 'common': [1], 'rare': [2]}
    """
    if not 0 <= rare_threshold <= frequent_threshold <= 1:
        raise ConfigError(
            "segmentation frequency groups need 0 <= rare_threshold <= frequent_threshold <= 1, got "
            f"rare_threshold={rare_threshold}, frequent_threshold={frequent_threshold}"
        )
    total = float(sum(pixel_counts)) or 1.0
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for c, n in enumerate(pixel_counts):
        share = float(n) / total
        key = "frequent" if share >= frequent_threshold else "rare" if share < rare_threshold else "common"
        groups[key].append(c)
    return groups


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@dataclass
class SegmentationResult:
    """The metrics of one split (a :class:`gradtail.contracts.EvalReport`); fractions in [0, 1]."""

    miou: float
    macc: float
    aacc: float
    per_class_iou: list[float | None]
    per_class_acc: list[float | None]
    group_miou: dict[str, float | None]
    groups: dict[str, list[int]]
    num_pixels: int
    confusion: list[list[int]] | None = field(repr=False)  # None above CONFUSION_MAX_CLASSES classes

    primary_metric: ClassVar[str] = "miou"

    @property
    def primary(self) -> float:
        """mIoU: the validation metric that selects the epoch."""
        return self.miou

    def summary(self) -> dict[str, float | None]:
        return {"miou": self.miou, "macc": self.macc, "aacc": self.aacc, **self._group_keys()}

    def _group_keys(self) -> dict[str, float | None]:
        return {f"miou_{g}": self.group_miou.get(g) for g in GROUPS}

    def val_record(self) -> dict[str, float | None]:
        """The ``val`` entry of an epoch record (mIoU is the selection metric)."""
        return self.summary()

    def to_dict(self, include_confusion: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {**self.summary(), "per_class_iou": self.per_class_iou}
        d |= {"per_class_acc": self.per_class_acc, "groups": self.groups, "num_pixels": self.num_pixels}
        if include_confusion and self.confusion is not None:
            d["confusion"] = self.confusion
        return d


def segmentation_metrics(
    confusion: torch.Tensor,
    train_pixel_counts: Sequence[int] | Sequence[float],
    frequent_threshold: float = DEFAULT_FREQUENT_THRESHOLD,
    rare_threshold: float = DEFAULT_RARE_THRESHOLD,
) -> SegmentationResult:
    """The metrics of a (C, C) confusion matrix ``M[true, pred]`` (module docstring for the formulas).

    Example:
        >>> import torch
        >>> m = torch.tensor([[3, 1], [0, 2]])
        >>> r = segmentation_metrics(m, [4, 2], frequent_threshold=0.5, rare_threshold=0.1)
        >>> round(r.miou, 4), round(r.aacc, 4), r.per_class_iou
        (0.7083, 0.8333, [0.75, 0.6666666666666666])
    """
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise InputError(f"confusion matrix must be (C, C), got {tuple(confusion.shape)}")
    m = confusion.detach().to("cpu", torch.float64)
    c = m.shape[0]
    if len(train_pixel_counts) != c:
        raise InputError(f"{len(train_pixel_counts)} training pixel counts for {c} classes")
    tp = m.diagonal()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(c)]
    acc = [float(tp[k] / gt[k]) if gt[k] > 0 else None for k in range(c)]
    total = float(m.sum())
    groups = pixel_frequency_groups(train_pixel_counts, frequent_threshold, rare_threshold)
    return SegmentationResult(
        miou=_mean(iou) or 0.0,
        macc=_mean(acc) or 0.0,
        aacc=float(tp.sum()) / total if total > 0 else 0.0,
        per_class_iou=iou,
        per_class_acc=acc,
        group_miou={g: _mean([iou[k] for k in idx]) for g, idx in groups.items()},
        groups=groups,
        num_pixels=int(total),
        confusion=confusion.detach().to("cpu", torch.long).tolist() if c <= CONFUSION_MAX_CLASSES else None,
    )


class ConfusionState:
    """A metric state: the (C, C) int64 confusion matrix of a split, updated per batch, summed across
    processes by :meth:`all_reduce` (one SUM all-reduce).

    Example:
        >>> import torch
        >>> state = ConfusionState(num_classes=3, ignore_index=255)
        >>> state.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
        >>> state.matrix.tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str = "cpu"):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of predicted labels ``pred`` against ``target`` (same shape; ignored pixels
        and labels outside [0, C) of the target are left out)."""
        if pred.shape != target.shape:
            raise InputError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
        c = self.num_classes
        t = target.reshape(-1).to(self.matrix.device, torch.long)
        p = pred.reshape(-1).to(self.matrix.device, torch.long)
        keep = (t >= 0) & (t < c)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        idx = t[keep] * c + p[keep]
        self.matrix += torch.bincount(idx, minlength=c * c).view(c, c)

    def all_reduce(self) -> ConfusionState:
        """Sum the matrix over processes (no-op in one process); returns self."""
        if is_distributed():
            all_reduce_sum_(self.matrix)
        return self


__all__ = [
    "DEFAULT_FREQUENT_THRESHOLD",
    "DEFAULT_RARE_THRESHOLD",
    "GROUPS",
    "ConfusionState",
    "SegmentationResult",
    "pixel_frequency_groups",
    "segmentation_metrics",
]
