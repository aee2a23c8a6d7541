"""Learning-rate schedules (docs/methods/protocol.md §3; docs/runs.md "Schedules").

- ``step`` / ``cosine`` / ``constant``: a function of training progress measured in epochs (fractional
  within an epoch, taken at the end of the step), with a linear warm-up from 0 over ``warmup_epochs``
  (the LDAM recipe's);
- ``multistep``: a function of the iteration about to be taken (mmdetection's step policy, the LVIS
  recipes'): linear warm-up over ``warmup_iters`` iterations from ``warmup_ratio`` x lr, then lr x
  ``step_gamma`` for each of ``step_fractions`` of the run's iterations passed.

Either way the schedule carries no state of its own: resuming at a global step restores it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradtail.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    epochs: int
    warmup_epochs: float = 0.0
    kind: str = "step"  # step | cosine | constant
    milestones: tuple[int, ...] = ()
    milestone_factors: tuple[float, ...] = ()
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 0.001
    step_fractions: tuple[float, ...] = ()
    step_gamma: float = 0.1

    @classmethod
    def from_config(cls, cfg: OptimConfig) -> LRSchedule:
        return cls(
            base_lr=cfg.lr,
            epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            kind=cfg.schedule,
            milestones=tuple(cfg.milestones),
            milestone_factors=tuple(cfg.milestone_factors),
            min_lr=cfg.min_lr,
            warmup_iters=cfg.warmup_iters,
            warmup_ratio=cfg.warmup_ratio,
            step_fractions=tuple(cfg.step_fractions),
            step_gamma=cfg.step_gamma,
        )

    def lr_for_step(self, step: int, epoch: int, index: int, steps_in_epoch: int, total_steps: int) -> float:
        """The rate of global step ``step`` (0-based), the ``index``-th of ``epoch``'s ``steps_in_epoch``;
        ``total_steps``: the run's iterations (``multistep``)."""
        if self.kind == "multistep":
            return self.lr_at_iteration(step, total_steps)
        return self.lr_at(epoch + (index + 1) / steps_in_epoch)

    def lr_at_iteration(self, iteration: int, total: int) -> float:
        """``multistep``: lr x step_gamma^k, k the fractions f with ``iteration >= int(f x total)``; times
        ``warmup_ratio + (1 - warmup_ratio) iteration / warmup_iters`` during the warm-up."""
        lr = self.base_lr
        for fraction in self.step_fractions:
            if iteration >= int(fraction * total):
                lr *= self.step_gamma
        if iteration < self.warmup_iters:
            k = iteration / max(self.warmup_iters, 1)
            lr *= self.warmup_ratio + (1 - self.warmup_ratio) * k
        return lr

    def lr_at(self, progress: float) -> float:
        """Learning rate at ``progress`` epochs into training (e.g. 3.25 = a quarter into epoch 3).

        The trainer passes the progress reached at the *end* of the step being taken, so the first
        warm-up step already has a positive rate.

        Warm-up: lr rises linearly, reaching base_lr at the end of ``warmup_epochs`` (per step; the LDAM
        code steps it per epoch, (e+1)/5). Step: the factor of the last milestone reached (milestone m is
        reached when the epoch index >= m, i.e. "after epoch 160" means from epoch index 160 on). Cosine:
        from base_lr at the end of warm-up to ``min_lr`` at the end of training.
        """
        if self.warmup_epochs > 0 and progress < self.warmup_epochs:
            return self.base_lr * progress / self.warmup_epochs
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            factor = 1.0
            epoch = math.floor(progress + 1e-9)
            for m, f in zip(self.milestones, self.milestone_factors, strict=True):
                if epoch >= m:
                    factor = f
            return self.base_lr * factor
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        t = min(max((progress - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
