"""Detection configs through the one config system (task: detection; extends, typed keys, one-line
errors naming the key and the valid ones) and a small end-to-end run on the Fashion-MNIST detection
benchmark (record with metrics, per-class AP, data hash, statistics, the predictions figure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradtail.config import load_config
from gradtail.engine.components import check_component_params
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"


@pytest.mark.parametrize(
    "name", ["fm_faster_rcnn_ce", "fm_faster_rcnn_eqlv2", "fm_retinanet_focal", "fm_retinanet_efl"]
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.task == "detection" and cfg.data.dataset == "fm_detection" and cfg.model.params["width"] == 32
    check_component_params(cfg)


@pytest.mark.parametrize("name", ["lvis_v1_faster_rcnn_eqlv2", "lvis_v1_retinanet_efl"])
def test_lvis_recipes_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.dataset == "coco_files" and cfg.model.params["backbone"] == "resnet50_fpn"
    assert cfg.model.params["detections_per_img"] == 300 and cfg.options.test_annotations.endswith("val.json")
    check_component_params(cfg)


def test_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {CONFIGS / 'fm_base.yaml'}\noptim: {{epoch: 3}}\n")
    unknown = r"unknown config key 'optim.epoch' \(did you mean 'epochs'\?\); valid keys in optim: "
    with pytest.raises(ConfigError, match=unknown):
        load_config(bad)
    bad.write_text("task: detection\nmodel: {name: yolo}\n")
    with pytest.raises(ConfigError, match=r"model\.name for task 'detection' must be one of faster_rcnn"):
        check_component_params(load_config(bad))
    bad.write_text("task: detection\ndetector: {arch: retinanet}\n")  # the old schema's section
    with pytest.raises(ConfigError, match=r"unknown config key .detector. for task .detection. \(did you"):
        load_config(bad)
    bad.write_text("task: detection\ndata: {imbalance_factor: 10}\n")  # a classification data key
    with pytest.raises(ConfigError, match=r"'data\.imbalance_factor' is not read by task 'detection'"):
        load_config(bad)
    bad.write_text("task: detection\nmodel: {name: retinanet}\nloss: {name: ce}\n")
    refusal = "task 'detection' does not take the loss 'ce'; it takes: sigmoid_focal"
    with pytest.raises(ConfigError, match=refusal):
        check_component_params(load_config(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "sampler"), [("fm_faster_rcnn_eqlv2", "instance"), ("fm_retinanet_efl", "repeat_factor")]
)
def test_small_end_to_end_run(tmp_path: Path, config: str, sampler: str) -> None:
    pytest.importorskip("lvis")
    small = {"train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}
    params = {"width": 16, "representation": 64}
    if config == "fm_retinanet_efl":
        params |= {"anchor_sizes": [12, 24, 48], "anchor_scales": 3, "box_loss": "giou"}
    sets = [
        f"detection.benchmark_root={tmp_path / 'fm'}",
        f"detection.benchmark={json.dumps(small)}",
        f"model.params={json.dumps(params)}",
        "optim.epochs=1",
        f"data.sampler={sampler}",
        "train.threads=2",
    ]
    if sampler == "repeat_factor":
        sets.append("data.sampler_params={threshold: 0.3}")
    cfg = load_config(CONFIGS / f"{config}.yaml", sets)
    final = Trainer(cfg, output_dir=tmp_path / "run", verbose=False).fit()
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["task"] == "detection" and saved["last_epoch"]["protocol"] == "lvis"
    assert set(saved["last_epoch"]) >= {"AP", "APr", "APc", "APf", "per_class_ap"}
    assert len(saved["last_epoch"]["per_class_ap"]) == 10 and saved["class_counts"][0] == 30
    assert saved["subset_sha256"] == final["subset_sha256"] and len(saved["subset_sha256"]) == 64
    diagnostics = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    steps = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["steps"]
    assert diagnostics["history"][-1]["steps"] == steps > 0
    assert (tmp_path / "run" / "predictions.png").is_file()
