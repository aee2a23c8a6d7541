"""The benchmark harness on a tiny synthetic suite: runs, skipping, resuming, report, validation."""

import json

import pytest
import yaml

from conftest import shipped_suites
from gradtail.bench import load_suite, plan_runs, run_suite
from gradtail.cli.main import main
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError

BASE = {
    "name": "syn",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 10,
        "val_per_class": 3,
        "synthetic": {"num_classes": 4, "per_class": 33, "test_per_class": 10, "image_size": 10},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False},
    "eval": {"many_threshold": 20, "few_threshold": 5},
}


def write_suite(tmp_path, **over):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "la.yaml").write_text(
        yaml.safe_dump({"extends": "base.yaml", "loss": {"name": "logit_adjust"}})
    )
    suite = {
        "name": "tiny",
        "base": "base.yaml",
        "seeds": [0, 1],
        "methods": {
            "ce": {"eval": {"posthoc": ["posthoc_la"]}},
            "la": {"config": "la.yaml"},
            "crt": {
                "after": "ce",
                "train": {"freeze_backbone": True, "reset_classifier": True},
                "data": {"sampler": "class_balanced"},
            },
        },
        "published": {"ce": 50.0},
    }
    suite.update(over)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_suite_runs_reports_and_skips_finished_runs(tmp_path, capsys):
    path = write_suite(tmp_path)
    out = tmp_path / "out"
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| method" in text and "crt" in text
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["table"]]
    assert labels[:3] == ["ce", "la", "crt"] and "ce + posthoc_la" in labels
    ce = results["table"][0]
    assert ce["top1"]["std"] is not None and len(ce["top1"]["values"]) == 2 and ce["published"] == 50.0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Protocol" in html and "SHA-256" in html
    assert (out / "report.md").is_file() and (out / "figure_1.png").is_file()
    # cRT started from the same seed's CE checkpoint
    crt_cfg = yaml.safe_load((out / "crt" / "seed1" / "config.yaml").read_text())
    assert crt_cfg["train"]["init_from"].endswith("ce/seed1/checkpoints/last.pt")
    # second invocation: everything is done, nothing trains
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.count("done, skipped") == 6 and "training" not in text.split("|")[0]


def test_interrupted_run_is_resumed_not_restarted(tmp_path):
    suite = load_suite(write_suite(tmp_path, seeds=[0]))
    out = tmp_path / "out"
    first = plan_runs(suite, out, only=["ce"])[0]
    Trainer(first.config, output_dir=first.directory, verbose=False).fit(
        stop_after=1
    )  # "killed" after epoch 1
    logs = []
    finals = run_suite(suite, out, only=["ce"], progress=False, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert len(finals) == 1 and finals[0]["epochs"] == 2
    lines = (first.directory / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


@pytest.mark.parametrize(
    "over,match",
    [
        ({"methods": {"x": {"loss": {"name": "no_such_loss"}}}}, "no_such_loss"),
        ({"methods": {"x": {"data": {"dataset": "imagenet_typo"}}}}, "imagenet_typo"),
        ({"methods": {"x": {"optim": {"lrate": 1}}}}, "optim.lrate"),
        ({"methods": {"x": {"after": "y"}}}, "after='y'"),
        ({"seeds": 3}, "seeds must be a non-empty list"),
        ({"seeds": [0, "one"]}, "seeds must be"),
        ({"method": {}}, "unknown suite key"),
    ],
)
def test_bad_suites_fail_before_training(tmp_path, over, match):
    path = write_suite(tmp_path, **over)
    with pytest.raises(ConfigError, match=match):
        load_suite(path)


def test_shipped_suites_validate(repo_root):
    paths = shipped_suites()
    assert len(paths) >= 9
    for path in paths:
        suite = load_suite(path, tuned=False)  # tuned twins need a `gradtail tune` output first
        assert suite.methods


def test_report_renders_in_headless_chromium(tmp_path, repo_root):
    """The HTML report opens in a real browser and paints more than a blank page."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "report_screenshot", repo_root / "scripts" / "report_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.find_chromium() is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    path = write_suite(tmp_path, seeds=[0], methods={"ce": {}})
    out = tmp_path / "out"
    assert main(["bench", str(path), "--output", str(out), "--no-progress"]) == 0
    png = module.screenshot(out / "report.html", tmp_path / "shot.png", width=900, height=1600)
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").resize((90, 160)).getcolors(maxcolors=100_000)
    assert colours is not None and len(colours) > 20  # text, table and figures, not a blank page
