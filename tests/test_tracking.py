"""Experiment tracking (issue 31, ``log:``): TensorBoard events and MLflow runs read back hold exactly the
numbers of ``metrics.jsonl`` and ``final.json``; a resumed run logs every epoch once; only rank 0 logs;
``gradtail tune`` nests one MLflow run per trial under its study's run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gradtail.config import config_from_dict
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError
from gradtail.rundir import RunDirectory
from gradtail.tracking import flatten_metrics, group_means, start_tracking

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tiny(tmp_path: Path, **over: object) -> dict:
    """A 4-class synthetic run that takes a second, with both trackers on (MLflow in a temp file store)."""
    cfg: dict = {
        "name": "tracked",
        "data": {
            "dataset": "synthetic",
            "imbalance_factor": 10,
            "val_per_class": 4,
            "synthetic": {"num_classes": 4, "per_class": 44, "test_per_class": 10, "image_size": 12},
        },
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "optim": {"lr": 0.05, "batch_size": 16, "epochs": 4, "warmup_epochs": 1, "schedule": "cosine"},
        "train": {"seed": 1, "progress": False},
        "eval": {"posthoc": ["posthoc_la"], "many_threshold": 30, "few_threshold": 10},
        "log": {"tensorboard": True, "mlflow": True, "mlflow_uri": (tmp_path / "mlruns").as_uri()},
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def expected_series(run: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` of metrics.jsonl, plus final.json's test and post-hoc numbers at the
    last epoch: what the trackers must hold."""
    records = RunDirectory(run).read_metrics()
    series: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in flatten_metrics(record).items():
            series.setdefault(key, {})[record["epoch"]] = value
    final = json.loads((run / "final.json").read_text())
    last = records[-1]["epoch"]
    for key, value in flatten_metrics(final["last_epoch"], "test/").items():
        series.setdefault(key, {})[last] = value
    for name, result in final["posthoc"].items():
        for key, value in flatten_metrics(result, f"posthoc/{name}/").items():
            series.setdefault(key, {})[last] = value
    return series


def tensorboard_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_series(uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=uri)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def run_id_of(run: Path) -> str:
    return json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]


def assert_exact(run: Path, uri: str) -> None:
    """Both trackers hold exactly one value per (metric, epoch), equal to the run's files (TensorBoard
    stores float32)."""
    expected = expected_series(run)
    tb = tensorboard_series(run)
    assert set(tb) == set(expected)
    for key, by_step in expected.items():
        got = tb[key]
        assert [s for s, _ in got] == sorted(by_step), key  # every step once, in order
        assert all(v == np.float32(by_step[s]) for s, v in got), key
    client = MlflowClient(tracking_uri=uri)
    run_id = run_id_of(run)
    assert set(client.get_run(run_id).data.metrics) == set(expected)
    for key, got in mlflow_series(uri, run_id, list(expected)).items():
        assert sorted(s for s, _ in got) == sorted(expected[key]), key
        assert all(v == expected[key][s] for s, v in got), key


@pytest.fixture(autouse=True)
def _file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def test_trackers_hold_exactly_the_values_of_metrics_jsonl(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path))
    run = tmp_path / "run"
    final = Trainer(cfg, output_dir=run, verbose=False).fit()
    assert_exact(run, cfg.log.mlflow_uri)
    series = expected_series(run)
    # the group metrics and the gradient-ratio summary per class group, every epoch
    for key in ("val/many", "val/medium", "val/few", "grad_ratio/many", "grad_ratio/medium", "grad_ratio/few",
                "train_loss", "lr", "test/top1", "test/few", "posthoc/posthoc_la/top1"):  # fmt: skip
        assert key in series, key
    assert sorted(series["grad_ratio/few"]) == [1, 2, 3, 4]
    # the config as hyperparameters, tags, the run finished
    client = MlflowClient(tracking_uri=cfg.log.mlflow_uri)
    mlrun = client.get_run(run_id_of(run))
    assert mlrun.data.params["optim.lr"] == "0.05" and mlrun.data.params["loss.name"] == "ce"
    assert mlrun.data.tags["gradtail.config_hash"] == final["config_hash"] == cfg.hash()
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tracked"


def test_grad_ratio_is_the_group_mean_of_the_diagnostics(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(tmp_path, log__tensorboard=False, log__mlflow=False))
    trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
    trainer.fit()
    groups = trainer.task.class_groups(trainer.eval_view())
    counts = trainer.data.class_counts  # Many > 30 > Medium > 10 > Few (eval.*_threshold)
    assert groups == {
        "many": [c for c, n in enumerate(counts) if n > 30],
        "medium": [c for c, n in enumerate(counts) if 10 <= n <= 30],
        "few": [c for c, n in enumerate(counts) if n < 10],
    }
    assert all(groups.values())
    for record, snap in zip(trainer.history, trainer.diagnostics.history, strict=True):
        assert record["grad_ratio"] == group_means(snap["g"], groups)
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not (tmp_path / "run" / "tracking.json").exists()


