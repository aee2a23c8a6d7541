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
   :meth:`LongTailLoss.normalizer` gives the count of a batch of targets.

A. Accumulation. Inside ``with loss.accumulate(total):`` (or ``accumulate(targets=union_targets)``)
   every call is normalised by the normaliser of the union of the micro-batches (``total``, at least 1)
   instead of its own, reads the statistics from before the context, and its statistics update is kept
   aside; at the exit the updates are added as one step (one all-reduce under DDP). k micro-batches
   then give the loss gradients and the statistics of one batch of their union.

V. Validation. Every input check runs before any buffer changes: a call that raises leaves every
   buffer bit-identical. Logits must be floating point; ``num_classes`` an integer.

P. Precision and compile. Loss buffers keep their dtype (float64) through ``.to(dtype)``, ``.half()``,
   ``.bfloat16()`` (device moves apply). Under ``torch.compile`` statistics are read through
   :func:`gradtail.gradstats.read_statistics` and data-dependent checks run in an opaque op, so a
   compiled loss (``fullgraph=True`` included) gives eager's values, gradients, statistics and errors.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from gradtail.contracts import LossContract
from gradtail.errors import ConfigError, InputError
from gradtail.gradstats import keep_buffer_dtypes, statistics_frozen


def validate_class_counts(
    class_counts: Sequence[int] | torch.Tensor | None, num_classes: int, loss_name: str
) -> torch.Tensor:
    """Return counts as a float64 tensor, or raise :class:`ConfigError` naming what is wrong."""
    num_classes = check_num_classes(num_classes, f"loss {loss_name!r}")
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


def check_num_classes(num_classes: object, loss_name: str = "loss") -> int:
    """``num_classes`` as an int; a float (even 10.0), a bool or anything else is a :class:`ConfigError`
    (``int(2.5)`` would silently give 2)."""
    if isinstance(num_classes, bool):
        raise ConfigError(f"{loss_name}: num_classes must be an integer, got {num_classes!r}")
    try:
        return operator.index(num_classes)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{loss_name}: num_classes must be an integer, got {num_classes!r}") from None


def check_floating_logits(logits: torch.Tensor, name: str = "logits") -> None:
    """Logits must be a floating-point tensor (integer or boolean logits have no gradient): InputError."""
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise InputError(f"{name} must be floating point, got dtype {logits.dtype}")


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor, num_channels: int) -> None:
    """Shape / dtype checks (free) and a label-range check that never forces a device sync.

    On CPU the range check is an ordinary comparison; on an accelerator it is an asynchronous assert
    (``torch._assert_async``) that fails at the next synchronization point instead of stalling every step.
    Labels equal to -1 are not accepted here; losses that support an ignore label check it themselves.
    Losses call :func:`checked_logits_targets` instead, which also works inside ``torch.compile``.
    """
    _check_logits_targets_shapes(logits, targets, num_channels)
    check_label_range(targets, num_channels)


def checked_logits_targets(logits: torch.Tensor, targets: torch.Tensor, num_channels: int) -> torch.Tensor:
    """:func:`check_logits_targets`, returning the targets to use from here on (:func:`checked_labels`:
    under ``torch.compile`` the label check is an opaque op the rest of the loss depends on)."""
    _check_logits_targets_shapes(logits, targets, num_channels)
    return checked_labels(targets, num_channels)


def _check_logits_targets_shapes(logits: torch.Tensor, targets: torch.Tensor, num_channels: int) -> None:
    check_floating_logits(logits)
    if not isinstance(targets, torch.Tensor):
        raise InputError(f"targets must be a tensor, got {type(targets).__name__}")
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
    ok = _labels_ok(targets, num_classes, allow, background)
    accepted = _accepted_labels(num_classes, allow, background)
    if targets.device.type == "cpu":
        if not bool(ok.all()):
            bad = targets[~ok].unique()[:5].tolist()
            raise InputError(f"{accepted}; found {bad}" + (f" ({hint})" if hint else ""))
    else:
        torch._assert_async(ok.all(), accepted)


def _labels_ok(targets: torch.Tensor, num_classes: int, allow: int | None, background: bool) -> torch.Tensor:
    ok = (targets >= 0) & (targets < num_classes + int(background))
    if allow is not None:
        ok |= targets == allow
    return ok


def _accepted_labels(num_classes: int, allow: int | None, background: bool) -> str:
    accepted = f"labels must be in [0, {num_classes})"
    if background:
        accepted += f" or {num_classes} (background)"
    if allow is not None:
        accepted += f" or {allow} (ignored)"
    return accepted


