"""Loss functions: a registry and ``create_loss``.

Every loss is an ``nn.Module`` ``(logits, targets) -> scalar``. The conventions every registered loss
follows (empty batches, when statistics change, accepted labels and the detection label options,
normalisers) are in :mod:`gradtail.losses.base` and ``docs/losses.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradtail.losses.base import (
    LongTailLoss,
    batch_mean,
    check_label_options,
    check_logits_targets,
    empty_batch_loss,
    validate_class_counts,
)
from gradtail.registry import Registry

LOSSES: Registry[LongTailLoss] = Registry("loss", package=(__name__, __path__))
register_loss = LOSSES.register


def create_loss(
    name: str,
    num_classes: int,
    class_counts: Sequence[int] | torch.Tensor | None = None,
    **kwargs: Any,
) -> LongTailLoss:
    """Build a registered loss. ``class_counts`` (training images per class) is passed to every loss;
    those that need it validate it, the others ignore it. ``drw_epoch`` (and optionally ``drw_beta``,
    ``drw_normalize``) gives any loss exposing ``per_sample_loss`` the deferred re-weighting schedule.

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("logit_adjust", num_classes=3, class_counts=[100, 10, 1])
        >>> type(loss).__name__, loss(torch.zeros(2, 3), torch.tensor([0, 2])).dim()
        ('LogitAdjustedLoss', 0)
        >>> create_loss("ce", 3, drw_epoch=160, class_counts=[100, 10, 1]).drw_epoch
        160
    """
    from gradtail.losses.reweighting import pop_drw_options, with_deferred_reweighting

    factory = LOSSES.get(name)
    if name == "drw":  # the DRW wrapper itself takes the options
        return factory(num_classes=num_classes, class_counts=class_counts, **kwargs)
    drw_options = pop_drw_options(kwargs)
    loss = factory(num_classes=num_classes, class_counts=class_counts, **kwargs)
    return with_deferred_reweighting(loss, class_counts, **drw_options)


def loss_names() -> list[str]:
    return LOSSES.names()


__all__ = [
    "LOSSES",
    "LongTailLoss",
    "batch_mean",
    "check_label_options",
    "check_logits_targets",
    "create_loss",
    "empty_batch_loss",
    "loss_names",
    "register_loss",
    "validate_class_counts",
]
