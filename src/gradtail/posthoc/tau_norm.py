"""tau-normalised classifier (docs/methods/baselines.md row ``tau_norm``; Kang et al.,
"Decoupling", ICLR 2020).

Each classifier weight vector is divided by its norm to the power tau: w~_j = w_j / ||w_j||^tau, so
||w~_j|| = ||w_j||^(1 - tau) (tau = 0: unchanged; tau = 1: unit norms). It changes the head, so it works
on *features*, not logits: :class:`TauNormAdjuster` holds a copy of the head's parameters,
``fit(val_features, val_targets)`` picks tau on the validation split and ``transform(features)`` returns
the logits of the tau-normalised head. :func:`apply_tau_norm` builds the new head module instead.

Bias handling (``bias_mode``), for a head z_j = w_j . h + b_j:

- ``"scale"`` (default): b~_j = b_j / ||w_j||^tau, i.e. the whole logit of class j is divided by
  ||w_j||^tau. tau = 0 reproduces the trained head exactly, and the head-class advantage carried by the
  bias is damped together with the one carried by the weight norm.
- ``"keep"``: b~_j = b_j (only the weights are normalised).
- ``"drop"``: no bias, as in Kang et al.'s released code (z_j = w~_j . h). With a biased head tau = 0 is
  then *not* the trained head.

A head without a bias gives the same result in all three modes. Weight norms are clamped at 1e-12.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import PosthocAdjuster
from gradtail.errors import ConfigError, InputError
from gradtail.posthoc import register_posthoc
from gradtail.posthoc.search import (
    DEFAULT_TAU_GRID,
    balanced_accuracy,
    check_state,
    check_targets,
    tune_scalar,
)
from gradtail.search_space import FloatRange, SearchSpace

BiasMode = Literal["scale", "keep", "drop"]
_NORM_FLOOR = 1e-12


def tau_normalized_parameters(
    weight: torch.Tensor, bias: torch.Tensor | None, tau: float, bias_mode: BiasMode = "scale"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w_j / ||w_j||^tau, bias per ``bias_mode``), detached, in the weight's dtype and device."""
    _check_bias_mode(bias_mode)
    w = weight.detach()
    norms = torch.linalg.vector_norm(w.to(torch.float64), dim=1).clamp_min(_NORM_FLOOR)
    factor = norms.pow(-float(tau)).to(w.dtype)  # 1 / ||w_j||^tau; exactly 1 at tau = 0
    new_w = w * factor.unsqueeze(1)
    if bias is None or bias_mode == "drop":
        return new_w, None
    b = bias.detach()
    return new_w, (b * factor.to(b.dtype) if bias_mode == "scale" else b.clone())


def apply_tau_norm(head: nn.Module, tau: float, bias_mode: BiasMode = "scale") -> nn.Module:
    """A new linear head with tau-normalised weights (the input head is left untouched).

    ``head`` must be an ``nn.Linear`` (gradtail's ``LinearHead``); a cosine head already normalises its
    weights, so tau-norm would do nothing there and is refused.
    """
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"tau_norm needs a linear classifier head (nn.Linear / LinearHead), got {type(head).__name__}"
        )
    new_w, new_b = tau_normalized_parameters(head.weight, head.bias, tau, bias_mode)
    new_head = copy.deepcopy(head)
    with torch.no_grad():
        new_head.weight.copy_(new_w)
        if new_b is None:
            new_head.register_parameter("bias", None)
        else:
            assert new_head.bias is not None
            new_head.bias.copy_(new_b)
    return new_head


def _check_bias_mode(bias_mode: str) -> None:
    """Only the three documented bias modes are accepted."""
    if bias_mode not in ("scale", "keep", "drop"):
        raise ConfigError(f"tau_norm: bias_mode must be 'scale', 'keep' or 'drop', got {bias_mode!r}")


