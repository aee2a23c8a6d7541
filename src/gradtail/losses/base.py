"""The loss interface every gradtail loss follows, the conventions they share, and their shared checks.

A gradtail loss is an ``nn.Module`` with ``forward(logits, targets) -> scalar``, usable in any plain PyTorch
loop. Losses that need class counts take them at construction (validated here); losses that keep
statistics keep them in buffers (so they are checkpointed with ``state_dict()``). The trainer calls
``set_epoch`` at the start of each epoch (deferred schedules such as DRW read it) and nothing else.

Conventions (every registered loss; ``docs/losses.md`` has the same text with the per-loss table)
--------------------------------------------------------------------------------------------------

E. Empty batch. Logits without samples (shape (0, C), or a segmentation map with a zero-size spatial
   dimension) give the loss :func:`empty_batch_loss`: an exact 0.0 (in the dtype the loss returns, at
   least float32) that is attached to the logits' graph, so ``.backward()`` works and every gradient it
   produces is zero. Statistics stay bit-identical and the step counter does not advance. A stateful
   loss in a training call still runs its statistics update with zero contributions, so it reaches the
   same collective (its one SUM all-reduce) as on any other step: an empty batch on one DDP rank never
   leaves the other ranks waiting. The step counter advances when at least one rank counted a sample in
   that step (the sample count travels in the same all-reduce, :mod:`gradtail.gradstats`), so every rank
   keeps identical statistics; in one process an empty step is therefore never counted. A batch whose
   samples are all ignored (convention L) is an empty batch: loss 0, nothing accumulated, not counted.

S. Statistics. A stateful loss (class attribute ``stateful = True``: buffers that change in training)
   changes them only when ``self.training and torch.is_grad_enabled()`` and not inside
   :func:`gradtail.gradstats.frozen_statistics` (:meth:`LongTailLoss.updates_statistics`); every other
   call only reads them and runs no collective. Mode, grad mode and freezing must thus be the same on
   every rank at a given call, as they are in a DDP loop. One updating call is one accumulated step. A
   call in eval mode with grad enabled on logits that require grad warns once per loss instance
   (``RuntimeWarning``): it is usually a training step whose statistics would otherwise stay silently
   frozen (``loss.eval()`` left on); evaluate under ``torch.no_grad()`` to stay silent.

L. Labels. By default an index target must lie in [0, C); anything else is an :class:`InputError`
   naming the accepted range. Two detection conventions are constructor options, off by default, with
   the same names wherever they exist (``sigmoid_eql``, ``efl``, ``eqfl``: both; ``softmax_eql``:
   ``ignore_index``; validated by :func:`check_label_options`):

   - ``background_label: bool = False``: label C means background: the sample's target row is all
     negative (every class channel 0; with ``sigmoid_eql``'s objectness channel, 1 on that channel,
     docs/methods/eql.md §2). It adds negative gradient only and is not a positive of the EFL / EQFL
     normaliser (docs/methods/eql.md §3).
   - ``ignore_index: int | None = None``: samples with this label (an int outside [0, C), and not C
     with ``background_label``) contribute nothing: not to the loss, its normaliser, the statistics or
     the step's sample count. The loss and the statistics equal those of the batch without these
     samples, and their gradient is zero.

N. Normalisers. The batch mean (B samples) for the classification losses; ``sigmoid_eql`` and
   ``softmax_eql`` divide by the number of non-ignored samples (every non-ignored position in
   segmentation), ``efl`` / ``eqfl`` by the number of positive samples (non-ignored, non-background);
   each normaliser is at least 1, so a batch without any counted sample gives 0, never 0 / 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch

from gradtail.contracts import LossContract
from gradtail.errors import ConfigError, InputError
from gradtail.gradstats import statistics_frozen


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


def check_label_range(
    targets: torch.Tensor,
    num_classes: int,
    allow: int | None = None,
    *,
    background: bool = False,
    hint: str = "",
) -> None:
    """Reject labels outside [0, num_classes) (convention L of this module).

    ``background`` also accepts ``num_classes`` (the background label), ``allow`` one more value (an
    ignore index). The error names the accepted range, then ``hint`` (e.g. the options that would accept
    more). No device sync on accelerators (async assert).
    """
    if targets.numel() == 0:
        return
    ok = (targets >= 0) & (targets < num_classes + int(background))
    accepted = f"labels must be in [0, {num_classes})"
    if background:
        accepted += f" or {num_classes} (background)"
    if allow is not None:
        ok |= targets == allow
        accepted += f" or {allow} (ignored)"
    if targets.device.type == "cpu":
        if not bool(ok.all()):
            bad = targets[~ok].unique()[:5].tolist()
            raise InputError(f"{accepted}; found {bad}" + (f" ({hint})" if hint else ""))
    else:
        torch._assert_async(ok.all(), accepted)


def check_label_options(
    num_classes: int, background_label: bool, ignore_index: int | None, loss_name: str
) -> tuple[bool, int | None]:
    """Validate the detection label options of convention L; return them normalised (bool, int or None).

    ``ignore_index`` must be an int outside [0, C), and not C when ``background_label`` is on.
    """
    if not isinstance(background_label, bool):
        raise ConfigError(
            f"loss {loss_name!r}: background_label must be True or False, got {background_label!r}"
        )
    if ignore_index is None:
        return background_label, None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ConfigError(f"loss {loss_name!r}: ignore_index must be an int or None, got {ignore_index!r}")
    if 0 <= ignore_index < num_classes:
        raise ConfigError(
            f"loss {loss_name!r}: ignore_index {ignore_index} is a valid class index "
            f"(classes are [0, {num_classes}))"
        )
    if background_label and ignore_index == num_classes:
        raise ConfigError(
            f"loss {loss_name!r}: ignore_index {ignore_index} is the background label (background_label=True)"
        )
    return background_label, int(ignore_index)


def label_options_hint(num_classes: int, background_label: bool | None, ignore_index: int | None) -> str:
    """The label options still off, for an error message (``background_label=None``: no such option)."""
    parts = []
    if background_label is False:
        parts.append(f"background_label=True accepts {num_classes} as background")
    if ignore_index is None:
        parts.append("ignore_index=k ignores label k")
    return "; ".join(parts)


def empty_batch_loss(empty: torch.Tensor) -> torch.Tensor:
    """Convention E: the loss of a batch without samples, an exact 0.0 attached to the logits' graph.

    ``empty`` is any zero-element tensor computed from the logits (the logits themselves, or per-sample
    terms). Its sum is exactly 0 and carries the graph, so ``.backward()`` works and gives zero gradients
    (NaN from a mean over nothing is what this replaces). Returned in at least float32.
    """
    if empty.numel() != 0:
        raise InputError(f"empty_batch_loss expects a tensor without elements, got {tuple(empty.shape)}")
    return upcast_half(empty).sum()


def batch_mean(per_sample: torch.Tensor) -> torch.Tensor:
    """L = (1/B) sum_i l_i; an empty batch gives :func:`empty_batch_loss` (0, not NaN), convention E."""
    if per_sample.numel() == 0:
        return empty_batch_loss(per_sample)
    return per_sample.mean()


class LongTailLoss(LossContract):
    """Base class: ``forward(logits, targets) -> scalar`` plus an epoch hook.

    Subclasses set ``num_classes`` and may override :meth:`set_epoch`. ``required_head`` names the
    classifier head a loss is defined on (``"cosine"`` for LDAM), ``None`` for any head. ``stateful``
    marks losses whose buffers change in training; they follow the conventions of this module.

    Example:
        >>> from gradtail.losses import create_loss
        >>> [(name, create_loss(name, 3).stateful) for name in ("ce", "softmax_eql")]
        [('ce', False), ('softmax_eql', True)]
    """

    required_head: ClassVar[str | None] = None
    allows_single_class: ClassVar[bool] = False  # wrappers whose inner loss validated num_classes
    stateful: bool = False  # True when buffers change during training (convention S of this module)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if int(num_classes) < 2 and not self.allows_single_class:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.epoch = 0
        self._warned_eval = False

    def updates_statistics(self, logits: torch.Tensor) -> bool:
        """Convention S: whether this call may change the loss's statistics (stateful losses ask this).

        True iff ``self.training and torch.is_grad_enabled()`` and not inside
        :func:`gradtail.gradstats.frozen_statistics`. In eval mode with grad enabled on ``logits`` that
        require grad, warns once per instance: probably a training step whose statistics stay frozen.
        """
        if statistics_frozen():
            return False
        if self.training:
            return torch.is_grad_enabled()
        if torch.is_grad_enabled() and logits.requires_grad and not self._warned_eval:
            self._warned_eval = True
            warnings.warn(
                f"{type(self).__name__} is in eval mode but its logits require grad: its statistics are "
                "not updated (call loss.train() for training steps; evaluate under torch.no_grad())",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

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
    with per-sample class re-weighting (deferred re-weighting, ``gradtail.losses.reweighting``, which accepts
    exactly the subclasses of this class).

    Example:
        >>> import torch
        >>> class AbsoluteError(PerSampleLoss):
        ...     def per_sample_loss(self, logits, targets):
        ...         check_logits_targets(logits, targets, self.num_classes)
        ...         return (1.0 - logits.gather(1, targets.view(-1, 1))).abs().squeeze(1)
        >>> loss = AbsoluteError(3)
        >>> loss(torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.0, 2.0]]), torch.tensor([0, 2])).item()
        0.75
        >>> loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item()  # empty batch (convention E)
        0.0
    """

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L = (1/B) sum_i l_i (:func:`batch_mean`: 0 for an empty batch, convention E)."""
        return batch_mean(self.per_sample_loss(logits, targets))
