"""Loss functions: the registry (:mod:`gradtail.losses.registry`) and the shared base, re-exported.

Every loss is an ``nn.Module`` ``(logits, targets) -> scalar``. The conventions every registered loss
follows (empty batches, when statistics change, accepted labels and the detection label options,
normalisers, accumulation, compile, precision of the statistics) are in :mod:`gradtail.losses.base` and
``docs/losses.md``. This file only re-exports: loss modules import ``register_loss`` from
:mod:`gradtail.losses.registry`, so no import runs in a circle.
"""

from __future__ import annotations

from gradtail.losses.base import (
    LongTailLoss,
    batch_mean,
    check_label_options,
    check_logits_targets,
    empty_batch_loss,
    validate_class_counts,
)
from gradtail.losses.registry import LOSSES, create_loss, loss_names, register_loss

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
