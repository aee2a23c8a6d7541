"""Experiment tracking: a run's numbers also sent to TensorBoard and MLflow (the ``log:`` section of a run
config, off by default; optional extra ``pip install 'gradtail[track]'``).

What is logged, with the epoch number as the step (the trainer calls :meth:`Tracker.log_epoch` once an
epoch's record is written to ``metrics.jsonl`` and checkpointed, and :meth:`Tracker.log_final` at the end):

- every number of the epoch's record, nested keys joined by ``/``: ``train_loss``, ``lr``,
  ``train_seconds``, ``steps`` (and a detector's loss terms, an update rule's summary), ``val/<metric>``
  with the task's group metrics (``val/many``, ``val/medium``, ``val/few``; ``val/miou_frequent`` ...;
  ``val/APr`` ...), ``test_curve/<metric>`` with ``eval.test_curve``, and ``grad_ratio/<group>``, the mean
  gradient ratio g_j = P_j / N_j of each class group (:func:`group_means`);
- at the end, step = the last epoch: the test metrics (``test/<metric>``) and the post-hoc results
  (``posthoc/<name>/<metric>``), the numbers of ``final.json``;
- the resolved config as hyperparameters (MLflow params ``data.dataset``, ``optim.lr``, ...; a
  ``config`` text in TensorBoard), and tags naming the task, the config hash and the run directory.

Backends:

- **TensorBoard** (``log.tensorboard``): event files in ``<run>/tensorboard/`` (``tensorboard --logdir
  runs/``). A resumed run writes a purge marker at step 1 and logs the checkpoint's epochs again, so
  TensorBoard shows every epoch exactly once, whatever epochs the interrupted process had logged.
- **MLflow** (``log.mlflow``): one MLflow run per training run in the experiment ``log.mlflow_experiment``,
  at ``log.mlflow_uri`` (default: a local file store, ``./mlruns``; any tracking URI MLflow takes). The
  run's id is kept in ``<run>/tracking.json``: a resumed run continues its MLflow run, logging the
  checkpoint's epochs that it lacks; when the interrupted process had logged epochs that the checkpoint
  does not hold (they are trained again), or the final numbers (a finished run resumed is evaluated
  again), that MLflow run is deleted and a new one gets the whole history, so no step is ever logged
  twice. ``gradtail tune`` nests one MLflow run per trial under one run per
  study (:class:`Nesting`).

Only the main process logs (rank 0 under ``torchrun``); the others get a tracker without backends.
"""

from __future__ import annotations

import atexit
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gradtail.config import RunConfig, dump_config
from gradtail.distributed import is_main_process
from gradtail.errors import ConfigError, OutputError
from gradtail.rundir import TRACKING, RunDirectory

EXTRA = "pip install 'gradtail[track]'"
STEP_KEY = "epoch"  # the record's key that is the step, never a metric itself
TRAIN_LOSS = "train_loss"  # every epoch record has it: the key whose logged steps a resume checks
FINAL_PREFIXES = ("test/", "posthoc/")  # what Tracker.log_final logs
MLFLOW_PARAM_LIMIT = 6000  # MLflow's limit on a parameter value's length


