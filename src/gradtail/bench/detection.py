"""Detection suites: ``gradtail bench`` for detection configs (docs/detection.md, "Suites").

A detection suite is a suite file with ``task: detection``; its methods are detection configs
(``configs/detection/``), with the suite's and each method's overrides merged on top:

```yaml
name: detection_3seeds
task: detection
description: two-stage CE vs EQLv2, one-stage focal vs EFL
seeds: [0, 1, 2]
overrides: {train: {epochs: 12}}          # applied to every method
methods:
  faster_rcnn_ce: {config: ../configs/detection/fm_faster_rcnn_ce.yaml}
  faster_rcnn_eqlv2: {config: ../configs/detection/fm_faster_rcnn_eqlv2.yaml, label: Faster R-CNN EQLv2}
```

Runs follow the classification suites' rules (:mod:`gradtail.bench.runner`): ``<output>/<method>/seed<k>/``
is a run directory; a run whose ``final.json`` carries the config hash of the run it would be now is
skipped, one with a checkpoint resumes, and a directory that holds a run of another config is an error
before any training unless ``overwrite``. Every run config is built and checked before the first run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtail.bench.runner import SuiteRun, check_conflicts, collect_finals, execute_runs
from gradtail.bench.suite import find_method, suite_seeds
from gradtail.config import deep_merge, read_yaml_mapping
from gradtail.errors import ConfigError

DETECTION_SUITE_KEYS = ("name", "task", "description", "overrides", "seeds", "methods")
DETECTION_METHOD_KEYS = ("config", "label", "data", "detector", "train")


@dataclass
class DetectionMethod:
    name: str
    config: dict[str, Any]  # the method's detection config (base files resolved), overrides merged
    label: str | None = None


@dataclass
class DetectionSuite:
    name: str
    seeds: list[int]
    methods: list[DetectionMethod]
    description: str = ""
    path: Path | None = None

    def method(self, name: str) -> DetectionMethod:
        return find_method(self.methods, name, self.name)

    def run_config(self, method: DetectionMethod, seed: int) -> Any:
        """The :class:`~gradtail.detection.training.DetectionRunConfig` of one (method, seed) run."""
        from gradtail.detection.training import DetectionRunConfig

        raw = copy.deepcopy(method.config)
        raw["name"] = method.name
        raw.setdefault("train", {})["seed"] = seed
        return DetectionRunConfig.from_dict(raw)


def suite_task(path: str | Path) -> str:
    """The ``task`` of a suite file (``classification`` when it has none)."""
    raw = read_yaml_mapping(Path(path), "suite file")
    return str(raw.get("task") or "classification")


def load_detection_suite(path: str | Path) -> DetectionSuite:
    """Load a detection suite and build and check every method's config (one-line errors naming the
    suite, the method and the key)."""
    from gradtail.detection.training import load_detection_dict

    path = Path(path)
    raw = read_yaml_mapping(path, "suite file")
    unknown = sorted(set(raw) - set(DETECTION_SUITE_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown suite key(s) {unknown} in {path}; valid for a detection suite: "
            f"{', '.join(DETECTION_SUITE_KEYS)}"
        )
    seeds = suite_seeds(raw, path)
    overrides = raw.get("overrides") or {}
    methods_raw = raw.get("methods")
    if not isinstance(overrides, dict) or not isinstance(methods_raw, dict) or not methods_raw:
        raise ConfigError(f"suite {path}: overrides must be a mapping and methods a non-empty mapping")
    methods = []
    for name, spec in methods_raw.items():
        if isinstance(spec, str):  # `method: path/to/config.yaml`, short for {config: ...}
            spec = {"config": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"suite {path}: methods.{name} must be a mapping, got {spec!r}")
        bad = sorted(set(spec) - set(DETECTION_METHOD_KEYS))
        if bad:
            raise ConfigError(
                f"suite {path}: methods.{name}: unknown key(s) {bad}; "
                f"valid: {', '.join(DETECTION_METHOD_KEYS)}"
            )
        if "config" not in spec:
            raise ConfigError(f"suite {path}: methods.{name} needs a config (a detection config file)")
        config = load_detection_dict(path.parent / str(spec["config"]))
        config = deep_merge(deep_merge(config, copy.deepcopy(overrides)), {
            k: copy.deepcopy(v) for k, v in spec.items() if k in ("data", "detector", "train")
        })  # fmt: skip
        methods.append(DetectionMethod(str(name), config, spec.get("label")))
    suite = DetectionSuite(
        str(raw.get("name", path.stem)), list(seeds), methods, str(raw.get("description", "")), path
    )
    for m in methods:
        try:
            suite.run_config(m, seeds[0]).detector.check()
        except ConfigError as e:
            raise ConfigError(f"suite {suite.name!r}, method {m.name!r}: {e}") from None
    return suite


@dataclass
class PlannedDetectionRun(SuiteRun):
    method: DetectionMethod
    seed: int
    directory: Path
    config: Any  # gradtail.detection.training.DetectionRunConfig

    def config_hash(self) -> str:
        from gradtail.detection.training import config_hash

        return config_hash(self.config)

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config.to_dict())

    def unsafe(self, changes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from gradtail.detection.training import DETECTION_RESUME_SAFE_KEYS

        return {k: v for k, v in changes.items() if k not in DETECTION_RESUME_SAFE_KEYS}


def plan_detection_runs(
    suite: DetectionSuite, output: Path, only: list[str] | None = None
) -> list[PlannedDetectionRun]:
    names = [m.name for m in suite.methods]
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ConfigError(f"--only names unknown method(s) {missing}")
    return [
        PlannedDetectionRun(m, seed, output / m.name / f"seed{seed}", suite.run_config(m, seed))
        for seed in suite.seeds  # seeds outer: a suite stopped early has every method for the first seeds
        for m in suite.methods
        if not only or m.name in only
    ]


def run_detection_suite(
    suite: DetectionSuite,
    output: Path,
    only: list[str] | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run every planned detection run that is not done; return every planned run's ``final.json``
    (with ``method`` and ``seed``)."""
    from gradtail.detection.training import DetectionRun

    runs = plan_detection_runs(suite, output, only)
    conflicts = check_conflicts(runs, overwrite)

    def train(run: PlannedDetectionRun, replace: bool) -> str:
        record = DetectionRun(run.config, run.directory, verbose=False).fit(
            resume=not replace, overwrite=replace
        )
        m = {k: f"{100 * v:.1f}" for k, v in record["metrics"].items()}
        return f"AP {m['AP']}, APr {m['APr']}, APc {m['APc']}, APf {m['APf']}"

    def describe(run: PlannedDetectionRun) -> str:
        d = run.config.detector
        return f"{d.arch}, loss {d.loss or 'stock'}, {run.config.train.epochs} epochs"

    execute_runs(f"detection suite {suite.name!r}", runs, conflicts, describe, train, log, output)
    return collect_finals(runs)


__all__ = [
    "DetectionMethod",
    "DetectionSuite",
    "load_detection_suite",
    "plan_detection_runs",
    "run_detection_suite",
    "suite_task",
]
