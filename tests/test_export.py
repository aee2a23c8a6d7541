"""``gradtail export`` (issue 31): an exported model run outside gradtail (onnxruntime, ``torch.jit.load``)
on image files read as its JSON sidecar says gives what ``gradtail predict`` gives on the same files: the
same argmax and probabilities within 1e-4, with each post-hoc adjuster folded in (classification), the
same per-pixel label maps (segmentation); detection exports to ONNX as torchvision's detectors do. What
cannot be exported is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gradtail.cli.main import main
from gradtail.config import config_from_dict, load_config
from gradtail.contracts import ExportRequest, TaskContract, create_task
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError
from gradtail.rundir import load_checkpoint

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
ADJUSTERS = ("posthoc_la", "tau_norm", "temperature", "gala_rebalance")
TINY = {
    "name": "export_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 2,
        "val_per_class": 3,
        "synthetic": {"num_classes": 3, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 8, "epochs": 3, "lr": 0.05, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False, "amp": "none"},
    "eval": {
        "posthoc": list(ADJUSTERS),
        "posthoc_params": {n: {"grid": [0.5, 1.0]} for n in ("posthoc_la", "tau_norm", "gala_rebalance")},
    },
}


# ----------------------------------------------------------------------------------------- helpers
def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    """uint8 (N, 1, H, W) images as PNG files, sorted names in dataset order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(images.shape[0]):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(images[i, 0].numpy(), mode="L").save(path)
        paths.append(path)
    return paths


def predicted_probabilities(
    checkpoint: Path, folder: Path, out: Path, posthoc: str | None, c: int
) -> np.ndarray:
    """``gradtail predict`` (JSON, every class) as an (N, C) array of probabilities."""
    extra = ["--posthoc", posthoc] if posthoc else []
    argv = ["predict", str(checkpoint), str(folder), "--top-k", str(c), "--output", str(out), *extra]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["predictions"]
    probs = np.zeros((len(rows), c))
    for i, row in enumerate(rows):
        for entry in row["top"]:
            probs[i, entry["index"]] = entry["prob"]
    return probs


def sidecar_inputs(sidecar: dict, paths: list[Path]) -> np.ndarray:
    """The images read as the sidecar says: decoded, zero-padded to its input size (centred), then
    (pixel / 255 - mean) / std per channel. Nothing of gradtail is used."""
    c, h, w = sidecar["input_size"]
    mean = np.asarray(sidecar["normalisation"]["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(sidecar["normalisation"]["std"], dtype=np.float32).reshape(-1, 1, 1)
    batch = np.zeros((len(paths), c, h, w), dtype=np.float32)
    for i, path in enumerate(paths):
        array = np.asarray(Image.open(path).convert("L" if c == 1 else "RGB"), dtype=np.float32)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        top, left = (h - array.shape[1]) // 2, (w - array.shape[2]) // 2
        batch[i, :, top : top + array.shape[1], left : left + array.shape[2]] = array
    return (batch / 255.0 - mean) / std  # zero padding is pixels of value 0, normalised like the others


def onnx_run(model: Path, inputs: np.ndarray, batch: int = 1000) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: inputs[i : i + batch]}) for i in range(0, len(inputs), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def export(run: Path, output: Path, *extra: str) -> dict:
    assert main(["export", str(run), "--output", str(output), *extra]) == 0
    return json.loads(output.with_name(output.stem + ".json").read_text())


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err, err
    return err


def compare(exported: np.ndarray, predicted: np.ndarray) -> float:
    """Identical argmax; returns the max abs probability difference (asserted <= 1e-4)."""
    assert (exported.argmax(1) == predicted.argmax(1)).all()
    diff = float(np.abs(exported - predicted).max())
    assert diff <= TOLERANCE, diff
    return diff


# ----------------------------------------------------------------------------------------- classification
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("export")
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg_file), "--output", str(root / "run")]) == 0
    checkpoint = root / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    trainer = Trainer(config_from_dict(state["config"]), output_dir=root / "eval", verbose=False)
    trainer.load_state(state)
    paths = write_pngs(trainer.data.test.images, root / "images")
    return SimpleNamespace(root=root, run=root / "run", checkpoint=checkpoint, folder=root / "images",
                           paths=paths, trainer=trainer, c=trainer.data.num_classes)  # fmt: skip


