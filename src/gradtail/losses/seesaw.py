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
counts what training has seen, not the dataset's counts.

Accumulation (convention A): ``with loss.accumulate(targets=union_targets):`` counts the union's labels
(summed over ranks: the one all-reduce of the step) when it starts, every micro-batch inside uses
N + those counts, as the whole batch would, and the exit adds them to ``cum_samples``. Seesaw needs
the union's targets there (``total`` alone is refused): its factors count labels before the loss.
The detection-specific objectness branch of the mmdetection loss is not part of this classification
loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from gradtail import distributed
from gradtail.errors import ConfigError
from gradtail.gradstats import keep_buffer_dtypes, read_statistics, statistics_frozen
from gradtail.losses.base import (
    Accumulation,
    PerSampleLoss,
    checked_labels,
    checked_logits_targets,
    upcast_half,
)
from gradtail.losses.closed_form import ProbabilityCrossEntropy, row_blocks
from gradtail.losses.registry import register_loss
from gradtail.search_space import FloatRange, SearchSpace


def seesaw_log_factors(
    log_probs: torch.Tensor, targets: torch.Tensor, cum_samples: torch.Tensor, p: float, q: float, eps: float
) -> torch.Tensor:
    """log(M_ij C_ij) for every sample i (row) and class j (column); 0 in the target column.

    log M_ij = p * min(log N_j - log N_i, 0) with N clamped to >= 1;
    log C_ij = q * max(log sigma_j - log max(sigma_i, eps), 0).

    The formula as written, for inspection; the loss computes softmax(z + log(M C)) from the factors
    themselves (:func:`seesaw_probabilities`).
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


@torch.no_grad()
def seesaw_probabilities(
    z: torch.Tensor, targets: torch.Tensor, cum_samples: torch.Tensor, p: float, q: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W, S, CE) with softmax(z~) = W / S row by row (W (N, C), S (N, 1)) and CE(z~_i, y_i) per sample
    (N,), for z~ = z + log(M C) (:func:`seesaw_log_factors`), from the detached logits ``z`` with one
    softmax and no log-softmax of z~ (issue #29, docs/losses.md "Cost").

    exp(z~_ij) = exp(z_ij) M_ij C_ij, so with sigma = softmax(z), r = max(N, 1)^p and
    f_i = max(sigma_i, eps) (i: the sample's label)

        W_ij = sigma_ij min(r_j, r_i) max(sigma_ij / f_i, 1)^q,   S_i = sum_k W_ik

    (M_ij = min(r_j, r_i) / r_i: the per-sample factor 1 / r_i cancels in W / S, and every factor is
    >= 1, so nothing underflows that sigma did not), and CE_i = log S_i - log W_ii with W_ii =
    sigma_ii r_i, where log sigma_ii = z_ii - m_i + log max_k sigma_ik (m_i = max_k z_ik) keeps its
    value when sigma_ii underflows. On eager CPU in blocks of samples (each block's softmax and factors
    while it is in cache, :func:`gradtail.losses.closed_form.row_blocks`), elsewhere on whole tensors.
    """
    y = targets.long().unsqueeze(1)
    r = cum_samples.clamp(min=1.0).pow(p).to(device=z.device, dtype=z.dtype) if p > 0 else None
    r_y = None if r is None else r[y]
    n = z.shape[0]
    blocked = z.device.type == "cpu" and not torch.compiler.is_compiling() and z.numel() > 0
    if blocked:
        weights = torch.empty(z.shape, dtype=z.dtype, device=z.device)
        z_max, top, sigma_y, totals = (torch.empty(n, 1, dtype=z.dtype, device=z.device) for _ in range(4))
        rows = row_blocks(z)[0][1]
        scratch = torch.empty((min(rows, n), z.shape[1]), dtype=z.dtype, device=z.device)
        parts = [x.split(rows) for x in (z, y, weights, z_max, top, sigma_y, totals)]
        parts.append([None] * len(parts[0]) if r_y is None else r_y.split(rows))
        for zb, yb, w, mb, tb, sb, nb, rb in zip(*parts, strict=True):
            torch._softmax(zb, 1, False, out=w)
            torch.amax(zb, 1, keepdim=True, out=mb)
            torch.amax(w, 1, keepdim=True, out=tb)
            torch.gather(w, 1, yb, out=sb)
            _seesaw_factors(w, sb, rb, r, q, eps, scratch if w.shape[0] == rows else scratch[: w.shape[0]])
            torch.sum(w, 1, keepdim=True, out=nb)
    else:
        weights = torch.softmax(z, dim=1)
        z_max, top = z.amax(dim=1, keepdim=True), weights.amax(dim=1, keepdim=True)
        sigma_y = weights.gather(1, y)
        _seesaw_factors(weights, sigma_y, r_y, r, q, eps, None)
        totals = weights.sum(dim=1, keepdim=True)
    log_sigma_y = z.gather(1, y) - z_max + top.log()
    losses = totals.log() - log_sigma_y
    if r_y is not None:
        losses = losses - r_y.log()
    return weights, totals, losses.squeeze(1)


