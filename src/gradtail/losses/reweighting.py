"""Class re-weighting by the effective number of samples: ``cb`` and deferred re-weighting (DRW).

Class-balanced weights (Cui et al. 2019): w_j = (1 - beta) / (1 - beta^{n_j}), normalised so that
sum_j w_j = C. beta = 0 gives uniform weights; beta -> 1 approaches inverse class frequency.

``cb`` applies the weights from the first step to one of four base losses. Reduction: the batch mean
of the weighted per-sample terms, L = (1/B) sum_i w_{y_i} l_i (the class-balanced paper's form),
not PyTorch's ``cross_entropy(weight=...)`` mean, which divides by sum_i w_{y_i}:

- ``base="ce"``:            l_i = -log p_{i,y_i}
- ``base="sigmoid_focal"``: l_i = sum_j (1 - p_t,ij)^gamma BCE(z_ij, T_ij), T_ij = 1[j = y_i],
  p_t = sigmoid(z) where T = 1 and 1 - sigmoid(z) where T = 0: the class-balanced focal loss as
  published (Cui et al. 2019, their released ``focal_loss``: one-vs-all sigmoids, the modulator
  exp(-gamma T z - gamma log(1 + exp(-z))) = (1 - p_t)^gamma, no alpha balance, summed over the C
  classes and divided by the number of positives, B). The ``cb_focal`` configs use it.
- ``base="softmax_focal"``: l_i = -(1 - p_{i,y_i})^gamma log p_{i,y_i} (the softmax focal loss of
  ``focal``); ``base="focal"`` is its earlier name, kept so that old configs mean what they meant.
- ``base="sigmoid"``:       l_i = sum_j BCE(z_ij, 1[j = y_i]), one-vs-all sigmoids summed over the C classes

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
from gradtail.losses.base import PerSampleLoss, checked_logits_targets, upcast_half, validate_class_counts
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

CB_BASES = ("ce", "sigmoid_focal", "softmax_focal", "sigmoid", "focal")  # "focal": softmax_focal
_FOCAL_BASES = ("sigmoid_focal", "softmax_focal", "focal")


def sigmoid_focal_terms(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample one-vs-all sigmoid focal loss l_i = sum_j (1 - p_t,ij)^gamma BCE(z_ij, T_ij)
    (Cui et al. 2019's ``focal_loss`` before its class weight; no alpha balance).

    With s = z (2 T - 1): BCE = -log sigmoid(s) and 1 - p_t = sigmoid(-s), so
    l_i = -sum_j exp(gamma logsigmoid(-s_ij)) logsigmoid(s_ij) (stable for large |z|; gamma = 0 gives
    the summed BCE exactly).
    """
    t = F.one_hot(targets.long(), logits.shape[1]).to(torch.bool)
    s = torch.where(t, logits, -logits)
    log_pt = F.logsigmoid(s)
    if gamma == 0:
        return -log_pt.sum(dim=1)
    return -(torch.exp(gamma * F.logsigmoid(-s)) * log_pt).sum(dim=1)


@register_loss("cb")
class ClassBalancedLoss(PerSampleLoss):
    """Class-balanced loss: l_i = w_{y_i} * base_i, L = (1/B) sum_i l_i; defaults beta 0.9999, base "ce".

    ``base``: ``"ce"``, ``"sigmoid_focal"`` (the published class-balanced focal loss),
    ``"softmax_focal"`` (``"focal"``, its earlier name), ``"sigmoid"`` (module docstring). ``gamma``
    (default 1, the released code's) is the focusing parameter of the focal bases and is refused with
    the others.
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
        if gamma is not None and base not in _FOCAL_BASES:
            raise ConfigError(
                f"loss 'cb': gamma applies to the focal bases {_FOCAL_BASES} only, got base={base!r}"
            )
        self.gamma = check_gamma(1.0 if gamma is None else gamma, "cb")
        self.register_buffer("weights", effective_number_weights(counts, self.beta))

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)
        z = upcast_half(logits)
        y = targets.long()
        if self.base == "sigmoid":
            one_hot = F.one_hot(y, self.num_classes).to(z.dtype)
            base = F.binary_cross_entropy_with_logits(z, one_hot, reduction="none").sum(dim=1)
        elif self.base == "sigmoid_focal":
            base = sigmoid_focal_terms(z, y, self.gamma)
        else:
            base = focal_terms(z, y, self.gamma if self.base in _FOCAL_BASES else 0.0)
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
    "sigmoid_focal_terms",
    "weighted_reduction",
    "with_deferred_reweighting",
]
