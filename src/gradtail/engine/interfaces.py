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
    """A term computed from one forward pass, added to the loss before the single backward.

    ``forward(features, logits, targets, loss, model, view_features=None) -> scalar``. ``loss`` is the base
    loss of this step (attached to the graph), so a regularizer can take
    ``autograd.grad(loss, logits, create_graph=True)`` to get the base loss's gradient at the raw logits
    without calling a (possibly stateful) loss again.

    - ``start_epoch``: the trainer adds the term only from this epoch on.
    - ``num_views``: extra augmented views of each image the term needs (contrastive terms such as BCL);
      the data config must produce exactly that many (``data.augment.views``). Their backbone features
      come from the same forward as the batch's (one pass over [x; views]) as ``view_features``,
      (num_views * B, feature_dim), view-major.
    - :meth:`setup` is called once by the trainer, before the optimizer is built, with the model: a term
      with its own parameters (projection heads) creates them there; they are trained with the model,
      checkpointed with the term's ``state_dict``, and averaged over processes under DDP.
    """

    start_epoch: int = 0
    num_views: int = 0

    def setup(self, model: nn.Module, num_classes: int) -> None:
        return None

    def forward(  # pragma: no cover - interface
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        model: nn.Module,
        view_features: torch.Tensor | None = None,
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
    observers see the logits; with ``views`` (the batch's extra views, (V * B, C, H, W)) the backbone runs
    once over [x; views], ``forward`` still returns the batch's own (features, logits) and keeps the views'
    features in ``view_features`` for the regularizer. ``regularize(features, logits, targets, loss)`` is
    the active regularizer's term (``None`` when there is none or it has not started);
    ``criterion(features, logits, targets)`` is the base loss plus that term. ``backward(loss)`` is
    scaler-aware (fp16) and accumulates into ``.grad``. The trainer zeroes gradients before the rule and
    calls ``optimizer.step()`` after it.
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
    views: torch.Tensor | None = None
    view_features: torch.Tensor | None = None

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model: Any = self.model.module if hasattr(self.model, "module") else self.model
        batch = x.shape[0]
        inputs = x if self.views is None else torch.cat([x, self.views])
        with self.autocast():
            if self.model is not model:  # DDP: go through the wrapper so gradients are reduced
                h, z = self.model(inputs, return_features=True)
                z = z[:batch]
            else:
                h = model.features(inputs)
                z = model.classifier(h[:batch])
        if self.views is not None:
            self.view_features = h[batch:]
        return h[:batch], z

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, z = self.features_and_logits(x)
        for obs in self.observers:
            obs.observe(z, targets)
        return h, z

    def regularize(
        self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor
    ) -> torch.Tensor | None:
        """The regularizer's term for this step (``loss``: the base loss it is added to), or None."""
        if self.regularizer is None or self.epoch < self.regularizer.start_epoch:
            return None
        with self.autocast():
            if self.regularizer.num_views:
                return self.regularizer(
                    features, logits, targets, loss, self.model, view_features=self.view_features
                )
            return self.regularizer(features, logits, targets, loss, self.model)

    def criterion(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(logits, targets)
        term = self.regularize(features, logits, targets, loss)
        return loss if term is None else loss + term

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

    def epoch_summary(self) -> dict[str, float]:
        """Scalars for the epoch's record (``metrics.jsonl``), read once at the end of each training epoch
        (GBG: the mean weight of each group)."""
        return {}


class PosthocAdjuster:
    """Fit on validation logits (never test), then transform logits before the argmax."""

    name = "posthoc"

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> PosthocAdjuster:  # pragma: no cover
        raise NotImplementedError

    def transform(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
