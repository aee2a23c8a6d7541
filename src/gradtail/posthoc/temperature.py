"""Temperature scaling (Guo et al., ICML 2017): calibration fit on validation, predictions unchanged.

Predict softmax(z / T) with one temperature T > 0 that minimises the validation negative log-likelihood:

    T* = argmin_T  -(1/n) sum_i log softmax(z_i / T)_{y_i}          (docs/tuning.md §4)

With beta = 1 / T the objective is convex in beta (a log-sum-exp of functions linear in beta minus a
linear term), so it is unimodal in log T; :meth:`TemperatureScaling.fit` finds the minimum by a golden-
section search over log T in [log 0.05, log 20] in float64 (no optimiser settings, the same answer on
every device). Dividing by T > 0 keeps the argmax: accuracy and every per-class figure stay the same,
only ECE, class-wise ECE and NLL change.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from gradtail.contracts import PosthocAdjuster
from gradtail.errors import ConfigError, InputError
from gradtail.posthoc import register_posthoc
from gradtail.posthoc.search import check_logits, check_state, check_targets
from gradtail.search_space import FloatRange, SearchSpace

LOW, HIGH = 0.05, 20.0  # the temperatures fit() searches
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(z / T) (float64)."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


@register_posthoc("temperature")
class TemperatureScaling(PosthocAdjuster):
    """z / T with T fit on validation by minimum NLL (docs/tuning.md §4).

    Args:
        temperature: T used by :meth:`transform` until :meth:`fit` chooses it (or always, ``tune=False``).
        tune: if True, :meth:`fit` chooses T on the validation logits.
        tol: width of the final log T bracket of the golden-section search.

    Example:
        >>> import torch
        >>> from gradtail.posthoc import create_posthoc
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(3).repeat(50)
        >>> overconfident = 4.0 * (torch.randn(150, 3) + 1.5 * torch.eye(3)[y])  # logits 4x too sharp
        >>> ts = create_posthoc("temperature").fit(overconfident, y)
        >>> round(ts.fitted_params()["temperature"], 1) > 2.0
        True
        >>> bool((ts.transform(overconfident).argmax(1) == overconfident.argmax(1)).all())
        True
    """

    # fit() searches this range itself
    search_space: ClassVar[SearchSpace] = {"temperature": FloatRange(LOW, HIGH, log=True)}

    name = "temperature"
    report_note = (
        "temperature: z / T with T fit on validation by minimum NLL (Guo et al. 2017); accuracy is "
        "unchanged, only calibration (ECE, class-wise ECE) moves."
    )

    def __init__(self, temperature: float = 1.0, tune: bool = True, tol: float = 1e-4) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature: temperature must be a positive number, got {temperature!r}")
        if not tol > 0:
            raise ConfigError(f"temperature: tol must be positive, got {tol!r}")
        self.temperature = float(temperature)
        self.tune = bool(tune)
        self.tol = float(tol)
        self.num_classes: int | None = None
        self.val_nll: dict[str, float] = {}

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> TemperatureScaling:
        """Choose T minimising the validation NLL (golden section on log T; no-op with ``tune=False``)."""
        check_logits(logits, None, self.name)
        check_targets(targets, logits.shape[0], self.name)
        self.num_classes = int(logits.shape[1])
        if targets.numel() and not (int(targets.min()) >= 0 and int(targets.max()) < self.num_classes):
            raise InputError(
                f"temperature: labels must be in [0, {self.num_classes}), "
                f"got range [{int(targets.min())}, {int(targets.max())}]"
            )
        if not bool(torch.isfinite(logits).all()):
            raise InputError("temperature: the validation logits contain NaN or inf")
        if not self.tune:
            return self
        z = logits.detach().double()
        f = lambda log_t: nll(z, targets, math.exp(log_t))  # noqa: E731
        lo, hi = math.log(LOW), math.log(HIGH)
        a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        fa, fb = f(a), f(b)
        while hi - lo > self.tol:
            if fa <= fb:
                hi, b, fb = b, a, fa
                a = hi - _GOLDEN * (hi - lo)
                fa = f(a)
            else:
                lo, a, fa = a, b, fb
                b = lo + _GOLDEN * (hi - lo)
                fb = f(b)
        self.temperature = math.exp((lo + hi) / 2.0)
        self.val_nll = {"before": nll(z, targets, 1.0), "after": nll(z, targets, self.temperature)}
        return self

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """z / T in the logits' dtype (at least float32); the argmax is the logits' own."""
        check_logits(logits, self.num_classes, self.name)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return logits.to(dtype) / self.temperature

    def fitted_params(self) -> dict[str, Any]:
        """T, and the validation NLL before and after it (reports print them)."""
        out: dict[str, Any] = {"temperature": self.temperature}
        if self.val_nll:
            out |= {"val_nll_before": self.val_nll["before"], "val_nll_after": self.val_nll["after"]}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(state, ("temperature",), self.name)
        temperature = float(state["temperature"])
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature: the saved temperature must be positive, got {temperature}")
        self.temperature = temperature

    def logit_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """z / T as z * (1 / T) + 0 (scalars: the same for every class)."""
        one = torch.ones((), dtype=torch.float64)
        return one / self.temperature, torch.zeros((), dtype=torch.float64)

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature:.4g}, tune={self.tune})"