@torch.library.custom_op("gradtail::checked_labels", mutates_args=())
def _checked_labels_op(
    targets: torch.Tensor, num_classes: int, allow: int | None, background: bool, hint: str
) -> torch.Tensor:
    """:func:`check_label_range`, run eagerly inside compiled code (opaque to the compiler)."""
    ok = _labels_ok(targets, num_classes, allow, background)
    if not bool(ok.all()):
        bad = targets[~ok].unique()[:5].tolist()
        accepted = _accepted_labels(num_classes, allow, background)
        raise InputError(f"{accepted}; found {bad}" + (f" ({hint})" if hint else ""))
    return targets.clone()


@_checked_labels_op.register_fake
def _checked_labels_fake(
    targets: torch.Tensor, num_classes: int, allow: int | None, background: bool, hint: str
) -> torch.Tensor:
    return torch.empty_like(targets)


def checked_labels(
    targets: torch.Tensor,
    num_classes: int,
    allow: int | None = None,
    *,
    background: bool = False,
    hint: str = "",
) -> torch.Tensor:
    """:func:`check_label_range`, then ``targets`` to use from here on (convention V).

    Eager: the check as :func:`check_label_range` does it, and ``targets`` itself. Under
    ``torch.compile`` on CPU (where a data-dependent ``if`` would break the graph, or fail with
    ``fullgraph=True``): an opaque op that raises the same one-line :class:`InputError` and returns a
    copy of ``targets``; everything computed from the copy, the statistics update included, then runs
    after the check, so a bad label leaves every buffer unchanged in compiled code too.
    """
    if torch.compiler.is_compiling() and targets.device.type == "cpu" and targets.numel() != 0:
        return _checked_labels_op(targets, num_classes, allow, background, hint)
    check_label_range(targets, num_classes, allow, background=background, hint=hint)
    return targets


@torch.library.custom_op("gradtail::checked_true", mutates_args=())
def _checked_true_op(x: torch.Tensor, ok: torch.Tensor, message: str) -> torch.Tensor:
    if not bool(ok.all()):
        raise InputError(message)
    return x.clone()


@_checked_true_op.register_fake
def _checked_true_fake(x: torch.Tensor, ok: torch.Tensor, message: str) -> torch.Tensor:
    return torch.empty_like(x)


