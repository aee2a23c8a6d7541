"""The small interfaces through which the trainer knows methods (design.md, "Pieces and their interfaces").

- a **loss**: ``gradtail.losses.LongTailLoss``, ``(logits, targets) -> scalar``;
- a **regularizer**: :class:`Regularizer`, a term from the same forward pass added before the one backward;
- an **update rule**: :class:`UpdateRule`, owns how one step's gradient is formed (plain backward, SAM, GBG);
- an **observer**: :class:`StepObserver`, sees the logits of every training step (diagnostics);
- a **post-hoc adjuster**: :class:`PosthocAdjuster`, fit on validation logits, transforms test logits.

Method code imports this module, never the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class Regularizer(nn.Module):
    """A penalty computed from one forward pass, added to the loss before the single backward.

    ``forward(features, logits, targets, loss, model) -> scalar``. ``loss`` is the base loss of this step
    (attached to the graph), so a regularizer can take ``autograd.grad(loss, logits, create_graph=True)``
    to get the base loss's gradient at the raw logits without calling a (possibly stateful) loss again.
    ``start_epoch``: the trainer adds the term only from this epoch on.
    """

    start_epoch: int = 0

    def forward(  # pragma: no cover - interface
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        model: nn.Module,
    ) -> torch.Tensor:
        raise NotImplementedError


@runtime_checkable
class StepObserver(Protocol):
    """Sees (logits, targets) of every training step, logits still attached (it may hook their gradient)."""

    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...


@dataclass
class StepOutput:
    """What an update rule returns: the step's loss and logits, detached, plus any scalars to log."""

    loss: torch.Tensor
    logits: torch.Tensor
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything an update rule may use for one step; built by the trainer.

    ``forward(x)`` runs the model under the run's autocast setting, returns (features, logits) and lets
    observers see the logits. ``criterion(features, logits, targets)`` is the base loss plus the
    regularizer (if active). ``backward(loss)`` is scaler-aware (fp16) and accumulates into ``.grad``.
    The trainer zeroes gradients before the rule and calls ``optimizer.step()`` after it.
    """

    model: nn.Module
    loss_fn: nn.Module
    regularizer: Regularizer | None
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int
    observers: Sequence[StepObserver] = ()
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    scaler: torch.amp.GradScaler | None = None

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model: Any = self.model.module if hasattr(self.model, "module") else self.model
        with self.autocast():
            if self.model is not model:  # DDP: go through the wrapper so gradients are reduced
                h, z = self.model(x, return_features=True)
            else:
                h = model.features(x)
                z = model.classifier(h)
        return h, z

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, z = self.features_and_logits(x)
        for obs in self.observers:
            obs.observe(z, targets)
        return h, z

    def criterion(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(logits, targets)
            if self.regularizer is not None and self.epoch >= self.regularizer.start_epoch:
                loss = loss + self.regularizer(features, logits, targets, loss, self.model)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)


class UpdateRule:
    """Owns how a step's gradient is formed. The default is one forward, one backward.

    Subclasses (SAM, GBG) override :meth:`__call__`; they must leave the final gradient in ``.grad`` of
    the parameters and not call ``optimizer.step()`` themselves unless :attr:`owns_optimizer_step`.
    """

    owns_optimizer_step: bool = False

    def __call__(self, ctx: StepContext, x: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        h, z = ctx.forward(x, targets)
        loss = ctx.criterion(h, z, targets)
        ctx.backward(loss)
        return StepOutput(loss=loss.detach(), logits=z.detach())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def on_epoch_start(self, epoch: int, trainer_view: Any) -> None:
        """Hook for rules that do work between epochs (GBG's grouping)."""
        return None


class PosthocAdjuster:
    """Fit on validation logits (never test), then transform logits before the argmax."""

    name = "posthoc"

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> PosthocAdjuster:  # pragma: no cover
        raise NotImplementedError

    def transform(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
