"""Benchmark suites: a base recipe, a list of methods (config overrides) and seeds, as YAML.

```yaml
name: quick
description: every registered method on Fashion-MNIST-LT IF100, short schedule
base: ../configs/fashion_mnist_lt/ce.yaml     # a run config (path relative to the suite file)
overrides: {optim: {epochs: 8}}               # applied to every method
seeds: [0]
methods:
  ce: {}
  balanced_softmax: {loss: {name: balanced_softmax}}
  softmax_eql: {config: ../configs/fashion_mnist_lt/softmax_eql.yaml}   # a method's own config file
  crt:                                        # stage 2 from the same seed's `ce` checkpoint
    after: ce
    train: {freeze_backbone: true, reset_classifier: true}
    data: {sampler: class_balanced}
published: {ce: 70.4}                         # optional "paper" column (top-1 %)
tuned: true       # also run each method's configuration chosen by `gradtail tune` on validation
tune_dir: runs/tune/quick                     # where that tune wrote (default runs/tune/<suite name>)
```

With ``tuned: true`` every method that has hyperparameters gets a twin ``<method>_tuned`` (label
"<label> (tuned)") whose config is ``<tune_dir>/<method>/best.yaml``, with the suite's and the method's
overrides applied as for the method itself; a missing ``best.yaml`` is an error that says to run
``gradtail tune`` on the suite first.

Everything is validated before any training: unknown suite keys, a method that does not build (unknown
config key, unknown loss / model / regularizer / update rule / post-hoc / sampler / dataset, a key of
``loss.params``, ``model.params``, ... that the component does not take: see
:func:`gradtail.engine.components.check_component_params`), ``after`` naming a method that is not in the
suite, seeds that are not a list of integers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gradtail.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    deep_merge,
    load_config_dict,
    read_yaml_mapping,
)
from gradtail.contracts import create_task
from gradtail.errors import ConfigError

SUITE_KEYS = (
    "name",
    "task",
    "description",
    "base",
    "overrides",
    "seeds",
    "methods",
    "published",
    "dataset_label",
    "tuned",
    "tune_dir",
)
METHOD_KEYS = ("after", "label", "config")  # method-level keys that are not run-config sections


M = TypeVar("M")


def find_method(methods: list[M], name: str, suite: str) -> M:
    """The method called ``name`` of a suite (any task's method records have a ``name``)."""
    for m in methods:
        if m.name == name:  # type: ignore[attr-defined]
            return m
    names = [m.name for m in methods]  # type: ignore[attr-defined]
    raise ConfigError(f"suite {suite!r} has no method {name!r}; methods: {names}")


@dataclass
class MethodSpec:
    name: str
    overrides: dict[str, Any]
    after: str | None = None  # a method whose checkpoint (same seed) this one starts from
    label: str | None = None
    config: dict[str, Any] | None = None  # the method's own config file (replaces the suite's base)
    tuned_from: str | None = None  # the best.yaml of `gradtail tune` a tuned twin is configured by


@dataclass
class Suite:
    name: str
    base: dict[str, Any]
    overrides: dict[str, Any]
    seeds: list[int]
    methods: list[MethodSpec]
    description: str = ""
    published: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    task: str = "classification"
    notes: list[str] = field(default_factory=list)  # the suite's own report notes (tuned twins' values)

    def method(self, name: str) -> MethodSpec:
        return find_method(self.methods, name, self.name)

    def run_config(self, method: MethodSpec, seed: int) -> RunConfig:
        """The resolved config of one (method, seed) run."""
        start = method.config if method.config is not None else self.base
        data = deep_merge(deep_merge(copy.deepcopy(start), self.overrides), method.overrides)
        data["name"] = f"{method.name}"
        apply_overrides(data, [f"train.seed={seed}"])
        return config_from_dict(data)


def load_suite(path: str | Path, tuned: bool = True) -> Suite:
    """Load and fully validate a suite file (every run config is built and checked). ``tuned=False``
    leaves out the ``tuned: true`` twins (``gradtail tune`` reads the suite that way)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "suite file")
    unknown = set(raw) - set(SUITE_KEYS)
    if unknown:
        raise ConfigError(f"unknown suite key(s) {sorted(unknown)} in {path}; valid: {', '.join(SUITE_KEYS)}")
    base: dict[str, Any] = {}
    if raw.get("base") is not None:
        base = load_config_dict(path.parent / str(raw["base"]))
    overrides = _mapping(raw.get("overrides") or {}, "overrides", path)
    seeds = suite_seeds(raw, path)
    methods_raw = _mapping(raw.get("methods"), "methods", path)
    if not methods_raw:
        raise ConfigError(f"suite {path}: no methods")
    methods = []
    for name, spec in methods_raw.items():
        spec = dict(_mapping(spec or {}, f"methods.{name}", path))
        after = spec.pop("after", None)
        label = spec.pop("label", None)
        config_path = spec.pop("config", None)
        config = load_config_dict(path.parent / str(config_path)) if config_path is not None else None
        if config is None and raw.get("base") is None:
            raise ConfigError(f"suite {path}: method {name!r} has no config and the suite has no base")
        methods.append(MethodSpec(str(name), overrides=spec, after=after, label=label, config=config))
    published = {str(k): float(v) for k, v in _mapping(raw.get("published") or {}, "published", path).items()}
    suite = Suite(
        name=str(raw.get("name", path.stem)),
        base=base,
        overrides=overrides,
        seeds=list(seeds),
        methods=methods,
        description=str(raw.get("description", "")),
        published=published,
        path=path,
    )
    if raw.get("tuned") not in (None, False, True):
        raise ConfigError(f"suite {path}: tuned must be true or false, got {raw.get('tuned')!r}")
    if tuned and raw.get("tuned"):
        tune_dir = Path(str(raw.get("tune_dir") or Path("runs") / "tune" / suite.name))
        twins = {t.name: t for t in tuned_twins(suite, tune_dir)}  # each right after its method
        suite.methods = [x for m in suite.methods for x in (m, twins.get(f"{m.name}_tuned")) if x is not None]
    if raw.get("task") is not None and not isinstance(raw.get("task"), str):
        raise ConfigError(f"suite {path}: task must be a task name, got {raw.get('task')!r}")
    suite.task = validate_suite(suite, raw.get("task"))
    suite.notes = tuned_notes(suite)
    return suite


def suite_seeds(raw: dict[str, Any], path: Path) -> list[int]:
    """A suite file's ``seeds`` (default [0]): a non-empty list of integers, else a one-line error."""
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"suite {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    return list(seeds)


def tuned_twins(suite: Suite, tune_dir: Path) -> list[MethodSpec]:
    """``<method>_tuned`` for every method with hyperparameters (its task's search space): its config is
    the ``best.yaml`` that ``gradtail tune`` wrote for it under ``tune_dir``."""
    twins = []
    for m in list(suite.methods):
        if m.after or not create_task(suite.run_config(m, suite.seeds[0])).search_space():
            continue
        best = tune_dir / m.name / "best.yaml"
        if not best.is_file():
            raise ConfigError(
                f"suite {suite.name!r} has tuned: true but {best} does not exist; run "
                f"`gradtail tune {suite.path}` first (or set tune_dir)"
            )
        label = f"{m.label or m.name} (tuned)"
        config = load_config_dict(best)
        twin = MethodSpec(f"{m.name}_tuned", copy.deepcopy(m.overrides), label=label, config=config)
        twin.tuned_from = str(best)
        twins.append(twin)
    return twins


def tuned_notes(suite: Suite) -> list[str]:
    """One line per tuned twin (``tuned: true``): the values ``gradtail tune`` chose on validation."""
    notes = []
    for m in suite.methods:
        if m.tuned_from is None:
            continue
        cfg = suite.run_config(m, suite.seeds[0])
        sections = {
            "loss": cfg.loss.params,
            "regularizer": cfg.regularizer.params,
            "update_rule": cfg.update_rule.params,
        }
        values = []
        for p in create_task(cfg).search_space():
            v = sections[p.section].get(p.name, p.default)
            values.append(f"{p.name}={v:.3g}" if isinstance(v, float) else f"{p.name}={v}")
        notes.append(
            f"{m.name}: {', '.join(values)}, chosen by gradtail tune on the validation split "
            f"({m.tuned_from})."
        )
    return notes


def _mapping(value: Any, key: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"suite {path}: {key} must be a mapping, got {value!r}")
    return value


def validate_suite(suite: Suite, task: str | None = None) -> str:
    """Build every run config and check its component names and parameters, so nothing fails after hours
    of training (the seeds change only ``train.seed``: one config per method is checked). Every method must
    be of one task (the suite's ``task`` when it names one): a suite mixing tasks is refused. Returns it."""
    from gradtail.engine.components import check_component_params

    names = [m.name for m in suite.methods]
    tasks: dict[str, str] = {}
    for m in suite.methods:
        where = f"suite {suite.name!r}, method {m.name!r}"
        if m.after is not None and m.after not in names:
            raise ConfigError(f"{where}: after={m.after!r} is not a method of the suite")
        if m.after == m.name:
            raise ConfigError(f"{where}: a method cannot start from itself")
        try:
            cfg = suite.run_config(m, suite.seeds[0])
            check_component_params(cfg)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        tasks[m.name] = cfg.task
    found = sorted(set(tasks.values()))
    if len(found) > 1:
        listing = ", ".join(f"{n}: {t}" for n, t in tasks.items())
        raise ConfigError(f"suite {suite.name!r} mixes tasks ({listing}); a suite holds methods of one task")
    if task is not None and found and found[0] != task:
        raise ConfigError(f"suite {suite.name!r} says task: {task} but its methods are {found[0]} configs")
    return found[0] if found else (task or "classification")
