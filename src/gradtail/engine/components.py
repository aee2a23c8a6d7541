"""Check a run config's method families, component names and parameter mappings before anything is built.

Every ``params``-like mapping of a :class:`~gradtail.config.RunConfig` goes to a registered factory as
keyword arguments: ``model.params`` (checked by the task, which knows its models), ``loss.params``,
``regularizer.params``, ``update_rule.params``, ``eval.posthoc_params[name]``, ``data.sampler_params``, and
``data.synthetic`` (the synthetic dataset's generator). :func:`check_component_params` checks their keys
against those factories' signatures, so a
misspelled key is a one-line :class:`~gradtail.errors.ConfigError` when the config is loaded
(``unknown config key 'loss.params.tua' (loss 'logit_adjust'); valid keys in loss.params: tau, ...``),
not a ``TypeError`` from a constructor at training time or after the first runs of a suite.

Arguments the trainer passes itself (the ``*_SET_BY_TRAINER`` tables below, which mirror
:class:`gradtail.engine.trainer.Trainer`) cannot be set in the mappings: the error names the config key
or the data they come from. Values are not checked here; the constructors check them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from gradtail.config import RunConfig
from gradtail.contracts import Accepts, create_task
from gradtail.data.samplers import SAMPLERS
from gradtail.errors import ConfigError
from gradtail.losses import LOSSES
from gradtail.losses.deferred import DRW_OPTIONS
from gradtail.optim import UPDATE_RULES
from gradtail.posthoc import POSTHOC
from gradtail.registry import check_call_params
from gradtail.regularizers import REGULARIZERS

# Arguments the trainer (or data builder) passes to each kind of factory -> where their value comes from.
LOSS_ARGS_SET_BY_TRAINER: Mapping[str, str] = {
    "num_classes": "the dataset",
    "class_counts": "the training data",
}
SAMPLER_ARGS_SET_BY_TRAINER: Mapping[str, str] = {
    "labels": "the training data",
    "num_classes": "the dataset",
    "seed": "train.seed",
}
# Post-hoc adjusters get these only when their factory lists them (Trainer._posthoc_args, _posthoc_inputs).
POSTHOC_ARGS_SET_BY_TRAINER: Mapping[str, str] = {
    "class_counts": "the training data",
    "classifier": "the trained model",
}


def check_component_params(cfg: RunConfig) -> None:
    """Check ``cfg`` before anything is built: the task's own checks (its dataset and model), the method
    families it takes (:meth:`~gradtail.contracts.TaskContract.accepts`; a refused one is one line naming
    the task and what it takes), every component name and parameter mapping against its registry (an
    unknown name is the registry's :class:`ConfigError`; an unknown, reserved or missing parameter names
    its full config key, :func:`gradtail.registry.check_call_params`)."""
    task = create_task(cfg)
    task.check()  # its dataset and model first: what the families it takes may depend on
    accepts = task.accepts()
    data = cfg.data
    rule = cfg.update_rule.name or "plain"
    chosen = (
        ("loss", cfg.loss.name, accepts.losses),
        ("regularizer", cfg.regularizer.name, accepts.regularizers),
        ("update rule", rule, accepts.update_rules),
        ("sampler", data.sampler, accepts.samplers),
        *(("post-hoc adjuster", name, accepts.posthoc) for name in cfg.eval.posthoc),
    )
    for family, name, allowed in chosen:
        if name and allowed is not None and name not in allowed:
            raise ConfigError(Accepts.refusal(family, name, task.name, allowed))
    SAMPLERS.check_params(
        data.sampler, data.sampler_params, "data.sampler_params", SAMPLER_ARGS_SET_BY_TRAINER
    )
    _check_loss_params(cfg.loss.name, cfg.loss.params)
    if cfg.regularizer.name:  # without a name, no regularizer is built and its params are unused
        REGULARIZERS.check_params(cfg.regularizer.name, cfg.regularizer.params, "regularizer.params")
    UPDATE_RULES.check_params(rule, cfg.update_rule.params, "update_rule.params")
    _check_posthoc_params(cfg.eval.posthoc, cfg.eval.posthoc_params)
    if cfg.optim.accumulation_steps > 1 and (rule != "plain" or cfg.regularizer.name or data.augment.views):
        raise ConfigError(
            "optim.accumulation_steps > 1 takes the plain update rule without a regularizer or extra views "
            f"(SAM, GBG and the terms on features need the whole batch at once); got update rule {rule!r}"
        )


def _check_loss_params(name: str, params: Mapping[str, Any]) -> None:
    """Every loss also takes the deferred re-weighting options (``create_loss`` takes them out); the ``drw``
    loss takes its own and forwards the rest to its ``base`` loss, checked against that loss."""
    key = "loss.params"
    if name != "drw":
        LOSSES.check_params(name, params, key, LOSS_ARGS_SET_BY_TRAINER, extra=DRW_OPTIONS)
        return
    forwarded = LOSSES.check_params("drw", params, key, LOSS_ARGS_SET_BY_TRAINER)
    drw_factory = LOSSES.get("drw")
    base = params.get("base", inspect.signature(drw_factory).parameters["base"].default)
    if base == "drw":
        raise ConfigError("config key 'loss.params.base': loss 'drw' must wrap another loss, not 'drw'")
    try:
        base_factory = LOSSES.get(base)
    except ConfigError as e:
        raise ConfigError(f"config key 'loss.params.base': {e}") from None
    own = [n for n in LOSSES.parameter_names("drw") if n not in LOSS_ARGS_SET_BY_TRAINER]
    check_call_params(
        base_factory,
        forwarded,
        key,
        f"loss 'drw' with base {base!r}",
        reserved=LOSS_ARGS_SET_BY_TRAINER,
        extra=own,
    )


def _check_posthoc_params(names: list[str], params_by_name: Mapping[str, Any]) -> None:
    """Each adjuster of ``eval.posthoc`` must be registered; each ``eval.posthoc_params`` entry must name a
    registered adjuster and hold parameters of it."""
    for name in names:
        POSTHOC.get(name)
    for name, params in params_by_name.items():
        key = f"eval.posthoc_params.{name}"
        try:
            factory = POSTHOC.get(name)
        except ConfigError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
        inputs = factory.construction_inputs  # type: ignore[attr-defined]
        reserved = {arg: POSTHOC_ARGS_SET_BY_TRAINER.get(arg, "the trainer") for arg in inputs}
        POSTHOC.check_params(name, params, key, reserved)

