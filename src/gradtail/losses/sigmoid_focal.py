"""The sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), one-vs-all:
the stock classification loss of one-stage detectors (RetinaNet, FCOS) and the base EFL equalises.

For logits z (n, C), t_ij = 1[j = y_i] (a background sample, label C with ``background_label``: every
t_ij = 0), p_ij = sigmoid(z_ij):

    FL_ij = alpha_t (1 - p_t)^gamma BCE(z_ij, t_ij),   p_t = p t + (1 - p)(1 - t),
                                                      alpha_t = alpha t + (1 - alpha)(1 - t)
    L = sum_ij FL_ij / max(1, number of positives)      (``normalizer`` replaces the count)

(docs/methods/eql.md §3, the EFL section, with gamma_j = gamma; torchvision's ``sigmoid_focal_loss`` is
the elementwise FL). Positives are the non-ignored samples with a class label (convention N of
:mod:`gradtail.losses.base`; inside ``accumulate``, the union's positives); ignored samples
(``ignore_index``) contribute nothing. Stateless; validated before use (convention V).

Computed as EFL's closed form with gamma_j = gamma and omega_j = 1 (docs/methods/eql.md §3; with empty
statistics EFL is this loss): value and gradient in one pass over the (n, C) logits, the targets as each
row's label entry (no one-hot matrix, no boolean indexing, no host sync), the gradient handed back by a
custom autograd Function (differentiable again under ``create_graph``).

In RetinaNet and FCOS, the detection task trains ``sigmoid_focal`` with torchvision's own head (its
per-image normaliser; docs/detection.md): the baseline exactly as torchvision ships it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gradtail.errors import ConfigError, InputError
from gradtail.losses.base import (
    LongTailLoss,
    check_label_options,
    checked_labels,
    checked_value,
    empty_batch_loss,
    label_options_hint,
    upcast_half,
)
from gradtail.losses.equalization import _efl_terms_inplace, _EFLValue, _label_entries
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace


@register_loss("sigmoid_focal")
class SigmoidFocalLoss(LongTailLoss):
    """Sigmoid (one-vs-all) focal loss; defaults alpha 0.25, gamma 2 (the paper's and torchvision's).

    Args:
        num_classes: C (logit channels).
        alpha: weight of the positive term in [0, 1] (negatives get 1 - alpha); a negative value turns
            the weighting off (alpha_t = 1), as torchvision's.
        gamma: focusing parameter >= 0 (0: the one-vs-all BCE).
        background_label, ignore_index: the detection label options of :mod:`gradtail.losses.base`.

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("sigmoid_focal", num_classes=3, background_label=True)
        >>> z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(z, torch.tensor([0, 3])).item(), 4)  # one positive; the second row is background
        0.7567
    """

    search_space: ClassVar[SearchSpace] = {"gamma": FloatRange(0.5, 3.0), "alpha": FloatRange(0.1, 0.75)}

    def __init__(
        self,
        num_classes: int,
        alpha: float = 0.25,
        gamma: float = 2.0,
        background_label: bool = False,
        ignore_index: int | None = None,
        class_counts: object = None,
    ) -> None:
        super().__init__(num_classes)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ConfigError(f"loss 'sigmoid_focal': gamma must be a number >= 0, got {gamma!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha > 1:
            raise ConfigError(f"loss 'sigmoid_focal': alpha must be a number <= 1, got {alpha!r}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.background_label, self.ignore_index = check_label_options(
            self.num_classes, background_label, ignore_index, "sigmoid_focal"
        )

    def _valid_positives(self, y: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(y, dtype=torch.bool) if self.ignore_index is None else y != self.ignore_index
        return (keep & (y < self.num_classes)).sum()

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """The number of positive samples (non-ignored, non-background; convention N): the ``total`` of
        :meth:`accumulate` for the union of the micro-batches."""
        y = torch.as_tensor(targets).reshape(-1).long()
        return self._valid_positives(y).to(torch.float64).cpu()

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != c:
            raise InputError(
                f"loss 'sigmoid_focal': logits must be (n, {c}), got shape {tuple(logits.shape)}"
            )
        if not logits.dtype.is_floating_point:
            raise InputError(f"loss 'sigmoid_focal': logits must be floating point, got {logits.dtype}")
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise InputError(
                f"loss 'sigmoid_focal': targets must be ({logits.shape[0]},), got {tuple(targets.shape)}"
            )
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(
                f"loss 'sigmoid_focal': targets must be integer class indices, got {targets.dtype}"
            )
        given = None
        if normalizer is not None:  # checked without a host sync on accelerators (convention V)
            given = torch.as_tensor(normalizer).detach()
            message = f"loss 'sigmoid_focal': normalizer must be > 0, got {normalizer!r}"
            given = checked_value(given, given > 0, message)
        hint = label_options_hint(c, self.background_label, self.ignore_index)
        y = checked_labels(
            targets.to(device=logits.device, dtype=torch.long), c, allow=self.ignore_index,
            background=self.background_label, hint=hint,
        )  # fmt: skip
        z = upcast_half(logits)
        valid = None if self.ignore_index is None else (y != self.ignore_index).view(-1, 1)
        is_pos = y < c if valid is None else (y < c) & valid.view(-1)
        if given is not None:  # the caller's (a detector's positives of the whole step), as given
            norm = given.to(device=z.device, dtype=z.dtype)
        else:  # the positives, at least 1, or the union's (A)
            norm = torch.as_tensor(self._divisor(is_pos.sum().to(z.dtype)), dtype=z.dtype, device=z.device)
        # the focal loss is EFL's closed form with gamma_j = gamma, omega_j = 1 (docs/methods/eql.md §3)
        gamma = torch.full((c,), self.gamma, dtype=z.dtype, device=z.device)
        a, b = (self.alpha, 1.0 - self.alpha) if self.alpha >= 0 else (1.0, 1.0)
        pos_coef, neg_coef = torch.full_like(gamma, a), torch.full_like(gamma, b)
        idx, hot = _label_entries(y, is_pos)
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        total, grad = _efl_terms_inplace(z.detach(), idx, hot, gamma, pos_coef, neg_coef, valid, needs_grad)
        if z.shape[0] == 0:
            return empty_batch_loss(z)
        if not needs_grad:
            return total / norm
        return _EFLValue.apply(z, total, grad, idx, hot, valid, gamma, pos_coef, neg_coef, norm)


__all__ = ["SigmoidFocalLoss"]
