"""The loss registry: ``LOSSES``, ``register_loss``, ``create_loss``, ``loss_names``.

Loss modules register themselves with ``@register_loss(name)`` (imported from here, never from the
package ``gradtail.losses``, so no import runs in a circle); the registry imports every module of the
package on its first lookup. ``create_loss`` also gives any loss the deferred re-weighting schedule
(:mod:`gradtail.losses.deferred`) when ``drw_epoch`` is passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gradtail.losses.base import LongTailLoss
from gradtail.losses.deferred import pop_drw_options, with_deferred_reweighting
from gradtail.registry import Registry

_PACKAGE = __name__.rpartition(".")[0]  # gradtail.losses: every module in it registers its losses

LOSSES: Registry[LongTailLoss] = Registry("loss", package=(_PACKAGE, [str(Path(__file__).parent)]))
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
    factory = LOSSES.get(name)
    if name == "drw":  # the DRW wrapper itself takes the options
        return factory(num_classes=num_classes, class_counts=class_counts, **kwargs)
    drw_options = pop_drw_options(kwargs)
    loss = factory(num_classes=num_classes, class_counts=class_counts, **kwargs)
    return with_deferred_reweighting(loss, class_counts, **drw_options)


def loss_names() -> list[str]:
    """The registered loss names, sorted."""
    return LOSSES.names()
