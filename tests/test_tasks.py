"""Every command for every task through the one task concept (docs/architecture.md, "Tasks"):

- one-line config errors (a misspelled loss parameter, a non-numeric epoch count) for every task;
- ``gradtail tune`` on a detection and a segmentation config, and a study that does not change when the
  test split's labels / boxes / masks are permuted (the test split is never read while tuning);
- ``gradtail predict`` on a finished detection run (a COCO / LVIS results file that the official API
  scores exactly as ``gradtail eval``) and a segmentation run (label-map PNGs whose mIoU is the run's);
- kill / resume bit-identical for segmentation (detection: tests/test_detection_cli.py);
- ``--overwrite`` leaves nothing of the previous run (its predictions figure included);
- detectors never compute torchvision's own classification loss next to the gradtail term.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gradtail.cli.main import main
from gradtail.config import load_config
from gradtail.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DETECTION = REPO / "configs" / "detection"
SEGMENTATION = REPO / "configs" / "segmentation"
TINY_FM = {"train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}
TINY_SEG = {"canvas_size": 32, "train_canvases": 24, "val_canvases": 8, "test_canvases": 8, "objects": [1, 2],
            "val_images_per_class": 5, "frequent_threshold": 0.05, "rare_threshold": 0.01}  # fmt: skip


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fm_detection")


def _detection_config(tmp_path: Path, fm_root: Path, epochs: int = 1, **extra: object) -> Path:
    raw = {
        "extends": str(DETECTION / "fm_faster_rcnn_eqlv2.yaml"),
        "detection": {"benchmark_root": str(fm_root), "benchmark": TINY_FM},
        "model": {"params": {"width": 16, "representation": 64}},
        "optim": {"epochs": epochs},
        "train": {"threads": 2, "progress": False},
        **extra,
    }
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _segmentation_config(tmp_path: Path, epochs: int = 2, loss: str = "softmax_eql") -> Path:
    raw = {
        "extends": str(SEGMENTATION / "fmnist_seg_base.yaml"),
        "name": "seg_tiny",
        "data": {"imbalance_factor": 10},
        "segmentation": TINY_SEG,
        "model": {"params": {"width": 4, "norm": "none"}},
        "loss": {"name": loss},
        "optim": {"epochs": epochs, "batch_size": 8, "warmup_epochs": 0, "drop_last": True},
        "train": {"progress": False, "amp": "none", "eval_every": 1},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "segmentation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err, err
    return err


# ----------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("config", "typo", "meant"),
    [
        (DETECTION / "fm_faster_rcnn_eqlv2.yaml", "gama", "gamma"),  # EQLv2's gamma
        (SEGMENTATION / "fmnist_seg_softmax_eql.yaml", "tua", "tau"),
        (REPO / "configs" / "fashion_mnist_lt" / "softmax_eql.yaml", "tua", "tau"),
    ],
    ids=["detection", "segmentation", "classification"],
)
def test_bad_keys_are_one_line_errors_in_every_task(config: Path, typo: str, meant: str, tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")]
    assert main(["train", str(config), *out, "--set", f"loss.params.{typo}=1"]) == 2
    err = _one_line_error(capsys)
    assert f"'loss.params.{typo}'" in err and f"did you mean '{meant}'" in err
    assert "valid keys in loss.params:" in err
    assert main(["train", str(config), *out, "--set", "optim.epochs=twelve"]) == 2
    err = _one_line_error(capsys)
    assert "'optim.epochs': expected an integer, got 'twelve'" in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_family_the_task_does_not_take_is_one_line(tmp_path: Path, capsys) -> None:
    config = SEGMENTATION / "fmnist_seg_ce.yaml"
    assert main(["train", str(config), "--output", str(tmp_path / "r"), "--set", "regularizer.name=bgp"]) == 2
    assert "task 'segmentation' does not take the regularizer 'bgp'; it takes: none" in _one_line_error(
        capsys
    )


# ----------------------------------------------------------------------------------------- tune
def _permute_test_targets(data: object) -> None:
    """Scramble the test split's targets in place: detection boxes rolled over the images, segmentation
    label maps shuffled over the images."""
    from gradtail.data.detection.builder import DetectionData
    from gradtail.data.segmentation import SegmentationData

    if isinstance(data, DetectionData):
        images = data.splits["test"].images
        boxes = [img.boxes for img in images]
        labels = [img.labels for img in images]
        for i, img in enumerate(images):
            img.boxes, img.labels = boxes[i - 1], labels[i - 1]
    elif isinstance(data, SegmentationData):
        masks = data.test.masks
        masks.copy_(masks[torch.randperm(len(masks), generator=torch.Generator().manual_seed(0))])
    else:  # classification
        data.test.labels.copy_(data.test.labels.flip(0))  # type: ignore[attr-defined]


@pytest.mark.parametrize("task", ["detection", "segmentation", "classification"])
def test_tune_never_reads_the_test_split(task: str, tmp_path: Path, fm_root: Path) -> None:
    pytest.importorskip("optuna")
    from gradtail.contracts import create_task
    from gradtail.tune import TuneSettings, tune_method

    if task == "detection":
        path = _detection_config(tmp_path, fm_root)
    elif task == "segmentation":
        path = _segmentation_config(tmp_path, epochs=1)
    else:
        path = REPO / "configs" / "fashion_mnist_lt" / "softmax_eql.yaml"
    cfg = load_config(path, ["optim.epochs=1", "optim.warmup_epochs=0"] if task == "classification" else [])
    settings = TuneSettings(trials=2, pruner="none", final_test=False, seed=0)
    values = []
    for permuted in (False, True):
        data = create_task(cfg).build_data()
        if permuted:
            _permute_test_targets(data)
        out = tmp_path / f"tune_{permuted}"
        result = tune_method(task, cfg, out, settings, data=data, log=lambda _: None)
        assert result.trials == {"COMPLETE": 2} and (out / "study.db").is_file()
        assert result.objective == create_task(cfg).objectives[0]
        values.append([t.split(",") for t in (out / task / "trials.csv").read_text().splitlines()[1:]])
    strip = [[row[:3] + row[5:] for row in rows] for rows in values]  # trial, state, value, params
    assert strip[0] == strip[1]


def test_gradtail_tune_runs_on_a_detection_and_a_segmentation_config(tmp_path: Path, fm_root: Path, capsys):
    pytest.importorskip("optuna")
    for name, path in (("detection", _detection_config(tmp_path, fm_root)),
                       ("segmentation", _segmentation_config(tmp_path, epochs=1))):  # fmt: skip
        out = tmp_path / f"tune_{name}"
        argv = ["tune", str(path), "--trials", "2", "--epochs", "1", "--no-test", "--output", str(out)]
        assert main(argv) == 0
        printed = capsys.readouterr().out
        objective = "AP" if name == "detection" else "miou"
        assert f"validation {objective}" in printed
        best = load_config(next(out.glob("*/best.yaml")))
        assert best.task == name and (out / "study.db").is_file() and (out / "report.html").is_file()
    bad = [
        "tune",
        str(_segmentation_config(tmp_path)),
        "--objective",
        "top1",
        "--output",
        str(tmp_path / "b"),
    ]
    assert main(bad) == 2
    assert "tune objective 'top1' is not one of task 'segmentation''s: miou" in _one_line_error(capsys)


# ----------------------------------------------------------------------------------------- predict
def test_detection_predict_writes_results_the_official_api_scores_as_eval(tmp_path: Path, fm_root: Path):
    lvis = pytest.importorskip("lvis")
    run = tmp_path / "run"
    assert main(["train", str(_detection_config(tmp_path, fm_root)), "--output", str(run)]) == 0
    final = json.loads((run / "final.json").read_text())
    ckpt = run / "checkpoints" / "last.pt"
    results = tmp_path / "results.json"
    assert main(["predict", str(ckpt), "--split", "test", "--output", str(results), "--draw"]) == 0
    records = json.loads(results.read_text())
    assert records and set(records[0]) == {"image_id", "category_id", "bbox", "score"}
    assert results.with_suffix(".png").is_file()
    # the official API, called directly, on the run's own test annotations
    from gradtail.data.detection.lvis import read_detection_json
    from gradtail.metrics.detection import lvis_ground_truth, numpy_float_alias

    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(lvis_ground_truth(read_detection_json(fm_root / "test.json"))))
    with numpy_float_alias():
        gt = lvis.LVIS(str(gt_file))
        ev = lvis.LVISEval(gt, lvis.LVISResults(gt, records, max_dets=300), iou_type="bbox")
        ev.run()
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        expected = final["last_epoch"][key]
        assert (ev.results[key] == expected) or (expected is None and ev.results[key] == -1), key
    # images given as files: image ids 1..N, listed beside the results
    images = sorted((fm_root / "images" / "test").glob("*.png"))[:3]
    out = tmp_path / "files.json"
    assert main(["predict", str(ckpt), *map(str, images), "--output", str(out)]) == 0
    listed = json.loads(out.with_suffix(".images.json").read_text())
    assert [e["id"] for e in listed] == [1, 2, 3] and {
        r["image_id"] for r in json.loads(out.read_text())
    } <= {1, 2, 3}


def test_segmentation_predict_writes_label_maps_with_the_runs_miou(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from gradtail.metrics.segmentation import ConfusionState, segmentation_metrics

    run = tmp_path / "run"
    assert main(["train", str(_segmentation_config(tmp_path)), "--output", str(run)]) == 0
    final = json.loads((run / "final.json").read_text())
    ckpt = run / "checkpoints" / "last.pt"
    maps = tmp_path / "maps"
    assert main(["predict", str(ckpt), "--split", "test", "--output", str(maps)]) == 0
    files = sorted(maps.glob("test_*.png"))
    assert len(files) == TINY_SEG["test_canvases"]
    first = Image.open(files[0])
    assert first.mode == "P" and first.size == (32, 32)
    cfg = load_config(run / "config.yaml")
    from gradtail.contracts import create_task

    task = create_task(cfg)
    data = task.build_data()
    state = ConfusionState(data.num_classes, 255, torch.device("cpu"))
    pred = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.int64))
    state.update(pred, data.test.masks.long())
    again = segmentation_metrics(
        state.matrix, data.class_counts, task.frequent_threshold, task.rare_threshold
    )
    assert again.miou == pytest.approx(final["last_epoch"]["miou"], abs=1e-12)
    # image files: one PNG per file, named after it
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.fromarray(data.test.images[k, 0].numpy()).save(images / f"im{k}.png")
    assert main(["predict", str(ckpt), str(images), "--output", str(tmp_path / "mine")]) == 0
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["im0.png", "im1.png"]
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(images)]) == 2  # a folder of PNGs needs --output
    assert "--output DIR is required for segmentation" in _one_line_error(capsys)


# ----------------------------------------------------------------------------------------- runs
def test_segmentation_kill_resume_is_bit_identical(tmp_path: Path, capsys) -> None:
    config = _segmentation_config(tmp_path, epochs=2)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", str(config), "--output", str(straight)]) == 0
    assert main(["train", str(config), "--output", str(stopped), "--stop-after", "1"]) == 0
    assert main(["train", str(config), "--output", str(stopped), "--resume"]) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])  # Softmax-EQL's statistics
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (straight, stopped))
    assert fa["last_epoch"] == fb["last_epoch"] and fa["val_selected"] == fb["val_selected"]


def test_overwrite_removes_every_file_of_the_previous_run(tmp_path: Path, fm_root: Path) -> None:
    config = _detection_config(tmp_path, fm_root, epochs=2)
    run = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run)]) == 0
    assert (run / "predictions.png").is_file() and (run / "checkpoints" / "best.pt").is_file()
    argv = ["train", str(config), "--output", str(run), "--overwrite", "--set", "detection.draw=false"]
    assert main([*argv, "--set", "train.eval_every=2", "--stop-after", "1"]) == 0
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert "predictions.png" not in left and "final.json" not in left and "checkpoints/best.pt" not in left


def test_test_split_is_evaluated_once_and_the_curve_only_on_request(tmp_path: Path) -> None:
    cfg = load_config(_segmentation_config(tmp_path, epochs=2))
    calls: list[str] = []
    trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
    original = trainer.task.evaluate

    def counting(view, split):  # type: ignore[no-untyped-def]
        calls.append(split)
        return original(view, split)

    trainer.task.evaluate = counting  # type: ignore[method-assign]
    final = trainer.fit()
    assert calls.count("test") == 1 + (final["val_selected"]["epoch"] != 2) and calls.count("val") == 3
    cfg.eval.test_curve = True
    curve = Trainer(cfg, output_dir=tmp_path / "curve", verbose=False)
    curve.fit()
    records = [json.loads(x) for x in (tmp_path / "curve" / "metrics.jsonl").read_text().splitlines()]
    assert all("test_curve" in r and "test" not in r for r in records)


# ----------------------------------------------------------------------------------------- detectors
def _detection_step(model_name: str, loss: str) -> None:
    from gradtail.models.detection import DetectorSpec, build_detector

    torch.manual_seed(0)
    extra = {"anchor_sizes": (12, 24, 48)} if model_name != "faster_rcnn" else {}
    width = 32 if model_name == "fcos" else 8  # FCOS's head: GroupNorm with 32 groups
    det = build_detector(
        DetectorSpec(arch=model_name, num_classes=3, loss=loss, width=width, representation=32, **extra)
    )
    det.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([k])} for k in (0, 2)]
    losses = det(images, targets)
    sum(losses.values()).backward()


def test_detectors_do_not_compute_torchvisions_classification_loss(monkeypatch) -> None:
    import torchvision.models.detection.fcos as fcos
    import torchvision.models.detection.roi_heads as roi_heads

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("torchvision's classification loss was computed")

    monkeypatch.setattr(roi_heads, "fastrcnn_loss", forbidden)
    monkeypatch.setattr(fcos, "sigmoid_focal_loss", forbidden)
    _detection_step("faster_rcnn", "sigmoid_eql")
    _detection_step("faster_rcnn", "ce")
    _detection_step("fcos", "efl")
    with pytest.raises(AssertionError, match="torchvision's classification loss"):
        _detection_step("fcos", "sigmoid_focal")  # the stock baseline is torchvision's own loss


# ----------------------------------------------------------------------------------------- accumulation
def _tiny_classification(accumulation: int, loss: str) -> object:
    from gradtail.config import config_from_dict

    return config_from_dict({
        "name": "acc", "data": {"dataset": "synthetic", "imbalance_factor": 4, "val_per_class": 2,
                                "synthetic": {"num_classes": 4, "per_class": 20, "test_per_class": 2,
                                              "image_size": 8}},
        "model": {"name": "small_cnn", "params": {"width": 4, "norm": "none"}},
        "loss": {"name": loss},
        "optim": {"batch_size": 32, "epochs": 1, "warmup_epochs": 0, "lr": 0.1, "schedule": "constant",
                  "accumulation_steps": accumulation},
        "train": {"amp": "none", "progress": False, "diagnostics": True},
    })  # fmt: skip


@pytest.mark.parametrize("loss", ["ce", "softmax_eql", "gala", "seesaw"])
def test_gradient_accumulation_in_the_trainer_equals_one_batch(tmp_path: Path, loss: str) -> None:
    """``optim.accumulation_steps: 4`` splits each batch into 4 micro-batches, one backward each: the
    parameters and the loss's statistics after the optimizer step equal those of the whole batch at once."""
    runs = []
    for k in (1, 4):
        trainer = Trainer(_tiny_classification(k, loss), output_dir=tmp_path / f"k{k}", verbose=False)
        trainer.train_loader.set_epoch(0)
        x, y = next(iter(trainer.train_loader))
        assert len(y) == 32
        trainer.model.train()
        trainer.loss_fn.train()
        for _ in range(2):  # the second step reads the statistics the first one accumulated
            trainer.train_step(x, y, epoch=0)
        runs.append(trainer)
    one, four = runs
    for name, p in one.model.state_dict().items():
        torch.testing.assert_close(four.model.state_dict()[name], p, rtol=1e-6, atol=1e-6, msg=name)
    for name, v in one.loss_fn.state_dict().items():
        torch.testing.assert_close(four.loss_fn.state_dict()[name], v, rtol=1e-6, atol=1e-9, msg=name)
    for name, v in one.diagnostics.state_dict().items():  # the observer counts one step per optimizer step
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(four.diagnostics.state_dict()[name], v, rtol=1e-6, atol=1e-9, msg=name)


def test_accumulation_is_refused_where_the_whole_batch_is_needed(tmp_path: Path, capsys) -> None:
    config = REPO / "configs" / "fashion_mnist_lt" / "gbg.yaml"
    argv = ["train", str(config), "--output", str(tmp_path / "r"), "--set", "optim.accumulation_steps=2"]
    assert main(argv) == 2
    assert "optim.accumulation_steps > 1 takes the plain update rule" in _one_line_error(capsys)
