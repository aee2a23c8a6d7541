"""Detection through the one harness: ``gradtail train`` / ``eval`` / ``predict`` / ``bench`` / ``report``
on detection configs, with the run directory's rules (refuse, resume bit-identically, overwrite), the
suite's skip / conflict rules, the report, and one-line errors. Tiny Fashion-MNIST detection data (50
training canvases) so it stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gradtail.bench import load_suite
from gradtail.cli.main import main
from gradtail.config import load_config
from gradtail.errors import ConfigError

pytest.importorskip("lvis")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "detection"
TINY_FM = {"train_counts": [30, 20, 14, 11, 8, 6, 4, 3, 2, 1], "val_per_class": 1, "test_per_class": 3}
TINY_MODEL = {"width": 16, "representation": 64}
ONE_STAGE = {**TINY_MODEL, "anchor_sizes": [12, 24, 48], "anchor_scales": 3, "box_loss": "giou"}


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fm_detection")


def _tiny(fm_root: Path, base: str) -> dict:
    params = ONE_STAGE if "retinanet" in base else TINY_MODEL
    return {
        "detection": {"benchmark_root": str(fm_root), "benchmark": TINY_FM},
        "model": {"params": params},
        "train": {"threads": 2},
    }


def _config(tmp_path: Path, fm_root: Path, base: str, epochs: int = 2) -> Path:
    path = tmp_path / f"{base}.yaml"
    raw = {"extends": str(CONFIGS / f"{base}.yaml"), **_tiny(fm_root, base), "optim": {"epochs": epochs}}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_config_names_its_task(tmp_path: Path) -> None:
    assert load_config(CONFIGS / "fm_retinanet_efl.yaml").task == "detection"  # through extends:
    assert load_config(REPO / "configs" / "fashion_mnist_lt" / "ce.yaml").task == "classification"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {CONFIGS / 'fm_faster_rcnn_ce.yaml'}\noptim: {{epochs: 1}}\n")
    assert load_config(child).task == "detection"
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: tracking\n")
    with pytest.raises(ConfigError, match="unknown task 'tracking'; valid: classification, detection"):
        load_config(bad)


def test_train_stop_resume_equals_uninterrupted(tmp_path: Path, fm_root: Path, capsys) -> None:
    cfg = _config(tmp_path, fm_root, "fm_retinanet_efl")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", str(cfg), "--output", str(straight), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--output", str(stopped), "--stop-after", "1", "--no-progress"]) == 0
    assert "resume with --resume" in capsys.readouterr().out
    # a directory with a run is never trained over silently
    assert main(["train", str(cfg), "--output", str(stopped)]) == 2
    assert "already holds an unfinished run" in capsys.readouterr().err
    # a resume may not change what is trained
    assert main(["train", str(cfg), "--output", str(stopped), "--resume", "--set", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.02 -> 0.1" in err and len(err.strip().splitlines()) == 1
    argv = ["train", str(cfg), "--output", str(stopped), "--resume", "--set", "train.keep_checkpoints=2"]
    assert main(argv) == 0
    a = json.loads((straight / "final.json").read_text())
    b = json.loads((stopped / "final.json").read_text())
    assert a["last_epoch"] == b["last_epoch"]
    assert a["val_selected"] == b["val_selected"]
    changed = {"train.keep_checkpoints": [1, 2], "train.progress": [False, True]}  # where and how it runs
    assert b["resumes"] == [{"at_epoch": 1, "changed": changed}]
    sa = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    sb = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert all(torch.equal(sa["loss"][k], sb["loss"][k]) for k in sa["loss"])  # EFL's statistics
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert (stopped / "config.yaml").is_file() and (stopped / "environment.json").is_file()


def test_eval_reproduces_the_final_metrics(tmp_path: Path, fm_root: Path, capsys) -> None:
    cfg = _config(tmp_path, fm_root, "fm_faster_rcnn_eqlv2", epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run), "--no-progress"]) == 0
    final = json.loads((run / "final.json").read_text())
    steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["steps"]
    assert json.loads((run / "diagnostics.json").read_text())["history"][-1]["steps"] == steps > 0
    ckpt = run / "checkpoints" / "last.pt"
    assert main(["eval", str(ckpt), "--json"]) == 0
    again = json.loads((run / "eval" / "final.json").read_text())
    assert again["last_epoch"] == final["last_epoch"]
    assert main(["eval", str(ckpt), "--split", "val", "--output", str(tmp_path / "val")]) == 0
    val = json.loads((tmp_path / "val" / "final.json").read_text())
    assert val["split"] == "val" and val["last_epoch"]["AP"] == pytest.approx(final["val_last_epoch"]["AP"])
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--posthoc", "tau_norm"]) == 2
    assert "task 'detection' does not take the post-hoc adjuster 'tau_norm'" in capsys.readouterr().err


def _suite(tmp_path: Path, fm_root: Path, lr: float = 0.02) -> Path:
    path = tmp_path / "suite.yaml"
    tiny = _tiny(fm_root, "fm_faster_rcnn_ce")
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_detection",
                "task": "detection",
                "seeds": [0, 1],
                "overrides": {**tiny, "optim": {"epochs": 1, "lr": lr}},
                "methods": {
                    "ce": {"config": str(CONFIGS / "fm_faster_rcnn_ce.yaml")},
                    "eqlv2": {"config": str(CONFIGS / "fm_faster_rcnn_eqlv2.yaml"), "label": "EQLv2"},
                },
            }
        )
    )
    return path


def test_bench_runs_skips_and_reports(tmp_path: Path, fm_root: Path, capsys) -> None:
    suite, out = _suite(tmp_path, fm_root), tmp_path / "bench"
    assert load_suite(suite).task == "detection"
    assert main(["bench", str(suite), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| EQLv2 " in printed and "report:" in printed
    results = json.loads((out / "results.json").read_text())
    finals = {
        (m, s): json.loads((out / m / f"seed{s}" / "final.json").read_text())
        for m in ("ce", "eqlv2")
        for s in (0, 1)
    }
    last = [row for row in results["table"] if row["kind"] == "last_epoch"]
    for row in last:
        values = [finals[(row["method"], s)]["last_epoch"]["AP"] for s in (0, 1)]
        assert row["AP"]["values"] == values and row["AP"]["mean"] == pytest.approx(sum(values) / 2)
    assert [row["label"] for row in last] == ["ce", "EQLv2"]
    assert len(results["classes"]) == 10 and set(results["per_class_ap"]) == {"ce", "eqlv2"}
    page = (out / "report.html").read_text()
    assert "AP per class against training frequency" in page and "Test images: EQLv2 (seed 0)" in page
    # the report alone, from the finished runs
    assert main(["report", str(suite), "--output", str(out)]) == 0
    assert "| EQLv2 " in capsys.readouterr().out
    # a second call trains nothing
    assert main(["bench", str(suite), "--output", str(out)]) == 0
    assert "4 runs (4 already done)" in capsys.readouterr().out
    # an edited suite is an error before any training, unless --overwrite (then those runs retrain)
    edited = _suite(tmp_path, fm_root, lr=0.01)
    argv = ["bench", str(edited), "--output", str(out), "--only", "ce", "--seeds", "0", "--no-progress"]
    assert main(argv) == 2
    assert "holds a run of another config" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert yaml.safe_load((out / "ce" / "seed0" / "config.yaml").read_text())["optim"]["lr"] == 0.01


def test_suite_errors_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    a = "{a: {config: " + str(CONFIGS / "fm_faster_rcnn_ce.yaml")
    ce = REPO / "configs" / "fashion_mnist_lt" / "ce.yaml"
    cases = {
        f"task: detection\nmethods: {a}}}}}\nbogus: 1\n": r"unknown suite key\(s\) \['bogus'\]",
        "task: detection\nmethods: {a: {}}\n": "method 'a' has no config and the suite has no base",
        f"task: detection\nmethods: {a}, optim: {{epoch: 2}}}}}}\n": "unknown config key 'optim.epoch'",
        f"task: detection\nmethods: {a}, model: {{name: yolo}}}}}}\n": "method 'a': model.name for task",
        f"task: detection\nseeds: [a]\nmethods: {a}}}}}\n": "seeds must be a non-empty list",
        f"methods: {a}}}, b: {{config: {ce}}}}}\n": r"mixes tasks \(a: detection, b: classification\)",
        f"task: segmentation\nmethods: {a}}}}}\n": "says task: segmentation but its methods are detection",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_suite(path)


def test_shipped_detection_suite_loads() -> None:
    suite = load_suite(REPO / "suites" / "detection_3seeds.yaml")
    names = {"faster_rcnn_ce", "faster_rcnn_eqlv2", "retinanet_focal", "retinanet_efl"}
    assert {m.name for m in suite.methods} >= names and suite.task == "detection"
    assert suite.run_config(suite.method("faster_rcnn_eqlv2"), 2).train.seed == 2


@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path: Path, fm_root: Path) -> None:
    """``gradtail train`` of a detection config under torchrun (gloo): DDP, rank-strided images, rank 0
    writes the run once, the loss's statistics summed across both processes."""
    import subprocess
    import sys

    cfg = _config(tmp_path, fm_root, "fm_faster_rcnn_eqlv2", epochs=1)
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "-m", "gradtail", "train", str(cfg), "--output", str(out), "--set", "train.threads=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[:6000]
    assert r.stdout.count("gradtail: detection run") == 1
    assert json.loads((out / "environment.json").read_text())["world_size"] == 2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["steps"] == 4  # 50 images / 2 ranks / batch 8
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert int(state["loss"]["stats.steps"]) == 4  # EQLv2's statistics, summed over both ranks each step
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_device_setting(tmp_path: Path, fm_root: Path, capsys) -> None:
    """train.device: cpu trains there (recorded); cuda where there is none is a one-line error."""
    cfg = _config(tmp_path, fm_root, "fm_faster_rcnn_ce", epochs=1)
    argv = ["train", str(cfg), "--output", str(tmp_path / "cpu"), "--set", "train.device=cpu"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "cpu" / "environment.json").read_text())["device"] == "cpu"
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["train", str(cfg), "--output", str(tmp_path / "gpu"), "--set", "train.device=cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_its_record(tmp_path: Path, fm_root: Path) -> None:
    cfg = _config(tmp_path, fm_root, "fm_retinanet_efl", epochs=1)
    argv = ["train", str(cfg), "--output", str(tmp_path / "gpu"), "--set", "train.device=cuda"]
    assert main(argv) == 0
    final = json.loads((tmp_path / "gpu" / "final.json").read_text())
    assert final["last_epoch"]["protocol"] == "lvis"
    assert json.loads((tmp_path / "gpu" / "environment.json").read_text())["device"].startswith("cuda")