@pytest.mark.parametrize("posthoc", [None, "posthoc_la", "tau_norm", "temperature"])
def test_onnx_classifier_matches_predict(tiny_run: SimpleNamespace, posthoc: str | None) -> None:
    r = tiny_run
    model = r.root / f"onnx_{posthoc}" / "model.onnx"
    sidecar = export(r.run, model, *(["--posthoc", posthoc] if posthoc else []))
    predicted = predicted_probabilities(r.checkpoint, r.folder, r.root / f"p_{posthoc}.json", posthoc, r.c)
    _, probs = onnx_run(model, sidecar_inputs(sidecar, r.paths))
    compare(probs, predicted)
    assert sidecar["class_names"] == r.trainer.data.class_names and sidecar["input_size"] == [1, 10, 10]
    assert sidecar["posthoc"]["name"] == posthoc and sidecar["check"]["runtime"] == "onnxruntime"
    if posthoc is not None:  # the run's own fit (the sidecar's parameters are among final.json's)
        fitted = json.loads((r.run / "final.json").read_text())["posthoc"][posthoc]["params"]
        assert sidecar["posthoc"]["params"].items() <= fitted.items()
    if posthoc in ("posthoc_la", "temperature"):  # the adjustment sits in the classifier's weights and bias
        assert "folded into the classifier's weights and bias" in sidecar["posthoc"]["applied"]
    if posthoc is not None:  # and it changes something (the comparison above is not vacuous)
        raw = predicted_probabilities(r.checkpoint, r.folder, r.root / "p_raw.json", None, r.c)
        assert np.abs(raw - predicted).max() > 1e-3


def test_gala_rebalance_exports_with_the_validation_class_mass(tiny_run: SimpleNamespace) -> None:
    """gradtail predict re-balances with q from the images it is given (transductive); the exported model,
    scoring one image at a time, with the validation split's q kept at fit: equal to predict's scores
    re-balanced with that q."""
    r = tiny_run
    model = r.root / "gala" / "model.onnx"
    sidecar = export(r.run, model, "--posthoc", "gala_rebalance")
    tau = sidecar["posthoc"]["params"]["tau"]
    val = r.trainer.predict("val").logits.double()
    q_val = torch.softmax(val, dim=1).mean(0)
    assert np.allclose(sidecar["posthoc"]["offset"], (-tau * torch.log(q_val)).tolist(), atol=1e-9)
    raw = predicted_probabilities(r.checkpoint, r.folder, r.root / "g_raw.json", None, r.c)
    offset = np.asarray(sidecar["posthoc"]["offset"])
    want = np.exp(np.log(raw) + offset)
    want /= want.sum(1, keepdims=True)
    _, probs = onnx_run(model, sidecar_inputs(sidecar, r.paths))
    compare(probs, want)
    assert np.abs(want - raw).max() > 1e-3


def test_torchscript_classifier_matches_predict(tiny_run: SimpleNamespace) -> None:
    r = tiny_run
    model = r.root / "ts" / "model.pt"
    sidecar = export(r.run, model, "--format", "torchscript", "--posthoc", "tau_norm")
    assert sidecar["format"] == "torchscript" and sidecar["check"]["runtime"] == "torch.jit"
    loaded = torch.jit.load(str(model))
    with torch.no_grad():
        _, probs = loaded(torch.from_numpy(sidecar_inputs(sidecar, r.paths)))
    predicted = predicted_probabilities(r.checkpoint, r.folder, r.root / "ts.json", "tau_norm", r.c)
    compare(probs.numpy(), predicted)


def test_default_output_is_the_runs_export_folder(tiny_run: SimpleNamespace, capsys) -> None:
    assert main(["export", str(tiny_run.checkpoint)]) == 0
    assert "onnx model -> " in capsys.readouterr().out
    folder = tiny_run.run / "export"
    assert (folder / "model.onnx").is_file() and (folder / "model.json").is_file()


