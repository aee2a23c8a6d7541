"""The loss interface every gradtail loss follows, and the input checks they share.

A gradtail loss is an ``nn.Module`` with ``forward(logits, targets) -> scalar``, usable in any plain PyTorch
loop. Losses that need class counts take them at construction (validated here); losses that keep
statistics keep them in buffers (so they are checkpointed with ``state_dict()``) and update them only
in training mode with gradients enabled. The trainer calls ``set_epoch`` at the start of each epoch
(deferred schedules such as DRW read it) and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradtail.errors import ConfigError, InputError


def validate_class_counts(
    class_counts: Sequence[int] | torch.Tensor | None, num_classes: int, loss_name: str
) -> torch.Tensor:
    """Return counts as a float64 tensor, or raise :class:`ConfigError` naming what is wrong."""
    if class_counts is None:
        raise ConfigError(f"loss {loss_name!r} needs class_counts (training images per class)")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() != num_classes:
        raise ConfigError(
            f"loss {loss_name!r}: class_counts has {counts.numel()} entries, "
            f"expected num_classes={num_classes}"
        )
    if not torch.isfinite(counts).all() or (counts <= 0).any():
        bad = [i for i, c in enumerate(counts.tolist()) if not (c > 0)]
        raise ConfigError(
            f"loss {loss_name!r}: class_counts must be positive; classes {bad} have zero/invalid counts"
        )
    return counts


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor, num_channels: int) -> None:
    """Shape / dtype checks (free) and a label-range check that never forces a device sync.

    On CPU the range check is an ordinary comparison; on an accelerator it is an asynchronous assert
    (``torch._assert_async``) that fails at the next synchronization point instead of stalling every step.
    Labels equal to -1 are not accepted here; losses that support an ignore label check it themselves.
    """
    if logits.dim() != 2:
        raise InputError(f"logits must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_channels:
        raise InputError(f"logits have {logits.shape[1]} class channels, the loss expects {num_channels}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise InputError(
            f"targets must be 1-D with one label per row of logits ({logits.shape[0]}), got shape "
            f"{tuple(targets.shape)}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InputError(f"targets must be integer class indices, got dtype {targets.dtype}")
    check_label_range(targets, num_channels)


def check_label_range(targets: torch.Tensor, num_classes: int, allow: int | None = None) -> None:
    """Reject labels outside [0, num_classes) (``allow`` may name one extra accepted value, e.g. -1)."""
    if targets.numel() == 0:
        return
    ok = (targets >= 0) & (targets < num_classes)
    if allow is not None:
        ok |= targets == allow
    if targets.device.type == "cpu":
        if not bool(ok.all()):
            bad = targets[~ok].unique()[:5].tolist()
            raise InputError(f"labels must be in [0, {num_classes}); found {bad}")
    else:
        torch._assert_async(ok.all(), f"labels must be in [0, {num_classes})")


class LongTailLoss(nn.Module):
    """Base class: ``forward(logits, targets) -> scalar`` plus an epoch hook.

    Subclasses set ``num_classes`` and may override :meth:`set_epoch`. ``required_head`` names the
    classifier head a loss is defined on (``"cosine"`` for LDAM), ``None`` for any head.
    """

    required_head: str | None = None

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if int(num_classes) < 2 and not getattr(self, "allows_single_class", False):
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (0-based)."""
        self.epoch = int(epoch)

    def inference_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits as the loss reads them, for prediction and calibration at test time.

        The identity for most losses; a loss that applies a fixed transform inside (LDAM's scale s on
        cosine logits) returns that transform, so test probabilities and ECE use the trained scale.
        Never a training-time adjustment (margins, priors, statistics): test time uses raw logits.
        """
        return logits

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


def upcast_half(logits: torch.Tensor) -> torch.Tensor:
    """Return ``logits`` in float32 when they are float16 / bfloat16, unchanged otherwise.

    Losses compute log-probabilities and class re-weightings in at least float32 whatever the training
    precision (the same choice autocast makes for ``cross_entropy``).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        return logits.float()
    return logits


class PerSampleLoss(LongTailLoss):
    """A loss that is the batch mean of per-sample terms: ``forward = per_sample_loss(z, y).mean()``.

    Subclasses implement ``per_sample_loss(logits, targets) -> (B,)`` (input checks and any statistics
    update happen there, once per call). Exposing the per-sample terms is what lets a loss be combined
    with per-sample class re-weighting (deferred re-weighting, ``gradtail.losses.reweighting``). Any
    :class:`LongTailLoss` may offer the same method without subclassing this.
    """

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L = (1/B) sum_i l_i."""
        return self.per_sample_loss(logits, targets).mean()
