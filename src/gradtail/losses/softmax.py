"""Softmax-family baselines: ``ce``, ``focal``, ``balanced_softmax``, ``logit_adjust``
(docs/methods/baselines.md).

Notation: z logits (B, C), y labels, p = softmax(z), n_j training count of class j, pi_j = n_j / sum n.
Every loss here is the batch mean of a per-sample term (:class:`~gradtail.losses.base.PerSampleLoss`),
so each can be combined with deferred re-weighting (``drw_epoch=...``, see ``reweighting``). None keeps
statistics; empty batches and labels follow the conventions of :mod:`gradtail.losses.base`
(``docs/losses.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError
from gradtail.losses.base import PerSampleLoss, checked_logits_targets, upcast_half, validate_class_counts
from gradtail.losses.closed_form import adjusted_log_softmax, per_sample_cross_entropy
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace

Counts = Sequence[int] | torch.Tensor | None


def focal_terms(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample softmax focal loss l_i = -(1 - p_{i,y_i})^gamma log p_{i,y_i} (Lin et al., softmax form).

    gamma = 0 returns cross-entropy exactly (and avoids 0^0 in the gradient when p_y rounds to 1).
    """
    logp_y = F.log_softmax(logits, dim=1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    if gamma == 0:
        return -logp_y
    one_minus_p = -torch.expm1(logp_y)  # 1 - p_y, accurate when p_y is close to 1
    return -one_minus_p.clamp(min=0).pow(gamma) * logp_y


def check_gamma(gamma: float, loss_name: str) -> float:
    """Focusing parameter gamma must be a finite number >= 0."""
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ConfigError(f"loss {loss_name!r}: gamma must be >= 0, got {gamma}")
    return gamma


@register_loss("ce")
class CrossEntropyLoss(PerSampleLoss):
    """l_i = -log softmax(z_i)_{y_i}. ``class_counts`` is accepted and ignored.

    Conventions (empty batch, labels): :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("ce", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        0.8136
        >>> loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))  # empty batch: 0, not NaN
        tensor(0.)
    """

    def __init__(self, num_classes: int, class_counts: Counts = None) -> None:
        super().__init__(num_classes)

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)
        return F.cross_entropy(upcast_half(logits), targets.long(), reduction="none")


@register_loss("focal")
class FocalLoss(PerSampleLoss):
    """Softmax focal loss l_i = -(1 - p_y)^gamma log p_y; gamma 1 as in the LDAM-DRW code, 0 gives CE.

    Conventions (empty batch, labels): :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("focal", num_classes=3, gamma=1.0)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        0.5455
    """

    search_space: ClassVar[SearchSpace] = {"gamma": FloatRange(0.0, 5.0)}  # focal exponent

    def __init__(self, num_classes: int, class_counts: Counts = None, gamma: float = 1.0) -> None:
        super().__init__(num_classes)
        self.gamma = check_gamma(gamma, "focal")

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)
        return focal_terms(upcast_half(logits), targets, self.gamma)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, gamma={self.gamma}"


class AdditiveLogitAdjustedCE(PerSampleLoss):
    """CE on shifted logits: l_i = CE(z_i + a, y_i), a a fixed per-class vector (buffer ``adjustment``).

    The buffer is constant (not statistics). Conventions: :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> loss = AdditiveLogitAdjustedCE(3, torch.tensor([0.0, 0.0, 0.0]))  # a = 0: plain CE
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        0.8136
    """

    adjustment: torch.Tensor

    def __init__(self, num_classes: int, adjustment: torch.Tensor) -> None:
        super().__init__(num_classes)
        self.register_buffer("adjustment", adjustment.to(torch.float64))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)
        z = upcast_half(logits)
        y = targets.long()
        log_p = adjusted_log_softmax(z.detach(), offsets=self.adjustment, y=y)  # of t = z + a
        return per_sample_cross_entropy(z, log_p, y)  # the gradient at t (losses.closed_form)


@register_loss("balanced_softmax")
class BalancedSoftmaxLoss(AdditiveLogitAdjustedCE):
    """Balanced Softmax (Ren et al. 2020): l_i = CE(z_i + log n, y_i).

    Conventions (empty batch, labels): :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("balanced_softmax", num_classes=3, class_counts=[100, 10, 1])
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        2.5171
    """

    def __init__(self, num_classes: int, class_counts: Counts = None) -> None:
        counts = validate_class_counts(class_counts, num_classes, "balanced_softmax")
        super().__init__(num_classes, counts.log())


@register_loss("logit_adjust")
class LogitAdjustedLoss(AdditiveLogitAdjustedCE):
    """Logit-adjusted loss (Menon et al. 2021): l_i = CE(z_i + tau log pi, y_i), pi_j = n_j / sum n.

    Conventions (empty batch, labels): :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("logit_adjust", num_classes=3, class_counts=[100, 10, 1], tau=1.0)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # tau = 1: Balanced Softmax
        2.5171
    """

    search_space: ClassVar[SearchSpace] = {"tau": FloatRange(0.0, 2.5)}  # prior exponent

    def __init__(self, num_classes: int, class_counts: Counts = None, tau: float = 1.0) -> None:
        counts = validate_class_counts(class_counts, num_classes, "logit_adjust")
        tau = float(tau)
        if not math.isfinite(tau):
            raise ConfigError(f"loss 'logit_adjust': tau must be finite, got {tau}")
        super().__init__(num_classes, tau * (counts / counts.sum()).log())
        self.tau = tau

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}"
