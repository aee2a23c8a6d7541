"""Post-hoc logit adjustment (docs/methods/baselines.md row ``posthoc_la``; Menon et al., ICLR 2021).

Predict argmax_j (z_j - tau log pi_j), pi the training class prior (counts / total). tau = 1 by default;
:meth:`PosthocLogitAdjuster.fit` picks tau on the validation split to maximise balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gradtail.contracts import PosthocAdjuster
from gradtail.errors import ConfigError, InputError
from gradtail.posthoc import register_posthoc
from gradtail.posthoc.search import (
    DEFAULT_TAU_GRID,
    balanced_accuracy,
    check_logits,
    check_state,
    check_targets,
    tune_scalar,
)
from gradtail.search_space import FloatRange, SearchSpace


def class_log_prior(
    class_counts: Sequence[int] | torch.Tensor | None, num_classes: int | None = None
) -> torch.Tensor:
    """log pi_j = log(n_j / sum_k n_k), float64; :class:`ConfigError` for missing/zero/mis-sized counts."""
    if class_counts is None:
        raise ConfigError("posthoc_la needs class_counts (training images per class)")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() < 2:
        raise ConfigError(f"posthoc_la: class_counts needs at least 2 classes, got {counts.numel()}")
    if num_classes is not None and counts.numel() != num_classes:
        raise ConfigError(f"posthoc_la: class_counts has {counts.numel()} entries, expected {num_classes}")
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        bad = [i for i, c in enumerate(counts.tolist()) if not c > 0]
        raise ConfigError(
            f"posthoc_la: class_counts must be positive; classes {bad} have zero/invalid counts"
        )
    return torch.log(counts / counts.sum())


@register_posthoc("posthoc_la")
class PosthocLogitAdjuster(PosthocAdjuster):
    """z - tau log pi (docs/methods/baselines.md ``posthoc_la``).

    Args:
        class_counts: training images per class (required).
        tau: the adjustment strength used by :meth:`transform` (until :meth:`fit` tunes it).
        tune: if True, :meth:`fit` picks tau on ``grid``; if False, :meth:`fit` keeps ``tau``.
        grid: candidate taus (default 0, 0.1, ..., 2); ties go to the smallest |tau|.
        num_classes: optional, checked against ``class_counts``.

    Example:
        >>> import torch
        >>> from gradtail.posthoc import create_posthoc
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(3).repeat(20)  # balanced validation labels; logits biased to the head class
        >>> val = torch.randn(60, 3) + 3.0 * torch.eye(3)[y] + torch.tensor([2.0, 0.0, -2.0])
        >>> la = create_posthoc("posthoc_la", class_counts=[100, 10, 1]).fit(val, y)
        >>> la.fitted_params(), la.transform(torch.zeros(1, 3)).argmax(dim=1).tolist()
        ({'tau': 0.8}, [2])
    """

    search_space: ClassVar[SearchSpace] = {"tau": FloatRange(0.0, 2.0)}  # fit() searches it on validation

    name = "posthoc_la"
    construction_inputs = ("class_counts",)  # what the harness passes at construction

    def __init__(
        self,
        class_counts: Sequence[int] | torch.Tensor | None = None,
        tau: float = 1.0,
        tune: bool = True,
        grid: Sequence[float] = DEFAULT_TAU_GRID,
        num_classes: int | None = None,
    ) -> None:
        self.log_prior = class_log_prior(class_counts, num_classes)
        self.num_classes = int(self.log_prior.numel())
        self.tau = float(tau)
        self.tune = bool(tune)
        self.grid = tuple(float(t) for t in grid)
        if self.tune and not self.grid:
            raise ConfigError("posthoc_la: the tau grid is empty")
        self.scores: list[float] = []

    def adjust(self, logits: torch.Tensor, tau: float) -> torch.Tensor:
        """z - tau log pi, in the logits' dtype (at least float32)."""
        check_logits(logits, self.num_classes, self.name)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        offset = (tau * self.log_prior).to(device=logits.device, dtype=dtype)
        return logits.to(dtype) - offset

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Adjusted logits with the current tau; argmax of the result is the prediction."""
        return self.adjust(logits, self.tau)

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> PosthocLogitAdjuster:
        """Pick tau on validation logits maximising balanced accuracy (no-op when ``tune=False``)."""
        check_logits(logits, self.num_classes, self.name)
        check_targets(targets, logits.shape[0], self.name)
        if self.tune:
            self.tau, self.scores = tune_scalar(
                lambda t: balanced_accuracy(self.adjust(logits, t), targets, self.num_classes), self.grid
            )
        return self

    def fitted_params(self) -> dict[str, float]:
        """The parameter in use (after :meth:`fit`), for reports."""
        return {"tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`transform` needs: tau and the log prior (float64, (C,))."""
        return {"tau": self.tau, "log_prior": self.log_prior.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore tau and the log prior of :meth:`state_dict` (they replace the constructor's)."""
        check_state(state, ("tau", "log_prior"), self.name)
        log_prior = torch.as_tensor(state["log_prior"], dtype=torch.float64).flatten()
        if log_prior.numel() != self.num_classes:
            raise InputError(
                f"posthoc_la: the saved log prior has {log_prior.numel()} entries, "
                f"expected {self.num_classes} classes"
            )
        self.log_prior = log_prior.clone()
        self.tau = float(state["tau"])

    def logit_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """z - tau log pi as z * 1 + offset (``gradtail export`` folds the offset into the bias)."""
        return torch.ones(self.num_classes, dtype=torch.float64), -self.tau * self.log_prior.double()

    def __repr__(self) -> str:
        return f"PosthocLogitAdjuster(num_classes={self.num_classes}, tau={self.tau}, tune={self.tune})"
