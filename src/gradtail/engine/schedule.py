"""Learning-rate schedules (docs/methods/protocol.md §3): linear warm-up, then step decay or cosine.

The schedule is a pure function of training progress measured in epochs (fractional within an epoch),
so it carries no state of its own: resuming at a global step restores it exactly.
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
        )

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
