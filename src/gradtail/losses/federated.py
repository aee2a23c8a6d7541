"""The federated loss (Zhou, Koltun, Krähenbühl, "Probabilistic two-stage detection", 2021), ``federated``,
as detectron2's ``FastRCNNOutputLayers(use_fed_loss=True)`` computes it (docs/instance.md §2; the spec:
``instance.md`` §2).

LVIS is federated: an image is exhaustively annotated for a few categories only, so a sigmoid classifier
should not push every one of its C logits down on every RoI. The loss is the per-class binary
cross-entropy of a one-hot target, summed over a *class set* S of the step only:

    L = (1/n) sum_i sum_{j in S} BCE(z_ij, T_ij),   T_ij = [y_i = j]

- S contains every ground-truth class of the step (the unique labels in [0, C) of its samples; the
  background label and ignored samples are not classes). If that is fewer than ``k`` classes, ``k - |S|``
  further classes are drawn **without replacement** from the others with probability proportional to
  w_c = ``class_counts[c] ** power`` (``class_counts``: the training images containing c, LVIS's
  ``image_count``; detectron2's ``get_fed_loss_cls_weights`` with ``freq_weight_power`` 0.5). S then has
  exactly max(k, |unique gt|) classes, capped by the classes that can be drawn (every class, or those of
  positive weight: a class without training images is never drawn as a negative).
- n is the number of samples (RoIs: positives and background alike; ignored ones left out), at least 1.
- The test score of class j is sigmoid(z_j).
- ``background_column=True``: the logits have C + 1 columns in the two-stage layout (gradtail's, background
  last); the last one gets no loss and no gradient (detectron2 computes the loss on
  ``pred_class_logits[:, :-1]``, its background logit is never trained).

One deviation from detectron2's code: there, S is built from ``torch.unique(gt_classes)`` *including* the
background class K when a background RoI is present, so the K slots of S hold the background and K - 1
categories (the background column is dropped afterwards). Here the background is never a member of S and
S has k categories (the spec's reading); with ``k`` = 50 of LVIS's 1,203 classes the difference is one
sampled negative class.

The draw uses the global torch random generator (checkpointed with every run: a resumed run draws the same
sets). The loss has no statistics (``stateful = False``); the class weights are a float64 buffer, checked
at construction. Empty batches, labels, the label options and the normaliser follow the conventions of
:mod:`gradtail.losses.base` (``docs/losses.md``; the row ``federated``); every input check runs before
anything is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError, InputError
from gradtail.losses.base import (
    LongTailLoss,
    check_floating_logits,
    check_label_options,
    checked_labels,
    empty_batch_loss,
    label_options_hint,
    upcast_half,
)
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, IntRange, SearchSpace


def federated_class_weights(
    class_counts: Sequence[int] | Sequence[float] | torch.Tensor | None, num_classes: int, power: float
) -> torch.Tensor:
    """w_c = class_counts[c] ** power as a float64 (C,) tensor (0 for a class without training images).

    Example:
        >>> federated_class_weights([100, 4, 0], 3, 0.5).tolist()
        [10.0, 2.0, 0.0]
    """
    if class_counts is None:
        raise ConfigError(
            "loss 'federated' needs class_counts (training images per class, LVIS's image_count)"
        )
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() != num_classes:
        raise ConfigError(
            f"loss 'federated': class_counts has {counts.numel()} entries, expected num_classes={num_classes}"
        )
    if not torch.isfinite(counts).all() or (counts < 0).any():
        bad = [i for i, c in enumerate(counts.tolist()) if not (math.isfinite(c) and c >= 0)]
        raise ConfigError(f"loss 'federated': class_counts must be finite and >= 0; classes {bad} are not")
    weights = counts.pow(power)
    weights[counts == 0] = 0.0  # 0 ** 0 = 1 would make a class without images a candidate
    return weights


@register_loss("federated")
class FederatedLoss(LongTailLoss):
    """The federated loss: per-class BCE over the step's class set S, summed, divided by the samples
    (module docstring; ``instance.md`` §2).

    Args:
        num_classes: C, the number of object classes.
        class_counts: training images containing each class (LVIS's ``image_count``), >= 0; w_c =
            class_counts[c] ** ``power``.
        k: the size of S when the step has fewer ground-truth classes (detectron2's
            ``fed_loss_num_classes``, 50).
        power: the exponent of the sampling weights (detectron2's ``fed_loss_freq_weight_power``, 0.5).
        background_column: the logits have C + 1 columns, the last an unused background column (the
            two-stage layout); it gets no loss and no gradient.
        background_label: label C is a background sample: all C targets 0 (convention L of
            :mod:`gradtail.losses.base`).
        ignore_index: a label whose samples are left out of the loss and the normaliser (convention L).

    Targets: (n,) class indices in [0, C) (plus the options above). The normaliser is the number of
    non-ignored samples, at least 1 (convention N). Empty batches and labels follow the conventions of
    :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("federated", num_classes=4, class_counts=[100, 25, 4, 1], k=2)
        >>> z = torch.zeros(3, 4, requires_grad=True)
        >>> classes = loss.sample_classes(torch.tensor([1, 1, 1]))  # class 1 and one drawn class
        >>> len(classes), int(classes[0])
        (2, 1)
        >>> round(loss.loss_on_classes(z, torch.tensor([1, 1, 1]), classes).item(), 4)  # 2 ln 2
        1.3863
        >>> _ = torch.manual_seed(0)
        >>> loss(z, torch.tensor([0, 2, 2])).backward()
        >>> int((z.grad != 0).any(dim=0).sum())  # the columns of S: classes 0, 2 (k = 2 already)
        2
    """

    search_space: ClassVar[SearchSpace] = {"k": IntRange(1, 200), "power": FloatRange(0.0, 1.0)}
    class_weights: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | Sequence[float] | torch.Tensor | None = None,
        k: int = 50,
        power: float = 0.5,
        background_column: bool = False,
        background_label: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(num_classes)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"loss 'federated': k must be an integer >= 1, got {k!r}")
        if (
            isinstance(power, bool)
            or not isinstance(power, (int, float))
            or not math.isfinite(power)
            or power < 0
        ):
            raise ConfigError(f"loss 'federated': power must be a finite number >= 0, got {power!r}")
        if not isinstance(background_column, bool):
            raise ConfigError(
                f"loss 'federated': background_column must be True or False, got {background_column!r}"
            )
        self.k = int(k)
        self.power = float(power)
        self.background_column = background_column
        self.background_label, self.ignore_index = check_label_options(
            self.num_classes, background_label, ignore_index, "federated"
        )
        self.register_buffer("class_weights", federated_class_weights(class_counts, self.num_classes, power))

    @property
    def num_channels(self) -> int:
        """The logit columns the loss takes: C, or C + 1 with ``background_column``."""
        return self.num_classes + int(self.background_column)

    # ------------------------------------------------------------------ inputs
    def _checked(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Shape / dtype / label checks (convention V); the targets to use from here on."""
        check_floating_logits(logits)
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"targets must be a tensor, got {type(targets).__name__}")
        if logits.dim() != 2:
            raise InputError(f"logits must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
        if logits.shape[1] != self.num_channels:
            raise InputError(
                f"logits have {logits.shape[1]} class channels, the loss expects {self.num_channels}"
                + (" (C + 1 with background_column)" if self.background_column else "")
            )
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise InputError(
                f"targets must be 1-D with one label per row of logits ({logits.shape[0]}), got shape "
                f"{tuple(targets.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"targets must be integer class indices, got dtype {targets.dtype}")
        hint = label_options_hint(self.num_classes, self.background_label, self.ignore_index)
        return checked_labels(
            targets, self.num_classes, self.ignore_index, background=self.background_label, hint=hint
        )

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """The number of non-ignored samples (convention N), float64 0-dim."""
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise InputError("FederatedLoss.normalizer expects a tensor of targets")
        if self.ignore_index is None:
            return torch.tensor(float(targets.shape[0]), dtype=torch.float64)
        return (targets != self.ignore_index).sum().to(torch.float64)

    # ------------------------------------------------------------------ the class set
    def sample_classes(self, targets: torch.Tensor) -> torch.Tensor:
        """S of a step with these (already checked) labels: the unique ground-truth classes, then the drawn
        ones (module docstring); int64 indices in [0, C), never the background."""
        y = targets.reshape(-1)
        positives = torch.unique(y[(y >= 0) & (y < self.num_classes)])
        weights = self.class_weights.to(y.device)
        need = self.k - int(positives.numel())
        if need <= 0:
            return positives
        prob = weights.clone()
        prob[positives] = 0.0
        available = int((prob > 0).sum())
        draw = min(need, available)
        if draw == 0:
            return positives
        sampled = torch.multinomial(prob, draw, replacement=False)
        return torch.cat([positives, sampled])

    def loss_on_classes(
        self, logits: torch.Tensor, targets: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """sum over the non-ignored samples i and the classes j of ``classes`` of BCE(z_ij, [y_i = j]),
        divided by max(n, 1) (or by the union's total inside :meth:`accumulate`)."""
        targets = self._checked(logits, targets)
        z = upcast_half(logits)[:, : self.num_classes]
        if self.ignore_index is not None:
            keep = targets != self.ignore_index
            z, targets = z[keep], targets[keep]
        if z.shape[0] == 0:
            return empty_batch_loss(z)
        onehot = torch.zeros_like(z)
        fg = targets < self.num_classes
        onehot[fg.nonzero().squeeze(1), targets[fg]] = 1.0
        classes = classes.to(device=z.device, dtype=torch.long)
        bce = F.binary_cross_entropy_with_logits(
            z.index_select(1, classes), onehot.index_select(1, classes), reduction="sum"
        )
        divisor = self._divisor(z.shape[0])
        if isinstance(divisor, torch.Tensor):
            divisor = divisor.to(device=bce.device, dtype=bce.dtype)
        return bce / divisor

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L over the class set drawn for this step (:meth:`sample_classes`; module docstring)."""
        targets = self._checked(logits, targets)  # before anything is drawn (convention V)
        kept = targets if self.ignore_index is None else targets[targets != self.ignore_index]
        if kept.numel() == 0:  # an empty batch (convention E) draws nothing
            return empty_batch_loss(upcast_half(logits)[:0])
        return self.loss_on_classes(logits, targets, self.sample_classes(kept))

    @staticmethod
    def scores(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(n, C) test scores sigmoid(z_j) (a background column, when present, is dropped)."""
        return torch.sigmoid(upcast_half(logits)[:, :num_classes])

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, k={self.k}, power={self.power}, "
            f"background_column={self.background_column}"
        )


__all__ = ["FederatedLoss", "federated_class_weights"]
