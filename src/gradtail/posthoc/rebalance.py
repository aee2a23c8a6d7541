"""GALA's post-hoc prediction re-balancing (docs/methods/gala.md §3), transductive by definition.

On an evaluation set with raw logits z (N x C): p = softmax(z), q_j = sum_i p_ij, and the prediction is
argmax_j p_j / q_j^tau = argmax_j (z_j - tau log q_j). q is computed from the very set being scored
(that is the method, not a leak of labels: no labels are used); tau is tuned on the validation split.

Two forms that give the same result:

- batch: :meth:`PredictionRebalancer.transform` computes q from the logits it is given;
- streaming: :class:`StreamingRebalancer`, pass 1 :meth:`~StreamingRebalancer.accumulate` over all
  batches, pass 2 :meth:`~StreamingRebalancer.rescore` each batch.

q is accumulated in float64; log q is clamped at the smallest positive float64, so a class whose
probabilities all underflow gets a finite (very large) boost instead of an infinity.

A model scoring one image at a time has no set to take q from: :meth:`PredictionRebalancer.fit` also
keeps the validation split's class mass (normalised to sum 1, the set tau is tuned on), and ``gradtail
export`` folds z - tau log q_val into the exported classifier (:meth:`PredictionRebalancer.logit_affine`).
On a balanced evaluation set it is close to the set's own q; the transductive form stays the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from gradtail.contracts import PosthocAdjuster
from gradtail.distributed import all_reduce_sum_
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

_TINY = torch.finfo(torch.float64).tiny


def class_mass(logits: torch.Tensor) -> torch.Tensor:
    """q_j = sum_i softmax(z_i)_j over the rows of ``logits`` (docs/methods/gala.md §3),
    float64, shape (C,)."""
    return torch.softmax(logits.detach().to(torch.float64), dim=1).sum(dim=0)


def rebalance_logits(logits: torch.Tensor, q: torch.Tensor, tau: float) -> torch.Tensor:
    """z_j - tau log q_j (docs/methods/gala.md §3), in the logits' dtype (at least float32);
    tau = 0 returns z."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    offset = tau * torch.log(q.to(torch.float64).clamp_min(_TINY))
    return logits.to(dtype) - offset.to(device=logits.device, dtype=dtype)


def _check_tau(tau: float) -> float:
    """tau as a float; :class:`ConfigError` unless finite."""
    tau = float(tau)
    if not math.isfinite(tau):
        raise ConfigError(f"gala_rebalance: tau must be finite, got {tau}")
    return tau


