"""Instance segmentation through the one harness (instance.md; the issue's acceptance): ``gradtail list``
shows the task, ``mask_rcnn`` and the ``federated`` loss; ``gradtail train`` then ``gradtail predict --split
test`` write results that ``LVISEval(gt, dt, "segm")``, called directly, scores exactly as the run's
``final.json``; ``gradtail eval`` reproduces it; a killed run resumes bit-identically; a misspelled key, a
corrupt or missing annotation file and a missing image are one-line errors naming them; the shipped
configs and suite load; a tiny suite runs and reports. Tiny Fashion-MNIST instance data (50 training
scenes) so it stays fast."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from gradtail.bench import load_suite
from gradtail.cli.main import main
from gradtail.config import load_config
from gradtail.engine.components import check_component_params

lvis = pytest.importorskip("lvis")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "instance"
TINY_FM = {"train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}
TINY_MODEL = {"width": 16, "representation": 64}
METHODS = ("ce", "rfs", "eqlv2", "seesaw", "federated")


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fm_instance")


def _config(
    tmp_path: Path, fm_root: Path, method: str = "federated", epochs: int = 2, **extra: object
) -> Path:
    raw = {
        "extends": str(CONFIGS / f"fm_mask_rcnn_{method}.yaml"),
        "instance_segmentation": {"benchmark_root": str(fm_root), "benchmark": TINY_FM},
        "model": {"params": TINY_MODEL},
        "optim": {"epochs": epochs},
        "train": {"threads": 2, "progress": False},
        **extra,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradtail: error: ") and "\n" not in err, err
    return err


def test_list_shows_the_task_mask_rcnn_and_the_federated_loss(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "instance_segmentation" in out.split("\n")[0]
    assert "federated" in next(line for line in out.splitlines() if line.startswith("losses:"))
    section = out.split("instance_segmentation:")[1]
    assert "mask_rcnn (losses ce, sigmoid_eql, softmax_eql, seesaw, federated)" in section
    assert "fm_instance" in section and "coco_files" in section


@pytest.mark.parametrize("name", [f"fm_mask_rcnn_{m}" for m in METHODS])
def test_shipped_fm_configs_load_and_check(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.task == "instance_segmentation" and cfg.model.name == "mask_rcnn"
    assert cfg.data.dataset == "fm_instance"
    check_component_params(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_lvis_recipes_load_and_check(method: str) -> None:
    cfg = load_config(CONFIGS / f"lvis_v1_mask_rcnn_{method}.yaml")
    assert cfg.data.dataset == "coco_files" and cfg.model.params["backbone"] == "resnet50_fpn"
    assert cfg.model.params["detections_per_img"] == 300 and cfg.options.test_annotations.endswith("val.json")
    assert cfg.optim.epochs == 12 and cfg.model.params["box_batch_size_per_image"] == 512
    check_component_params(cfg)


def test_shipped_suite_loads() -> None:
    suite = load_suite(REPO / "suites" / "instance_3seeds.yaml")
    assert suite.task == "instance_segmentation" and suite.seeds == [0, 1, 2]
    assert {m.name for m in suite.methods} >= {f"mask_rcnn_{m}" for m in METHODS}


def test_train_then_predict_gives_what_lvis_eval_scores_as_final_json(tmp_path: Path, fm_root: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(_config(tmp_path, fm_root, "eqlv2", epochs=1)), "--output", str(run)]) == 0
    final = json.loads((run / "final.json").read_text())
    last = final["last_epoch"]
    assert (
        final["task"] == "instance_segmentation" and last["iou_type"] == "segm" and last["protocol"] == "lvis"
    )
    assert {"AP", "APr", "APc", "APf", "box_AP", "box_APr", "per_class_ap", "box_per_class_ap"} <= set(last)
    ckpt = run / "checkpoints" / "last.pt"
    results = tmp_path / "results.json"
    assert main(["predict", str(ckpt), "--split", "test", "--output", str(results), "--draw"]) == 0
    records = json.loads(results.read_text())
    assert records and set(records[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert all(isinstance(r["segmentation"]["counts"], str) for r in records)
    assert results.with_suffix(".png").is_file() and (run / "predictions.png").is_file()
    from gradtail.data.detection.instance import read_instance_json
    from gradtail.metrics.detection import numpy_float_alias
    from gradtail.metrics.instance import mask_ground_truth

    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(mask_ground_truth(read_instance_json(fm_root / "test.json"))))

    def lvis_eval(dets: list[dict]) -> dict:
        with numpy_float_alias():
            gt = lvis.LVIS(str(gt_file))
            ev = lvis.LVISEval(gt, lvis.LVISResults(gt, dets, max_dets=300), "segm")
            ev.run()
        return ev.results

    def same(key: str, got: float) -> bool:
        expected = last[key]
        return got == expected or (expected is None and got == -1)

    as_written = lvis_eval(copy.deepcopy(records))
    for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert same(key, as_written[key]), key
    masks_only = lvis_eval([{k: v for k, v in r.items() if k != "bbox"} for r in records])  # detectron2's way
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert same(key, masks_only[key]), key
    # gradtail eval reproduces the record
    assert main(["eval", str(ckpt), "--json"]) == 0
    again = json.loads((run / "eval" / "final.json").read_text())
    assert again["last_epoch"] == last
    # images given as files: ids 1..N listed beside the results, masks the size of each image
    images = sorted((fm_root / "images" / "test").glob("*.png"))[:2]
    out = tmp_path / "files.json"
    assert main(["predict", str(ckpt), *map(str, images), "--output", str(out), "--draw"]) == 0
    listed = json.loads(out.with_suffix(".images.json").read_text())
    recs = json.loads(out.read_text())
    assert [e["id"] for e in listed] == [1, 2] and {r["image_id"] for r in recs} <= {1, 2}
    assert all(r["segmentation"]["size"] == [64, 64] for r in recs)


@pytest.mark.parametrize("method", ["federated", "seesaw"])
def test_kill_and_resume_is_bit_identical(tmp_path: Path, fm_root: Path, method: str, capsys) -> None:
    cfg = _config(tmp_path, fm_root, method, epochs=2, data={"sampler": "repeat_factor",
                                                          "sampler_params": {"threshold": 0.3}})  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", str(cfg), "--output", str(straight)]) == 0
    assert main(["train", str(cfg), "--output", str(stopped), "--stop-after", "1"]) == 0
    assert "resume with --resume" in capsys.readouterr().out
    assert main(["train", str(cfg), "--output", str(stopped), "--resume"]) == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])  # seesaw's counts, fed weights
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (straight, stopped))
    assert fa["last_epoch"] == fb["last_epoch"] and fa["val_selected"] == fb["val_selected"]
    assert fb["resumes"] == [{"at_epoch": 1, "changed": {}}]


def test_config_errors_are_one_line(tmp_path: Path, fm_root: Path, capsys) -> None:
    cfg = str(_config(tmp_path, fm_root))
    out = ["--output", str(tmp_path / "run")]
    cases = [
        (["--set", "instance_segmentation.benchmak_root=x"],
         "unknown config key 'instance_segmentation.benchmak_root' (did you mean 'benchmark_root'?)"),
        (["--set", "loss.params.kk=3"], "'loss.params.kk'"),
        (["--set", "model.name=faster_rcnn"], "'instance_segmentation' must be one of mask_rcnn"),
        (["--set", "loss.name=efl"], "task 'instance_segmentation' does not take the loss 'efl'"),
        (["--set", "model.params.backbon=tiny"], "'model.params.backbon'"),
        (["--set", "instance_segmentation.mask_threshold=1.5"], "mask_threshold must be in (0, 1)"),
        (["--set", "detection.flip=false"], "unknown config key 'detection' for task"),
    ]  # fmt: skip
    for extra, fragment in cases:
        assert main(["train", cfg, *out, *extra]) == 2, extra
        err = _one_line_error(capsys)
        assert fragment in err, (extra, err)
    assert not (tmp_path / "run").exists()


def test_corrupt_or_missing_annotation_files_and_images_are_one_line_naming_them(
    tmp_path: Path, fm_root: Path, capsys
) -> None:
    _config(tmp_path, fm_root)  # the benchmark files exist after a build: copy them as "own data"
    from gradtail.data.detection.fm_instance import FMInstanceSpec, build_fm_instance

    built = build_fm_instance(fm_root, FMInstanceSpec(**{k: tuple(v) if isinstance(v, list) else v
                                                        for k, v in TINY_FM.items()}))  # fmt: skip
    own = tmp_path / "own"
    shutil.copytree(built.root, own)
    sets = [
        f"instance_segmentation.{split}_annotations={own / f'{split}.json'}" for split in ("train", "test")
    ]
    base = ["train", str(CONFIGS / "fm_mask_rcnn_ce.yaml"), "--output", str(tmp_path / "run"),
            "--set", "data.dataset=coco_files", "--set", f"instance_segmentation.image_root={own / 'images'}",
            *[x for s in sets for x in ("--set", s)], "--set", "optim.epochs=1"]  # fmt: skip
    (own / "test.json").write_text('{"images": [1, 2')
    assert main(base) == 2
    err = _one_line_error(capsys)
    assert str(own / "test.json") in err and "not valid JSON" in err
    (own / "test.json").unlink()
    assert main(base) == 2
    assert f"{own / 'test.json'}: annotation file not found" in _one_line_error(capsys)
    shutil.copy(built.root / "test.json", own / "test.json")
    (own / "images" / "test" / "000002.png").unlink()
    assert main(base) == 2
    assert f"{own / 'images' / 'test' / '000002.png'}: image file not found" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_tiny_suite_runs_and_reports(tmp_path: Path, fm_root: Path, capsys) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "tiny_instance",
        "task": "instance_segmentation",
        "seeds": [0, 1],
        "overrides": {"instance_segmentation": {"benchmark_root": str(fm_root), "benchmark": TINY_FM},
                      "model": {"params": TINY_MODEL}, "optim": {"epochs": 1}, "train": {"threads": 2}},
        "methods": {"ce": {"config": str(CONFIGS / "fm_mask_rcnn_ce.yaml")},
                    "federated": {"config": str(CONFIGS / "fm_mask_rcnn_federated.yaml"),
                                  "label": "federated"}},
    }))  # fmt: skip
    out = tmp_path / "bench"
    assert main(["bench", str(suite), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mask AP" in printed and "box AP" in printed and "| federated" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "instance_segmentation" and len(results["classes"]) == 10
    row = next(r for r in results["table"] if r["method"] == "federated" and r["kind"] == "last_epoch")
    finals = [json.loads((out / "federated" / f"seed{s}" / "final.json").read_text()) for s in (0, 1)]
    assert row["AP"]["values"] == [f["last_epoch"]["AP"] for f in finals]
    assert row["box_AP"]["values"] == [f["last_epoch"]["box_AP"] for f in finals]
    page = (out / "report.html").read_text()
    assert "Mask AP per class against training frequency" in page and "Test images: federated" in page
    # the protocol names the evaluator the runs went through (faster-coco-eval where installed: auto)
    assert results["evaluators"] == sorted({f["last_epoch"]["evaluator"] for f in finals})
    named = {"lvis": "through the official lvis API", "faster_coco_eval": "through faster-coco-eval"}
    assert all(named[e] in page for e in results["evaluators"])


def test_gradtail_tune_selects_on_validation_mask_ap(tmp_path: Path, fm_root: Path, capsys) -> None:
    pytest.importorskip("optuna")
    out = tmp_path / "tune"
    argv = ["tune", str(_config(tmp_path, fm_root, "federated", epochs=1)), "--trials", "2", "--epochs", "1",
            "--no-test", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "validation AP" in capsys.readouterr().out
    best = load_config(next(out.glob("*/best.yaml")))
    assert best.task == "instance_segmentation" and best.loss.name == "federated"
    assert set(best.loss.params) >= {"k", "power"}  # the federated loss's declared search space