def checked_value(x: torch.Tensor, ok: torch.Tensor, message: str) -> torch.Tensor:
    """Raise ``InputError(message)`` unless ``ok`` is all true; return ``x`` to use from here on.

    CPU: an ordinary check (under ``torch.compile``, inside an opaque op as :func:`checked_labels`);
    accelerators: an asynchronous assert (no device sync).
    """
    if x.device.type != "cpu":
        torch._assert_async(ok.all(), message)
        return x
    if torch.compiler.is_compiling():
        return _checked_true_op(x, ok, message)
    if not bool(ok.all()):
        raise InputError(message)
    return x


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
        num_classes = check_num_classes(num_classes, type(self).__name__)
        if num_classes < 2 and not self.allows_single_class:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.epoch = 0
        self._warned_eval = False
        self._accumulation: Accumulation | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Module conversions: devices apply to the loss's buffers, dtypes do not (convention P).

        ``loss.to(torch.bfloat16)``, ``.half()`` and a ``model.to(...)`` holding the loss would otherwise
        cast float64 statistics and constants (class weights, margins, priors) down.
        """
        return keep_buffer_dtypes(self, lambda: super(LongTailLoss, self)._apply(fn, recurse))

    # ------------------------------------------------------------------ accumulation (convention A)
    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """The count this loss divides by for a batch with these targets (convention N), float64 0-dim,
        before the "at least 1" floor: B for a mean over samples. The ``total`` of :meth:`accumulate`
        is this count for the union of the micro-batches."""
        if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
            raise InputError(f"{type(self).__name__}.normalizer expects a tensor of targets")
        return torch.tensor(float(targets.shape[0]), dtype=torch.float64)

    @property
    def accumulating(self) -> bool:
        """True inside :meth:`accumulate`."""
        return self._accumulation is not None

    def _divisor(self, own: torch.Tensor | int | float) -> torch.Tensor | int | float:
        """What this call divides its summed loss by: max(own count, 1) normally (convention N), the
        union's max(total, 1) inside :meth:`accumulate` (convention A)."""
        acc = self._accumulation
        if acc is not None:
            return acc.divisor
        if isinstance(own, torch.Tensor):
            return own.clamp(min=1)
        return max(own, 1)

    @contextmanager
    def accumulate(
        self, total: int | float | torch.Tensor | None = None, *, targets: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Gradient accumulation: k micro-batches inside give the loss gradients and statistics of one
        batch of their union (convention A; ``docs/losses.md``).

        Args:
            total: the union's normaliser on this process, in the unit of :meth:`normalizer` (samples
                for the classification losses, non-ignored samples or positions for ``sigmoid_eql`` /
                ``softmax_eql``, positive samples for ``efl`` / ``eqfl``); floored at 1. A number or a
                0-dim tensor; a tensor with at least one dimension is taken as ``targets``.
            targets: instead of ``total``, the union's targets (all micro-batches' labels, in order or
                not): ``total = normalizer(targets)``. Needed by ``seesaw`` (its factors count the
                union's labels before its first micro-batch) and by ``drw`` after its switch with
                ``drw_normalize="weights"`` (a sum of class weights); right for every loss.

        Inside, each call returns its summed loss divided by max(total, 1), so the sum of the
        micro-batches' gradients is the gradient of the union's loss; every call reads the statistics
        from before the context; their updates are added at the exit as one step, with one all-reduce
        under DDP (the totals are summed over ranks there, as the sample counts are). An exception
        inside drops the updates. Stateless losses only change their normaliser. Contexts do not nest.

        Example:
            >>> import torch
            >>> from gradtail.losses import create_loss
            >>> loss = create_loss("softmax_eql", num_classes=3)
            >>> z, y = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 0, 1, 2])
            >>> with loss.accumulate(total=4):
            ...     for part in (slice(0, 2), slice(2, 4)):
            ...         loss(z[part], y[part]).backward()
            >>> int(loss.stats.steps)  # one step for the two micro-batches
            1
        """
        self.start_accumulation(total, targets=targets)
        try:
            yield
        except BaseException:
            self.finish_accumulation(commit=False)
            raise
        self.finish_accumulation(commit=True)

    def start_accumulation(
        self, total: int | float | torch.Tensor | None = None, *, targets: torch.Tensor | None = None
    ) -> None:
        """What entering :meth:`accumulate` does (for wrappers and loops that cannot use ``with``)."""
        if self._accumulation is not None:
            raise ConfigError(f"{type(self).__name__}.accumulate(): already accumulating (no nesting)")
        if isinstance(total, torch.Tensor) and total.dim() >= 1 and targets is None:
            total, targets = None, total  # the union's targets, given positionally
        if (total is None) == (targets is None):
            raise ConfigError("accumulate() takes the union's total or its targets (exactly one)")
        if targets is not None:
            total = self.normalizer(targets)
        acc = Accumulation.of(total, type(self).__name__)  # type: ignore[arg-type]
        self._begin_accumulation(acc, targets)
        self._accumulation = acc

    def finish_accumulation(self, commit: bool = True) -> None:
        """What leaving :meth:`accumulate` does: add the updates kept aside as one step (``commit``) or
        drop them."""
        if self._accumulation is None:
            raise ConfigError(f"{type(self).__name__}: finish_accumulation() without start_accumulation()")
        self._accumulation = None
        self._end_accumulation(commit)

    def _begin_accumulation(self, acc: Accumulation, targets: torch.Tensor | None) -> None:
        """Hook for stateful losses: start keeping updates aside (nothing for stateless losses)."""

    def _end_accumulation(self, commit: bool) -> None:
        """Hook for stateful losses: add the updates kept aside as one step (or drop them)."""

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


@dataclass
class Accumulation:
    """The state of :meth:`LongTailLoss.accumulate`: the union's normaliser on this process."""

    total: torch.Tensor  # float64 0-dim, >= 0

    @property
    def divisor(self) -> torch.Tensor:
        """max(total, 1): what every micro-batch's summed loss is divided by."""
        return self.total.clamp(min=1.0)

    @staticmethod
    def of(total: int | float | torch.Tensor, owner: str) -> Accumulation:
        """Validate ``total`` (a finite count >= 0, a number or a 0-dim tensor)."""
        if isinstance(total, bool) or not isinstance(total, int | float | torch.Tensor):
            raise ConfigError(
                f"{owner}.accumulate(): total must be a number or a 0-dim tensor, got {total!r}"
            )
        t = torch.as_tensor(total, dtype=torch.float64).detach()
        if t.dim() != 0:
            raise ConfigError(f"{owner}.accumulate(): total must be 0-dim, got shape {tuple(t.shape)}")
        if t.device.type == "cpu" and not (bool(torch.isfinite(t)) and float(t) >= 0):
            raise ConfigError(f"{owner}.accumulate(): total must be a finite count >= 0, got {float(t)}")
        return Accumulation(total=t)


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
        """L = (1/B) sum_i l_i (:func:`batch_mean`: 0 for an empty batch, convention E); inside
        :meth:`accumulate`, sum_i l_i / max(total, 1) (convention A)."""
        per_sample = self.per_sample_loss(logits, targets)
        acc = self._accumulation
        if acc is None or per_sample.numel() == 0:
            return batch_mean(per_sample)
        return per_sample.sum() / acc.divisor.to(device=per_sample.device, dtype=per_sample.dtype)
