"""The Equalization losses (docs/methods/eql.md §1-4; Tan et al., TPAMI 2023, EQLv2 CVPR 2021, EFL CVPR 2022).

Each loss keeps a :class:`gradtail.gradstats.GradientStatistics` submodule ``stats`` (float64 buffers
P, N, steps: checkpointed by ``state_dict()``, SUM-all-reduced across ranks) and follows
docs/methods/eql.md §1:

1. Timing: ``forward`` derives its class weights / offsets from the statistics as they are on entry
   (through step t-1), builds the loss, and only then adds the step-t gradient of *that* loss.
2. Detachment: weights and offsets are computed from buffers under no autograd history; the closed-form
   gradient is computed from ``logits.detach()``; nothing flows back into the statistics.
3. Synchronization: one all-reduce per training forward, on every rank (inside the statistics update).
4. Statistics are buffers (``stats.pos``, ``stats.neg``, ``stats.steps``).
5. Precision: the loss and its closed-form gradient are computed in float32 (float64 for float64
   logits) from the logits, whatever autocast produced; sums are float64. bf16/fp16 autocast therefore
   gives the same statistics as fp32 on the same logits, and no gradient scaler is involved.
6. What is accumulated follows each loss's official code (docs/methods/eql.md §9), because in detection
   the number of samples n (and of positives) changes from step to step, and a per-step factor 1/n then
   changes the ratios g_j (by up to ~100% with n between 8 and 200), not only the absolute P, N:

   - ``sigmoid_eql`` (EQLv2): by default (``accumulation="official"``) the released code's
     |sigmoid(z_ij) - T_ij| w_ij summed over the step's samples, *without* the 1/n of the loss and
     without any world-size factor (SUM over ranks = one process with the whole batch).
     ``accumulation="exact"`` instead adds the exact |dL/dz| of the mean over the step's samples, which
     is what the other losses do.
   - ``efl`` / ``eqfl``: |dl/dz| of the loss *including* its normaliser (the number of positives), or,
     with a ``normalizer`` passed to ``forward``, that normaliser divided by the world size.
   - ``softmax_eql``: the exact |dL/dz| of the mean over samples.

   Normalisers are global (rule 8 of :mod:`gradtail.gradstats`): each rank adds its per-sample
   gradients without the normaliser and the normaliser's count; the counts are summed in the same
   all-reduce and divide the summed gradients. Any split of a batch over processes (20 + 12 samples as
   well as 16 + 16) therefore accumulates exactly what one process with the whole batch does.

   Only a factor that is the same at every step leaves the ratios unchanged (rule 6 of §1).

Empty batches, when statistics change (and the eval-mode warning), label options (``background_label``,
``ignore_index``) and normalisers follow the conventions E, S, L, N of :mod:`gradtail.losses.base`
(``docs/losses.md``), as do accumulation (A: ``with loss.accumulate(total):``, k micro-batches = one
step of their union), validation before any buffer changes (V), and precision and compile (P). One
training forward outside ``accumulate`` = one accumulated step, so an update rule that evaluates the
loss several times per optimizer step must freeze the extra passes. Buffers follow the logits' device
(the module moves itself on the first forward on a new device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from gradtail.distributed import world_size
from gradtail.errors import ConfigError, InputError
from gradtail.gradstats import GradientStatistics, class_sums, read_statistics
from gradtail.losses.base import (
    Accumulation,
    LongTailLoss,
    check_floating_logits,
    check_label_options,
    checked_labels,
    checked_value,
    empty_batch_loss,
    label_options_hint,
)
from gradtail.losses.closed_form import SoftmaxCrossEntropy, cross_entropy_step
from gradtail.losses.registry import register_loss
from gradtail.search_space import Choice, FloatRange, SearchSpace

Indicator = Literal["pos", "neg", "pos_and_neg"]
ClassCounts = Sequence[int] | torch.Tensor | None


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits, float64 for float64 (docs/methods/eql.md §1 rule 5)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _check_2d_logits(logits: torch.Tensor, channels: int, name: str) -> None:
    check_floating_logits(logits, f"{name}: logits")
    if logits.dim() != 2 or logits.shape[1] != channels:
        raise InputError(f"{name}: logits must be (n, {channels}), got shape {tuple(logits.shape)}")


def _check_index_targets(targets: torch.Tensor, n: int, name: str) -> None:
    if not isinstance(targets, torch.Tensor):
        raise InputError(f"{name}: targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != n:
        raise InputError(f"{name}: targets must be ({n},) class indices, got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InputError(f"{name}: targets must be integer class indices, got dtype {targets.dtype}")


def _checked_unit_interval(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` after checking its values lie in [0, 1] (:func:`~gradtail.losses.base.checked_value`)."""
    return checked_value(x, (x >= 0) & (x <= 1), f"{what} must lie in [0, 1]")


