"""GALA: gradient-aware logit adjustment loss (docs/methods/gala.md §1-2; Zhang et al., ICASSP 2024).

Statistics (docs/methods/gala.md §1). Each training step feeds G = |softmax(z~) - onehot(y)| / B, the
closed-form gradient of the mean loss at the *adjusted* logits z~ (B: the samples of the whole step,
over all ranks and, inside ``accumulate``, all micro-batches). Of the C x C matrix M[j, c] it would
fill (rows: classifier j, columns: sample class c) GALA reads two vectors only, and only these are kept,
by :class:`gradtail.gradstats.GradientStatistics` (float64 buffers, SUM-all-reduced across ranks,
checkpointed):

- theta_j = M[j, j]                 (positive gradient received by class j): ``stats.pos``
- phi_c   = sum_{j != c} M[j, c]    (negative gradient produced by samples of class c): ``stats.produced``

For softmax CE the samples of class c produce exactly the negative gradient they receive,
sum_{j != c} p_j = 1 - p_c, so theta == phi at every step; gradtail adds one float64 number for both,
each sample's off-label entries summed (phi's own definition), so the identity holds to the last bit
(docs/methods/gala.md §1). ``stats.neg`` (N_j, the negative gradient received) is kept as for every
statistics module.

Loss (docs/methods/gala.md §2), eps inside every log, for a sample of label k:

- ``paper``: z~_j = z_j + lambda1 log(theta_j + eps) - lambda2 log(phi_k + eps) for j != k, z~_k = z_k
- ``code``:  the same offset on every logit, target included; the lambda2 term is then a per-sample
  constant, so the loss is CE(z + lambda1 log(theta + eps), y). gradtail computes exactly that form:
  dropping the per-sample constant changes neither the loss nor its gradients nor the statistics
  (softmax is shift-invariant), and it makes ``lambda2`` bit-for-bit inert in this variant.

L = mean_i CE(z~_i, y_i). Test time uses the raw logits: this is a training loss only.

Cost (issue #29, docs/losses.md "Cost"): the adjusted logits are z plus a per-class row (``paper``: the
per-sample constant -lambda2 log(phi_k + eps) is moved onto the label's logit as +lambda2 log(phi_k + eps),
the same softmax), and the loss, its gradient and the statistics come from one log-softmax and one
cross-entropy backward kernel in the forward (:mod:`gradtail.losses.closed_form`); the backward only
scales that gradient. The state is 3 (``double``: 5) vectors of C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from gradtail.errors import ConfigError
from gradtail.gradstats import GradientStatistics, read_statistics
from gradtail.losses.base import Accumulation as AccumulationState
from gradtail.losses.base import LongTailLoss, checked_logits_targets, empty_batch_loss
from gradtail.losses.closed_form import SoftmaxCrossEntropy, cross_entropy_step
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace

Variant = Literal["paper", "code"]
Accumulation = Literal["single", "double"]


@register_loss("gala")
class GALALoss(LongTailLoss):
    """Gradient-aware logit adjustment loss (docs/methods/gala.md §2), with both published forms.

    Args:
        num_classes: C.
        class_counts: accepted for the common loss factory signature and ignored (GALA uses gradient
            statistics, not class counts).
        variant: ``"paper"`` (formula of the paper, target logit not adjusted) or ``"code"`` (the
            authors' released code: every logit adjusted, i.e. CE(z + lambda1 log(theta + eps), y)).
        accumulation: ``"single"`` (theta, phi are the running sums) or ``"double"`` (the released code:
            after each step the running sums are added again into second-level float64 buffers
            ``theta2`` / ``phi2``, and theta, phi are read from those, so older steps weigh more: after
            t steps with per-step sums S_1..S_t the second level holds sum_s (t - s + 1) S_s).
        lambda1: weight of log(theta_j + eps).
        lambda2: weight of log(phi_k + eps) (``paper`` only; inert in ``code``).
        eps: added inside every log.

    Timing (docs/methods/eql.md §1): the offsets of step t come from statistics through step t - 1 and are
    detached constants; the statistics are updated after the step's loss is built. When they change
    (convention S: training mode with grad enabled, not frozen), what an empty batch gives (E) and which
    labels are accepted ([0, C), no detection options; L) follow the conventions of
    :mod:`gradtail.losses.base` (``docs/losses.md``). With ``double`` accumulation a step the statistics do
    not count (empty on every rank, or skipped as non-finite) does not add the running sums to the second
    level either. Statistics come from the detached adjusted logits, in float64 whatever the training
    precision (autocast does not change them; phi == theta then holds to float64 rounding).

    Step 1 is plain CE in both variants: while the statistics are empty (no update yet) the offsets are
    zero. For ``code`` (any lambdas) and for ``paper`` with lambda1 == lambda2 this is what the formula
    gives anyway (a per-sample constant, or exactly 0). For ``paper`` with lambda1 != lambda2 the
    literal formula at empty statistics would shift every non-target logit by
    (lambda1 - lambda2) log(eps), which is not CE; gradtail follows docs/methods/gala.md §2 ("step 1 is plain
    CE") and treats empty statistics as zero offsets. The check is a tensor ``where`` (no device sync).

    Scale dependence: with theta == phi, the ``paper`` loss equals CE where non-target logits get
    lambda1 log(theta_j + eps) and the target logit gets lambda2 log(theta_k + eps). Multiplying all
    statistics by s therefore shifts non-target logits relative to the target by
    (lambda1 - lambda2) log s: with lambda1 != lambda2 the result depends on the global scale of the
    statistics, i.e. on the 1/B normalization, on the number of steps and on the accumulation mode
    (``double`` grows roughly quadratically with steps). With lambda1 == lambda2 (and in ``code``) only
    ratios matter, up to eps.

    Multi-process: the per-sample |softmax(z~) - onehot(y)| and the batch size B are summed over ranks
    in one all-reduce and divided there (:mod:`gradtail.gradstats` rule 8), so the statistics equal
    those of one process running the whole global batch, whatever the split (20 + 12 samples as well
    as 16 + 16). Accumulation, validation before any change and compile: conventions A, V, P of
    :mod:`gradtail.losses.base`.

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("gala", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]], requires_grad=True)
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # step 1: plain cross-entropy
        0.8136
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # step 2: offsets from step 1
        0.4528
        >>> int(loss.stats.steps)
        2
    """

    search_space: ClassVar[SearchSpace] = {
        "lambda1": FloatRange(0.1, 4.0, log=True),
        "lambda2": FloatRange(0.1, 4.0, log=True),
    }

    stateful = True
    theta2: torch.Tensor
    phi2: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | torch.Tensor | None = None,
        variant: Variant = "paper",
        accumulation: Accumulation = "single",
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        eps: float = 1e-3,
    ) -> None:
        super().__init__(num_classes)
        if variant not in ("paper", "code"):
            raise ConfigError(f"gala: variant must be 'paper' or 'code', got {variant!r}")
        if accumulation not in ("single", "double"):
            raise ConfigError(f"gala: accumulation must be 'single' or 'double', got {accumulation!r}")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if not math.isfinite(float(value)):
                raise ConfigError(f"gala: {name} must be finite, got {value}")
        if not float(eps) > 0:
            raise ConfigError(f"gala: eps must be > 0 (it is added inside every log), got {eps}")
        self.variant: Variant = variant
        self.accumulation: Accumulation = accumulation
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.eps = float(eps)
        self.stats = GradientStatistics(self.num_classes, track_produced=True)
        if accumulation == "double":
            self.register_buffer("theta2", torch.zeros(self.num_classes, dtype=torch.float64))
            self.register_buffer("phi2", torch.zeros(self.num_classes, dtype=torch.float64))

    # ------------------------------------------------------------------ statistics
    def theta(self) -> torch.Tensor:
        """theta_j = M[j, j]: positive gradient received by class j (docs/methods/gala.md §1), from the
        active accumulator, float64 (C,)."""
        if self.accumulation == "double":
            return read_statistics(self.theta2)
        return read_statistics(self.stats.pos)

    def phi(self) -> torch.Tensor:
        """phi_c = sum_{j != c} M[j, c]: negative gradient produced by samples of class c
        (docs/methods/gala.md §1), from the active accumulator, float64 (C,)."""
        if self.accumulation == "double":
            return read_statistics(self.phi2)
        return self.stats.negative_produced()

    @torch.no_grad()
    def offsets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row (C,), label (C,) or None), float64: z~ = z + row, except the label's logit, which is
        z_k + label[k] (docs/methods/gala.md §2, up to a per-sample constant, module docstring).

        ``code``: row = lambda1 log(theta + eps), no label term. ``paper``: the same row, and the label's
        logit z_k + lambda2 log(phi_k + eps): the literal z~ minus the per-sample constant
        -lambda2 log(phi_k + eps), which leaves softmax, the loss and every gradient unchanged. Both are 0
        while the statistics are empty (step 1 is plain CE, class docstring); a tensor ``where``, no
        device sync.
        """
        rows = self._offset_rows()
        return rows[0], (rows[1] if self.variant == "paper" else None)

    def _offset_rows(self) -> torch.Tensor:
        """:meth:`offsets` as one float64 tensor, (1, C) (``code``) or (2, C) (``paper``: row, label),
        each operation run once for both (few small operations per step, issue #29)."""
        if self.variant == "code":
            rows = torch.log(self.theta().unsqueeze(0) + self.eps)
            lambdas: tuple[float, ...] = (self.lambda1,)
        else:
            rows = torch.log(torch.stack([self.theta(), self.phi()]) + self.eps)
            lambdas = (self.lambda1, self.lambda2)
        if lambdas[0] != 1.0 or lambdas[-1] != 1.0:
            if lambdas[0] == lambdas[-1]:
                rows = rows * lambdas[0]
            else:
                rows = rows * torch.tensor(lambdas, dtype=rows.dtype, device=rows.device).unsqueeze(1)
        return torch.where(self.stats.started(), rows, 0.0)

    def logit_offsets(self, targets: torch.Tensor) -> torch.Tensor:
        """Detached float64 (n, C) offsets z~ - z of the literal formulas (docs/methods/gala.md §2), for
        inspection; the loss itself uses :meth:`offsets` (no (n, C) tensor).

        Zero while the statistics are empty (step 1 is plain CE, see the class docstring).
        """
        theta = self.theta().detach()
        base = self.lambda1 * torch.log(theta + self.eps)  # lambda1 log(theta_j + eps)
        n = targets.shape[0]
        if self.variant == "code":
            # CE(z + lambda1 log(theta + eps), y); the -lambda2 log(phi_k + eps) constant is dropped.
            offsets = base.unsqueeze(0).expand(n, -1)
        else:
            tgt = targets.to(device=theta.device, dtype=torch.long)
            log_phi_k = torch.log(self.phi().detach()[tgt] + self.eps)  # log(phi_k + eps), per sample
            per_sample = self.lambda2 * log_phi_k
            offsets = base.unsqueeze(0) - per_sample.unsqueeze(1)
            offsets = offsets.scatter(1, tgt.view(-1, 1), 0.0)  # z~_k = z_k: target not adjusted
        return torch.where(self.stats.started(), offsets, torch.zeros_like(offsets))

    # ------------------------------------------------------------------ loss
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """L = mean_i CE(z~_i, y_i) (docs/methods/gala.md §2); then, when convention S allows, update
        statistics.

        The value, dL/dz and the statistics' sums are computed together
        (:func:`gradtail.losses.closed_form.cross_entropy_step`: value and gradient bit for bit those of
        ``F.cross_entropy`` at z~); the backward only hands that gradient on. An empty
        batch gives :func:`gradtail.losses.base.empty_batch_loss` and still runs the update (zero
        contribution, the same collective as every step; convention E).
        """
        targets = checked_logits_targets(logits, targets, self.num_classes)  # before any change (V)
        if self.stats.pos.device != logits.device:
            self.to(logits.device)
        collect = self.updates_statistics(logits)
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # work precision
        y = targets
        if y.dtype != torch.long or y.device != z.device:
            y = y.to(device=z.device, dtype=torch.long)
        n = z.shape[0]
        if n == 0:
            if collect:  # zero sums: the same collective as every step (convention E)
                zero = torch.zeros(self.num_classes, dtype=torch.float64, device=z.device)
                self._update(zero, zero, 0)
            return empty_batch_loss(z)
        rows = self._offset_rows().to(z.dtype)  # constants: statistics through step t-1
        row, label_at = rows[0], (rows[1][y] if self.variant == "paper" else None)
        divisor = torch.as_tensor(self._divisor(n), dtype=z.dtype, device=z.device)
        needs_grad = torch.is_grad_enabled() and z.requires_grad
        step = cross_entropy_step(
            z.detach(), y, row, divisor, target_offsets=label_at, with_grad=needs_grad,
            sums="rest" if collect else None,
        )  # fmt: skip
        if collect:
            self._update(step.label, step.other, n)  # type: ignore[arg-type]
        if not needs_grad:
            return step.total / divisor
        return SoftmaxCrossEntropy.apply(z, step.total, step.grad, y, None, divisor, row, label_at)

    @torch.no_grad()
    def _update(self, theta: torch.Tensor, neg: torch.Tensor, n: int) -> None:
        """Add G = |softmax(z~) - onehot(y)| / B (docs/methods/gala.md §1; B summed over ranks, gradstats
        rule 8), given this step's unnormalised per-class sums of |G| times this call's divisor.

        Of the matrix M[j, c] += |G_ij| (c = y_i): phi_c, the off-diagonal column sums, adds the
        off-label entries of each sample of class c, summed in float64; theta_c = M[c, c] adds |G_iy|,
        which for softmax CE is the same sum (sum_{j != y} p_j = 1 - p_y, module docstring), so the
        same float64 number is added to both (theta == phi to the last bit, and accurate when p_y is
        close to 1: :func:`gradtail.losses.closed_form.cross_entropy_step` with ``sums="rest"``); N_j
        adds the off-label entries of column j.
        """
        second = self.accumulation == "double" and not self.stats.accumulating
        steps_before = self.stats.steps.clone() if second else None
        self.stats.update_from_class_sums(theta, neg, produced=theta, count=n, norm=n)
        if steps_before is not None:
            self._second_level(steps_before)

    def _second_level(self, steps_before: torch.Tensor) -> None:
        """``double``: add the running sums again after every counted step (released code); a step the
        statistics did not count (empty everywhere, non-finite) adds nothing."""
        if self.accumulation != "double":
            return
        counted = self.stats.steps != steps_before
        zero = torch.zeros((), dtype=self.theta2.dtype, device=self.theta2.device)
        self.theta2.add_(torch.where(counted, self.stats.pos, zero))
        self.phi2.add_(torch.where(counted, self.stats.produced, zero))

    def _begin_accumulation(self, acc: AccumulationState, targets: torch.Tensor | None) -> None:
        self.stats.begin_accumulation(acc.total)

    @torch.no_grad()
    def _end_accumulation(self, commit: bool) -> None:
        steps_before = self.stats.steps.clone()
        self.stats.end_accumulation(commit)
        if commit:
            self._second_level(steps_before)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, variant={self.variant!r}, accumulation={self.accumulation!r}, "
            f"lambda1={self.lambda1}, lambda2={self.lambda2}, eps={self.eps}"
        )
