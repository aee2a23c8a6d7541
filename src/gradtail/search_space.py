"""Hyperparameter search spaces, declared by each component next to its code (``gradtail tune``).

A component (loss, regularizer, update rule, post-hoc adjuster) lists the constructor parameters worth
tuning in a class attribute ``search_space: ClassVar[SearchSpace]``: a mapping from the parameter's name
to one of :class:`FloatRange`, :class:`IntRange`, :class:`Choice` or :class:`EpochFraction`. The published
default (the constructor's default, or the value a method's config sets) is the tuner's first trial, so
every space must contain it. Nothing here imports Optuna: a parameter asks a *trial* object for a value
through the three methods Optuna's ``Trial`` has (``suggest_float``, ``suggest_int``,
``suggest_categorical``), so the spaces stay importable without the ``tune`` extra.

Example:
    >>> from gradtail.search_space import FloatRange, Choice
    >>> space = {"beta": FloatRange(0.01, 1.0, log=True), "variant": Choice(("head", "logit"))}
    >>> space["beta"].contains(0.1), space["variant"].contains("feature")
    (True, False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


class TrialLike(Protocol):
    """What a parameter needs from a trial (Optuna's ``Trial`` has these three methods)."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class FloatRange:
    """A real parameter in [low, high]; ``log``: sampled uniformly in log space (scales such as β)."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"FloatRange needs low < high (and low > 0 with log), got {self}")

    def suggest(self, trial: TrialLike, name: str, epochs: int) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and self.low <= value <= self.high

    def to_config(self, value: Any, epochs: int) -> Any:
        return float(value)


@dataclass(frozen=True)
class IntRange:
    """An integer parameter in [low, high] (both included)."""

    low: int
    high: int
    step: int = 1

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"IntRange needs low < high, got {self}")

    def suggest(self, trial: TrialLike, name: str, epochs: int) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def to_config(self, value: Any, epochs: int) -> Any:
        return int(value)


@dataclass(frozen=True)
class Choice:
    """One of a few values (strings, numbers, booleans)."""

    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"Choice needs at least two values, got {self.choices!r}")

    def suggest(self, trial: TrialLike, name: str, epochs: int) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def to_config(self, value: Any, epochs: int) -> Any:
        return value


@dataclass(frozen=True)
class EpochFraction:
    """An epoch number given as a fraction of the schedule (DRW's re-weighting epoch, a term's start), so
    a value found with short tuning runs transfers to the full schedule: the trial samples the fraction
    ``f`` in [low, high] and the config gets ``round(f * epochs)`` (:meth:`to_config`)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"EpochFraction needs 0 <= low < high <= 1, got {self}")

    def suggest(self, trial: TrialLike, name: str, epochs: int) -> float:
        return trial.suggest_float(name, self.low, self.high)

    def contains(self, value: Any) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and self.low <= value <= self.high

    def to_config(self, value: Any, epochs: int) -> Any:
        return round(float(value) * epochs)

    def from_config(self, value: Any, epochs: int) -> float:
        """The fraction an epoch number of the config stands for (the first trial's value)."""
        return min(max(float(value) / max(epochs, 1), self.low), self.high)


Param = FloatRange | IntRange | Choice | EpochFraction
SearchSpace = Mapping[str, Param]


def default_in_space(param: Param, value: Any, epochs: int) -> Any:
    """The value a config holds, as the trial value of ``param`` (an epoch number becomes its fraction),
    or raise ``ValueError`` when it lies outside the space."""
    if isinstance(param, EpochFraction):
        return param.from_config(value, epochs)
    if isinstance(param, FloatRange) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not param.contains(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{value!r} is outside {param}")
    return value


__all__ = [
    "Choice",
    "EpochFraction",
    "FloatRange",
    "IntRange",
    "Param",
    "SearchSpace",
    "TrialLike",
    "default_in_space",
]