def sigmoid_eql_scores(logits: torch.Tensor) -> torch.Tensor:
    """Detection inference scores (docs/methods/eql.md §2): score_j = sigmoid(z_j) * (1 - sigmoid(z_extra)).

    ``logits`` is (n, C + 1) with the objectness/background channel last; returns (n, C). Uses
    1 - sigmoid(x) = sigmoid(-x) for accuracy when the background logit is large.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise InputError(f"logits must be (n, C + 1) with C >= 1, got shape {tuple(logits.shape)}")
    z = logits.to(_work_dtype(logits))
    return torch.sigmoid(z[:, :-1]) * torch.sigmoid(-z[:, -1:])


class _EqualizationLoss(LongTailLoss):
    """Shared plumbing: the statistics submodule, when to collect, device following
    (docs/methods/eql.md §1)."""

    stateful = True

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.stats = GradientStatistics(self.num_classes)

    def _prepare(self, logits: torch.Tensor) -> bool:
        """After the input checks (convention V): move buffers to the logits' device; return whether
        this call updates the statistics (S)."""
        if self.stats.pos.device != logits.device:
            self.to(logits.device)
        return self.updates_statistics(logits)

    def ratio(self) -> torch.Tensor:
        """g_j = P_j / (N_j + 1e-10) (docs/methods/eql.md §1), float64 (C,), as accumulated so far."""
        return self.stats.ratio()

    def _begin_accumulation(self, acc: Accumulation, targets: torch.Tensor | None) -> None:
        self.stats.begin_accumulation(acc.total)

    def _end_accumulation(self, commit: bool) -> None:
        self.stats.end_accumulation(commit)


# ---------------------------------------------------------------------------------------------- §2
class _EQLv2Targets(NamedTuple):
    """The targets T of one :class:`SigmoidEQL` call in the form its closed form reads (§2).

    Index targets: ``idx`` (n, 1) long, the channel of each row's 1 (any channel for a row without
    one), ``hot`` (n, 1) bool, whether T is 1 there, ``dense`` None. Multi-label targets: ``dense``, the
    (n, C) bool T, ``idx`` and ``hot`` None. ``valid``: (n, 1) bool, False on ignored rows, or None
    without ``ignore_index``.
    """

    idx: torch.Tensor | None
    hot: torch.Tensor | None
    dense: torch.Tensor | None
    valid: torch.Tensor | None


@torch.no_grad()
def _eqlv2_value(
    z: torch.Tensor, r: torch.Tensor, q: torch.Tensor, labels: _EQLv2Targets, with_p: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_ij w_ij BCE(z_ij, T_ij), p) of docs/methods/eql.md §2: w_ij = q_j where T_ij = 1, r_j elsewhere,
    ignored rows out; p = sigmoid(z) with the ignored rows zeroed (``with_p``), else None.

    Per element BCE(z, 0) = z - log sigmoid(z) and BCE(z, 1) = -log sigmoid(z), the terms
    ``F.binary_cross_entropy_with_logits`` computes (so with every weight 1 the sum is bit for bit
    its ``reduction="sum"``). Index targets: the negatives' terms for every element in one buffer,
    then the n label entries replaced (no (n, C) target or weight matrix).
    """
    log_p = F.logsigmoid(z)
    if labels.dense is not None:
        t = labels.dense
        elem = torch.where(t, -log_p * q, (z - log_p) * r)
    else:
        idx, hot = labels.idx, labels.hot
        at_label = -log_p.gather(1, idx) * q[idx]  # the label entry's term where T = 1 there
        elem = torch.sub(z, log_p, out=log_p).mul_(r)  # in place: one (n, C) buffer for both
        elem.scatter_(1, idx, torch.where(hot, at_label, elem.gather(1, idx)))
    if labels.valid is not None:
        elem.masked_fill_(~labels.valid, 0.0)
    total = elem.sum()
    if not with_p:
        return total, None
    p = torch.sigmoid(z)
    if labels.valid is not None:
        p.masked_fill_(~labels.valid, 0.0)
    return total, p


