"""``gradtail train`` under torchrun: 2 CPU processes (gloo) against 1 process with the same global batch."""

import json
import subprocess
import sys

import pytest
import yaml

CONFIG = {
    "name": "ddp_tiny",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 1,
        "val_per_class": 4,
        "synthetic": {
            "num_classes": 4,
            "per_class": 44,
            "test_per_class": 20,
            "image_size": 12,
            "noise": 0.3,
        },
        "augment": {"crop_padding": 0, "hflip": False},
    },
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "loss": {"name": "softmax_eql"},
    "optim": {"lr": 0.1, "batch_size": 16, "epochs": 8, "warmup_epochs": 0, "schedule": "cosine"},
    "train": {"progress": False},
}


def _run(tmp_path, name, nproc):
    cfg = dict(CONFIG, optim=dict(CONFIG["optim"], batch_size=16 // nproc))  # same global batch
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [
        *(launcher if nproc > 1 else [sys.executable]),
        "-m",
        "gradtail",
        "train",
        str(path),
        "--output",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return r, json.loads((out / "final.json").read_text()), out


@pytest.mark.distributed
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    _, one, _ = _run(tmp_path, "one", 1)
    r, two, out = _run(tmp_path, "two", 2)
    assert r.stdout.count("gradtail: classification run") == 1  # rank 0 speaks, once
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 9))  # written once, by rank 0
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 2
    assert one["last_epoch"]["top1"] > 0.6 and two["last_epoch"]["top1"] > 0.6  # chance: 0.25
    # BatchNorm sees half batches per rank, so "equal" means within noise, not to the bit
    assert abs(one["last_epoch"]["top1"] - two["last_epoch"]["top1"]) < 0.1


@pytest.mark.distributed
def test_resume_a_two_process_run_with_one_process(tmp_path):
    """A checkpoint holds only global state (model, optimizer, synced statistics, history), so a run
    started by 2 processes can be resumed by 1 (the per-process batch is the config's, so the global
    batch changes with the world size)."""
    import torch

    cfg = dict(CONFIG, optim=dict(CONFIG["optim"], batch_size=8, epochs=3))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = ["-m", "gradtail", "train", str(path), "--output", str(out)]
    r = subprocess.run([*two, *common, "--stop-after", "1"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    steps_after_one = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["loss"]["stats.steps"]
    r = subprocess.run([sys.executable, *common, "--resume"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    final_state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert int(final_state["loss"]["stats.steps"]) > int(steps_after_one) > 0  # statistics continued
    assert json.loads((out / "final.json").read_text())["epochs"] == 3