def test_export_refusals_are_one_line(tiny_run: SimpleNamespace, tmp_path: Path, capsys) -> None:
    r = tiny_run
    err = one_line_error(capsys, ["export", str(r.run), "--posthoc", "nope"])
    assert "no fitted post-hoc adjuster 'nope'" in err
    err = one_line_error(capsys, ["export", str(r.run), "--output", str(tmp_path / "m.json")])
    assert "cannot be .json" in err
    err = one_line_error(capsys, ["export", str(tmp_path / "missing")])
    assert "checkpoint not found" in err
    # a gala_rebalance state saved without its validation class mass (before runs kept it)
    copy = tmp_path / "old"
    shutil.copytree(r.run, copy, ignore=shutil.ignore_patterns("export"))
    path = copy / "extras" / "posthoc" / "gala_rebalance.pt"
    record = torch.load(path, weights_only=True)
    record["state"].pop("q")
    torch.save(record, path)
    err = one_line_error(capsys, ["export", str(copy), "--posthoc", "gala_rebalance"])
    assert "no fitted linear form" in err
    assert not (copy / "export").exists()
    # a task without an exporter refuses through the contract
    with pytest.raises(ConfigError, match="cannot be exported"):
        TaskContract(None).export({}, r.checkpoint, ExportRequest())


# ----------------------------------------------------------------------------------------- segmentation
TINY_SEG = {"canvas_size": 32, "train_canvases": 24, "val_canvases": 8, "test_canvases": 8, "objects": [1, 2],
            "val_images_per_class": 5, "frequent_threshold": 0.05, "rare_threshold": 0.01}  # fmt: skip


