"""Detection runs: YAML configs (base merge, one-line errors) and a small end-to-end run on the
Fashion-MNIST detection benchmark (record with metrics, per-class AP, data hash, statistics, drawing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradtail.detection.training import load_detection_config, run_detection
from gradtail.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"


@pytest.mark.parametrize(
    "name", ["fm_faster_rcnn_ce", "fm_faster_rcnn_eqlv2", "fm_retinanet_focal", "fm_retinanet_efl"]
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_detection_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.kind == "fm_benchmark" and cfg.detector.width == 32
    cfg.detector.check()


@pytest.mark.parametrize("name", ["lvis_v1_faster_rcnn_eqlv2", "lvis_v1_retinanet_efl"])
def test_lvis_recipes_load(name: str) -> None:
    cfg = load_detection_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.kind == "files" and cfg.detector.backbone == "resnet50_fpn"
    assert cfg.detector.detections_per_img == 300
    cfg.detector.check()


def test_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "fm_base.yaml") + "\ntrain: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"train: unknown keys \['epoch'\]"):
        load_detection_config(bad)
    bad.write_text("detector: {arch: yolo}\n")
    with pytest.raises(ConfigError, match="detector arch must be one of"):
        load_detection_config(bad).detector.check()
    with pytest.raises(ConfigError, match="not found"):
        load_detection_config(tmp_path / "missing.yaml")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "sampler"), [("fm_faster_rcnn_eqlv2", "uniform"), ("fm_retinanet_efl", "repeat_factor")]
)
def test_small_end_to_end_run(tmp_path: Path, config: str, sampler: str) -> None:
    pytest.importorskip("lvis")
    small = {"train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}
    over = {
        "data": {"root": str(tmp_path / "fm"), "fm": small},
        "detector": {"width": 16, "representation": 64},
        "train": {"epochs": 1, "batch_size": 8, "sampler": sampler, "rfs_threshold": 0.3, "threads": 2},
    }
    record = run_detection(
        load_detection_config(CONFIGS / f"{config}.yaml", over), tmp_path / "run", verbose=False
    )
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["protocol"] == "lvis" and set(saved["metrics"]) >= {"AP", "APr", "APc", "APf"}
    assert len(saved["per_class"]) == 10 and saved["per_class"][0]["train_images"] == 30
    assert saved["data_sha256"] == record["data_sha256"] and len(saved["data_sha256"]) == 64
    assert saved["gradient_statistics"]["steps"] == saved["iterations"] > 0
    assert (tmp_path / "run" / "detections.png").is_file()
