"""BGP: balanced gradient penalty (docs/methods/bgp.md), a regularizer added to any base loss.

**This is a documented reconstruction, not the paper's formula.** The paper (Wang et al., "Balanced
Gradient Penalty Improves Deep Long-Tailed Learning", ACM MM 2022) is available to us only as its
abstract. What the abstract fixes -- a regularization loss, added to any base loss, that penalises
sharpness without a second pass and without class priors -- is implemented as the readings of
docs/methods/bgp.md §2-3, selected by ``variant``. Reports built on it must say that the formula is
reconstructed.

Notation (docs/methods/bgp.md §1-2). B samples, features h_i, raw logits z_i, labels y_i. For each class c
present in the batch, S_c are its samples and n_c = |S_c|. g_i is the base loss's gradient at the raw logits
of sample i, taken as

    g_i = B * dL/dz_i,   L the base loss of the step

which is exactly the per-sample loss gradient when L is the *mean* over samples of per-sample losses
(every gradtail classification loss is). For losses that adjust logits (logit adjustment, margins,
GALA / EQL offsets) this is the gradient at the raw logits, as docs/methods/bgp.md §2 asks, and the loss is
never called a second time (stateful losses update their statistics once). Only the loss head is
differentiated to get g (``create_graph=True``), not the network.

Variants (``squared=True`` drops every square root, i.e. penalises squared norms; ``variant="squared"``
means ``head`` with squared norms):

- ``head``: Gamma_c = (1/n_c) sum_{i in S_c} g_i a~_i^T, the class-mean gradient of the head's
  parameters, with a~_i = [a_i; 1] (the 1 only when the head has a bias). Its squared Frobenius norm is
  computed from two B x B Gram matrices, ||Gamma_c||^2 = (1/n_c^2) sum_{i,i' in S_c} (g_i.g_i')(a~_i.a~_i');
  R = mean over present classes of sqrt(||Gamma_c||^2 + 1e-12).
- ``logit`` (the default: the reading validation selects, docs/methods/bgp.md §2): R = mean over present
  classes c of (1/n_c) sum_{i in S_c} sqrt(||g_i||^2 + 1e-12).
- ``feature``: R = mean over present classes of ||f_bar_c||, f_i = M^T g_i the gradient at the head's input
  (M = W for a linear head, so f_bar_c = W^T g_bar_c), computed from the Gram matrix of the f_i.
- ``unbalanced``: the ``head`` quantity with all samples in one class: ||batch-mean head gradient||
  (the SAM-like ablation BGP argues against).
- ``exact``: mean over present classes of the norm of the per-class mean loss's gradient over all
  trainable model parameters, by double backprop (one vector-Jacobian product through the model per
  class): a reference, it costs a second pass per class.

Heads (``model.classifier``): a linear head z = W h + b uses a_i = h_i and M = W. A cosine head
z = s * normalize(W) normalize(h) (no bias) uses the head's normalised input scaled by s, a_i = s * h^_i,
and M = s * W^ (W^ the row-normalised weight): then Gamma_c is exactly the class-mean gradient with
respect to the normalised weight W^, and f_i the gradient at the normalised feature h^_i. The ``logit``
and ``exact`` variants work with any head; the others need one of these two.

The penalty is L_total = L_base + beta * R (docs/methods/bgp.md §2). beta defaults to 0.1, inside
docs/methods/bgp.md §3's sweep range 0.01-1 for norms; retune it (0.1-2) with ``squared=True``.

Settings and conventions:

- ``detach_features=True`` makes the penalty send no gradient to the features h (hence none to the
  backbone): a_i uses h.detach(), and g is replaced by g_head = g.detach() + H v with H the Hessian of the
  loss at z (exact vector-Hessian product through the loss head only) and v = head(h.detach()) - z.detach()
  (zero in value). g_head equals g in value and has exactly g's derivative with respect to the head's
  parameters, so the penalty then regularises the head only. Not available for ``exact``.
- ``start_epoch`` is read by the trainer (``StepContext.criterion``), which adds the term from that epoch.
- The norm is computed in float32 (float64 for float64 inputs) with autocast disabled.
- Each process penalises its own (local) batch; under DDP nothing is all-reduced here.
- Under ``torch.no_grad`` (evaluation) the base loss carries no graph, so the penalty is returned as 0.
- Tensor hooks registered on the logits (observers, ``GradientStatistics.attach_hook``) also fire during
  the ``autograd.grad`` call that forms g; inside that call ``torch.is_grad_enabled()`` is True, which is
  how such a hook can tell it apart from the ordinary backward. In that ordinary backward the gradient
  reaching the logits includes the penalty's own (second-order) part.
- ``last_value`` keeps the latest R, detached (for logging without a device sync).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from gradtail.contracts import Regularizer, unwrap_model
from gradtail.errors import ConfigError, InputError
from gradtail.losses.base import check_logits_targets
from gradtail.models.heads import CosineHead
from gradtail.regularizers import register_regularizer
from gradtail.search_space import Choice, FloatRange, SearchSpace

NORM_EPS = 1e-12
VARIANTS = ("head", "logit", "feature", "unbalanced", "exact")


def logit_gradients(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """g = B * dL/dz (docs/methods/bgp.md §1-2): per-sample gradients at the raw logits of a mean-reduced
    loss."""
    if loss.dim() != 0:
        raise InputError(f"bgp needs the scalar base loss, got shape {tuple(loss.shape)}")
    if not (loss.requires_grad and logits.requires_grad):
        raise InputError("bgp needs the base loss attached to the logits' graph (logits requiring grad)")
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True, allow_unused=True)
    if grad is None:
        raise InputError("bgp: the base loss does not depend on the logits it was given")
    return grad * logits.shape[0]


def head_only_gradients(g: torch.Tensor, logits: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
    """g_head = g.detach() + H v, v = head_logits - z.detach() (module docstring, ``detach_features``).

    H v is the vector-Jacobian product of g with respect to z (H, the loss Hessian at z, is symmetric),
    so g_head has g's value (v is zero) and g's derivative along the head's parameters, and none along h.
    """
    if not g.requires_grad:  # a loss linear in z: its gradient does not depend on z
        return g.detach()
    v = (head_logits - logits.detach()).to(g.dtype)
    (hv,) = torch.autograd.grad(g, logits, grad_outputs=v, create_graph=True, allow_unused=True)
    return g.detach() if hv is None else g.detach() + hv


def head_inputs(head: nn.Module, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(a, M, has_bias) with z = M a (+ b) for the head (module docstring, "Heads")."""
    if isinstance(head, CosineHead):
        a = head.scale * nn.functional.normalize(features, dim=1)
        m = head.scale * nn.functional.normalize(head.weight, dim=1)
        return a, m, False
    if isinstance(head, nn.Linear):
        return features, head.weight, head.bias is not None
    raise ConfigError(
        f"bgp: this variant needs a linear or cosine classifier head, got {type(head).__name__}; "
        "use variant 'logit' or 'exact' with other heads"
    )