@torch.no_grad()
def _eqlv2_class_sums(
    p: torch.Tensor, r: torch.Tensor, q: torch.Tensor, labels: _EQLv2Targets, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class float64 sums of |sigmoid(z_ij) - T_ij| w_ij over the positives and over the negatives of
    the C class channels (docs/methods/eql.md §2: the objectness channel is never counted), from
    p = sigmoid(z) (ignored rows zero) without an (n, C) gradient, target or float64 matrix:

    - N_j: r_j times the column sum of p over the negatives (:func:`gradstats.class_sums` of p with the
      positives zeroed; index targets zero the n label entries in place and restore them);
    - P_j: q_j times the sum of 1 - p over the positives.

    The weights are the ones the loss used (work precision), in float64.
    """
    c = num_classes
    r64, q64 = r[:c].to(torch.float64), q[:c].to(torch.float64)
    if labels.dense is not None:
        t = labels.dense
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        neg = class_sums(torch.where(t, zero, p))
        pos = class_sums(torch.where(t, 1.0 - p, zero))
        return pos * q64, neg * r64
    idx, hot = labels.idx, labels.hot
    at_label = p.gather(1, idx)
    p.scatter_(1, idx, torch.where(hot, torch.zeros_like(at_label), at_label))
    neg = class_sums(p[:, :c])
    p.scatter_(1, idx, at_label)  # restored: p serves the backward
    one_minus = torch.where(hot, 1.0 - at_label.to(torch.float64), 0.0).view(-1)
    pos = torch.zeros(p.shape[1], dtype=torch.float64, device=p.device).index_add_(0, idx.view(-1), one_minus)
    return pos[:c] * q64, neg * r64


class _SigmoidEQLValue(torch.autograd.Function):
    """``total / divisor`` (docs/methods/eql.md §2) with the closed-form gradient
    dL/dz_ij = w_ij (sigmoid(z_ij) - T_ij) / divisor from p = sigmoid(z) computed in the forward (and
    read by the statistics): one pass over the (n, C) elements and the n label entries, instead of
    autograd through the weighted BCE. Under ``create_graph`` (double backward, e.g. BGP) the same
    gradient from differentiable operations. Inputs: as :func:`_eqlv2_value` (targets as
    :class:`_EQLv2Targets` fields), ``divisor`` 0-dim.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        total: torch.Tensor,
        p: torch.Tensor,
        idx: torch.Tensor | None,
        hot: torch.Tensor | None,
        dense: torch.Tensor | None,
        valid: torch.Tensor | None,
        r: torch.Tensor,
        q: torch.Tensor,
        divisor: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, p, idx, hot, dense, valid, r, q, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, p, idx, hot, dense, valid, r, q, divisor = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = grad_out / divisor
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient
            if dense is None:
                dense = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter(1, idx, hot)
            dz = (torch.sigmoid(z) - dense.to(z.dtype)) * torch.where(dense, q, r) * scale
            if valid is not None:
                dz = torch.where(valid, dz, torch.zeros((), dtype=dz.dtype, device=dz.device))
        else:  # p r_j / divisor everywhere, then (p - 1) q_j / divisor where T = 1 (ignored rows: p = 0)
            rs, qs = r * scale, q * scale
            dz = p * rs
            if dense is not None:
                dz = torch.where(dense, (p - 1.0) * qs, dz)
            else:
                at_label = p.gather(1, idx)
                dz.scatter_(1, idx, torch.where(hot, (at_label - 1.0) * qs[idx], at_label * rs[idx]))
        return dz, None, None, None, None, None, None, None, None, None


@register_loss("sigmoid_eql")
class SigmoidEQL(_EqualizationLoss):
    """Sigmoid Equalization Loss v2 (docs/methods/eql.md §2): L = (1/n) sum_i sum_j w_ij BCE(z_ij, T_ij).

    Args:
        num_classes: C, the number of object classes (not counting an objectness channel).
        class_counts: accepted for the common factory signature and ignored.
        alpha, gamma, mu: q_j = 1 + alpha (1 - r_j), r_j = f(g_j) = 1 / (1 + exp(-gamma (g_j - mu))).
        init_ratio: g used while the statistics are empty (100: every weight is exactly 1 at step 1).
        objectness: logits have C + 1 channels, the last a class-agnostic background/objectness channel
            with r = q = 1, excluded from the statistics (the EQLv2 detection head,
            docs/methods/eql.md §2, §9). Needs ``background_label=True``: label C is what trains that channel.
        background_label: accept label C = background: all class channels 0 (with ``objectness`` the
            extra channel 1), negatives only (convention L of :mod:`gradtail.losses.base`).
        ignore_index: label whose samples are left out of the loss, the normaliser n and the statistics
            (convention L); ``None`` (default): no ignore label.
        accumulation: ``"official"`` (default): the released EQLv2 code's statistics, the sum over the
            step's samples of |sigmoid(z_ij) - T_ij| w_ij *without* the loss's 1/n (docs/methods/eql.md
            §9) and without a world-size factor (the SUM all-reduce makes W ranks equal one process with
            the whole batch). ``"exact"``: the exact |dL/dz| of the returned value, i.e. the same divided
            by n and by the world size. The two give the same ratios g_j only while n is the same at every
            step; with n varying from step to step (detection) they differ.

    Targets: (n,) class indices in [0, C) (plus the options above), or, without ``objectness``, an
    (n, C) {0, 1} multi-label matrix (a row of zeros is a background sample). n is the number of
    non-ignored samples, at least 1; the loss value is the official sum / n in both accumulations.
    Statistics per class over positives and negatives, the objectness channel excluded. Empty batches,
    the statistics rule and the options follow the conventions of :mod:`gradtail.losses.base`
    (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("sigmoid_eql", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]], requires_grad=True)
        >>> value = loss(logits, torch.tensor([0, 2]))  # step 1: every weight is 1, plain summed BCE
        >>> round(value.item(), 4)
        1.9056
        >>> value.backward()
        >>> int(loss.stats.steps), loss.stats.pos.shape
        (1, torch.Size([3]))
    """

    search_space: ClassVar[SearchSpace] = {
        "alpha": FloatRange(1.0, 10.0),
        "gamma": FloatRange(4.0, 20.0),
        "mu": FloatRange(0.5, 0.95),
    }

    def __init__(
        self,
        num_classes: int,
        class_counts: ClassCounts = None,
        alpha: float = 4.0,
        gamma: float = 12.0,
        mu: float = 0.8,
        init_ratio: float = 100.0,
        objectness: bool = False,
        background_label: bool = False,
        ignore_index: int | None = None,
        accumulation: Literal["official", "exact"] = "official",
    ) -> None:
        super().__init__(num_classes)
        if accumulation not in ("official", "exact"):
            raise ConfigError(
                f"sigmoid_eql: accumulation must be 'official' or 'exact', got {accumulation!r}"
            )
        self.accumulation = accumulation
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.mu = float(mu)
        self.init_ratio = float(init_ratio)
        self.objectness = bool(objectness)
        self.background_label, self.ignore_index = check_label_options(
            self.num_classes, background_label, ignore_index, "sigmoid_eql"
        )
        if self.objectness and not self.background_label:
            raise ConfigError(
                "sigmoid_eql: objectness=True (a C + 1 channel detection head) needs background_label=True"
            )

    @property
    def num_channels(self) -> int:
        """Logit channels expected: C, or C + 1 with the objectness channel."""
        return self.num_classes + int(self.objectness)

    def effective_ratio(self) -> torch.Tensor:
        """g_j, with ``init_ratio`` while no step is accumulated (docs/methods/eql.md §2: 'initial ratio
        100')."""
        init = torch.full_like(self.stats.pos, self.init_ratio)
        return torch.where(self.stats.started(), self.stats.ratio(), init)

    @torch.no_grad()
    def class_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, q), float64 (num_channels,): r_j = f(g_j), q_j = 1 + alpha (1 - r_j); extra channel 1 (§2)."""
        r = torch.sigmoid(self.gamma * (self.effective_ratio() - self.mu))
        q = 1.0 + self.alpha * (1.0 - r)
        if self.objectness:
            one = torch.ones(1, dtype=r.dtype, device=r.device)
            r, q = torch.cat([r, one]), torch.cat([q, one])
        return r, q

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Inference scores: :func:`sigmoid_eql_scores` with objectness, plain sigmoid without."""
        if self.objectness:
            return sigmoid_eql_scores(logits)
        return torch.sigmoid(logits.to(_work_dtype(logits)))

    def _targets(self, logits: torch.Tensor, targets: torch.Tensor) -> _EQLv2Targets:
        """T of this call (docs/methods/eql.md §2) as :class:`_EQLv2Targets`, after every input check.

        Index targets: each row's label channel ``idx`` and whether T is 1 there (``hot``): a class label,
        or label C (background) on the objectness channel; a background row without ``objectness`` has
        no 1 (its ``idx`` is any channel, not hot). Ignored rows are masked by ``valid``. Multi-label
        (n, C) targets: the dense bool T.
        """
        n, c = logits.shape[0], self.num_classes
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"sigmoid_eql: targets must be a tensor, got {type(targets).__name__}")
        if targets.dim() == 2:
            if self.objectness:
                raise InputError("sigmoid_eql: multi-label (n, C) targets are not supported with objectness")
            if tuple(targets.shape) != (n, c):
                raise InputError(
                    f"sigmoid_eql: multi-label targets must be ({n}, {c}), got {tuple(targets.shape)}"
                )
            t = targets.detach().to(device=logits.device, dtype=_work_dtype(logits))
            t = checked_value(t, (t == 0) | (t == 1), "sigmoid_eql: multi-label targets must be 0 or 1")
            return _EQLv2Targets(None, None, t != 0, None)
        _check_index_targets(targets, n, "sigmoid_eql")
        hint = label_options_hint(c, self.background_label, self.ignore_index)
        targets = checked_labels(
            targets, c, allow=self.ignore_index, background=self.background_label, hint=hint
        )
        y = targets.to(device=logits.device, dtype=torch.long).view(-1, 1)
        valid = None if self.ignore_index is None else y != self.ignore_index
        hot = y < self.num_channels  # label C is hot on the objectness channel, nowhere without it
        if valid is not None:
            hot = hot & valid
        idx = torch.where(hot, y, torch.zeros_like(y))  # rows without a 1: channel 0 (not hot)
        return _EQLv2Targets(idx, hot, None, valid)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L = (1/n) sum_i sum_j w_ij BCE(z_ij, T_ij) with weights from statistics through step t-1 (§1-2).

        n = non-ignored samples, at least 1 (convention N of :mod:`gradtail.losses.base`). The value, its
        gradient w_ij (sigmoid(z_ij) - T_ij) / n and the statistics come from one closed-form pass
        (:func:`_eqlv2_value`, :func:`_eqlv2_class_sums`, :class:`_SigmoidEQLValue`).
        """
        _check_2d_logits(logits, self.num_channels, "sigmoid_eql")
        labels = self._targets(logits, targets)  # every check before any change (V)
        collect = self._prepare(logits)
        dtype = _work_dtype(logits)
        z = logits.to(dtype)
        r, q = (w.to(device=z.device, dtype=dtype) for w in self.class_weights())  # constants: through t-1
        count: int | torch.Tensor = z.shape[0] if labels.valid is None else labels.valid.sum()
        divisor = torch.as_tensor(self._divisor(count), dtype=dtype, device=z.device)  # max(n, 1) or (A)
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        total, p = _eqlv2_value(z.detach(), r, q, labels, with_p=needs_grad or collect)
        if collect:
            pos, neg = _eqlv2_class_sums(p, r, q, labels, self.num_classes)
            # official (§9): summed without 1/n and without a world-size factor; exact: the gradient of
            # the mean over the step's samples, normalised globally (gradstats rule 8)
            norm = None if self.accumulation == "official" else count
            self.stats.update_from_class_sums(pos, neg, count=count, norm=norm)
        if z.numel() == 0:
            return empty_batch_loss(z)  # convention E (the statistics update above still ran)
        if not needs_grad:
            return total / divisor
        return _SigmoidEQLValue.apply(
            z, total, p, labels.idx, labels.hot, labels.dense, labels.valid, r, q, divisor
        )

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """n of a batch (convention N): its non-ignored samples (rows of multi-label targets)."""
        return _count_not_ignored(targets, self.ignore_index, multi_label_dims=2)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, gamma={self.gamma}, mu={self.mu}, "
            f"init_ratio={self.init_ratio}, objectness={self.objectness}, "
            f"background_label={self.background_label}, ignore_index={self.ignore_index}, "
            f"accumulation={self.accumulation!r}"
        )


# ---------------------------------------------------------------------------------------------- §3
class _FocalEqualization(_EqualizationLoss):
    """Shared part of EFL and EQFL (docs/methods/eql.md §3): per-class focusing gamma_j and weighting omega_j.

    Targets: (n,) integers in [0, C); with ``background_label`` also C = background (all class channels
    0), with ``ignore_index`` that label = ignored (out of the loss, the normaliser and the statistics;
    the detection code uses -1). Normalizer: the number of positive samples, at least 1 (conventions L,
    N of :mod:`gradtail.losses.base`).
    """

    def __init__(
        self,
        num_classes: int,
        gamma_b: float,
        s: float,
        background_label: bool,
        ignore_index: int | None,
        name: str,
    ) -> None:
        super().__init__(num_classes)
        if not gamma_b > 0:
            raise ConfigError(f"{name}: gamma_b must be > 0 (omega_j = gamma_j / gamma_b), got {gamma_b}")
        self.gamma_b = float(gamma_b)
        self.s = float(s)
        self.background_label, self.ignore_index = check_label_options(
            self.num_classes, background_label, ignore_index, name
        )

    def effective_ratio(self) -> torch.Tensor:
        """g_hat_j = clamp(g_j, 0, 1), 1 while the statistics are empty (docs/methods/eql.md §3: 'ratio starts
        at 1')."""
        g = torch.where(self.stats.started(), self.stats.ratio(), torch.ones_like(self.stats.pos))
        return g.clamp(0.0, 1.0)

    @torch.no_grad()
    def focusing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma_j, omega_j), float64 (C,): gamma_j = gamma_b + s (1 - g_hat_j), omega_j = gamma_j / gamma_b.

        (docs/methods/eql.md §3.)
        """
        gamma = self.gamma_b + self.s * (1.0 - self.effective_ratio())
        return gamma, gamma / self.gamma_b

    def _targets(
        self, logits: torch.Tensor, targets: torch.Tensor, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y (n,) long, valid (n, 1) bool, is_pos (n,) bool) for index targets (class docstring).

        T_ij = 1 exactly at the positive elements: one per non-ignored, non-background row, at its label
        (background and ignored rows are rows of zeros); :func:`_positives` gives them as (rows, cls),
        :func:`_dense_targets` as the dense (n, C) T.
        """
        _check_index_targets(targets, logits.shape[0], name)
        c = self.num_classes
        hint = label_options_hint(c, self.background_label, self.ignore_index)
        targets = checked_labels(
            targets, c, allow=self.ignore_index, background=self.background_label, hint=hint
        )
        y = targets.to(device=logits.device, dtype=torch.long)
        if self.ignore_index is None:
            valid = torch.ones_like(y, dtype=torch.bool).view(-1, 1)
        else:
            valid = (y != self.ignore_index).view(-1, 1)
        is_pos = valid.view(-1) & (y >= 0) & (y < c)  # the ignore index lies outside [0, C)
        return y, valid, is_pos

    @staticmethod
    def _check_normalizer(normalizer: float | torch.Tensor | None, name: str) -> torch.Tensor | None:
        """The caller's ``normalizer`` as a float64 0-dim tensor (checked > 0), or None."""
        if normalizer is None:
            return None
        if isinstance(normalizer, bool) or not isinstance(normalizer, int | float | torch.Tensor):
            raise InputError(f"{name}: normalizer must be a number or a 0-dim tensor, got {normalizer!r}")
        norm = torch.as_tensor(normalizer).detach()
        if norm.dim() != 0 or norm.dtype == torch.bool:
            raise InputError(
                f"{name}: normalizer must be a number or a 0-dim tensor, got shape {tuple(norm.shape)}"
            )
        norm = norm.to(torch.float64)
        return checked_value(
            norm, (norm > 0) & torch.isfinite(norm), f"{name}: normalizer must be > 0 and finite"
        )

    def _divide_by(self, num_pos: torch.Tensor, normalizer: torch.Tensor | None, like: torch.Tensor):
        """The loss's denominator: the caller's ``normalizer`` (e.g. a detector's positive count averaged
        over ranks, as the official one-stage codes do, §9), else max(#pos, 1), or inside
        ``accumulate`` the union's max(total, 1) (conventions N, A)."""
        if normalizer is not None:
            return normalizer.to(device=like.device, dtype=like.dtype)
        return _as(self._divisor(num_pos), like)

    def _collect(
        self,
        grad: torch.Tensor,
        idx: torch.Tensor,
        hot: torch.Tensor,
        valid: torch.Tensor,
        num_pos: torch.Tensor,
        normalizer: torch.Tensor | None,
    ) -> None:
        """Add |dl/dz| (ignored rows zero, not counted) to the statistics (docs/methods/eql.md §3):
        P_j += sum_i T_ij |dl/dz_ij|, N_j += sum_i (1 - T_ij) |dl/dz_ij|, divided by the number of
        positives of the whole step over all ranks (gradstats rule 8), or by the caller's ``normalizer``
        times the world size.

        ``grad`` (n, C): dl/dz or |dl/dz| without the normaliser, zero on ignored rows and >= 0 away from
        the label entries; ``idx``, ``hot`` (:func:`_label_entries`): T is 1 exactly at the hot label
        entries. P adds |grad| at those n entries, N the column sums of the others (the hot entries are
        zeroed in place for :func:`gradstats.class_sums`, float64 without a float64 copy of the (n, C)
        gradient, then restored)."""
        at_label = grad.gather(1, idx)
        grad.scatter_(1, idx, torch.where(hot, torch.zeros_like(at_label), at_label))
        neg = class_sums(grad)
        grad.scatter_(1, idx, at_label)  # restored: ``grad`` serves the backward
        on = torch.where(hot, at_label.abs(), torch.zeros_like(at_label)).to(torch.float64).view(-1)
        pos = torch.zeros(self.num_classes, dtype=torch.float64, device=grad.device).index_add_(
            0, idx.view(-1), on
        )
        count = valid.sum()
        if normalizer is None:
            self.stats.update_from_class_sums(pos, neg, count=count, norm=num_pos)
        else:
            scale = 1.0 / (normalizer.to(device=pos.device) * world_size())
            self.stats.update_from_class_sums(pos, neg, scale=scale, count=count)

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """#pos of a batch (convention N): its non-ignored, non-background samples."""
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise InputError(f"{type(self).__name__}.normalizer expects (n,) targets")
        y = targets.detach()
        return ((y >= 0) & (y < self.num_classes)).sum().to(torch.float64)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, gamma_b={self.gamma_b}, s={self.s}, "
            f"background_label={self.background_label}, ignore_index={self.ignore_index}"
        )