@pytest.mark.parametrize("checkpoint_every", [1, 2], ids=["checkpointed", "epoch-lost"])
def test_a_resumed_run_logs_every_epoch_once(tmp_path: Path, checkpoint_every: int) -> None:
    """Killed after epoch 3: with a checkpoint every epoch the run continues its MLflow run; with one every
    2 epochs epoch 3 is trained again, so its logged values are withdrawn (TensorBoard purges them, the
    MLflow run is replaced) and each epoch appears once, with the values of the finished run."""
    raw = tiny(tmp_path, train__checkpoint_every=checkpoint_every)
    cfg = config_from_dict(raw)
    run = tmp_path / "run"
    Trainer(cfg, output_dir=run, verbose=False).fit(stop_after=3)
    first_id = run_id_of(run)
    client = MlflowClient(tracking_uri=cfg.log.mlflow_uri)
    assert client.get_run(first_id).info.status == "KILLED"
    assert sorted(m.step for m in client.get_metric_history(first_id, "train_loss")) == [1, 2, 3]
    Trainer(config_from_dict(raw), output_dir=run, verbose=False).fit(resume=True)
    assert_exact(run, cfg.log.mlflow_uri)
    if checkpoint_every == 1:
        assert run_id_of(run) == first_id
    else:
        assert run_id_of(run) != first_id
        assert client.get_run(first_id).info.lifecycle_stage == "deleted"
    # the same numbers as an uninterrupted run (the resume is bit-identical)
    straight = tmp_path / "straight"
    Trainer(config_from_dict(tiny(tmp_path / "other", log__tensorboard=False, log__mlflow=False)),
            output_dir=straight, verbose=False).fit()  # fmt: skip
    keep = ("train_loss", "val/top1", "grad_ratio/few")
    assert {k: v for k, v in expected_series(run).items() if k in keep} == {
        k: v for k, v in expected_series(straight).items() if k in keep
    }
    # resuming the finished run evaluates it again: still one value per step
    Trainer(config_from_dict(raw), output_dir=run, verbose=False).fit(resume=True)
    assert_exact(run, cfg.log.mlflow_uri)


def test_log_keys_are_resume_safe_and_outside_the_config_hash(tmp_path: Path) -> None:
    off = config_from_dict(tiny(tmp_path, log__tensorboard=False, log__mlflow=False))
    on = config_from_dict(tiny(tmp_path))
    assert off.hash() == on.hash() and off.to_dict()["log"] != on.to_dict()["log"]
    run = tmp_path / "run"
    Trainer(off, output_dir=run, verbose=False).fit(stop_after=2)
    final = Trainer(on, output_dir=run, verbose=False).fit(resume=True)  # trackers turned on: accepted
    assert set(final["resumes"][0]["changed"]) == {"log.tensorboard", "log.mlflow"}
    assert_exact(run, on.log.mlflow_uri)  # the epochs trained before the trackers were on are there too


def test_only_the_main_process_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradtail.tracking as tracking

    monkeypatch.setattr(tracking, "is_main_process", lambda: False)
    cfg = config_from_dict(tiny(tmp_path))
    tracker = start_tracking(cfg, RunDirectory(tmp_path / "run"), [], resumed=False)
    assert not tracker.enabled
    tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
    tracker.close()
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()


def test_a_missing_extra_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    cfg = config_from_dict(tiny(tmp_path, log__tensorboard=False))
    with pytest.raises(ConfigError, match=r"log.mlflow needs MLflow: pip install 'gradtail\[track\]'"):
        start_tracking(cfg, RunDirectory(tmp_path / "run"), [], resumed=False)


def test_default_store_is_mlruns_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    raw = tiny(tmp_path, log__tensorboard=False, optim__epochs=1)
    raw["log"].pop("mlflow_uri")
    raw["eval"]["posthoc"] = []
    Trainer(config_from_dict(raw), output_dir=tmp_path / "run", verbose=False).fit()
    record = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]
    assert record["tracking_uri"] == (tmp_path / "mlruns").resolve().as_uri()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 keeps its file store behind it
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    assert client.get_experiment_by_name("gradtail") is not None


def test_tune_nests_one_mlflow_run_per_trial_under_the_study(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from gradtail.tune import TuneSettings
    from gradtail.tune.study import tune_method

    raw = tiny(tmp_path, log__tensorboard=False, optim__epochs=2)
    raw["loss"] = {"name": "focal"}
    raw["eval"]["posthoc"] = []
    cfg = config_from_dict(raw)
    settings = TuneSettings(trials=3, epochs=2, pruner="none", final_test=True, stale_after=10.0)
    result = tune_method("focal", cfg, tmp_path / "tune", settings, log=lambda _: None)
    assert result.trials.get("COMPLETE") == 3
    client = MlflowClient(tracking_uri=cfg.log.mlflow_uri)
    experiment = client.get_experiment_by_name("gradtail")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "tune focal"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["final", "trial 0", "trial 1", "trial 2"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.metrics["best_balanced_accuracy"] == pytest.approx(result.best_value)
    # a trial's MLflow run holds its run directory's epochs
    trial0 = next(r for r in children if r.info.run_name == "trial 0")
    records = RunDirectory(tmp_path / "tune" / "focal" / "trials" / "0000").read_metrics()
    history = client.get_metric_history(trial0.info.run_id, "val/balanced_accuracy")
    want = [(r["epoch"], r["val"]["balanced_accuracy"]) for r in records]
    assert [(m.step, m.value) for m in history] == want


def test_overwrite_removes_the_trackers_files(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    (run.tensorboard_dir).mkdir(parents=True)
    (run.tensorboard_dir / "events.out.tfevents.1").write_bytes(b"")
    run.write_json("tracking.json", {"mlflow": {"run_id": "x"}})
    (run.path / "export").mkdir()
    (run.path / "export" / "model.onnx").write_bytes(b"")
    (run.path / "notes.txt").write_text("mine")
    run.start("overwrite")
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]
