"""SAM: sharpness-aware minimisation as an update rule (docs/methods/baselines.md row ``sam``;
docs/methods/bgp.md §4's comparison).

One step, with g(theta) the gradient of the step's criterion (base loss + regularizer, if any):

1. forward / backward at theta                          -> g = g(theta)
2. ascend: theta + e, e = rho * g / ||g||_2             (global L2 norm over parameters that got a gradient)
3. zero the gradients, forward / backward at theta + e  -> g_SAM = g(theta + e)
4. restore theta exactly (from a copy, not by subtracting e) and leave g_SAM in ``.grad``; the trainer's
   optimizer then steps from theta with g_SAM.

Conventions:

- Observers see the first pass's logits only (``ctx.forward`` once; the second pass uses
  ``ctx.features_and_logits``). The returned loss and logits are the first pass's.
- BatchNorm: the second pass normalises with its own batch statistics (train mode, as in the usual SAM
  implementations) but its running statistics are discarded: every BatchNorm buffer (running mean /
  variance, ``num_batches_tracked``) is saved before the second forward and restored after it, so the
  running statistics are exactly those a plain step would leave.
- Stateful losses: the second pass runs inside :func:`gradtail.gradstats.frozen_statistics`, so
  losses that keep statistics (EQL, GALA, Seesaw) update them once per step, from the first pass at
  theta (the loss at the parameters actually being updated).
- fp16 with a GradScaler is not supported (the ascent would use scaled, possibly inf gradients and the
  scaler's skip-step logic would see two backward passes): a :class:`ConfigError` says to use bf16 or fp32.
- Gradients must be zero (or None) on entry, as the trainer leaves them; gradients of parameters that
  get none in the first pass are not perturbed.
- Cost: two forward and two backward passes per step (about 2x a plain step).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from gradtail.contracts import StepContext, StepOutput, UpdateRule
from gradtail.errors import ConfigError
from gradtail.gradstats import frozen_statistics
from gradtail.optim import register_update_rule
from gradtail.search_space import FloatRange, SearchSpace


def batchnorm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every running-statistics buffer of the model's normalisation layers."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    return saved


@register_update_rule("sam")
class SAM(UpdateRule):
    """Sharpness-aware minimisation (docs/methods/baselines.md ``sam``): gradient at theta + rho g/||g||,
    used at theta.

    Args:
        rho: radius of the ascent step (default 0.05, docs/methods/baselines.md).
        eps: added to ||g|| before dividing (a zero gradient gives a zero ascent).

    Example:
        >>> import torch
        >>> from gradtail.contracts import StepContext
        >>> from gradtail.models import create_model
        >>> from gradtail.optim import create_update_rule
        >>> _ = torch.manual_seed(0)
        >>> model, sam = create_model("small_cnn", num_classes=3, width=8), create_update_rule("sam")
        >>> ctx = StepContext(model=model, loss_fn=torch.nn.CrossEntropyLoss(), regularizer=None, epoch=0)
        >>> w = model.classifier.weight; w0 = w.detach().clone()
        >>> out = sam(ctx, torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0]))  # g(theta + e) in .grad
        >>> tuple(out.logits.shape), w.grad is not None, torch.equal(w, w0)  # theta is restored
        ((4, 3), True, True)
    """

    search_space: ClassVar[SearchSpace] = {"rho": FloatRange(0.01, 0.5, log=True)}

    def __init__(self, rho: float = 0.05, eps: float = 1e-12) -> None:
        if not (math.isfinite(float(rho)) and float(rho) > 0):
            raise ConfigError(f"sam rho must be a finite number > 0, got {rho}")
        if not (math.isfinite(float(eps)) and float(eps) > 0):
            raise ConfigError(f"sam eps must be a finite number > 0, got {eps}")
        self.rho = float(rho)
        self.eps = float(eps)

    def __call__(self, ctx: StepContext, x: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        if ctx.scaler is not None and ctx.scaler.is_enabled():
            raise ConfigError(
                "update rule 'sam' does not support fp16 with a GradScaler; use amp bf16 or fp32"
            )
        # 1. gradient at theta (observers see these logits)
        h, z = ctx.forward(x, targets)
        loss = ctx.criterion(h, z, targets)
        ctx.backward(loss)
        params = [p for p in ctx.parameters() if p.grad is not None]
        if not params:
            return StepOutput(loss=loss.detach(), logits=z.detach())
        # 2. ascend to theta + rho g / ||g||
        with torch.no_grad():
            device = params[0].grad.device
            dtype = torch.promote_types(params[0].grad.dtype, torch.float32)  # half grads: norm in float32
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.to(dtype)).to(device) for p in params])
            )
            scale = self.rho / (grad_norm + self.eps)
            theta = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale.to(device=p.device, dtype=p.dtype))
                p.grad = None
        # 3. gradient at theta + e, BatchNorm running statistics and loss statistics left untouched
        saved_bn = batchnorm_buffers(ctx.model)
        try:
            with frozen_statistics():
                h2, z2 = ctx.features_and_logits(x)
                ctx.backward(ctx.criterion(h2, z2, targets))
        finally:
            # 4. restore theta exactly, and the running statistics of the first pass
            with torch.no_grad():
                for p, old in zip(params, theta, strict=True):
                    p.copy_(old)
                for buf, old in saved_bn:
                    buf.copy_(old)
        return StepOutput(loss=loss.detach(), logits=z.detach())

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho})"
