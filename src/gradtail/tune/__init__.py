"""``gradtail tune``: hyperparameter search on validation only (Optuna), per method of a suite or config.

- :mod:`gradtail.tune.spaces`: a method's search space from its components' declared ``search_space``;
- :mod:`gradtail.tune.study`: the studies (TPE, pruning, SQLite storage, resume), the validation-only
  view of the data, the best config and the chosen configuration's one test evaluation;
- :mod:`gradtail.tune.report`: the tuning report (table, optimisation history, parameter importances).

A suite with ``tuned: true`` then trains each method's chosen configuration over the suite's seeds next
to its default (:mod:`gradtail.bench.suite`). docs/tuning.md describes the whole procedure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gradtail.config import load_config, read_yaml_mapping
from gradtail.contracts import create_task
from gradtail.errors import ConfigError
from gradtail.tune.spaces import TunedParam, declared_search_space, method_search_space
from gradtail.tune.study import TuneResult, TuneSettings, ValidationOnlyData, tune_method


def default_output(target: str | Path) -> Path:
    """``runs/tune/<suite or config name>``: where ``gradtail tune`` writes and ``tuned: true`` reads."""
    path = Path(target)
    raw = read_yaml_mapping(path, "suite or config file")
    return Path("runs") / "tune" / str(raw.get("name", path.stem))


def run_tune(
    target: str | Path,
    settings: TuneSettings,
    output: Path | None = None,
    methods: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[TuneResult]:
    """Tune every method of a suite file (or ``methods`` of it), or the one method of a config file;
    write each study's files under ``output`` and the tuning report. Returns the results in order."""
    import optuna

    from gradtail.bench.suite import load_suite
    from gradtail.tune.report import write_tune_report

    path = Path(target)
    raw = read_yaml_mapping(path, "suite or config file")
    output = output or default_output(path)
    if "methods" in raw:
        suite = load_suite(path, tuned=False)
        names = [m.name for m in suite.methods]
        if methods:
            unknown = sorted(set(methods) - set(names))
            if unknown:
                raise ConfigError(
                    f"--methods names {unknown}, not methods of suite {suite.name!r}: {', '.join(names)}"
                )
        chosen = [m for m in suite.methods if not methods or m.name in methods]
        planned = []
        for m in chosen:
            if m.after:
                log(f"gradtail tune: {m.name}: not tuned (it starts from {m.after!r}'s checkpoint)")
                continue
            planned.append((m.name, suite.run_config(m, suite.seeds[0])))
        prefix = f"{suite.name}/"
    else:
        if methods:
            raise ConfigError("--methods selects methods of a suite; a config file is one method")
        cfg = load_config(path)
        planned = [(cfg.name, cfg)]
        prefix = ""
    start = time.perf_counter()
    results, studies, data_cache = [], {}, {}
    for name, cfg in planned:
        config = cfg.to_dict()
        key = repr((cfg.task, config["data"], config.get(cfg.task)))  # the data a task builds from these
        task = create_task(cfg)
        if key not in data_cache and task.search_space():
            data_cache[key] = task.build_data()
        result = tune_method(
            name, cfg, output, settings, data=data_cache.get(key), study_prefix=prefix, log=log
        )
        results.append(result)
        if not result.skipped:
            storage = settings.storage or f"sqlite:///{(output / 'study.db').resolve()}"
            studies[name] = optuna.load_study(study_name=result.study, storage=storage)
    report_settings = {
        "objective": results[0].objective if results else settings.objective,
        "trials": settings.trials,
        "epochs": settings.epochs,
        "pruner": settings.pruner,
        "seed": settings.seed,
        "wall_seconds": time.perf_counter() - start,
    }
    html = write_tune_report(results, output, studies, report_settings)
    log(f"gradtail tune: report {html}")
    return results


__all__ = [
    "TuneResult",
    "TuneSettings",
    "TunedParam",
    "ValidationOnlyData",
    "declared_search_space",
    "default_output",
    "method_search_space",
    "run_tune",
    "tune_method",
]