def test_segmentation_onnx_labels_match_predict_label_maps(tmp_path: Path, capsys) -> None:
    raw = {
        "extends": str(REPO / "configs" / "segmentation" / "fmnist_seg_base.yaml"),
        "name": "seg_export",
        "data": {"imbalance_factor": 10},
        "segmentation": TINY_SEG,
        "model": {"params": {"width": 4, "norm": "none"}},
        "loss": {"name": "softmax_eql"},
        "optim": {"epochs": 2, "batch_size": 8, "warmup_epochs": 0, "drop_last": True},
        "train": {"progress": False, "amp": "none", "eval_every": 1},
        "eval": {"batch_size": 8},
    }
    cfg_file = tmp_path / "seg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(cfg_file), "--output", str(run)]) == 0
    maps = tmp_path / "maps"
    checkpoint = run / "checkpoints" / "last.pt"
    assert main(["predict", str(checkpoint), "--split", "test", "--output", str(maps)]) == 0
    files = sorted(maps.glob("test_*.png"))
    predicted = np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.int64)
    model = tmp_path / "seg" / "model.onnx"
    sidecar = export(run, model)
    data = create_task(load_config(run / "config.yaml")).build_data()
    images = data.test.images.numpy().astype(np.float32)  # uint8 canvases (N, 1, 32, 32)
    mean = np.asarray(sidecar["normalisation"]["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(sidecar["normalisation"]["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    logits, labels = onnx_run(model, (images / 255.0 - mean) / std)
    assert labels.dtype == np.int64 and labels.shape == predicted.shape
    assert (labels == predicted).all() and (labels == logits.argmax(1)).all()
    assert len(np.unique(predicted)) >= 2  # not a constant map
    assert sidecar["check"]["other_size"]["max_abs_difference"] <= TOLERANCE  # any image size
    ts = tmp_path / "seg" / "model.pt"
    export(run, ts, "--format", "torchscript")
    with torch.no_grad():
        _, ts_labels = torch.jit.load(str(ts))(torch.from_numpy((images / 255.0 - mean) / std))
    assert (ts_labels.numpy() == predicted).all()
    err = one_line_error(capsys, ["export", str(run), "--posthoc", "posthoc_la"])
    assert "segmentation takes no post-hoc adjuster" in err


# ----------------------------------------------------------------------------------------- detection
def test_detection_exports_to_onnx_as_torchvision_does(tmp_path: Path, capsys) -> None:
    pytest.importorskip("pycocotools")
    raw = {
        "extends": str(REPO / "configs" / "detection" / "fm_faster_rcnn_eqlv2.yaml"),
        "detection": {"benchmark_root": str(tmp_path / "fm"), "benchmark": {
            "train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}},
        "model": {"params": {"width": 16, "representation": 64}},
        "optim": {"epochs": 1},
        "train": {"threads": 2, "progress": False},
    }  # fmt: skip
    cfg_file = tmp_path / "det.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(cfg_file), "--output", str(run)]) == 0
    model = tmp_path / "det" / "model.onnx"
    sidecar = export(run, model)
    assert sidecar["check"]["runtime"] == "onnxruntime"
    assert [o["name"] for o in sidecar["outputs"]] == ["boxes", "labels", "scores"]
    # the test images: the same detections as the PyTorch detector where scores are not near-ties
    cfg = load_config(run / "config.yaml")
    task = create_task(cfg)
    data = task.build_data()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    detector = task.build_model(data, task.build_loss(data))
    detector.load_state_dict(state["model"])
    detector.eval()
    from gradtail.export.detection import match

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ev = data.eval_loader("test", cfg, torch.device("cpu"))
    for i in range(min(4, len(ev.dataset))):
        image, _ = ev.dataset[i]
        got = [torch.from_numpy(a) for a in session.run(None, {"images": image.numpy()})]
        with torch.no_grad():
            out = detector([image])[0]
        record = match(got, (out["boxes"], out["labels"], out["scores"]), 0.05)
        assert record["detections"][0] == record["detections"][1]
        assert record.get("labels_equal", True) and record.get("max_box_difference", 0.0) < 1e-2
    err = one_line_error(capsys, ["export", str(run), "--format", "torchscript"])
    assert "detection exports to ONNX" in err


# ----------------------------------------------------------------------------------------- FM-LT
@pytest.mark.slow
def test_fm_lt_onnx_matches_predict_on_the_test_split(tmp_path: Path) -> None:
    """The acceptance run: Fashion-MNIST-LT IF100 (2 epochs of the base recipe, float32), every
    adjuster fitted on validation; the 10,000 test images as PNG files through gradtail predict and
    through the exported ONNX model under onnxruntime."""
    raw = {
        "extends": str(REPO / "configs" / "fashion_mnist_lt" / "base.yaml"),
        "name": "fm_export",
        "optim": {"epochs": 2},
        "train": {"amp": "none", "progress": False},
        "eval": {"posthoc": list(ADJUSTERS)},
    }
    cfg_file = tmp_path / "fm.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["train", str(cfg_file), "--output", str(run)]) == 0
    checkpoint = run / "checkpoints" / "last.pt"
    data = create_task(load_config(run / "config.yaml")).build_data()
    paths = write_pngs(data.test.images, tmp_path / "test")
    assert len(paths) == 10000
    diffs, predicted = {}, {}
    for posthoc in (None, *ADJUSTERS):
        model = tmp_path / f"m_{posthoc}.onnx"
        sidecar = export(run, model, *(["--posthoc", posthoc] if posthoc else []))
        out = tmp_path / f"{posthoc}.json"
        predicted[posthoc] = predicted_probabilities(checkpoint, tmp_path / "test", out, posthoc, 10)
        _, probs = onnx_run(model, sidecar_inputs(sidecar, paths))
        if posthoc == "gala_rebalance":  # predict's q is the test images'; the export's validation's
            want = np.exp(np.log(predicted[None]) + np.asarray(sidecar["posthoc"]["offset"]))
            want /= want.sum(1, keepdims=True)
            diffs[posthoc] = compare(probs, want)
            agree = float((probs.argmax(1) == predicted[posthoc].argmax(1)).mean())
            print(f"gala_rebalance: argmax agreement with the transductive gradtail predict {agree:.4f}")
        else:
            diffs[str(posthoc)] = compare(probs, predicted[posthoc])
    print("max abs probability difference, ONNX vs gradtail predict:", diffs)