def _as(x: torch.Tensor | int | float, like: torch.Tensor) -> torch.Tensor | int | float:
    """A denominator in the dtype and on the device of ``like`` (numbers stay numbers)."""
    return x.to(device=like.device, dtype=like.dtype) if isinstance(x, torch.Tensor) else x


def _count_not_ignored(
    targets: torch.Tensor, ignore_index: int | None, multi_label_dims: int = 0
) -> torch.Tensor:
    """float64 0-dim count of samples whose label is not ``ignore_index`` (multi-label rows all count)."""
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise InputError("normalizer expects a tensor of targets")
    if multi_label_dims and targets.dim() == multi_label_dims:
        return torch.tensor(float(targets.shape[0]), dtype=torch.float64)
    if ignore_index is None:
        return torch.tensor(float(targets.numel()), dtype=torch.float64)
    return (targets.detach() != ignore_index).sum().to(torch.float64)


def _label_entries(y: torch.Tensor, is_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, hot), both (n, 1): each row's label channel (channel 0 for a background or ignored row) and
    whether T is 1 there (a positive row). T of EFL / EQFL (docs/methods/eql.md §3) is 1 exactly at the
    hot entries: n gathers and scatters replace an (n, C) target matrix, with static shapes (no
    data-dependent ``nonzero``, no host sync, the same code eager and compiled)."""
    hot = is_pos.view(-1, 1)
    return torch.where(hot, y.view(-1, 1), torch.zeros_like(hot, dtype=torch.long)), hot


def _dense_targets(idx: torch.Tensor, hot: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The dense bool (n, C) T of :func:`_label_entries` (shape and device of ``like``): only the double
    backward builds it."""
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device).scatter(1, idx, hot)


