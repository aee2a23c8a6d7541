"""The CLI: a run end to end, and one-line errors for bad input."""

import subprocess
import sys

import yaml

from gradtail.cli.main import main

TINY = {
    "name": "cli_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 10,
        "val_per_class": 3,
        "synthetic": {"num_classes": 3, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False},
}


def _write(tmp_path, cfg):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_train_then_eval(tmp_path, capsys):
    p = _write(tmp_path, TINY)
    assert main(["train", str(p), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "| method" in out and "cli_tiny" in out and "many" in out
    assert main(["eval", str(tmp_path / "run" / "checkpoints" / "last.pt")]) == 0
    assert "cli_tiny" in capsys.readouterr().out


def test_stop_and_resume_via_cli(tmp_path, capsys):
    p = _write(tmp_path, TINY)
    run = str(tmp_path / "run")
    assert main(["train", str(p), "--output", run, "--stop-after", "1"]) == 0
    assert "stopped after epoch 1" in capsys.readouterr().out
    assert main(["train", str(p), "--output", run, "--resume"]) == 0


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "gradtail", *args], capture_output=True, text=True, timeout=120
    )


def test_unknown_key_is_one_line(tmp_path):
    cfg = dict(TINY, optim={"learning_rate": 0.1})
    r = _cli("train", str(_write(tmp_path, cfg)))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "optim.learning_rate" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_dir_without_download_is_one_line(tmp_path):
    cfg = dict(
        TINY, data={"dataset": "fashion_mnist", "data_dir": str(tmp_path / "nowhere"), "download": False}
    )
    r = _cli("train", str(_write(tmp_path, cfg)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "nowhere" in r.stderr


def test_bad_override_and_missing_checkpoint(tmp_path):
    r = _cli("train", str(_write(tmp_path, TINY)), "--set", "optim.epochs=many")
    assert r.returncode == 2 and "optim.epochs" in r.stderr and "Traceback" not in r.stderr
    r = _cli("eval", str(tmp_path / "missing.pt"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
