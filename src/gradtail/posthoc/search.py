"""The small search every post-hoc adjuster uses to pick its scalar on the validation split (never test).

- :func:`tune_scalar`: evaluate a score on a grid and keep the best value, ties broken deterministically.
- :func:`balanced_accuracy`: mean per-class recall, the criterion post-hoc parameters are tuned for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradtail.errors import ConfigError, InputError

#: tau in 0, 0.1, ..., 2.0 (written as i / 10 so the values are exact decimals, not accumulated sums)
DEFAULT_TAU_GRID: tuple[float, ...] = tuple(i / 10 for i in range(21))


def tune_scalar(score_fn: Callable[[float], float], grid: Sequence[float]) -> tuple[float, list[float]]:
    """Return ``(best, scores)``: the grid value with the highest score, and the score of every value.

    Ties (equal scores) go to the value of smallest absolute value (the least adjustment), then to the
    first such value in the grid. A NaN score never wins. ``scores[i]`` belongs to ``grid[i]``.
    """
    values = [float(v) for v in grid]
    if not values:
        raise ConfigError("tune_scalar: the grid is empty")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"tune_scalar: grid values must be finite, got {values}")
    scores = [float(score_fn(v)) for v in values]
    best_i = 0
    for i in range(1, len(values)):
        s, b = scores[i], scores[best_i]
        if math.isnan(s):
            continue
        if math.isnan(b) or s > b or (s == b and abs(values[i]) < abs(values[best_i])):
            best_i = i
    return values[best_i], scores


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of per-class recall: (1/|K|) sum_{c in K} #{i: y_i = c, pred_i = c} / #{i: y_i = c}.

    ``logits``: (N, C) scores (prediction = argmax, first index on ties) or (N,) integer predictions.
    K is the set of classes present in ``targets`` (a class absent from the set has no recall).
    """
    if logits.dim() == 2:
        if logits.shape[1] != num_classes:
            raise InputError(
                f"balanced_accuracy: logits have {logits.shape[1]} columns, expected {num_classes}"
            )
        preds = logits.argmax(dim=1)
    elif logits.dim() == 1 and not logits.dtype.is_floating_point:
        preds = logits
    else:
        raise InputError(
            f"balanced_accuracy: expected (N, {num_classes}) logits or (N,) integer predictions, "
            f"got shape {tuple(logits.shape)} dtype {logits.dtype}"
        )
    if targets.dim() != 1 or targets.shape[0] != preds.shape[0]:
        raise InputError(
            f"balanced_accuracy: targets must be ({preds.shape[0]},), got {tuple(targets.shape)}"
        )
    if targets.numel() == 0:
        raise InputError("balanced_accuracy: no samples")
    targets = targets.to(device=preds.device, dtype=torch.long)
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise InputError(f"balanced_accuracy: labels must be in [0, {num_classes})")
    support = torch.bincount(targets, minlength=num_classes)
    hits = torch.bincount(targets[preds == targets], minlength=num_classes)
    present = support > 0
    recall = hits[present].double() / support[present].double()
    return float(recall.mean())


def check_logits(logits: torch.Tensor, num_classes: int | None, who: str) -> None:
    """Reject anything but an (N, C) floating tensor (C checked when known)."""
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise InputError(
            f"{who}: expected (N, C) floating logits, got shape {tuple(logits.shape)} {logits.dtype}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise InputError(f"{who}: logits have {logits.shape[1]} columns, expected {num_classes} classes")


def check_targets(targets: torch.Tensor, n: int, who: str) -> None:
    """Targets must be (n,) integer labels matching the rows of the scores."""
    if targets.dim() != 1 or targets.shape[0] != n or targets.dtype.is_floating_point:
        raise InputError(
            f"{who}: targets must be ({n},) integer labels, got shape {tuple(targets.shape)} {targets.dtype}"
        )


def check_state(state: object, keys: tuple[str, ...], who: str) -> dict[str, Any]:
    """A saved post-hoc state (``load_state_dict``) must be a mapping holding ``keys``."""
    if not isinstance(state, dict):
        raise InputError(f"{who}: a saved state must be a mapping, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise InputError(f"{who}: the saved state lacks {', '.join(missing)}")
    return state