def _seesaw_factors(
    w: torch.Tensor,
    sigma_y: torch.Tensor,
    r_y: torch.Tensor | None,
    r: torch.Tensor | None,
    q: float,
    eps: float,
    scratch: torch.Tensor | None,
) -> None:
    """sigma -> W of :func:`seesaw_probabilities` in place on ``w`` (n, C); ``scratch`` (n, C) or
    ``None`` (new tensors)."""
    if q > 0:  # C: max(sigma_j / f, 1)^q, f = max(sigma_y, eps); exactly 1 at the label
        f = sigma_y.clamp(min=eps)
        ratio = w / f if scratch is None else torch.div(w, f, out=scratch)
        w.mul_(ratio.clamp_(min=1.0).pow_(q))
    if r is not None:  # M times r_y: min(r_j, r_y); r_y at the label
        w.mul_(torch.minimum(r, r_y) if scratch is None else torch.minimum(r, r_y, out=scratch))  # type: ignore[arg-type]


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

        self._union_counts: torch.Tensor | None = None  # inside accumulate(): the union's label counts

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Devices apply to ``cum_samples``, dtypes do not (float64 counts; convention P)."""
        return keep_buffer_dtypes(self, lambda: super(SeesawLoss, self)._apply(fn, recurse))

    def label_counts(self, targets: torch.Tensor) -> torch.Tensor:
        """all_reduce_sum(per-class label counts of ``targets``), float64 (C,) (no host-device sync)."""
        batch = torch.zeros(self.num_classes, dtype=self.cum_samples.dtype, device=self.cum_samples.device)
        y = targets.reshape(-1).to(device=batch.device, dtype=torch.long)
        batch.index_add_(0, y, torch.ones(y.shape[0], dtype=batch.dtype, device=batch.device))
        distributed.all_reduce_sum_(batch)
        return batch

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = checked_logits_targets(logits, targets, self.num_classes)  # before any change (V)
        if self.cum_samples.device != logits.device:
            self.to(logits.device)
        counts = read_statistics(self.cum_samples)
        if self.updates_statistics(logits):  # convention S; an empty batch still all-reduces (E)
            if self._union_counts is not None:  # inside accumulate(): the union's labels (A)
                counts = counts + self._union_counts.to(counts.device)
            else:
                batch = self.label_counts(targets)
                counts = counts + batch  # step t uses the counts through step t (module docstring)
                self.cum_samples.add_(batch)
        z = upcast_half(logits)
        y = targets.long()
        weights, totals, losses = seesaw_probabilities(z.detach(), y, counts, self.p, self.q, self.eps)
        if not (torch.is_grad_enabled() and z.requires_grad):
            return losses
        return ProbabilityCrossEntropy.apply(z, weights, totals, losses, y)  # softmax(z~) - onehot(y)

    def _begin_accumulation(self, acc: Accumulation, targets: torch.Tensor | None) -> None:
        if targets is None:
            raise ConfigError(
                "seesaw: accumulate() needs targets=<the union's labels> (its factors count the labels of "
                "the whole accumulated batch before its first micro-batch), not total"
            )
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise ConfigError("seesaw: accumulate(targets=...) takes the (n,) labels of the union")
        targets = checked_labels(targets, self.num_classes)
        self._union_counts = self.label_counts(targets)

    @torch.no_grad()
    def _end_accumulation(self, commit: bool) -> None:
        union, self._union_counts = self._union_counts, None
        if commit and union is not None and self.training and not statistics_frozen():
            self.cum_samples.add_(union.to(self.cum_samples.device))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, p={self.p}, q={self.q}, eps={self.eps}"
