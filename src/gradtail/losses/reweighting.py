"""Class re-weighting by the effective number of samples: ``cb`` and deferred re-weighting (DRW).

Class-balanced weights (Cui et al. 2019): w_j = (1 - beta) / (1 - beta^{n_j}), normalised so that
sum_j w_j = C. beta = 0 gives uniform weights; beta -> 1 approaches inverse class frequency.

``cb`` applies the weights from the first step to one of three base losses. Reduction: the batch mean
of the weighted per-sample terms, L = (1/B) sum_i w_{y_i} l_i (the class-balanced paper's form),
not PyTorch's ``cross_entropy(weight=...)`` mean, which divides by sum_i w_{y_i}:

- ``base="ce"``:      l_i = -log p_{i,y_i}
- ``base="focal"``:   l_i = -(1 - p_{i,y_i})^gamma log p_{i,y_i} (the softmax focal loss of ``focal``)
- ``base="sigmoid"``: l_i = sum_j BCE(z_ij, 1[j = y_i]), one-vs-all sigmoids summed over the C classes

DRW (Cao et al. 2019) is a schedule that any loss exposing per-sample terms (``per_sample_loss``) can
take: before epoch ``drw_epoch`` the loss is the plain batch mean of its per-sample terms; from
``drw_epoch`` on (``set_epoch`` is called by the trainer, 0-based) each term is weighted by the
class-balanced weight w_{y_i} with ``drw_beta`` (0.9999). The reduction after the switch is a setting:

- ``drw_normalize="weights"`` (default): L = sum_i w_{y_i} l_i / sum_i w_{y_i}, what the LDAM-DRW
  reference code computes with ``F.cross_entropy(..., weight=per_cls_weights)``;
- ``drw_normalize="batch"``: L = (1/B) sum_i w_{y_i} l_i, the class-balanced paper's reduction.

The schedule itself (:class:`DeferredReweighting`, :func:`with_deferred_reweighting`) is defined in
:mod:`gradtail.losses.deferred`, which the registry imports; its names are also importable from here.
Two equivalent ways to ask for it: the registered loss ``drw`` (``base`` names the wrapped loss, CE by
default), or ``drw_epoch=...`` on any ``create_loss`` call (see :func:`with_deferred_reweighting`).
LDAM-DRW is ``create_loss("drw", C, counts, base="ldam")`` (switch at epoch 160, beta 0.9999).

Empty batches give 0 under every reduction (no 0 / 0), and labels follow the conventions of
:mod:`gradtail.losses.base` (``docs/losses.md``); a DRW-wrapped loss keeps the statistics rule of the
loss it wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError
from gradtail.losses.base import PerSampleLoss, check_logits_targets, upcast_half, validate_class_counts
from gradtail.losses.deferred import (
    DRW_NORMALIZATIONS,
    DRW_OPTIONS,
    DRW_SEARCH_SPACE,
    DeferredReweighting,
    check_beta,
    effective_number_weights,
    pop_drw_options,
    weighted_reduction,
    with_deferred_reweighting,
)
from gradtail.losses.registry import create_loss, register_loss
from gradtail.losses.softmax import check_gamma, focal_terms
from gradtail.search_space import Choice, SearchSpace

Counts = Sequence[int] | torch.Tensor | None

CB_BASES = ("ce", "focal", "sigmoid")


@register_loss("cb")
class ClassBalancedLoss(PerSampleLoss):
    """Class-balanced loss: l_i = w_{y_i} * base_i, L = (1/B) sum_i l_i; defaults beta 0.9999, base "ce".

    ``gamma`` (default 1) is the focusing parameter of ``base="focal"`` and is refused with other bases.
    ``weights`` is a constant buffer (not statistics). Conventions (empty batch, labels):
    :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("cb", num_classes=3, class_counts=[100, 10, 1], beta=0.9999)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        1.876
    """

    search_space: ClassVar[SearchSpace] = {"beta": Choice((0.9, 0.99, 0.999, 0.9999))}

    weights: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Counts = None,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float | None = None,
    ) -> None:
        super().__init__(num_classes)
        counts = validate_class_counts(class_counts, num_classes, "cb")
        if base not in CB_BASES:
            raise ConfigError(f"loss 'cb': base must be one of {CB_BASES}, got {base!r}")
        self.beta = check_beta(beta, "cb")
        self.base = base
        if gamma is not None and base != "focal":
            raise ConfigError(f"loss 'cb': gamma applies to base='focal' only, got base={base!r}")
        self.gamma = check_gamma(1.0 if gamma is None else gamma, "cb")
        self.register_buffer("weights", effective_number_weights(counts, self.beta))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_logits_targets(logits, targets, self.num_classes)
        z = upcast_half(logits)
        y = targets.long()
        if self.base == "sigmoid":
            one_hot = F.one_hot(y, self.num_classes).to(z.dtype)
            base = F.binary_cross_entropy_with_logits(z, one_hot, reduction="none").sum(dim=1)
        else:
            base = focal_terms(z, y, self.gamma if self.base == "focal" else 0.0)
        return self.weights.to(z.dtype)[y] * base

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, beta={self.beta}, base={self.base!r}, gamma={self.gamma}"


@register_loss("drw")
def deferred_reweighting(
    num_classes: int,
    class_counts: Counts = None,
    base: str = "ce",
    drw_epoch: int = 160,
    drw_beta: float = 0.9999,
    drw_normalize: str = "weights",
    **base_kwargs: Any,
) -> DeferredReweighting:
    """The ``drw`` baseline: the registered loss ``base`` (CE by default; ``"ldam"`` gives LDAM-DRW) with
    class-balanced weights switched on at ``drw_epoch``; ``base_kwargs`` go to the base loss.

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("drw", num_classes=3, class_counts=[100, 10, 1], drw_epoch=2)
        >>> loss.set_epoch(5)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)
        1.3746
    """
    if base == "drw":
        raise ConfigError("loss 'drw': base must name another loss, not 'drw'")
    inner = create_loss(base, num_classes, class_counts, **base_kwargs)
    return DeferredReweighting(inner, class_counts, drw_epoch, drw_beta, drw_normalize)


deferred_reweighting.search_space = DRW_SEARCH_SPACE  # type: ignore[attr-defined]


__all__ = [  # the DRW names also importable from here, where they were first defined
    "CB_BASES",
    "DRW_NORMALIZATIONS",
    "DRW_OPTIONS",
    "DRW_SEARCH_SPACE",
    "ClassBalancedLoss",
    "DeferredReweighting",
    "check_beta",
    "deferred_reweighting",
    "effective_number_weights",
    "pop_drw_options",
    "weighted_reduction",
    "with_deferred_reweighting",
]