def _efl_terms(
    z: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, coef: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_ij l_ij, |dl/dz| (n, C)) of EFL (docs/methods/eql.md §3); with s = z (2 T - 1),
    p_t = sigmoid(s) and coef = alpha_t omega (0 on ignored rows), per element:

    - l = -coef (1 - p_t)^gamma log p_t,
    - |dl/dz| = coef (1 - p_t)^gamma [(1 - p_t) - gamma p_t log p_t]  (dl/dz = -(2 T - 1) |dl/dz|),

    both from log p_t = logsigmoid(s) and log(1 - p_t) = log p_t - s (so (1 - p_t)^gamma =
    exp(gamma log(1 - p_t)), no tensor-exponent pow). ``t``: the dense bool T. Differentiable ops only:
    the backward of :class:`_EFLValue` differentiates this under ``create_graph``;
    :func:`_efl_terms_inplace` is the same arithmetic for the ordinary pass."""
    s = torch.where(t, z, -z)
    log_pt = F.logsigmoid(s)
    log_1m = log_pt - s
    w = coef * torch.exp(gamma * log_1m)
    total = -torch.dot(w.reshape(-1), log_pt.reshape(-1))  # sum_ij l_ij, no (n, C) temporary
    grad = w * (torch.exp(log_1m) - gamma * torch.sigmoid(s) * log_pt)
    return total, grad


@torch.no_grad()
def _efl_terms_inplace(
    z: torch.Tensor,
    idx: torch.Tensor,
    hot: torch.Tensor,
    gamma: torch.Tensor,
    pos_coef: torch.Tensor,
    neg_coef: torch.Tensor,
    valid: torch.Tensor | None,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_efl_terms` from the label entries (``idx``, ``hot``: :func:`_label_entries`) instead of a
    dense T, coef = alpha omega_j (``pos_coef``) at the hot entries and (1 - alpha) omega_j
    (``neg_coef``) elsewhere, 0 on the rows ``valid`` marks False; four (n, C) buffers reused in place
    instead of ~10 fresh temporaries (on CPU every fresh (n, C) tensor of a detector's size pays its page
    faults). Same operations, same values. The gradient only ``with_grad``."""
    z_at = z.gather(1, idx)
    s = z.neg()
    s.scatter_(1, idx, torch.where(hot, z_at, -z_at))  # s = z (2 T - 1)
    log_pt = F.logsigmoid(s)
    log_1m = torch.sub(log_pt, s)
    w = torch.mul(gamma, log_1m).exp_()  # (1 - p_t)^gamma
    w_at = w.gather(1, idx)
    w.mul_(neg_coef)
    w.scatter_(1, idx, torch.where(hot, w_at * pos_coef[idx], w.gather(1, idx)))  # coef (1 - p_t)^gamma
    if valid is not None:
        w.masked_fill_(~valid, 0.0)
    total = -torch.dot(w.reshape(-1), log_pt.reshape(-1))
    if not with_grad:
        return total, None
    gpl = s.sigmoid_().mul_(gamma).mul_(log_pt)  # gamma p_t log p_t (s is not needed any more)
    grad = log_1m.exp_().sub_(gpl).mul_(w)  # [(1 - p_t) - gamma p_t log p_t] coef (1 - p_t)^gamma
    return total, grad


