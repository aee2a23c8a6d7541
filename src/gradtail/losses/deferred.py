"""Deferred re-weighting (DRW, Cao et al. 2019) and the class-balanced weights it shares with ``cb``.

Class-balanced weights (Cui et al. 2019): w_j = (1 - beta) / (1 - beta^{n_j}), normalised so that
sum_j w_j = C. beta = 0 gives uniform weights; beta -> 1 approaches inverse class frequency.

DRW is a schedule that any loss exposing per-sample terms (``per_sample_loss``) can take: before epoch
``drw_epoch`` the loss is the plain batch mean of its per-sample terms; from ``drw_epoch`` on
(``set_epoch`` is called by the trainer, 0-based) each term is weighted by the class-balanced weight
w_{y_i} with ``drw_beta`` (0.9999). The reduction after the switch is a setting:

- ``drw_normalize="weights"`` (default): L = sum_i w_{y_i} l_i / sum_i w_{y_i}, what the LDAM-DRW
  reference code computes with ``F.cross_entropy(..., weight=per_cls_weights)``;
- ``drw_normalize="batch"``: L = (1/B) sum_i w_{y_i} l_i, the class-balanced paper's reduction.

This module does not import the loss registry (:mod:`gradtail.losses.registry` imports it, to apply
``drw_epoch=...`` on any ``create_loss`` call); the registered ``drw`` loss and ``cb`` live in
:mod:`gradtail.losses.reweighting`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from gradtail.errors import ConfigError
from gradtail.losses.base import (
    Accumulation,
    LongTailLoss,
    PerSampleLoss,
    batch_mean,
    empty_batch_loss,
    validate_class_counts,
)
from gradtail.search_space import EpochFraction, SearchSpace

Counts = Sequence[int] | torch.Tensor | None

DRW_NORMALIZATIONS = ("weights", "batch")
DRW_OPTIONS = ("drw_epoch", "drw_beta", "drw_normalize")
# What ``gradtail tune`` searches when a method uses deferred re-weighting (``drw_epoch`` in its loss
# parameters, or the ``drw`` loss): the epoch re-weighting starts, as a fraction of the schedule (LDAM-DRW
# starts at 160 of 200 epochs, 0.8).
DRW_SEARCH_SPACE: SearchSpace = {"drw_epoch": EpochFraction(0.5, 0.9)}


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """w_j = (1 - beta) / (1 - beta^{n_j}), normalised to sum C (float64)."""
    counts = counts.to(torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return weights * (counts.numel() / weights.sum())


def check_beta(beta: float, loss_name: str) -> float:
    """beta must lie in [0, 1)."""
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ConfigError(f"loss {loss_name!r}: beta must be in [0, 1), got {beta}")
    return beta


def weighted_reduction(
    per_sample: torch.Tensor, sample_weights: torch.Tensor, normalize: str
) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i (``"weights"``) or sum_i w_i l_i / B (``"batch"``); 0 for B = 0.

    An empty batch gives :func:`~gradtail.losses.base.empty_batch_loss` (convention E), not 0 / 0.
    """
    if per_sample.numel() == 0:
        return empty_batch_loss(per_sample)
    total = (sample_weights * per_sample).sum()
    if normalize == "weights":
        return total / sample_weights.sum()
    return total / per_sample.numel()


