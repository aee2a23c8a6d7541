"""``gradtail tune``: choose a method's hyperparameters on validation only, with Optuna (docs/tuning.md).

One Optuna study per method, kept in a database (an SQLite file in the output folder by default; any
Optuna storage URL with ``storage``), so a killed tune resumes the same study and several processes can
share it. The sampler is TPE, seeded; the first trial is the method's published default
(:func:`gradtail.tune.spaces.defaults`). Every trial is an ordinary training run of the method's config
with the trial's values, evaluated on the validation split after every epoch (the pruner stops trials
whose validation metric falls behind: median or successive halving).

The test split is never read while searching: the trainer gets :class:`ValidationOnlyData`, a view of the
run's data without it. Once the search is done, the chosen configuration is trained on the full schedule
and evaluated on the test split once (``final/`` next to the study's files), unless ``final_test`` is off.

With ``log.mlflow`` (:mod:`gradtail.tracking`), each study is one MLflow run (kept across resumes of the
study: its id is a user attribute of the Optuna study), and each trial and the final run one MLflow run
nested under it; pruned trials end ``KILLED``.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradtail.config import RunConfig, config_from_dict, dump_config
from gradtail.contracts import RunData, TrainLoader, create_task
from gradtail.errors import ConfigError, OutputError, TrainingError
from gradtail.tracking import Nesting, close_parent_run, open_parent_run
from gradtail.tune.spaces import (
    TunedParam,
    apply_values,
    defaults,
    describe_values,
    suggest,
)

PRUNERS = ("median", "halving", "none")
FINISHED = ("COMPLETE", "PRUNED")


@dataclass
class TuneSettings:
    """How a tune runs (the ``gradtail tune`` options).

    - ``trials``: finished (complete or pruned) trials each study reaches, counted across processes and
      resumes; ``timeout``: seconds of searching per method in this process (None: no limit).
    - ``storage``: an Optuna storage URL; None: ``sqlite:///<output>/study.db``.
    - ``objective``: the validation metric maximised; None: the task's selection metric (classification
      ``balanced_accuracy``, also ``top1``, ``few`` or ``mix`` = (1 - ``mix_weight``) balanced accuracy +
      ``mix_weight`` Few; segmentation ``miou``; detection ``AP``, also ``APr``, ...).
    - ``epochs``: the trials' schedule (None: the method's own; shorter runs search more settings, and
      epoch-valued parameters are searched as fractions of the schedule, so they transfer).
    - ``pruner``: ``median`` (Optuna's MedianPruner), ``halving`` (successive halving) or ``none``.
    - ``seed``: the TPE sampler's seed; the training seed is the config's (the suite's first seed).
    - ``final_test``: train the chosen configuration on the full schedule and evaluate the test split once.
    - ``stale_after``: seconds without a heartbeat after which a running trial of a killed process is
      marked failed (and run again).
    """

    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    objective: str | None = None
    mix_weight: float = 0.5
    epochs: int | None = None
    pruner: str = "median"
    seed: int = 0
    final_test: bool = True
    overwrite: bool = False
    stale_after: float = 120.0

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"tune pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.trials < 1:
            raise ConfigError(f"--trials must be >= 1, got {self.trials}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ConfigError(f"--mix-weight must be in [0, 1], got {self.mix_weight}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")


def objective_value(val: dict[str, Any], settings: TuneSettings, task: Any) -> float:
    """The validation metric of one evaluation record (``final.json``'s ``val_last_epoch``, an epoch's
    ``val``), as the run's task defines it (:meth:`gradtail.contracts.TaskContract.objective`; its first
    objective when ``settings.objective`` is None)."""
    name = settings.objective or task.objectives[0]
    return float(task.objective(val, name, settings.mix_weight))


class ForbiddenSplitRead(TrainingError):
    """Raised when anything asks a :class:`ValidationOnlyData` for its test split."""


class ValidationOnlyData:
    """A run's data without its test split (what a tuning trial trains and validates on).

    ``has_split("test")`` is False, so the trainer evaluates validation only; asking for the test split
    anyway raises :class:`ForbiddenSplitRead`. Everything else is the wrapped data's, whatever the task.
    """

    def __init__(self, data: RunData) -> None:
        if not data.has_split("val"):
            raise ConfigError(
                "gradtail tune needs a validation split to select on (data.val_per_class > 0, or "
                "data.split_fractions.val for your own data); the test split is never used for it"
            )
        self._data = data

    @property
    def class_counts(self) -> list[int]:
        return self._data.class_counts

    @property
    def num_classes(self) -> int:
        return self._data.num_classes

    @property
    def in_channels(self) -> int:
        return self._data.in_channels

    @property
    def sha256(self) -> str:
        return self._data.sha256

    @property
    def train_labels(self) -> torch.Tensor:
        return self._data.train_labels

    @property
    def class_names(self) -> list[str]:
        return self._data.class_names

    def preprocessing(self) -> dict[str, Any]:
        return self._data.preprocessing()

    def has_split(self, split: str) -> bool:
        return split != "test" and self._data.has_split(split)

    def train_loader(self, cfg: RunConfig, device: torch.device, rank: int, world: int) -> TrainLoader:
        return self._data.train_loader(cfg, device, rank, world)

    def eval_loader(
        self, split: str, cfg: RunConfig, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        if split == "test":
            raise ForbiddenSplitRead(
                "the test split is not read while tuning (selection uses validation only)"
            )
        return self._data.eval_loader(split, cfg, device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self._data.normalize(x)

    def describe(self) -> dict[str, Any]:
        return self._data.describe()

    def __getattr__(self, name: str) -> Any:
        """Whatever else a task reads of its own data (detection's category ids and frequency groups)."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._data, name)


@dataclass
class TuneResult:
    """One method's study: the best trial, the default trial, counts, wall time and where files are."""

    method: str
    study: str
    objective: str
    best_value: float | None
    best_params: dict[str, Any]
    default_value: float | None
    trials: dict[str, int]
    wall_seconds: float
    directory: str
    best_config: str | None = None
    final: dict[str, Any] | None = None
    skipped: str | None = None
    space: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "gradtail tune needs Optuna: pip install 'gradtail[tune]' (optuna==5.0.0)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_storage(url: str, stale_after: float) -> Any:
    """An Optuna storage for ``url`` with heartbeats, so a trial left running by a killed process is
    marked failed after ``stale_after`` seconds (and run again) instead of blocking the study."""
    optuna = _optuna()
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the study folder {path.parent}: {e.strerror or e}") from None
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            heartbeat_interval=max(1, int(stale_after // 4)),
            grace_period=max(2, int(stale_after)),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except Exception as e:  # an unreachable database, a bad URL: one line, not SQLAlchemy's traceback
        raise OutputError(f"cannot open the Optuna storage {url!r}: {e.__class__.__name__}: {e}") from None


def _pruner(settings: TuneSettings, epochs: int) -> Any:
    optuna = _optuna()
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, epochs // 4), reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 3))


def _trial_config(
    base: dict[str, Any], space: list[TunedParam], values: dict[str, Any], epochs: int | None, out: Path
) -> RunConfig:
    config = dict(base)
    if epochs is not None:
        config["optim"] = dict(config["optim"], epochs=epochs)
        config["optim"]["warmup_epochs"] = min(int(config["optim"]["warmup_epochs"]), epochs)
    config = apply_values(config, space, values)
    train = config["train"]
    n = int(config["optim"]["epochs"])
    train.update(output_dir=str(out), eval_every=1, checkpoint_every=n, keep_checkpoints=0, progress=False)
    return config_from_dict(config)


def _states(study: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def tune_method(
    method: str,
    cfg: RunConfig,
    output: Path,
    settings: TuneSettings,
    data: RunData | None = None,
    study_prefix: str = "",
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search ``cfg``'s hyperparameters on validation (one study ``<prefix><method>``), write the best
    config as ``<output>/<method>/best.yaml``, the trials as ``trials.csv`` and ``summary.json``, and (with
    ``settings.final_test``) evaluate the chosen configuration on the test split once."""
    from gradtail.engine.trainer import Trainer

    directory = output / method
    task = create_task(cfg)
    name_of_objective = settings.objective or task.objectives[0]
    if name_of_objective not in task.objectives:
        raise ConfigError(
            f"tune objective {name_of_objective!r} is not one of task {task.name!r}'s: "
            f"{', '.join(task.objectives)}"
        )
    space = task.search_space()
    if not space:
        reason = "its components declare no hyperparameters"
        log(f"gradtail tune: {method}: nothing to tune ({reason})")
        return TuneResult(
            method, "", name_of_objective, None, {}, None, {}, 0.0, str(directory), skipped=reason
        )
    optuna = _optuna()
    if data is None:
        data = task.build_data()
    val_data = ValidationOnlyData(data)
    storage = make_storage(
        settings.storage or f"sqlite:///{(output / 'study.db').resolve()}", settings.stale_after
    )
    name = f"{study_prefix}{method}"
    trial_epochs = settings.epochs or cfg.optim.epochs
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=_pruner(settings, trial_epochs),
        load_if_exists=True,
    )
    study.set_user_attr("objective", name_of_objective)
    study.set_user_attr("space", [p.key for p in space])
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(defaults(space), user_attrs={"default": True}, skip_if_exists=True)
    base = cfg.to_dict()
    parent = open_parent_run(
        cfg, f"tune {method}", study.user_attrs.get("mlflow_run_id"),
        {"gradtail.study": name, "gradtail.objective": name_of_objective, "gradtail.task": cfg.task},
    )  # fmt: skip
    if parent is not None:
        study.set_user_attr("mlflow_run_id", parent)

    def objective(trial: Any) -> float:
        values = suggest(trial, space, trial_epochs)
        trial_cfg = _trial_config(
            base, space, values, settings.epochs, directory / "trials" / f"{trial.number:04d}"
        )
        trial.set_user_attr("config", describe_values(space, values, trial_epochs))
        start = time.perf_counter()

        def report(record: dict[str, Any]) -> None:
            value = objective_value(record["val"], settings, task)
            trial.report(value, record["epoch"])
            if trial.should_prune():
                trial.set_user_attr("seconds", time.perf_counter() - start)
                raise optuna.TrialPruned(
                    f"validation {name_of_objective} {value:.4f} at epoch {record['epoch']}"
                )

        trainer = Trainer(trial_cfg, data=val_data, output_dir=trial_cfg.train.output_dir, verbose=False)
        if parent is not None:  # the trial's MLflow run, under the study's
            trainer.tracking_nesting = Nesting(parent, f"trial {trial.number}")
        try:
            final = trainer.fit(overwrite=True, on_epoch_end=report)
        except BaseException:  # pruned (or failed): its MLflow run ends, not left running
            trainer.tracker.close("KILLED")
            raise
        trial.set_user_attr("seconds", time.perf_counter() - start)
        return objective_value(final["val_last_epoch"], settings, task)

    def enough(study: Any, trial: Any) -> None:
        counts = _states(study)
        if (
            sum(counts.get(s, 0) for s in FINISHED) >= settings.trials
            or counts.get("FAIL", 0) > settings.trials
        ):
            study.stop()

    start = time.perf_counter()
    before = _states(study)
    done = sum(before.get(s, 0) for s in FINISHED)
    if done < settings.trials:
        log(
            f"gradtail tune: {method}: {len(space)} parameters, {done}/{settings.trials} trials done "
            f"-> {directory}"
        )
        study.optimize(
            objective,
            timeout=settings.timeout,
            callbacks=[enough],
            catch=(TrainingError,),
            gc_after_trial=True,
        )
    wall = time.perf_counter() - start
    # the chosen values as best.yaml holds them (epoch fractions on the method's own schedule)
    result = _summarise(method, name, study, space, name_of_objective, cfg.optim.epochs, directory, wall)
    if result.best_value is not None:
        best = study.best_trial
        best_config = apply_values(base, space, best.params)
        best_cfg = config_from_dict(best_config)
        path = directory / "best.yaml"
        header = (
            f"# gradtail tune: {method}, study {name!r}, best of {result.trials.get('COMPLETE', 0)} complete "
            f"trials (validation {name_of_objective} {best.value:.4f}; default {result.default_value})\n"
        )
        _write(path, header + dump_config(best_cfg))
        result.best_config = str(path)
        if settings.final_test:
            nesting = Nesting(parent, "final") if parent is not None else None
            result.final = _final_run(
                best_cfg, data, directory / "final", settings.overwrite, log, method, nesting
            )
    best_metrics = {} if result.best_value is None else {f"best_{name_of_objective}": result.best_value}
    best_tags = {f"gradtail.best.{k}": v for k, v in result.best_params.items()}
    close_parent_run(cfg, parent, best_metrics, best_tags, sum(result.trials.get(s, 0) for s in FINISHED))
    _write(directory / "summary.json", json.dumps(result.to_dict(), indent=1))
    _write_trials_csv(directory / "trials.csv", study, space, trial_epochs)
    return result


def _summarise(
    method: str,
    name: str,
    study: Any,
    space: list[TunedParam],
    objective: str,
    epochs: int,
    directory: Path,
    wall: float,
) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    default = next((t for t in trials if t.user_attrs.get("default")), None)
    best = max(complete, key=lambda t: t.value) if complete else None
    seconds = sum(float(t.user_attrs.get("seconds", 0.0)) for t in trials)
    return TuneResult(
        method=method,
        study=name,
        objective=objective,
        best_value=best.value if best else None,
        best_params=describe_values(space, best.params, epochs) if best else {},
        default_value=default.value if default is not None and default.state.name == "COMPLETE" else None,
        trials=_states(study),
        wall_seconds=max(wall, seconds),
        directory=str(directory),
        space=[p.key for p in space],
    )


def _final_run(
    cfg: RunConfig,
    data: RunData,
    out: Path,
    overwrite: bool,
    log: Callable[[str], None],
    method: str,
    nesting: Nesting | None = None,
) -> dict[str, Any]:
    """Train the chosen configuration on its full schedule and evaluate the test split once."""
    from gradtail.engine.trainer import Trainer
    from gradtail.rundir import RunDirectory

    cfg.train.output_dir = str(out)
    cfg.train.progress = False
    previous = RunDirectory(out).read_final()
    if previous is not None and previous.get("config_hash") == cfg.hash():
        log(f"gradtail tune: {method}: the chosen configuration's test run is done ({out})")
        return previous["last_epoch"]
    log(f"gradtail tune: {method}: training the chosen configuration, then one test evaluation -> {out}")
    trainer = Trainer(cfg, data=data, output_dir=out, verbose=False)
    trainer.tracking_nesting = nesting
    final = trainer.fit(resume=not overwrite, overwrite=overwrite)
    return dict(final["last_epoch"])


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _write_trials_csv(path: Path, study: Any, space: list[TunedParam], epochs: int) -> None:
    keys = [p.key for p in space]
    rows = []
    for t in study.get_trials(deepcopy=False):
        config = describe_values(space, t.params, epochs) if t.params else {}
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append(
            [
                t.number,
                t.state.name,
                "" if t.value is None else f"{t.value:.6f}",
                last or "",
                f"{float(t.user_attrs.get('seconds', 0.0)):.1f}",
                "yes" if t.user_attrs.get("default") else "",
            ]
            + [config.get(k, "") for k in keys]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "value", "epochs_run", "seconds", "default", *keys])
        writer.writerows(rows)


__all__ = [
    "ForbiddenSplitRead",
    "TuneResult",
    "TuneSettings",
    "ValidationOnlyData",
    "make_storage",
    "objective_value",
    "tune_method",
]
