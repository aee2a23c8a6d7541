"""A method's search space, gathered from the components its config names (docs/tuning.md §1): the
default tuning space of every task (:meth:`gradtail.contracts.TaskContract.search_space`).

Each component declares the constructor parameters worth searching next to its code
(``search_space`` on the class, :mod:`gradtail.search_space`). A method is a run config: its loss (plus
the deferred re-weighting options when the config uses ``drw_epoch``), its regularizer and its update
rule. Post-hoc adjusters select their own parameter on validation in :meth:`fit` (their ``search_space``
documents the range of that search), so the tuner does not search them again.

A tuned parameter is named by its config key (``loss.params.tau``), which is also its name in the Optuna
study. The first trial is the method's published default: the value its config sets, or the constructor
default when the config leaves it out.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradtail.config import RunConfig
from gradtail.errors import ConfigError
from gradtail.losses import LOSSES
from gradtail.losses.deferred import DRW_SEARCH_SPACE
from gradtail.optim import UPDATE_RULES
from gradtail.posthoc import POSTHOC
from gradtail.regularizers import REGULARIZERS
from gradtail.search_space import EpochFraction, Param, SearchSpace, TrialLike, default_in_space


@dataclass(frozen=True)
class TunedParam:
    """One searched parameter: ``section`` (``loss`` / ``regularizer`` / ``update_rule``), ``name`` (the
    constructor argument), ``param`` (its range) and ``default`` (the first trial's value, in the units
    of the space: an :class:`~gradtail.search_space.EpochFraction` holds a fraction)."""

    section: str
    name: str
    param: Param
    default: Any

    @property
    def key(self) -> str:
        """The config key, also the parameter's name in the study: ``loss.params.tau``."""
        return f"{self.section}.params.{self.name}"


def declared_search_space(kind: str, name: str) -> SearchSpace:
    """The ``search_space`` a registered component declares (``kind``: loss, regularizer, update_rule,
    posthoc). Factories that are functions (the ``drw`` loss) carry it as an attribute."""
    registries = {
        "loss": LOSSES,
        "regularizer": REGULARIZERS,
        "update_rule": UPDATE_RULES,
        "posthoc": POSTHOC,
    }
    factory: Any = registries[kind].get(name)
    space: SearchSpace = factory.search_space
    return space


def _constructor_default(factory: Callable[..., Any], name: str) -> Any:
    target = factory.__init__ if inspect.isclass(factory) else factory  # type: ignore[misc]
    parameter = inspect.signature(target).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise ConfigError(f"{name!r} has no default in {factory.__name__}; set it in the config to tune it")
    return parameter.default


def method_search_space(cfg: RunConfig) -> list[TunedParam]:
    """Every parameter ``gradtail tune`` searches for the method ``cfg`` describes, with its default.

    Raises :class:`ConfigError` when a default the config sets lies outside the declared space (the
    published default must be the first trial).
    """
    epochs = cfg.optim.epochs
    parts: list[tuple[str, str, Mapping[str, Any], SearchSpace, Callable[..., Any]]] = []
    loss_space: dict[str, Param] = dict(declared_search_space("loss", cfg.loss.name))
    if cfg.loss.name != "drw" and "drw_epoch" in cfg.loss.params:
        loss_space.update(DRW_SEARCH_SPACE)
    parts.append(("loss", cfg.loss.name, cfg.loss.params, loss_space, LOSSES.get(cfg.loss.name)))
    if cfg.regularizer.name:
        name = cfg.regularizer.name
        space = declared_search_space("regularizer", name)
        parts.append(("regularizer", name, cfg.regularizer.params, space, REGULARIZERS.get(name)))
    rule = cfg.update_rule.name or "plain"
    space = declared_search_space("update_rule", rule)
    parts.append(("update_rule", rule, cfg.update_rule.params, space, UPDATE_RULES.get(rule)))
    tuned = []
    for section, component, params, space, factory in parts:
        for pname, param in space.items():
            value = params[pname] if pname in params else _constructor_default(factory, pname)
            try:
                default = default_in_space(param, value, epochs)
            except ValueError as e:
                raise ConfigError(
                    f"config key '{section}.params.{pname}' ({section} {component!r}): the default {e}; "
                    "widen the declared search space or change the config"
                ) from None
            tuned.append(TunedParam(section, pname, param, default))
    return tuned


def suggest(trial: TrialLike, space: list[TunedParam], epochs: int) -> dict[str, Any]:
    """The trial's value of every parameter (in the units of its space), keyed by config key."""
    return {p.key: p.param.suggest(trial, p.key, epochs) for p in space}


def defaults(space: list[TunedParam]) -> dict[str, Any]:
    """The first trial: every parameter at its default."""
    return {p.key: p.default for p in space}


def apply_values(
    config: Mapping[str, Any], space: list[TunedParam], values: Mapping[str, Any]
) -> dict[str, Any]:
    """A copy of the raw config mapping with ``values`` (trial units, keyed by config key) written into
    the components' ``params``; an epoch fraction becomes the epoch of this config's schedule."""
    out = copy.deepcopy(dict(config))
    epochs = int(out["optim"]["epochs"])
    for p in space:
        if p.key not in values:
            continue
        section = out.setdefault(p.section, {})
        params = section.get("params") or {}
        section["params"] = params
        params[p.name] = p.param.to_config(values[p.key], epochs)
    return out


def describe_values(space: list[TunedParam], values: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """``{config key: value as the config holds it}`` for reports (epoch fractions as epochs)."""
    out = {}
    for p in space:
        if p.key in values:
            v = p.param.to_config(values[p.key], epochs)
            out[p.key] = round(v, 6) if isinstance(v, float) and not isinstance(p.param, EpochFraction) else v
    return out


__all__ = [
    "TunedParam",
    "apply_values",
    "declared_search_space",
    "defaults",
    "describe_values",
    "method_search_space",
    "suggest",
]