class _EFLValue(torch.autograd.Function):
    """sum_ij l_ij / norm with the closed-form gradient of :func:`_efl_terms` (already computed for the
    statistics) as its backward, instead of autograd through ~10 element-wise ops per element. Under
    ``create_graph`` (double backward, e.g. BGP) the gradient is recomputed with differentiable ops."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        elem_sum: torch.Tensor,
        grad: torch.Tensor,
        idx: torch.Tensor,
        hot: torch.Tensor,
        valid: torch.Tensor | None,
        gamma: torch.Tensor,
        pos_coef: torch.Tensor,
        neg_coef: torch.Tensor,
        norm: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, grad, idx, hot, valid, gamma, pos_coef, neg_coef, norm)
        return elem_sum / norm

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, grad, idx, hot, valid, gamma, pos_coef, neg_coef, norm = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient
            t = _dense_targets(idx, hot, z)
            coef = torch.where(t, pos_coef, neg_coef)
            if valid is not None:
                coef = coef * valid
            dz = torch.where(t, -1.0, 1.0) * _efl_terms(z, t, gamma, coef)[1] * (grad_out / norm)
        else:  # dl/dz = -(2 T - 1) |dl/dz|: the sign flipped at the hot label entries only
            dz = grad * (grad_out / norm)
            at_label = dz.gather(1, idx)
            dz.scatter_(1, idx, torch.where(hot, -at_label, at_label))
        return dz, None, None, None, None, None, None, None, None, None


@torch.no_grad()
def _eqfl_terms_inplace(
    z: torch.Tensor,
    idx: torch.Tensor,
    hot: torch.Tensor,
    quality: torch.Tensor,
    gamma: torch.Tensor,
    omega: torch.Tensor,
    valid: torch.Tensor | None,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum_ij l_ij, dl/dz (n, C) or None) of EQFL (docs/methods/eql.md §3),
    l_ij = omega_j BCE(z_ij, Q_ij) |p_ij - Q_ij|^gamma_j, p = sigmoid(z), Q = ``quality`` (n, 1) at the
    hot label entries (:func:`_label_entries`), 0 elsewhere; rows that ``valid`` marks False are 0.

    Where Q = 0 (all but n entries), from log p = logsigmoid(z), BCE = z - log p and
    p^gamma = exp(gamma log p), 1 - p = exp(-BCE) (no tensor-exponent pow, no (n, C) target):

    - l = omega p^gamma BCE,  dl/dz = omega p^gamma [p + gamma BCE (1 - p)]  (>= 0);

    at the hot entries, d = |p - Q|:

    - l = omega BCE(z, Q) d^gamma,  dl/dz = omega sign(p - Q) d^(gamma - 1) [d^2 + gamma BCE(z, Q) p (1 - p)].
    """
    log_p = F.logsigmoid(z)
    p_gamma = torch.mul(log_p, gamma).exp_()  # p^gamma_j
    if valid is not None:  # the factor of every term and gradient: ignored rows out
        p_gamma.masked_fill_(~valid, 0.0)
    p = torch.exp(log_p) if with_grad else None
    bce = torch.sub(z, log_p, out=log_p)  # BCE(z, 0) (log p is not needed any more)
    elem = torch.mul(bce, p_gamma).mul_(omega)
    z_at, g_at, w_at = z.gather(1, idx), gamma[idx], omega[idx]
    bce_at = F.binary_cross_entropy_with_logits(z_at, quality, reduction="none")
    p_at = torch.sigmoid(z_at)
    diff = p_at - quality
    d = diff.abs()
    elem.scatter_(1, idx, torch.where(hot, w_at * (bce_at * d**g_at), elem.gather(1, idx)))
    total = elem.sum()
    if p is None:
        return total, None
    one_m = bce.neg().exp_()  # 1 - p = exp(-BCE(z, 0))
    grad = bce.mul_(gamma).mul_(one_m).add_(p).mul_(p_gamma).mul_(omega)
    at_label = (
        w_at * torch.sign(diff) * d ** (g_at - 1.0) * (d * d + g_at * bce_at * p_at * torch.sigmoid(-z_at))
    )
    grad.scatter_(1, idx, torch.where(hot, at_label, grad.gather(1, idx)))
    return total, grad