@register_posthoc("tau_norm")
class TauNormAdjuster(PosthocAdjuster):
    """tau-norm as a post-hoc adjuster working on features (``input_kind = "features"``).

    Args:
        weight: (C, D) classifier weights (or give ``classifier``).
        bias: (C,) bias or None.
        classifier: an ``nn.Linear`` head (the model's ``classifier``) to take ``weight`` / ``bias`` from
            (a detached copy is kept; the module itself is never modified).
        tau: used by :meth:`transform` until :meth:`fit` tunes it.
        tune: if True, :meth:`fit` picks tau on ``grid`` (default 0, 0.1, ..., 2) by balanced accuracy.
        bias_mode: ``"scale"`` (default), ``"keep"`` or ``"drop"`` (see the module docstring).

    Example:
        >>> import torch
        >>> from gradtail.posthoc import create_posthoc
        >>> _ = torch.manual_seed(0)
        >>> tn = create_posthoc("tau_norm", classifier=torch.nn.Linear(4, 3))  # the model's linear head
        >>> tn = tn.fit(torch.randn(30, 4), torch.arange(3).repeat(10))  # validation *features*, labels
        >>> tn.fitted_params(), tuple(tn.transform(torch.randn(5, 4)).shape)  # features in, logits out
        ({'tau': 0.7, 'bias_mode': 'scale'}, (5, 3))
    """

    search_space: ClassVar[SearchSpace] = {"tau": FloatRange(0.0, 2.0)}  # fit() searches it on validation

    name = "tau_norm"
    input_kind = "features"  # fit / transform take features h, not logits
    construction_inputs = ("classifier",)  # what the harness passes at construction

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        classifier: nn.Module | None = None,
        tau: float = 1.0,
        tune: bool = True,
        grid: Sequence[float] = DEFAULT_TAU_GRID,
        bias_mode: BiasMode = "scale",
    ) -> None:
        if classifier is not None:
            if weight is not None or bias is not None:
                raise ConfigError("tau_norm: give either classifier or weight/bias, not both")
            if not isinstance(classifier, nn.Linear):
                raise ConfigError(f"tau_norm needs a linear classifier head, got {type(classifier).__name__}")
            weight, bias = classifier.weight, classifier.bias
        if weight is None:
            raise ConfigError("tau_norm needs the classifier: pass classifier= or weight= (and bias=)")
        if weight.dim() != 2 or weight.shape[0] < 2:
            raise InputError(f"tau_norm: weight must be (C, D) with C >= 2, got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise InputError(f"tau_norm: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        _check_bias_mode(bias_mode)
        if not math.isfinite(float(tau)):
            raise ConfigError(f"tau_norm: tau must be finite, got {tau}")
        self.weight = weight.detach().clone()
        self.bias = None if bias is None else bias.detach().clone()
        self.bias_mode: BiasMode = bias_mode
        self.tau = float(tau)
        self.tune = bool(tune)
        self.grid = tuple(float(t) for t in grid)
        if self.tune and not self.grid:
            raise ConfigError("tau_norm: the tau grid is empty")
        self.scores: list[float] = []

    @classmethod
    def from_classifier(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        tau: float = 1.0,
        tune: bool = True,
        grid: Sequence[float] = DEFAULT_TAU_GRID,
        bias_mode: BiasMode = "scale",
    ) -> TauNormAdjuster:
        """Build from the classifier's weight (C, D) and bias (C,) (or None)."""
        return cls(weight=weight, bias=bias, tau=tau, tune=tune, grid=grid, bias_mode=bias_mode)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits_from_features(self, features: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """z_j = w~_j . h + b~_j with w~_j = w_j / ||w_j||^tau (``tau`` defaults to the current one)."""
        if features.dim() != 2 or features.shape[1] != self.weight.shape[1]:
            raise InputError(
                f"tau_norm: features must be (N, {self.weight.shape[1]}), got {tuple(features.shape)}"
            )
        w, b = tau_normalized_parameters(
            self.weight, self.bias, self.tau if tau is None else tau, self.bias_mode
        )
        dev = features.device
        return F.linear(features.to(w.dtype), w.to(dev), None if b is None else b.to(dev))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the tau-normalised head. NOTE: the input is the *features* h (N, D), not logits."""
        return self.logits_from_features(features)

    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> TauNormAdjuster:
        """Pick tau on validation *features* (N, D) maximising balanced accuracy (no-op if ``tune=False``)."""
        self.logits_from_features(features[:1], 0.0)  # shape check
        check_targets(targets, features.shape[0], self.name)
        if self.tune:
            self.tau, self.scores = tune_scalar(
                lambda t: balanced_accuracy(
                    self.logits_from_features(features, t), targets, self.num_classes
                ),
                self.grid,
            )
        return self

    def fitted_params(self) -> dict[str, float | str]:
        """The parameters in use (after :meth:`fit`), for reports."""
        return {"tau": self.tau, "bias_mode": self.bias_mode}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`transform` needs: tau, the bias mode and the head's weight (C, D) and bias (C,) or
        None as they were when fitted."""
        return {
            "tau": self.tau,
            "bias_mode": self.bias_mode,
            "weight": self.weight.detach().cpu().clone(),
            "bias": None if self.bias is None else self.bias.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the saved head replaces the one given at construction."""
        check_state(state, ("tau", "bias_mode", "weight", "bias"), self.name)
        weight, bias = state["weight"], state["bias"]
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] < 2:
            raise InputError("tau_norm: the saved weight must be a (C, D) tensor with C >= 2")
        c = weight.shape[0]
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)):
            raise InputError(f"tau_norm: the saved bias must be None or a ({c},) tensor")
        _check_bias_mode(state["bias_mode"])
        tau = float(state["tau"])
        if not math.isfinite(tau):
            raise InputError(f"tau_norm: the saved tau must be finite, got {tau}")
        device = self.weight.device
        self.weight = weight.detach().to(device).clone()
        self.bias = None if bias is None else bias.detach().to(device).clone()
        self.bias_mode = state["bias_mode"]
        self.tau = tau

    def feature_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tau-normalised head's weight (C, D) and bias (C,) or None, as :meth:`transform` applies
        them (``gradtail export`` puts them in place of the classifier)."""
        return tau_normalized_parameters(self.weight, self.bias, self.tau, self.bias_mode)

    def head(self, tau: float | None = None) -> nn.Linear:
        """A fresh ``nn.Linear`` holding the tau-normalised classifier (current tau by default)."""
        w, b = tau_normalized_parameters(
            self.weight, self.bias, self.tau if tau is None else tau, self.bias_mode
        )
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                assert lin.bias is not None
                lin.bias.copy_(b)
        return lin

    def __repr__(self) -> str:
        return (
            f"TauNormAdjuster(num_classes={self.num_classes}, tau={self.tau}, tune={self.tune}, "
            f"bias_mode={self.bias_mode!r})"
        )
