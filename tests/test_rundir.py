"""The run directory's rules (issue 13 faults 1, 2, 5, 6): refuse / resume / overwrite, config checks on
resume, output faults as one-line errors with nothing half-written, a corrupt last checkpoint."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import gradtail.rundir as rundir_module
from gradtail.cli.main import main
from gradtail.errors import DataError, OutputError
from gradtail.rundir import (
    RESUME_SAFE_KEYS,
    RunDirectory,
    config_changes,
    load_checkpoint,
    resume_config_changes,
    save_checkpoint,
)

TINY = {
    "name": "rundir_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 10,
        "val_per_class": 3,
        "synthetic": {"num_classes": 3, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"lr": 0.05, "batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False, "diagnostics": False},
}


def _config(tmp_path: Path, **optim) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["optim"].update(optim)
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ fault 1: an existing run
def test_train_refuses_a_directory_holding_a_run(tmp_path, capsys, monkeypatch):
    cfg, run = _config(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run)]) == 0
    final = (run / "final.json").read_text()
    last = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()

    def no_data(*args, **kwargs):
        raise AssertionError("the refusal must come before the data is loaded")

    monkeypatch.setattr("gradtail.tasks.classification.build_data", no_data)
    assert main(["train", str(cfg), "--output", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no run header printed either
    err = captured.err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err
    assert "already holds a finished run (2 epochs)" in err and "--resume" in err and "--overwrite" in err
    # nothing was touched
    assert _epochs(run) == [1, 2]
    assert (run / "final.json").read_text() == final
    assert (run / "checkpoints" / "last.pt").read_bytes() == last


def test_an_unfinished_run_is_refused_too_and_overwrite_replaces_it(tmp_path, capsys):
    cfg, run = _config(tmp_path, epochs=3), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run), "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--output", str(run)]) == 2
    assert "unfinished run (2 epochs recorded)" in _one_line_error(capsys)
    (run / "extras").mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(cfg), "--output", str(run), "--overwrite", "--stop-after", "1"]) == 0
    assert _epochs(run) == [1]  # the old epochs are gone, not mixed in
    assert not (run / "extras").exists() and (run / "notes.txt").read_text() == "mine"
    assert main(["train", str(cfg), "--output", str(run), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in _one_line_error(capsys)


# ------------------------------------------------------------------ fault 2: resume with another config
def test_resume_refuses_a_changed_learning_rate_or_epoch_count(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--output", str(run), "--stop-after", "1"]) == 0
    capsys.readouterr()
    for changed, key in ((_config(tmp_path, lr=0.01), "optim.lr: 0.05 -> 0.01"),
                         (_config(tmp_path, epochs=4), "optim.epochs: 2 -> 4")):  # fmt: skip
        assert main(["train", str(changed), "--output", str(run), "--resume"]) == 2
        err = _one_line_error(capsys)
        assert key in err and "--overwrite" in err
    assert _epochs(run) == [1]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["config"]["optim"]["lr"] == 0.05 and state["epoch"] == 1


def test_resume_accepts_safe_keys_and_records_the_change(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--output", str(run), "--stop-after", "1"]) == 0
    args = ["--set", "train.checkpoint_every=2", "--set", "eval.batch_size=7"]
    assert main(["train", str(cfg), "--output", str(run), "--resume", *args]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["resumes"] == [
        {"at_epoch": 1, "changed": {"eval.batch_size": [1000, 7], "train.checkpoint_every": [1, 2]}}
    ]
    assert _epochs(run) == [1, 2]


def test_resume_config_changes_lists_only_safe_keys():
    loss = {"params": {"a": 1}}
    saved = {"optim": {"lr": 0.1}, "train": {"progress": True, "device": "cpu"}, "loss": loss}
    same_but_safe = {"optim": {"lr": 0.1}, "train": {"progress": False, "device": "cuda"}, "loss": loss}
    got = resume_config_changes(saved, same_but_safe, Path("r"))
    assert got == {"train.device": ["cpu", "cuda"], "train.progress": [True, False]}
    assert set(got) <= RESUME_SAFE_KEYS
    with pytest.raises(Exception, match=r"loss\.params: \{'a': 1\} -> \{'a': 2\}"):
        resume_config_changes(saved, {**saved, "loss": {"params": {"a": 2}}}, Path("r"))
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == {"a.c": [None, 2]}
    # a tuple-valued option (the FM benchmarks' train_counts) equals the list its config.yaml reads back as
    assert config_changes({"x": {"counts": [3, 2]}}, {"x": {"counts": (3, 2)}}) == {}
    changed = config_changes({"x": {"counts": [3, 2]}}, {"x": {"counts": (3, 1)}})
    assert changed == {"x.counts": [[3, 2], [3, 1]]}


# ------------------------------------------------------------------ fault 5: output faults
def test_output_path_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", str(_config(tmp_path)), "--output", str(blocker / "run")]) == 2
    err = _one_line_error(capsys)
    assert "cannot create output directory" in err and str(blocker / "run") in err


def test_read_only_output_directory_fails_before_training(tmp_path, capsys, monkeypatch):
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.name == ".write_probe":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--output", str(run)]) == 2
    err = _one_line_error(capsys)
    assert "cannot write into output directory" in err and "Permission denied" in err
    assert not (run / "metrics.jsonl").exists()


def test_full_disk_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path)
    real_save = torch.save

    def short_write(obj, f, *a, **k):  # what PyTorch reports when the disk fills mid-file
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 117440 vs 117328")

    monkeypatch.setattr(rundir_module.torch, "save", short_write)
    with pytest.raises(OutputError, match=r"cannot write checkpoint .*last\.pt: RuntimeError: .*unexpected"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path)
    assert list(path.parent.iterdir()) == [path]  # no *.tmp left behind
    monkeypatch.setattr(rundir_module.torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is intact


def test_full_disk_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    def no_space(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir_module.torch, "save", no_space)
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--output", str(run)]) == 2
    err = _one_line_error(capsys)
    assert "No space left on device" in err and ("last.pt" in err or "best.pt" in err)
    assert not list((run / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------ fault 6: a corrupt last checkpoint
def test_corrupt_last_checkpoint_names_the_intact_epoch_checkpoint(tmp_path, capsys):
    cfg, run = _config(tmp_path, epochs=3), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run), "--stop-after", "2", "--set",
                 "train.keep_checkpoints=2"]) == 0  # fmt: skip
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    capsys.readouterr()
    keep = ["--set", "train.keep_checkpoints=2"]
    assert main(["train", str(cfg), "--output", str(run), "--resume", *keep]) == 2
    err = _one_line_error(capsys)
    intact = run / "checkpoints" / "epoch_0002.pt"
    assert "last.pt is corrupt" in err and f"{intact} (epoch 2) is intact" in err
    assert f"--resume {intact}" in err
    args = ["--resume", str(intact), "--set", "train.keep_checkpoints=2"]
    assert main(["train", str(cfg), "--output", str(run), *args]) == 0
    assert _epochs(run) == [1, 2, 3]


def test_corrupt_checkpoints_without_an_intact_one(tmp_path):
    run = RunDirectory(tmp_path)
    run.last_checkpoint.parent.mkdir(parents=True)
    run.last_checkpoint.write_bytes(b"garbage")
    run.epoch_checkpoint(1).write_bytes(b"garbage")
    with pytest.raises(DataError, match="no intact epoch checkpoint is kept: start again with --overwrite"):
        run.load_resume_checkpoint()
    assert RunDirectory(tmp_path / "none").load_resume_checkpoint() is None


# ------------------------------------------------------------------ the bench runner goes through it too
def test_bench_refuses_run_directories_of_another_config_before_training(tmp_path, capsys):
    suite = {
        "name": "s",
        "base": str(_config(tmp_path)),
        "seeds": [0],
        "methods": {"ce": {}, "focal": {"loss": {"name": "focal"}}},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "bench"
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 0
    focal_final = (out / "focal" / "seed0" / "final.json").read_text()
    suite["methods"]["ce"] = {"optim": {"lr": 0.02}}  # the suite is edited: ce's finished run is stale
    path.write_text(yaml.safe_dump(suite))
    capsys.readouterr()
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "1 run directory of this suite holds a run of another config" in err and "--overwrite" in err
    assert "optim.lr: 0.05 -> 0.02" in err
    assert main(["bench", str(path), "--output", str(out), "--no-progress", "--overwrite"]) == 0
    assert "retraining (another config)" in capsys.readouterr().out
    saved = yaml.safe_load((out / "ce" / "seed0" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.02 and _epochs(out / "ce" / "seed0") == [1, 2]
    assert (out / "focal" / "seed0" / "final.json").read_text() == focal_final  # untouched