def _eqfl_grad(
    z: torch.Tensor,
    idx: torch.Tensor,
    hot: torch.Tensor,
    quality: torch.Tensor,
    gamma: torch.Tensor,
    omega: torch.Tensor,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """dl/dz of :func:`_eqfl_terms_inplace` from differentiable operations on the dense Q (the double
    backward of :class:`_EQFLValue`):
    omega sign(p - Q) |p - Q|^(gamma - 1) [|p - Q|^2 + gamma BCE(z, Q) p (1 - p)]."""
    soft = _dense_targets(idx, hot, z).to(z.dtype) * quality
    p = torch.sigmoid(z)
    bce = F.binary_cross_entropy_with_logits(z, soft, reduction="none")
    diff = p - soft
    d = diff.abs()
    grad = omega * torch.sign(diff) * d ** (gamma - 1.0) * (d * d + gamma * bce * p * torch.sigmoid(-z))
    if valid is not None:
        grad = torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad


class _EQFLValue(torch.autograd.Function):
    """sum_ij l_ij / norm of EQFL with the closed-form gradient of :func:`_eqfl_terms_inplace` (already
    computed for the statistics) as its backward; under ``create_graph`` :func:`_eqfl_grad`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        elem_sum: torch.Tensor,
        grad: torch.Tensor,
        idx: torch.Tensor,
        hot: torch.Tensor,
        quality: torch.Tensor,
        valid: torch.Tensor | None,
        gamma: torch.Tensor,
        omega: torch.Tensor,
        norm: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(z, grad, idx, hot, quality, valid, gamma, omega, norm)
        return elem_sum / norm

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        z, grad, idx, hot, quality, valid, gamma, omega, norm = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: a differentiable gradient
            grad = _eqfl_grad(z, idx, hot, quality, gamma, omega, valid)
        return grad * (grad_out / norm), None, None, None, None, None, None, None, None, None


@register_loss("efl")
class EqualizedFocalLoss(_FocalEqualization):
    """Equalized Focal Loss (docs/methods/eql.md §3): l_ij = -alpha_t omega_j (1 - p_t)^gamma_j log(p_t),
    summed / #pos.

    Args:
        num_classes: C.
        class_counts: accepted for the common factory signature and ignored.
        gamma_b: base focusing parameter (2).
        s: focusing scale factor (8; 4 for lighter detectors).
        alpha: focal alpha (0.25); ``None`` or a negative value disables the alpha_t factor.
        background_label: accept label C = background (all class channels 0; convention L of
            :mod:`gradtail.losses.base`).
        ignore_index: label left out of the loss, the normaliser and the statistics (the detection
            code's -1); ``None`` (default): none.

    With empty statistics (g_hat = 1) this is exactly the sigmoid focal loss summed over elements and
    divided by the number of positives (at least 1). gamma_j and omega_j are constants; (1 - p_t)^gamma_j
    is differentiated as in focal loss. Empty batches, the statistics rule and the label options follow
    the conventions of :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("efl", num_classes=3, background_label=True, ignore_index=-1)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [1.0, 1.0, 1.0]])
        >>> value = loss(logits, torch.tensor([0, 3, -1]))  # a positive, a background, an ignored row
        >>> round(value.item(), 4)
        0.7567
        >>> int(loss.stats.steps)
        1
    """

    search_space: ClassVar[SearchSpace] = {
        "gamma_b": FloatRange(0.5, 4.0),
        "s": FloatRange(1.0, 16.0),
        "alpha": FloatRange(0.1, 0.9),
    }

    def __init__(
        self,
        num_classes: int,
        class_counts: ClassCounts = None,
        gamma_b: float = 2.0,
        s: float = 8.0,
        alpha: float | None = 0.25,
        background_label: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(num_classes, gamma_b, s, background_label, ignore_index, "efl")
        self.alpha = None if alpha is None or alpha < 0 else float(alpha)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sum over valid elements of alpha_t omega_j (1 - p_t)^gamma_j BCE(z, T), over #pos (§3).

        ``normalizer`` (optional, > 0) replaces #pos in the loss and in the statistics (§9: the statistics
        include the loss's normaliser), e.g. the positives of the whole batch averaged over ranks.
        """
        _check_2d_logits(logits, self.num_classes, "efl")
        y, valid, is_pos = self._targets(logits, targets, "efl")  # every check before any change (V)
        given = self._check_normalizer(normalizer, "efl")
        collect = self._prepare(logits)
        z = logits.to(_work_dtype(logits))
        num_pos = is_pos.sum()
        norm = self._divide_by(num_pos, given, z)
        gamma, omega = (v.to(z.dtype) for v in self.focusing())  # constants: statistics through t-1
        a = 1.0 if self.alpha is None else self.alpha
        b = 1.0 if self.alpha is None else 1.0 - self.alpha
        idx, hot = _label_entries(y, is_pos)
        mask = None if self.ignore_index is None else valid
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        pos_coef, neg_coef = a * omega, b * omega
        total, grad = _efl_terms_inplace(
            z.detach(), idx, hot, gamma, pos_coef, neg_coef, mask, with_grad=needs_grad or collect
        )
        if collect:
            self._collect(grad, idx, hot, valid, num_pos, given)  # type: ignore[arg-type]
        if z.numel() == 0:
            return empty_batch_loss(z)  # convention E (the statistics update above still ran)
        if not needs_grad:
            return total / norm
        return _EFLValue.apply(z, total, grad, idx, hot, mask, gamma, pos_coef, neg_coef, norm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


@register_loss("eqfl")
class EqualizedQualityFocalLoss(_FocalEqualization):
    """Equalized quality focal loss (docs/methods/eql.md §3): omega_j BCE(z, Q) |Q - p|^gamma_j,
    summed / #pos.

    ``forward(logits, targets, quality=None)``: ``quality`` is an (n,) tensor in [0, 1], the soft target
    of each sample's positive channel (e.g. the IoU of a detection); ``None`` means 1 (hard targets).
    Q_ij = quality_i on the positive channel, 0 elsewhere, so negatives give BCE(z, 0) p^gamma_j and
    positives BCE(z, q) |q - p|^gamma_j, all times omega_j, no alpha. With empty statistics this is the
    quality focal loss (beta = gamma_b). Statistics count the label channel as the positive whatever q.

    Args:
        num_classes: C.
        class_counts: accepted for the common factory signature and ignored.
        gamma_b: base focusing parameter (2).
        s: focusing scale factor (8).
        background_label: accept label C = background (all class channels 0; convention L of
            :mod:`gradtail.losses.base`).
        ignore_index: label left out of the loss, the normaliser and the statistics; ``None`` (default):
            none.

    Normaliser: the number of positive samples, at least 1. Empty batches, the statistics rule and the
    label options follow the conventions of :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("eqfl", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> value = loss(logits, torch.tensor([0, 2]), quality=torch.tensor([0.9, 0.6]))
        >>> round(value.item(), 4)
        0.4517
    """

    search_space: ClassVar[SearchSpace] = {"gamma_b": FloatRange(0.5, 4.0), "s": FloatRange(1.0, 16.0)}

    def __init__(
        self,
        num_classes: int,
        class_counts: ClassCounts = None,
        gamma_b: float = 2.0,
        s: float = 8.0,
        background_label: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(num_classes, gamma_b, s, background_label, ignore_index, "eqfl")

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        quality: torch.Tensor | None = None,
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum over valid elements of omega_j BCE(z, Q) |Q - p|^gamma_j, divided by #pos (§3), or by
        ``normalizer`` when given (as in :meth:`EqualizedFocalLoss.forward`)."""
        _check_2d_logits(logits, self.num_classes, "eqfl")
        y, valid, is_pos = self._targets(logits, targets, "eqfl")  # every check before any change (V)
        given = self._check_normalizer(normalizer, "eqfl")
        work = _work_dtype(logits)
        qv = None
        if quality is not None:
            if not isinstance(quality, torch.Tensor) or quality.dim() != 1 or quality.shape[0] != y.shape[0]:
                shape = tuple(quality.shape) if isinstance(quality, torch.Tensor) else type(quality).__name__
                raise InputError(f"eqfl: quality must be ({y.shape[0]},), got {shape}")
            check_floating_logits(quality, "eqfl: quality")
            qv = _checked_unit_interval(
                quality.detach().to(device=logits.device, dtype=work), "eqfl: quality"
            )
        collect = self._prepare(logits)
        z = logits.to(work)
        num_pos = is_pos.sum()
        norm = self._divide_by(num_pos, given, z)
        gamma, omega = (v.to(z.dtype) for v in self.focusing())  # constants: statistics through t-1
        idx, hot = _label_entries(y, is_pos)
        q = torch.ones_like(y, dtype=z.dtype) if qv is None else qv  # None: hard targets, Q = T
        q = q.view(-1, 1)
        mask = None if self.ignore_index is None else valid
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        total, grad = _eqfl_terms_inplace(
            z.detach(), idx, hot, q, gamma, omega, mask, with_grad=needs_grad or collect
        )
        if collect:
            self._collect(grad, idx, hot, valid, num_pos, given)  # type: ignore[arg-type]
        if z.numel() == 0:
            return empty_batch_loss(z)  # convention E (the statistics update above still ran)
        if not needs_grad:
            return total / norm
        return _EQFLValue.apply(z, total, grad, idx, hot, q, mask, gamma, omega, norm)


# ---------------------------------------------------------------------------------------------- §4
@register_loss("softmax_eql")
class SoftmaxEQL(_EqualizationLoss):
    """Softmax Equalization Loss (docs/methods/eql.md §4): L = mean_i CE(z_i + tau log I, y_i),
    I_j = max(stat_j, eps).

    Args:
        num_classes: C.
        class_counts: accepted for the common factory signature and ignored.
        tau: strength of the adjustment (1).
        eps: floor of the indicator (1e-4).
        indicator: ``"pos"`` (I = P, default), ``"neg"`` (I = N) or ``"pos_and_neg"`` (I = P + N).
        ignore_index: label excluded from the loss, its normaliser and the statistics (convention L of
            :mod:`gradtail.losses.base`); ``None`` (default): none, every label must be in [0, C). Pass
            the dataset's value for segmentation (e.g. 255, or ``F.cross_entropy``'s -100).

    Logits (N, C) with targets (N,), or (N, C, d1, ...) with targets (N, d1, ...) for segmentation:
    every non-ignored position is a sample. The mean is over non-ignored samples (at least 1, so 0 if
    there are none). Empty batches and the statistics rule follow the conventions of
    :mod:`gradtail.losses.base` (``docs/losses.md``).

    CE(z + tau log I, y) equals the spec's CE(z~, y), z~_j = z_j + tau log(I_j / I_y) (j != y): the two
    differ by a per-sample constant and softmax is shift-invariant. gradtail adds
    tau (log I_j - max_k log I_k), also the same up to a constant: at step 1 (all I = eps) the offsets are
    exactly 0, so the loss is bit-for-bit CE, and offsets stay <= 0. Statistics: |softmax(z~) - onehot(y)|
    / (#samples), positives the label column (the gradient at z~ equals the gradient at z). Test time uses
    the raw logits.

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("softmax_eql", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # step 1: plain cross-entropy
        0.8136
        >>> seg = create_loss("softmax_eql", num_classes=3, ignore_index=255)
        >>> labels = torch.tensor([[[0, 255], [2, 1]]])  # one 2 x 2 label map, one pixel ignored
        >>> round(seg(torch.zeros(1, 3, 2, 2), labels).item(), 4)  # log 3 over the 3 counted pixels
        1.0986
    """

    search_space: ClassVar[SearchSpace] = {
        "tau": FloatRange(0.25, 2.5),
        "indicator": Choice(("pos", "neg", "pos_and_neg")),
    }

    def __init__(
        self,
        num_classes: int,
        class_counts: ClassCounts = None,
        tau: float = 1.0,
        eps: float = 1e-4,
        indicator: Indicator = "pos",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(num_classes)
        if indicator not in ("pos", "neg", "pos_and_neg"):
            raise ConfigError(
                f"softmax_eql: indicator must be 'pos', 'neg' or 'pos_and_neg', got {indicator!r}"
            )
        if not eps > 0:
            raise ConfigError(f"softmax_eql: eps must be > 0 (it floors a logarithm), got {eps}")
        _, self.ignore_index = check_label_options(self.num_classes, False, ignore_index, "softmax_eql")
        self.tau = float(tau)
        self.eps = float(eps)
        self.indicator: Indicator = indicator

    @torch.no_grad()
    def indicator_values(self) -> torch.Tensor:
        """I_j = max(P_j, eps) (or N_j, or P_j + N_j), float64 (C,) (docs/methods/eql.md §4)."""
        if self.indicator == "pos":
            raw = read_statistics(self.stats.pos)
        elif self.indicator == "neg":
            raw = read_statistics(self.stats.neg)
        else:
            raw = read_statistics(self.stats.pos) + read_statistics(self.stats.neg)
        return raw.clamp(min=self.eps)

    @torch.no_grad()
    def logit_offsets(self) -> torch.Tensor:
        """tau (log I_j - max_k log I_k), float64 (C,): z + offsets is z + tau log I up to a constant (§4)."""
        log_i = torch.log(self.indicator_values())
        relative = log_i - log_i.max()
        return relative if self.tau == 1.0 else self.tau * relative  # 1 * x is x: one operation less

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mean over non-ignored samples of CE(z + tau log I, y), I from statistics through t-1 (§1, §4)."""
        c = self.num_classes
        check_floating_logits(logits, "softmax_eql: logits")
        if logits.dim() < 2 or logits.shape[1] != c:
            raise InputError(
                f"softmax_eql: logits must be floating (N, {c}) or (N, {c}, d1, ...), got "
                f"{logits.dtype} {tuple(logits.shape)}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"softmax_eql: targets must be a tensor, got {type(targets).__name__}")
        if tuple(targets.shape) != expected:
            raise InputError(f"softmax_eql: targets must have shape {expected}, got {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise InputError(f"softmax_eql: targets must be integer class indices, got dtype {targets.dtype}")
        hint = label_options_hint(c, None, self.ignore_index)
        targets = checked_labels(targets, c, allow=self.ignore_index, hint=hint)  # before any change (V)
        collect = self._prepare(logits)
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.to(_work_dtype(logits))
        y = targets
        if y.dtype != torch.long or y.device != z.device:
            y = y.to(device=z.device, dtype=torch.long)
        valid = None if self.ignore_index is None else y != self.ignore_index
        y_safe = y if valid is None else torch.where(valid, y, 0)  # any class where nothing counts
        # non-ignored samples; the loss divides by at least 1 (convention N), or the union's (A)
        count = y.numel() if valid is None else valid.sum()
        divisor = torch.as_tensor(self._divisor(count), dtype=z.dtype, device=z.device)
        offsets = self.logit_offsets().to(z.dtype)  # constants: statistics through step t-1
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        # CE(z + offsets, y), its gradient and the statistics' sums together (losses.closed_form)
        step = cross_entropy_step(
            z.detach(), y_safe, offsets, divisor, valid=valid, with_grad=needs_grad,
            sums="label" if collect else None,
        )  # fmt: skip
        if collect:
            self._collect(step.label, step.other, count)  # type: ignore[arg-type]
        if z.numel() == 0:
            return empty_batch_loss(z)  # convention E (the statistics update above still ran)
        if not needs_grad:
            return step.total / divisor
        return SoftmaxCrossEntropy.apply(z, step.total, step.grad, y_safe, valid, divisor, offsets, None)

    @torch.no_grad()
    def _collect(self, pos: torch.Tensor, neg: torch.Tensor, count: int | torch.Tensor) -> None:
        """Add |softmax(z~) - onehot(y)| / #samples per class (§1, §4), given this step's sums of the
        loss's own gradient (softmax(z~) - onehot(y)) / divisor times the divisor, from
        :func:`gradtail.losses.closed_form.cross_entropy_step` (no one-hot matrix): P_c the label
        entries |grad_iy| of the samples of class c, N_c the other entries of column c (unnormalised,
        float64 sums); #samples is that of the whole step over all ranks (gradstats rule 8)."""
        self.stats.update_from_class_sums(pos, neg, count=count, norm=count)

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """The non-ignored samples (positions) of a batch (convention N)."""
        return _count_not_ignored(targets, self.ignore_index)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, tau={self.tau}, eps={self.eps}, indicator={self.indicator!r}, "
            f"ignore_index={self.ignore_index}"
        )