def flatten_metrics(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested keys joined by ``/`` (``{"val": {"top1": 0.5}}`` ->
    ``{"val/top1": 0.5}``); the ``epoch`` key, None, booleans, strings and lists are left out.

    Example:
        >>> flatten_metrics({"epoch": 2, "train_loss": 0.5, "val": {"top1": 0.75, "few": None}})
        {'train_loss': 0.5, 'val/top1': 0.75}
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key == STEP_KEY:
            continue
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def config_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as ``{"optim.lr": "0.1", ...}`` (sections flattened; ``params`` mappings and lists as
    JSON), for trackers' hyperparameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key not in ("params", "posthoc_params", "synthetic",
                                                                 "sampler_params"):  # fmt: skip
            out.update(config_params(value, f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = str(value)
    return out


def group_means(values: Sequence[float], groups: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
    """The mean of ``values`` (one per class) over each group's classes; None for an empty group.

    Example:
        >>> group_means([2.0, 1.0, 0.5, 0.25], {"many": [0], "medium": [1, 2], "few": [3], "none": []})
        {'many': 2.0, 'medium': 0.75, 'few': 0.25, 'none': None}
    """
    out: dict[str, float | None] = {}
    for name, members in groups.items():
        picked = [float(values[int(c)]) for c in members if 0 <= int(c) < len(values)]
        out[str(name)] = sum(picked) / len(picked) if picked else None
    return out


@dataclass(frozen=True)
class Nesting:
    """Where a run's MLflow run sits: under the MLflow run ``parent_run_id`` (a ``gradtail tune`` study's),
    named ``run_name`` (a trial's number)."""

    parent_run_id: str
    run_name: str


class Backend(Protocol):
    """One experiment tracker."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardBackend:
    """Scalars in ``<run>/tensorboard/`` through ``torch.utils.tensorboard.SummaryWriter``.

    ``history``: the epoch records the run already has (a resume: the checkpoint's); when the folder
    already holds event files, a purge marker at step 1 hides everything logged before and ``history`` is
    logged again, so every step appears exactly once.
    """

    def __init__(self, folder: Path, cfg: RunConfig, history: Sequence[Mapping[str, Any]]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"log.tensorboard needs TensorBoard: {EXTRA}") from None
        earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=1 if earlier else None)
        except OSError as e:
            raise OutputError(f"cannot write TensorBoard events into {folder}: {e.strerror or e}") from None
        if not earlier:
            self.writer.add_text("config", "```\n" + dump_config(cfg) + "\n```", global_step=0)
        for record in history:
            self.log_metrics(flatten_metrics(record), int(record[STEP_KEY]))
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- MLflow


def default_mlflow_uri() -> str:
    """``./mlruns`` as a file-store URI (MLflow's historical default location)."""
    return (Path.cwd() / "mlruns").resolve().as_uri()


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith(("databricks", "sqlite")))


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; a missing extra is a one-line :class:`ConfigError`. MLflow 3 keeps
    its file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set for file-store
    URIs only (the default ``./mlruns``)."""
    if _is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"log.mlflow needs MLflow: {EXTRA}") from None
    return MlflowClient(tracking_uri=uri)


def mlflow_experiment(client: Any, name: str) -> str:
    """The id of the experiment ``name``, created when missing (another process may create it first)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _log_batch(client: Any, run_id: str, metrics: Mapping[str, float] = {}, step: int = 0,
               params: Mapping[str, str] = {}) -> None:  # fmt: skip
    """Metrics (one step) and params in batches of MLflow's limits."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start : start + 500])
    plist = [Param(k[:250], str(v)[:MLFLOW_PARAM_LIMIT]) for k, v in params.items()]
    for start in range(0, len(plist), 100):
        client.log_batch(run_id, params=plist[start : start + 100])


class MLflowBackend:
    """One MLflow run per training run (module docstring: resumes never log a step twice)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: RunDirectory,
        history: Sequence[Mapping[str, Any]],
        resumed: bool,
        nesting: Nesting | None = None,
    ) -> None:
        uri = cfg.log.mlflow_uri or default_mlflow_uri()
        self.client = mlflow_client(uri)
        try:
            self.run_id = self._open(uri, cfg, run_dir, history, resumed, nesting)
        except (ConfigError, OutputError):
            raise
        except Exception as e:  # an unreachable server, a bad URI: one line, not MLflow's traceback
            first = " ".join(str(e).split())[:300]
            raise OutputError(f"cannot log to MLflow at {uri!r}: {e.__class__.__name__}: {first}") from None

    def _open(
        self,
        uri: str,
        cfg: RunConfig,
        run_dir: RunDirectory,
        history: Sequence[Mapping[str, Any]],
        resumed: bool,
        nesting: Nesting | None,
    ) -> str:
        client = self.client
        last = int(history[-1][STEP_KEY]) if history else 0
        previous = _read_tracking(run_dir).get("mlflow", {}) if resumed else {}
        run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
                alive = run.info.lifecycle_stage == "active"
            except Exception:  # deleted for good, or another store
                alive = False
            if alive:
                logged = {int(m.step) for m in client.get_metric_history(run_id, TRAIN_LOSS)}
                ended = any(k.startswith(FINAL_PREFIXES) for k in run.data.metrics)  # re-evaluated run
                if ended or any(step > last for step in logged):  # epochs the checkpoint does not hold
                    client.delete_run(run_id)
                else:
                    client.update_run(run_id, status="RUNNING")
                    for record in history:
                        if int(record[STEP_KEY]) not in logged:
                            _log_batch(client, run_id, flatten_metrics(record), int(record[STEP_KEY]))
                    return str(run_id)
        experiment_id = mlflow_experiment(client, cfg.log.mlflow_experiment)
        tags = {
            "gradtail.task": cfg.task,
            "gradtail.config_hash": cfg.hash(),
            "gradtail.run_dir": str(run_dir.path.resolve()),
        }
        if nesting is not None:
            tags["mlflow.parentRunId"] = nesting.parent_run_id
        name = nesting.run_name if nesting is not None else cfg.name
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        run_id = str(run.info.run_id)
        _log_batch(client, run_id, params=config_params(cfg.to_dict()))
        for record in history:
            _log_batch(client, run_id, flatten_metrics(record), int(record[STEP_KEY]))
        run_dir.write_json(TRACKING, {"mlflow": {"tracking_uri": uri, "experiment_id": experiment_id,
                                                 "run_id": run_id}})  # fmt: skip
        return run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        _log_batch(self.client, self.run_id, metrics, step)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _read_tracking(run_dir: RunDirectory) -> dict[str, Any]:
    """``tracking.json`` of the run, or {} when there is none (or it is unreadable)."""
    try:
        data = json.loads(run_dir.file(TRACKING).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def open_parent_run(cfg: RunConfig, run_name: str, run_id: str | None = None,
                    tags: Mapping[str, str] | None = None) -> str | None:  # fmt: skip
    """The MLflow run other runs nest under (a ``gradtail tune`` study's): ``run_id`` when it still
    exists (a resumed tune), else a new run named ``run_name``; None without ``log.mlflow`` or off the
    main process."""
    if not cfg.log.mlflow or not is_main_process():
        return None
    uri = cfg.log.mlflow_uri or default_mlflow_uri()
    client = mlflow_client(uri)
    try:
        if run_id is not None:
            try:
                if client.get_run(run_id).info.lifecycle_stage == "active":
                    client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # deleted, or another store: start a new one
                pass
        experiment_id = mlflow_experiment(client, cfg.log.mlflow_experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        return str(run.info.run_id)
    except Exception as e:  # an unreachable server, a bad URI: one line, not MLflow's traceback
        first = " ".join(str(e).split())[:300]
        raise OutputError(f"cannot log to MLflow at {uri!r}: {e.__class__.__name__}: {first}") from None


def close_parent_run(cfg: RunConfig, run_id: str | None, metrics: Mapping[str, float],
                     tags: Mapping[str, str], step: int) -> None:  # fmt: skip
    """Log ``metrics`` (at ``step``) and ``tags`` to the parent run and end it (FINISHED)."""
    if run_id is None:
        return
    client = mlflow_client(cfg.log.mlflow_uri or default_mlflow_uri())
    _log_batch(client, run_id, metrics, step)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value)[:MLFLOW_PARAM_LIMIT])
    client.set_terminated(run_id, status="FINISHED")


# --------------------------------------------------------------------------- the tracker


class Tracker:
    """The run's trackers (none: every call does nothing). Build it with :func:`start_tracking`."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends = list(backends)
        self._open = bool(self.backends)
        if self._open:
            atexit.register(self._at_exit)

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Every number of an epoch's record (``metrics.jsonl``), at step = its epoch."""
        if self.backends:
            metrics = flatten_metrics(record)
            for backend in self.backends:
                backend.log_metrics(metrics, int(record[STEP_KEY]))

    def log_final(self, final: Mapping[str, Any], step: int) -> None:
        """The test metrics (``test/...``) and post-hoc results (``posthoc/<name>/...``) of ``final.json``,
        at step = the last epoch."""
        if not self.backends:
            return
        metrics: dict[str, float] = {}
        if final.get("last_epoch"):
            metrics |= flatten_metrics(final["last_epoch"], "test/")
        for name, result in (final.get("posthoc") or {}).items():
            metrics |= flatten_metrics(result, f"posthoc/{name}/")
        for backend in self.backends:
            backend.log_metrics(metrics, step)

    def close(self, status: str = "FINISHED") -> None:
        """End every tracker's run (``FINISHED``; ``KILLED`` for a run stopped to be resumed; ``FAILED``)."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self._at_exit)
        for backend in self.backends:
            backend.close(status)

    def _at_exit(self) -> None:
        """A process that ends with the run open (an interrupt, an error) marks it killed."""
        if self._open:
            self.close("KILLED")


def start_tracking(
    cfg: RunConfig,
    run_dir: RunDirectory,
    history: Sequence[Mapping[str, Any]],
    resumed: bool,
    nesting: Nesting | None = None,
) -> Tracker:
    """The trackers ``cfg.log`` asks for, on the main process (a tracker without backends elsewhere or
    when none is on), with the epochs of ``history`` (a resumed run's) logged exactly once."""
    log = cfg.log
    if not is_main_process() or not (log.tensorboard or log.mlflow):
        return Tracker()
    backends: list[Backend] = []
    if log.tensorboard:
        backends.append(TensorBoardBackend(run_dir.tensorboard_dir, cfg, history))
    if log.mlflow:
        backends.append(MLflowBackend(cfg, run_dir, history, resumed, nesting))
    return Tracker(backends)


__all__ = [
    "MLflowBackend",
    "Nesting",
    "TensorBoardBackend",
    "Tracker",
    "close_parent_run",
    "config_params",
    "default_mlflow_uri",
    "flatten_metrics",
    "group_means",
    "mlflow_client",
    "mlflow_experiment",
    "open_parent_run",
    "start_tracking",
]
