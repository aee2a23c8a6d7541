"""Seesaw loss (Wang et al., CVPR 2021), ``seesaw``, for softmax classifiers.

For a sample of class i and a negative class j != i the negative logit is re-weighted inside the softmax:

    z~_j = z_j + log(M_ij * C_ij),   l = CE(z~, i)

- mitigation M_ij = (N_j / N_i)^p if N_j < N_i else 1, where N is the cumulative number of training
  samples of each class seen so far (counted from the batch labels; counts below 1 are read as 1, as in
  mmdetection, so a class not yet seen does not remove its logit);
- compensation C_ij = (sigma_j / max(sigma_i, eps))^q when that ratio exceeds 1, else 1, where sigma is
  the softmax of the (detached) logits (the eps floor on the target's probability is mmdetection's).

No gradient flows through M or C (both are constants of the step). Defaults p 0.8, q 2, eps 1e-2.

Statistics (docs/methods/eql.md §1): ``cum_samples`` is a float64 buffer (checkpointed). Each training step
(convention S of :mod:`gradtail.losses.base`: ``self.training and torch.is_grad_enabled()``, not inside
``frozen_statistics``) the batch's per-class label counts are SUM-all-reduced across ranks
(:func:`gradtail.distributed.all_reduce_sum_`, a no-op without a process group; every rank runs it every
training step, an empty batch included, convention E) and added to ``cum_samples`` BEFORE the factors
are computed, so step t uses the counts through step t, its own batch included. This is the order of
mmdetection's ``SeesawLoss.forward`` (accumulate, then compute the loss); it is the counting analogue of
docs/methods/eql.md's timing rule, because a step's labels are known before its loss, unlike its gradients.
Any other call only reads the counts. Empty batches, labels ([0, C)) and the eval-mode warning follow the
conventions of :mod:`gradtail.losses.base` (``docs/losses.md``). ``class_counts`` is accepted and ignored: N
counts what training has seen, not the dataset's counts. The detection-specific objectness branch of the
mmdetection loss is not part of this classification loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradtail import distributed
from gradtail.errors import ConfigError
from gradtail.losses.base import PerSampleLoss, check_logits_targets, upcast_half
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace


def seesaw_log_factors(
    log_probs: torch.Tensor, targets: torch.Tensor, cum_samples: torch.Tensor, p: float, q: float, eps: float
) -> torch.Tensor:
    """log(M_ij C_ij) for every sample i (row) and class j (column); 0 in the target column.

    log M_ij = p * min(log N_j - log N_i, 0) with N clamped to >= 1;
    log C_ij = q * max(log sigma_j - log max(sigma_i, eps), 0).
    """
    y = targets.long()
    log_adjust = torch.zeros_like(log_probs)
    if p > 0:
        log_n = cum_samples.clamp(min=1.0).log().to(log_probs.dtype)
        log_adjust = log_adjust + p * (log_n.unsqueeze(0) - log_n[y].unsqueeze(1)).clamp(max=0.0)
    if q > 0:
        log_p_y = log_probs.gather(1, y.unsqueeze(1)).clamp(min=math.log(eps))
        log_adjust = log_adjust + q * (log_probs - log_p_y).clamp(min=0.0)
    # the target column: M_ii = C_ii = 1 already (ratio 1), zeroed explicitly for clarity
    return log_adjust.scatter(1, y.unsqueeze(1), 0.0)


@register_loss("seesaw")
class SeesawLoss(PerSampleLoss):
    """l_i = CE(z_i + log(M_{y_i, .} C_{y_i, .}) on negatives, y_i); cumulative counts in ``cum_samples``.

    Args: ``p`` (0.8, mitigation), ``q`` (2, compensation), ``eps`` (1e-2, floor of the target's
    probability in the compensation ratio); ``class_counts`` is ignored. Conventions (empty batch,
    statistics rule, labels): :mod:`gradtail.losses.base` (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("seesaw", num_classes=3)
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]], requires_grad=True)
        >>> round(loss(logits, torch.tensor([0, 0])).item(), 4)
        0.5253
        >>> loss.cum_samples.tolist()  # labels seen by training steps so far
        [2.0, 0.0, 0.0]
    """

    search_space: ClassVar[SearchSpace] = {"p": FloatRange(0.0, 1.5), "q": FloatRange(0.0, 4.0)}

    stateful = True
    cum_samples: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | torch.Tensor | None = None,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
    ) -> None:
        super().__init__(num_classes)
        p, q, eps = float(p), float(q), float(eps)
        if not (math.isfinite(p) and p >= 0):
            raise ConfigError(f"loss 'seesaw': p must be >= 0, got {p}")
        if not (math.isfinite(q) and q >= 0):
            raise ConfigError(f"loss 'seesaw': q must be >= 0, got {q}")
        if not (0 < eps <= 1):
            raise ConfigError(f"loss 'seesaw': eps must be in (0, 1], got {eps}")
        self.p, self.q, self.eps = p, q, eps
        self.register_buffer("cum_samples", torch.zeros(num_classes, dtype=torch.float64))

    def accumulate(self, targets: torch.Tensor) -> None:
        """N += all_reduce_sum(per-class label counts of this batch) (no host-device synchronisation)."""
        batch = torch.zeros_like(self.cum_samples)
        ones = torch.ones(targets.shape[0], dtype=batch.dtype, device=batch.device)
        batch.index_add_(0, targets.long(), ones)
        distributed.all_reduce_sum_(batch)
        self.cum_samples.add_(batch)

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        check_logits_targets(logits, targets, self.num_classes)
        if self.updates_statistics(logits):  # convention S; an empty batch still all-reduces (E)
            self.accumulate(targets)
        z = upcast_half(logits)
        y = targets.long()
        with torch.no_grad():
            log_probs = F.log_softmax(z, dim=1)
            log_adjust = seesaw_log_factors(log_probs, y, self.cum_samples, self.p, self.q, self.eps)
        return F.cross_entropy(z + log_adjust, y, reduction="none")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}"