class DeferredReweighting(LongTailLoss):
    """Deferred re-weighting of any loss with ``per_sample_loss``: class-balanced weights from ``drw_epoch``.

    L = mean_i l_i while ``epoch < drw_epoch``; afterwards sum_i w_{y_i} l_i / sum_i w_{y_i}
    (``drw_normalize="weights"``) or (1/B) sum_i w_{y_i} l_i (``"batch"``), w from ``drw_beta``.
    The wrapped loss is the submodule ``inner`` (its buffers checkpoint as ``inner.*``); it receives
    ``set_epoch`` and keeps its own statistics (``stateful`` and the statistics rule are the wrapped
    loss's); ``required_head`` is the wrapped loss's. Conventions: :mod:`gradtail.losses.base`
    (``docs/losses.md``).

    Example:
        >>> import torch
        >>> from gradtail.losses import create_loss
        >>> loss = create_loss("ce", num_classes=3, class_counts=[100, 10, 1], drw_epoch=2)
        >>> type(loss).__name__
        'DeferredReweighting'
        >>> logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]])
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # epoch 0: plain CE
        0.8136
        >>> loss.set_epoch(2)
        >>> round(loss(logits, torch.tensor([0, 2])).item(), 4)  # from epoch 2: class-balanced weights
        1.3746
    """

    allows_single_class = True  # the wrapped loss has validated num_classes already
    weights: torch.Tensor

    def __init__(
        self,
        loss: LongTailLoss,
        class_counts: Counts = None,
        drw_epoch: int = 160,
        drw_beta: float = 0.9999,
        drw_normalize: str = "weights",
    ) -> None:
        if isinstance(loss, DeferredReweighting):
            raise ConfigError("loss is already deferred-reweighted (with_deferred_reweighting replaces it)")
        if not isinstance(loss, PerSampleLoss):
            raise ConfigError(
                f"{type(loss).__name__} does not expose per_sample_loss(logits, targets), so it cannot be "
                "combined with deferred re-weighting (drw)"
            )
        super().__init__(loss.num_classes)
        counts = validate_class_counts(class_counts, loss.num_classes, "drw")
        if isinstance(drw_epoch, bool) or not isinstance(drw_epoch, numbers.Integral) or drw_epoch < 0:
            raise ConfigError(f"loss 'drw': drw_epoch must be an integer >= 0, got {drw_epoch!r}")
        if drw_normalize not in DRW_NORMALIZATIONS:
            raise ConfigError(
                f"loss 'drw': drw_normalize must be one of {DRW_NORMALIZATIONS}, got {drw_normalize!r}"
            )
        self.inner = loss
        self.required_head = loss.required_head
        self.stateful = loss.stateful
        self.drw_epoch = int(drw_epoch)
        self.drw_beta = check_beta(drw_beta, "drw")
        self.drw_normalize = drw_normalize
        self.register_buffer("weights", effective_number_weights(counts, self.drw_beta))
        self.set_epoch(loss.epoch)

    @property
    def active(self) -> bool:
        """True from epoch ``drw_epoch`` on (epochs are 0-based, as ``set_epoch`` receives them)."""
        return self.epoch >= self.drw_epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def inference_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.inner.inference_logits(logits)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = self.inner.per_sample_loss(logits, targets)  # checks the inputs
        acc = self._accumulation
        if not self.active:
            sample_weights = None
        else:
            sample_weights = self.weights.to(device=per_sample.device, dtype=per_sample.dtype)[targets.long()]
        if acc is None or per_sample.numel() == 0:  # conventions N, E
            if sample_weights is None:
                return batch_mean(per_sample)
            return weighted_reduction(per_sample, sample_weights, self.drw_normalize)
        # convention A: divided by the union's normaliser (samples, or sum of class weights)
        total = per_sample.sum() if sample_weights is None else (sample_weights * per_sample).sum()
        return total / acc.divisor.to(device=total.device, dtype=total.dtype)

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """B, or after the switch with ``drw_normalize="weights"`` sum_i w_{y_i} (convention N)."""
        if self.active and self.drw_normalize == "weights":
            if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
                raise ConfigError("drw: normalizer expects (n,) targets")
            return self.weights.to(targets.device)[targets.long()].sum().cpu()
        return super().normalizer(targets)

    def _begin_accumulation(self, acc: Accumulation, targets: torch.Tensor | None) -> None:
        """The wrapped loss accumulates too (its statistics; seesaw needs the targets). With ``total``
        after the switch (``drw_normalize="weights"``), ``total`` is the union's sum of class weights."""
        if targets is not None:
            self.inner.start_accumulation(targets=targets)
        else:
            self.inner.start_accumulation(acc.total)

    def _end_accumulation(self, commit: bool) -> None:
        self.inner.finish_accumulation(commit)

    def extra_repr(self) -> str:
        return f"drw_epoch={self.drw_epoch}, drw_beta={self.drw_beta}, drw_normalize={self.drw_normalize!r}"


def pop_drw_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the DRW options (``drw_epoch``, ``drw_beta``, ``drw_normalize``) out of ``kwargs``, return them."""
    return {key: kwargs.pop(key) for key in DRW_OPTIONS if key in kwargs}


def with_deferred_reweighting(
    loss: LongTailLoss,
    class_counts: Counts = None,
    drw_epoch: int | None = None,
    **drw_options: Any,
) -> LongTailLoss:
    """Give ``loss`` the DRW schedule switching on at ``drw_epoch`` (``None``: return ``loss`` unchanged).

    A loss that already has a schedule gets the new one in its place (never weighted twice).
    """
    unknown = set(drw_options) - set(DRW_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown deferred re-weighting options {sorted(unknown)}; valid: {DRW_OPTIONS}")
    if drw_epoch is None:
        if drw_options:
            raise ConfigError(f"{sorted(drw_options)} given without drw_epoch: deferred re-weighting is off")
        return loss
    if isinstance(loss, DeferredReweighting):
        loss = loss.inner
    return DeferredReweighting(loss, class_counts, drw_epoch=drw_epoch, **drw_options)
