"""Checkpoints hold only tensors and plain data and are read with ``weights_only=True`` (issue 31).

A checkpoint whose unpickling would create a file is refused in one line by every command that reads a
run's files (``eval``, ``predict``, ``export``, ``train --resume``; ``report`` never reads checkpoints),
and the file is never created. Checkpoints of the earlier format are refused with the upgrade command;
``gradtail checkpoint upgrade PATH --trust`` converts them, and the converted checkpoint resumes
bit-identically. Every other file gradtail reads goes through parsers, never ``eval`` or a pickle.
"""

from __future__ import annotations

import ast
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import gradtail
from gradtail.cli.main import main
from gradtail.config import config_from_dict
from gradtail.engine.checkpoint import capture_rng_state, restore_rng_state
from gradtail.engine.trainer import Trainer
from gradtail.errors import DataError
from gradtail.rundir import (
    CHECKPOINT_VERSION,
    RunDirectory,
    UnsafeCheckpointError,
    load_checkpoint,
    plain_data_problem,
    save_checkpoint,
)

SRC = Path(gradtail.__file__).parent
TINY = {
    "name": "safe_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 2,
        "val_per_class": 3,
        "synthetic": {"num_classes": 3, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 8, "epochs": 3, "lr": 0.05, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False, "seed": 3},
    "eval": {"posthoc": ["posthoc_la"]},
}


class CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if anything executes the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def malicious(path: Path, marker: Path, like: dict) -> None:
    """A file that looks like a gradtail checkpoint (model, config, version) whose pickle creates
    ``marker`` when loaded with ``weights_only=False``."""
    torch.save({**like, "rng": CreatesAFile(marker)}, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished tiny run, its config file and its test images."""
    root = tmp_path_factory.mktemp("safe")
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg_file), "--output", str(root / "run")]) == 0
    state = load_checkpoint(root / "run" / "checkpoints" / "last.pt")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 10), 40 * i, dtype=np.uint8), mode="L").save(images / f"{i}.png")
    return SimpleNamespace(root=root, cfg=cfg_file, run=root / "run", state=state, images=images)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err, err
    return err


def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(run, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "created_by_the_pickle"
    copy = tmp_path / "run"
    shutil.copytree(run.run, copy)
    like = {k: run.state[k] for k in ("model", "config", "version", "epoch")}
    evil = copy / "checkpoints" / "last.pt"
    malicious(evil, marker, like)
    why = "holds pickled objects (io.open); gradtail does not execute code from checkpoints"
    commands = {
        "eval": ["eval", str(evil)],
        "predict": ["predict", str(evil), str(run.images)],
        "export": ["export", str(copy)],
        "train --resume": ["train", str(run.cfg), "--output", str(copy), "--resume"],
        "train --resume PATH": ["train", str(run.cfg), "--output", str(tmp_path / "n"), "--resume",
                                str(evil)],
        "checkpoint upgrade": ["checkpoint", "upgrade", str(evil)],
    }
    for name, argv in commands.items():
        err = refused(capsys, argv)
        assert why in err or "pass --trust only for a file whose source you trust" in err, (name, err)
        assert not marker.exists(), name
    # cRT's stage-1 checkpoint (train.init_from)
    err = refused(capsys, ["train", str(run.cfg), "--output", str(tmp_path / "crt"),
                           "--set", f"train.init_from={evil}"])  # fmt: skip
    assert why in err and not marker.exists()
    # the validation-selected weights (best.pt: eval reads them) and a fitted post-hoc state (predict)
    torch.save({"model": CreatesAFile(marker)}, copy / "checkpoints" / "best.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"best.pt holds pickled objects \(io.open\)"):
        RunDirectory(copy).load_best()
    shutil.copy(run.run / "checkpoints" / "last.pt", evil)  # a good checkpoint again
    torch.save({"state": CreatesAFile(marker)}, copy / "extras" / "posthoc" / "posthoc_la.pt")
    err = refused(capsys, ["predict", str(evil), str(run.images), "--posthoc", "posthoc_la"])
    assert "post-hoc state" in err and "holds pickled objects (io.open)" in err
    assert not marker.exists()


def test_the_malicious_file_does_run_code_when_unpickled_knowingly(run, tmp_path: Path, capsys) -> None:
    """The file above is a real threat: ``--trust`` unpickles it (the file appears), and gradtail still
    writes nothing that is not tensors and plain data."""
    marker = tmp_path / "created"
    evil = tmp_path / "evil.pt"
    malicious(evil, marker, {k: run.state[k] for k in ("model", "config", "epoch")})
    argv = ["checkpoint", "upgrade", str(evil), "--trust", "--output", str(tmp_path / "o.pt")]
    err = refused(capsys, argv)
    assert marker.exists() and "cannot convert" in err and not (tmp_path / "o.pt").exists()


def test_report_reads_no_checkpoint(tmp_path: Path, capsys) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY, "optim": {**TINY["optim"], "epochs": 1}}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "safe", "base": "base.yaml", "seeds": [0],
                                     "methods": {"ce": {}}}))  # fmt: skip
    out = tmp_path / "bench"
    assert main(["bench", str(suite), "--output", str(out), "--no-progress"]) == 0
    marker = tmp_path / "created"
    for checkpoint in (out / "ce" / "seed0" / "checkpoints").glob("*.pt"):
        malicious(checkpoint, marker, {"model": {}, "config": {}})
    capsys.readouterr()
    assert main(["report", str(suite), "--output", str(out)]) == 0
    assert main(["bench", str(suite), "--output", str(out), "--no-progress"]) == 0  # finished: skipped
    assert not marker.exists()


def old_format(state: dict) -> dict:
    """``state`` as gradtail wrote it before format 3: NumPy's RNG state as its tuple with an ndarray,
    Python's as ``random.getstate()``'s tuple (both pickled as objects)."""
    rng = state["rng"].get("main", state["rng"])  # this process's states (DDP checkpoints add every rank's)
    n, p = rng["numpy"], rng["python"]
    numpy_state = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                   n["cached_gaussian"])  # fmt: skip
    python_state = (p["version"], tuple(p["internal"]), p["gauss_next"])
    old_rng = {"torch": rng["torch"], "numpy": numpy_state, "python": python_state}
    return {**state, "version": 2, "rng": old_rng}


def test_an_old_checkpoint_is_refused_then_upgraded_and_resumes_bit_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_from_dict(TINY)
    straight = Trainer(cfg, output_dir=tmp_path / "straight", verbose=False)
    a = straight.fit()
    part = tmp_path / "part"
    Trainer(config_from_dict(TINY), output_dir=part, verbose=False).fit(stop_after=1)
    last = part / "checkpoints" / "last.pt"
    torch.save(old_format(torch.load(last, weights_only=True)), last)  # as an earlier gradtail wrote it
    with pytest.raises(UnsafeCheckpointError, match=r"holds pickled objects \(numpy"):
        load_checkpoint(last)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    err = refused(capsys, ["train", str(cfg_file), "--output", str(part), "--resume"])
    assert f"convert it with gradtail checkpoint upgrade {last} --trust" in err
    # without --trust: refused; with it: converted in place
    assert "pass --trust" in refused(capsys, ["checkpoint", "upgrade", str(last)])
    assert main(["checkpoint", "upgrade", str(last), "--trust"]) == 0
    assert "format 2 -> 3" in capsys.readouterr().out
    assert load_checkpoint(last)["version"] == CHECKPOINT_VERSION == 3
    assert main(["checkpoint", "upgrade", str(last)]) == 0  # a current file: nothing to do, no --trust needed
    assert "nothing to do" in capsys.readouterr().out
    resumed = Trainer(config_from_dict(TINY), output_dir=part, verbose=False)
    b = resumed.fit(resume=True)
    assert a["last_epoch"] == b["last_epoch"] and a["val_selected"] == b["val_selected"]
    weights = zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True)
    for (k, va), vb in weights:
        assert torch.equal(va, vb), k


def test_checkpoints_are_plain_data(run) -> None:
    """Every entry of a written checkpoint is a tensor or plain data (what weights_only reads back)."""
    assert plain_data_problem(run.state) is None
    rng = run.state["rng"].get("main", run.state["rng"])
    assert isinstance(rng["numpy"]["key"], torch.Tensor) and isinstance(rng["python"]["internal"], list)
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\] \(a numpy.ndarray\)"):
        save_checkpoint({"model": {}, "config": {}, "rng": {"numpy": np.zeros(2)}}, Path("/nonexistent/x.pt"))


def test_rng_states_round_trip_exactly() -> None:
    random.gauss(0, 1)  # a cached Gaussian in Python's generator ...
    np.random.standard_normal(1)  # ... and in NumPy's legacy one
    state = capture_rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    draws = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist())  # fmt: skip
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    restore_rng_state(state)
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
             torch.rand(3).tolist())  # fmt: skip
    assert draws == again
    with pytest.raises(DataError, match="unknown layout"):
        restore_rng_state({"torch": state["torch"], "numpy": np.random.get_state(),
                           "python": random.getstate()})  # fmt: skip


def test_other_files_are_read_by_parsers_only() -> None:
    """No ``eval`` / ``exec``, no plain pickle, no ``torch.load`` without ``weights_only=True`` (but the
    explicit ``--trust`` upgrade), ``np.load`` without pickles, YAML through the safe loader only."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        defs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
        functions = {id(n): f.name for f in defs for n in ast.walk(f)}  # innermost function wins
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if name in ("eval", "exec", "pickle.load", "pickle.loads", "marshal.loads", "yaml.unsafe_load"):
                found.append(f"{where} {name}")
            elif name == "torch.load" and keywords.get("weights_only") != "True":
                if functions.get(id(node)) != "upgrade_checkpoint":
                    found.append(f"{where} torch.load({keywords})")
            elif name == "np.load" and keywords.get("allow_pickle") != "False":
                found.append(f"{where} np.load without allow_pickle=False")
            elif name == "yaml.load" and keywords.get("Loader") != "ConfigLoader":
                found.append(f"{where} yaml.load with {keywords.get('Loader')}")
    assert found == [], found
    from gradtail.config import ConfigLoader

    assert issubclass(ConfigLoader, yaml.SafeLoader)


def test_the_installed_command_refuses_in_one_line(run, tmp_path: Path) -> None:
    """Through the installed entry point: exit status 2, one line, no file."""
    marker = tmp_path / "created"
    evil = tmp_path / "evil.pt"
    malicious(evil, marker, {k: run.state[k] for k in ("model", "config", "version", "epoch")})
    argv = [sys.executable, "-m", "gradtail", "eval", str(evil)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "gradtail does not execute code from checkpoints" in proc.stderr and not marker.exists()
