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


def _write_idx(path, array):
    """An IDX file (magic 0x0803 uint8 images / 0x0801 uint8 labels), gzip-compressed like the originals."""
    import gzip
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion(folder, train_labels, n_images=None):
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    n = len(train_labels) if n_images is None else n_images
    _write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", train_labels)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", list(range(10)))


def test_label_out_of_range_in_data_is_one_line(tmp_path):
    labels = [c for c in range(10) for _ in range(3)]
    labels[4] = 12
    _fake_fashion(tmp_path / "fm", labels)
    cfg = dict(TINY, data={"dataset": "fashion_mnist", "data_dir": str(tmp_path / "fm"), "download": False})
    r = _cli("train", str(_write(tmp_path, cfg)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "train-labels-idx1-ubyte.gz" in r.stderr and "12" in r.stderr


def test_images_and_labels_of_different_length_is_one_line(tmp_path):
    labels = [c for c in range(10) for _ in range(3)]
    _fake_fashion(tmp_path / "fm", labels, n_images=29)
    cfg = dict(TINY, data={"dataset": "fashion_mnist", "data_dir": str(tmp_path / "fm"), "download": False})
    r = _cli("train", str(_write(tmp_path, cfg)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "29" in r.stderr and "30" in r.stderr