def class_counts(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """n_c for every class (0 for classes absent from the batch); index_add_, unlike bincount, never syncs."""
    ones = torch.ones(targets.shape[0], dtype=dtype, device=targets.device)
    return torch.zeros(num_classes, dtype=dtype, device=targets.device).index_add_(0, targets, ones)


def mean_over_present(per_class: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(1/|C_B|) sum over present classes c of per_class[c] (docs/methods/bgp.md §1, "balanced")."""
    present = (counts > 0).to(per_class.dtype)
    return (per_class * present).sum() / present.sum().clamp_min(1.0)


def class_gram_sq_norms(gram: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """||(1/n_c) sum_{i in S_c} u_i||^2 = (1/n_c^2) sum_{i,i' in S_c} gram[i, i'] per class
    (docs/methods/bgp.md §2)."""
    same = (targets[:, None] == targets[None, :]).to(gram.dtype)
    row = (gram * same).sum(dim=1)
    sums = torch.zeros_like(counts).index_add_(0, targets, row)
    return sums / counts.clamp_min(1.0).square()


@register_regularizer("bgp")
class BalancedGradientPenalty(Regularizer):
    """beta * R, R a class-balanced gradient norm from the step's own forward pass (module docstring).

    Args:
        variant: ``logit`` (default), ``head``, ``feature``, ``unbalanced``, ``exact``, or ``squared``
            (= ``head`` with squared norms). ``logit`` is the default because it is the reading validation
            selects: on Fashion-MNIST-LT the β sweep (``suites/bgp_beta_sweep.yaml``, selection by
            validation balanced accuracy) gave ``logit`` β 0.1 72.0 against at most 70.0 for ``head``
            (β 0.01, effectively CE; ``head`` β 0.1: 59.0), and ``gradtail tune`` searches both readings
            (docs/methods/bgp.md §2).
        beta: weight of the penalty (>= 0).
        squared: penalise squared norms instead of norms.
        start_epoch: first epoch (0-based) at which the trainer adds the term.
        detach_features: the penalty sends no gradient to the features (regularises the head only).

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> from gradtail.regularizers import create_regularizer
        >>> _ = torch.manual_seed(0)
        >>> model, reg = create_model("small_cnn", num_classes=3, width=8), create_regularizer("bgp")
        >>> x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 0, 0, 1, 1, 2])
        >>> h = model.features(x); logits = model.classifier(h)
        >>> term = reg(h, logits, y, torch.nn.functional.cross_entropy(logits, y), model)  # beta * R
        >>> term.dim(), bool(term >= 0), term.requires_grad
        (0, True, True)
    """

    search_space: ClassVar[SearchSpace] = {
        "variant": Choice(("logit", "head", "feature")),
        "beta": FloatRange(0.01, 1.0, log=True),
    }

    report_note = (
        "BGP is a documented reconstruction: the paper's full text is unavailable, so the penalty is "
        "built from its abstract (docs/methods/bgp.md; gradtail.regularizers.bgp)."
    )

    def __init__(
        self,
        variant: str = "logit",
        beta: float = 0.1,
        squared: bool = False,
        start_epoch: int = 0,
        detach_features: bool = False,
    ) -> None:
        super().__init__()
        if variant == "squared":
            variant, squared = "head", True
        if variant not in VARIANTS:
            raise ConfigError(f"unknown bgp variant {variant!r}; valid: {', '.join((*VARIANTS, 'squared'))}")
        if not (math.isfinite(float(beta)) and float(beta) >= 0):
            raise ConfigError(f"bgp beta must be a finite number >= 0, got {beta}")
        if int(start_epoch) < 0:
            raise ConfigError(f"bgp start_epoch must be >= 0, got {start_epoch}")
        if detach_features and variant == "exact":
            raise ConfigError(
                "bgp variant 'exact' differentiates through the whole model; detach_features is not available"
            )
        self.variant = variant
        self.beta = float(beta)
        self.squared = bool(squared)
        self.start_epoch = int(start_epoch)
        self.detach_features = bool(detach_features)
        self.last_value: torch.Tensor | None = None

    def forward(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        model: nn.Module,
        view_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """beta * R for this batch (docs/methods/bgp.md §2: L_total = L_base + beta R)."""
        check_logits_targets(logits, targets, logits.shape[1])
        if features.dim() != 2 or features.shape[0] != logits.shape[0]:
            raise InputError(
                f"features must be 2-D with one row per sample ({logits.shape[0]}), "
                f"got shape {tuple(features.shape)}"
            )
        if not torch.is_grad_enabled() or logits.shape[0] == 0:
            return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        g = logit_gradients(loss, logits)
        if self.variant == "exact":
            r = self._exact(g, logits, targets, model)
        else:
            head = unwrap_model(model).classifier
            h = features.detach() if self.detach_features else features
            if self.detach_features:
                g = head_only_gradients(g, logits, head(h))
            r = self._closed_form(g, h, targets, head)
        self.last_value = r.detach()
        return self.beta * r

    def _norm(self, sq: torch.Tensor) -> torch.Tensor:
        """sqrt(sq + 1e-12) (docs/methods/bgp.md §2), or sq itself for squared norms
        (docs/methods/bgp.md §3)."""
        return sq if self.squared else torch.sqrt(sq.clamp_min(0.0) + NORM_EPS)

    def _closed_form(
        self, g: torch.Tensor, h: torch.Tensor, targets: torch.Tensor, head: nn.Module
    ) -> torch.Tensor:
        """R for the head / logit / feature / unbalanced variants, from the forward quantities only."""
        dtype = torch.promote_types(g.dtype, torch.float32)
        with torch.autocast(device_type=g.device.type, enabled=False):
            g = g.to(dtype)
            counts = class_counts(targets, g.shape[1], dtype)
            if self.variant == "logit":
                per_sample = self._norm(g.square().sum(dim=1))
                per_class = torch.zeros_like(counts).index_add_(0, targets, per_sample)
                per_class = per_class / counts.clamp_min(1.0)
                return mean_over_present(per_class, counts)
            a, m, has_bias = head_inputs(head, h)
            if self.variant == "feature":
                f = g @ m.to(dtype)  # rows f_i = M^T g_i
                return mean_over_present(self._norm(class_gram_sq_norms(f @ f.T, targets, counts)), counts)
            a = a.to(dtype)
            gram = (g @ g.T) * (a @ a.T + (1.0 if has_bias else 0.0))  # (g_i.g_i')(a~_i.a~_i')
            if self.variant == "unbalanced":
                return self._norm(gram.sum() / float(g.shape[0]) ** 2)
            return mean_over_present(self._norm(class_gram_sq_norms(gram, targets, counts)), counts)

    def _exact(
        self, g: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, model: nn.Module
    ) -> torch.Tensor:
        """R = mean_c ||d L_c / d theta||, L_c = (1/n_c) sum_{i in S_c} l_i, by double backprop (reference).

        d L_c / d theta = (dz/d theta)^T G_c with G_c[i] = g_i / n_c for i in S_c, 0 elsewhere: one
        vector-Jacobian product through the model per present class, with ``create_graph=True``.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = torch.promote_types(g.dtype, torch.float32)
        norms = []
        for c in torch.unique(targets).tolist():
            mask = (targets == c).to(g.dtype)
            g_c = g * (mask / mask.sum())[:, None]
            grads = torch.autograd.grad(
                logits, params, grad_outputs=g_c, create_graph=True, allow_unused=True
            )
            sq = [gp.to(dtype).square().sum() for gp in grads if gp is not None]
            norms.append(self._norm(torch.stack(sq).sum() if sq else g.new_zeros((), dtype=dtype)))
        return torch.stack(norms).mean()

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, beta={self.beta}, squared={self.squared}, "
            f"start_epoch={self.start_epoch}, detach_features={self.detach_features}"
        )