@register_posthoc("gala_rebalance")
class PredictionRebalancer(PosthocAdjuster):
    """Batch form of prediction re-balancing: q from the logits being transformed (docs/methods/gala.md §3).

    Args:
        tau: strength (1 on CIFAR; 1.7 ImageNet-LT, 1.5 iNaturalist, 1.4 Places-LT in the paper).
        tune: if True, :meth:`fit` picks tau on ``grid`` by validation balanced accuracy.
        grid: candidate taus (default 0, 0.1, ..., 2); ties go to the smallest |tau|.
        num_classes: optional; checked against the logits when given.

    :meth:`fit` computes q from the validation logits themselves, exactly as :meth:`transform` will do
    on the evaluation set. Give :meth:`transform` the whole evaluation set (or a large part of it); use
    :meth:`streaming` when it arrives in batches.

    Example:
        >>> import torch
        >>> from gradtail.posthoc import create_posthoc
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(3).repeat(20)  # balanced validation labels; logits biased to the head class
        >>> val = torch.randn(60, 3) + 3.0 * torch.eye(3)[y] + torch.tensor([2.0, 0.0, -2.0])
        >>> rb = create_posthoc("gala_rebalance").fit(val, y)  # tau tuned; q comes from each set transformed
        >>> rb.fitted_params(), tuple(rb.transform(torch.randn(5, 3)).shape)
        ({'tau': 1.6}, (5, 3))
    """

    search_space: ClassVar[SearchSpace] = {"tau": FloatRange(0.0, 2.0)}  # fit() searches it on validation

    name = "gala_rebalance"

    def __init__(
        self,
        tau: float = 1.0,
        tune: bool = True,
        grid: Sequence[float] = DEFAULT_TAU_GRID,
        num_classes: int | None = None,
    ) -> None:
        self.tau = _check_tau(tau)
        self.tune = bool(tune)
        self.grid = tuple(float(t) for t in grid)
        if self.tune and not self.grid:
            raise ConfigError("gala_rebalance: the tau grid is empty")
        self.num_classes = num_classes
        self.scores: list[float] = []
        self.fitted_mass: torch.Tensor | None = None  # the validation class mass q_val / N (fit)

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """z - tau log q with q = class_mass(logits) (transductive: q from this very set)."""
        check_logits(logits, self.num_classes, self.name)
        return rebalance_logits(logits, class_mass(logits), self.tau)

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> PredictionRebalancer:
        """Pick tau on validation logits maximising balanced accuracy (no-op when ``tune=False``)."""
        check_logits(logits, self.num_classes, self.name)
        check_targets(targets, logits.shape[0], self.name)
        if logits.shape[0]:
            self.fitted_mass = (class_mass(logits) / logits.shape[0]).cpu()
        if self.tune:
            q = class_mass(logits)
            c = logits.shape[1]
            self.tau, self.scores = tune_scalar(
                lambda t: balanced_accuracy(rebalance_logits(logits, q, t), targets, c), self.grid
            )
        return self

    def needs_validation(self) -> bool:
        """Only to tune tau: at a given tau (``tune=False``, the published 1.5 on iNaturalist 2018) q comes
        from the set transformed, and no validation split is needed (then :meth:`logit_affine`, which
        needs the validation class mass, is None and ``gradtail export`` refuses the fold)."""
        return self.tune

    def streaming(self) -> StreamingRebalancer:
        """A two-pass re-balancer with this adjuster's (possibly tuned) tau."""
        return StreamingRebalancer(tau=self.tau, num_classes=self.num_classes)

    def fitted_params(self) -> dict[str, float]:
        """The parameter in use (after :meth:`fit`), for reports."""
        return {"tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`transform` needs: tau (and the class count when known). There is no stored prior:
        q comes from the very set transformed (transductive, docs/methods/gala.md §3)."""
        state: dict[str, Any] = {"tau": self.tau, "num_classes": self.num_classes}
        if self.fitted_mass is not None:
            state["q"] = self.fitted_mass.clone()  # the validation class mass, for gradtail export
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore tau (and the class count, and the validation class mass when saved) of
        :meth:`state_dict`."""
        check_state(state, ("tau",), self.name)
        self.tau = _check_tau(state["tau"])
        num_classes = state.get("num_classes")
        self.num_classes = None if num_classes is None else int(num_classes)
        q = state.get("q")
        self.fitted_mass = None if q is None else torch.as_tensor(q, dtype=torch.float64).flatten().clone()

    def logit_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """z - tau log q_val with the validation class mass kept by :meth:`fit` (module docstring): the
        form a model scoring one image at a time can apply; None before a fit (or from a state saved
        without it)."""
        if self.fitted_mass is None:
            return None
        offset = -self.tau * torch.log(self.fitted_mass.to(torch.float64).clamp_min(_TINY))
        return torch.ones_like(offset), offset

    def __repr__(self) -> str:
        return f"PredictionRebalancer(tau={self.tau}, tune={self.tune})"


class StreamingRebalancer:
    """Two-pass prediction re-balancing over batches; equal to the batch form on the concatenation.

    Pass 1: :meth:`accumulate` every batch of the evaluation set (adds its softmax mass to q). Pass 2:
    :meth:`rescore` every batch (returns z - tau log q). The first :meth:`rescore` (or an explicit
    :meth:`finalize`) freezes q; under a process group it SUM-all-reduces q first, so every rank must
    reach it (rank-sharded evaluation then uses the q of the whole set). Accumulating after that is an
    error; :meth:`reset` starts over.
    """

    def __init__(self, tau: float = 1.0, num_classes: int | None = None) -> None:
        self.tau = _check_tau(tau)
        self.num_classes = num_classes
        self._q: torch.Tensor | None = None
        self.num_samples = 0
        self._final = False

    def reset(self) -> None:
        """Forget q (start a new evaluation set)."""
        self._q = None
        self.num_samples = 0
        self._final = False

    def accumulate(self, logits: torch.Tensor) -> None:
        """Pass 1: q += sum over this batch of softmax(z) (docs/methods/gala.md §3)."""
        if self._final:
            raise InputError(
                "StreamingRebalancer: accumulate() after rescore()/finalize(); call reset() first"
            )
        check_logits(logits, self.num_classes, "StreamingRebalancer")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        mass = class_mass(logits)
        self._q = mass if self._q is None else self._q + mass.to(self._q.device)
        self.num_samples += logits.shape[0]

    def finalize(self) -> torch.Tensor:
        """Freeze q (all-reduced across ranks when a process group exists) and return it."""
        if self._q is None:
            raise InputError(
                "StreamingRebalancer: no logits accumulated; run accumulate() over the set first"
            )
        if not self._final:
            all_reduce_sum_(self._q)
            self._final = True
        return self._q

    @property
    def q(self) -> torch.Tensor:
        """The accumulated class mass q (float64, (C,))."""
        if self._q is None:
            raise InputError("StreamingRebalancer: no logits accumulated yet")
        return self._q

    def rescore(self, logits: torch.Tensor) -> torch.Tensor:
        """Pass 2: z - tau log q for one batch, with q of the whole accumulated set."""
        q = self.finalize()
        check_logits(logits, self.num_classes, "StreamingRebalancer")
        return rebalance_logits(logits, q, self.tau)
