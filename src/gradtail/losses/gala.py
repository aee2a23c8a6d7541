"""GALA: gradient-aware logit adjustment loss (docs/methods/gala.md §1-2; Zhang et al., ICASSP 2024).

Statistics (docs/methods/gala.md §1). Each training step feeds G = |softmax(z~) - onehot(y)| / B, the
closed-form gradient of the mean loss at the *adjusted* logits z~ (B: the samples of the whole step,
over all ranks and, inside ``accumulate``, all micro-batches), into a C x C matrix M[j, c] (rows:
classifier j, columns: sample class c), kept by :class:`gradtail.gradstats.GradientStatistics` (float64
buffers, SUM-all-reduced across ranks, checkpointed). From it

- theta_j = M[j, j]                 (positive gradient received by class j)
- phi_c   = sum_{j != c} M[j, c]    (negative gradient produced by samples of class c)

and theta == phi at every step for softmax CE.

Loss (docs/methods/gala.md §2), eps inside every log, for a sample of label k:

- ``paper``: z~_j = z_j + lambda1 log(theta_j + eps) - lambda2 log(phi_k + eps) for j != k, z~_k = z_k
- ``code``:  the same offset on every logit, target included; the lambda2 term is then a per-sample
  constant, so the loss is CE(z + lambda1 log(theta + eps), y). gradtail computes exactly that form:
  dropping the per-sample constant changes neither the loss nor its gradients nor the statistics
  (softmax is shift-invariant), and it makes ``lambda2`` bit-for-bit inert in this variant.

L = mean_i CE(z~_i, y_i). Test time uses the raw logits: this is a training loss only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError
from gradtail.gradstats import GradientStatistics, read_statistics
from gradtail.losses.base import Accumulation as AccumulationState
from gradtail.losses.base import LongTailLoss, checked_logits_targets, empty_batch_loss
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
        self.stats = GradientStatistics(self.num_classes, track_matrix=True)
        if accumulation == "double":
            self.register_buffer("theta2", torch.zeros(self.num_classes, dtype=torch.float64))
            self.register_buffer("phi2", torch.zeros(self.num_classes, dtype=torch.float64))

    # ------------------------------------------------------------------ statistics
    def theta(self) -> torch.Tensor:
        """theta_j: positive gradient received by class j (docs/methods/gala.md §1), from the active
        accumulator."""
        if self.accumulation == "double":
            return read_statistics(self.theta2)
        return torch.diagonal(read_statistics(self.stats.matrix))

    def phi(self) -> torch.Tensor:
        """phi_c: negative gradient produced by samples of class c (docs/methods/gala.md §1), active
        accumulator."""
        if self.accumulation == "double":
            return read_statistics(self.phi2)
        return self.stats.negative_produced()

    def logit_offsets(self, targets: torch.Tensor) -> torch.Tensor:
        """Detached float64 (n, C) offsets z~ - z for the current statistics (docs/methods/gala.md §2).

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

        An empty batch gives :func:`gradtail.losses.base.empty_batch_loss` and still runs the update
        (zero contribution, the same collective as every step; convention E).
        """
        targets = checked_logits_targets(logits, targets, self.num_classes)  # before any change (V)
        if self.stats.pos.device != logits.device:
            self.to(logits.device)
        collect = self.updates_statistics(logits)
        work_dtype = torch.promote_types(logits.dtype, torch.float32)
        z = logits.to(work_dtype)
        targets = targets.to(device=logits.device, dtype=torch.long)
        offsets = self.logit_offsets(targets).to(device=z.device, dtype=work_dtype)
        z_adj = z + offsets
        if z.numel():  # the mean over B samples, or over the union's total inside accumulate (A)
            total = F.cross_entropy(z_adj, targets, reduction="sum")
            divisor = self._divisor(z.shape[0])
            loss = total / (divisor.to(total) if isinstance(divisor, torch.Tensor) else divisor)
        else:
            loss = empty_batch_loss(z_adj)
        if collect:
            self._update(z_adj.detach(), targets)
        return loss

    @torch.no_grad()
    def _update(self, z_adj: torch.Tensor, targets: torch.Tensor) -> None:
        """Add G = |softmax(z~) - onehot(y)| / B to M (docs/methods/gala.md §1; B summed over ranks,
        gradstats rule 8), then the second level."""
        with torch.autocast(device_type=z_adj.device.type, enabled=False):
            grad = torch.softmax(z_adj.to(torch.float64), dim=1)
            grad.scatter_add_(1, targets.view(-1, 1), -torch.ones_like(grad[:, :1]))
            grad.abs_()
            steps_before = self.stats.steps.clone()
            self.stats.update_from_softmax_grad(grad, targets, norm=z_adj.shape[0])
            if not self.stats.accumulating:
                self._second_level(steps_before)

    def _second_level(self, steps_before: torch.Tensor) -> None:
        """``double``: add the running sums again after every counted step (released code); a step the
        statistics did not count (empty everywhere, non-finite) adds nothing."""
        if self.accumulation != "double":
            return
        counted = self.stats.steps != steps_before
        zero = torch.zeros((), dtype=self.theta2.dtype, device=self.theta2.device)
        self.theta2.add_(torch.where(counted, torch.diagonal(self.stats.matrix), zero))
        self.phi2.add_(
            torch.where(counted, self.stats.matrix.sum(dim=0) - torch.diagonal(self.stats.matrix), zero)
        )

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
