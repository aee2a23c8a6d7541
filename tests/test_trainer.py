"""End-to-end training on synthetic data: outputs, learning, exact resume, non-finite loss."""

import json

import pytest
import torch

from gradtail.config import config_from_dict
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError, TrainingError


def tiny_config(**over):
    cfg = {
        "name": "tiny",
        "data": {
            "dataset": "synthetic",
            "imbalance_factor": 10,
            "val_per_class": 4,
            "synthetic": {
                "num_classes": 4,
                "per_class": 44,
                "test_per_class": 20,
                "image_size": 12,
                "noise": 0.3,
            },
            "augment": {"crop_padding": 1, "hflip": True},
        },
        "model": {"name": "small_cnn", "params": {"width": 4}},
        "loss": {"name": "ce"},
        "optim": {"lr": 0.05, "batch_size": 16, "epochs": 4, "warmup_epochs": 1, "schedule": "cosine"},
        "train": {"seed": 1, "progress": False, "diagnostics": True},
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return config_from_dict(cfg)


def test_fit_writes_run_outputs(tmp_path):
    cfg = tiny_config()
    final = Trainer(cfg, output_dir=tmp_path).fit()
    for name in (
        "config.yaml",
        "environment.json",
        "subset.json",
        "metrics.jsonl",
        "final.json",
        "diagnostics.json",
        "checkpoints/last.pt",
    ):
        assert (tmp_path / name).is_file(), name
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    subset = json.loads((tmp_path / "subset.json").read_text())
    assert subset["counts"] == [40, 20, 9, 4] and len(subset["sha256"]) == 64
    assert final["class_counts"] == [40, 20, 9, 4]
    assert 0.0 <= final["last_epoch"]["top1"] <= 1.0
    assert final["val_selected"]["epoch"] in (1, 2, 3, 4)


def test_learns_the_synthetic_task(tmp_path):
    # Prototypes are random pixel patterns: flips and crops would scramble them, so no augmentation.
    cfg = tiny_config(optim__epochs=8, data__imbalance_factor=1.0)
    cfg.data.augment.crop_padding = 0
    cfg.data.augment.hflip = False
    final = Trainer(cfg, output_dir=tmp_path).fit()
    assert final["last_epoch"]["top1"] > 0.6  # chance is 0.25


def test_resume_is_bit_identical(tmp_path):
    cfg = tiny_config()
    full = Trainer(cfg, output_dir=tmp_path / "full")
    a = full.fit()
    part = Trainer(cfg, output_dir=tmp_path / "part")
    part.fit(stop_after=2)
    assert part.epoch == 2
    resumed = Trainer(cfg, output_dir=tmp_path / "part")
    b = resumed.fit(resume=True)
    assert a["last_epoch"] == b["last_epoch"]
    assert a["val_selected"] == b["val_selected"]
    for (k, va), vb in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(
        full.diagnostics.state_dict().items(), resumed.diagnostics.state_dict().values(), strict=False
    ):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_non_finite_loss_names_the_step(tmp_path):
    trainer = Trainer(tiny_config(), output_dir=tmp_path)

    class NanLoss(torch.nn.Module):
        def forward(self, logits, targets):
            return torch.nn.functional.cross_entropy(logits, targets) * (
                float("nan") if self.calls == 2 else 1.0
            )

        def set_epoch(self, epoch):
            pass

        def __init__(self):
            super().__init__()
            self.calls = 0

        def __call__(self, *a):
            self.calls += 1
            return super().__call__(*a)

    trainer.loss_fn = NanLoss()
    with pytest.raises(TrainingError, match="global step 1"):
        trainer.train_epoch(0, progress=False)


def test_resume_with_other_subset_is_refused(tmp_path):
    Trainer(tiny_config(optim__epochs=1), output_dir=tmp_path).fit()
    other = tiny_config(optim__epochs=1, data__subset_seed=5)
    with pytest.raises(ConfigError, match=r"data\.subset_seed: 0 -> 5"):
        Trainer(other, output_dir=tmp_path).fit(resume=True)
    # the same config on other data (a path is resume-safe, the subset hash is not): refused by the hash
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    state["subset_sha256"] = "0" * 64
    with pytest.raises(ConfigError, match="different training subset"):
        Trainer(tiny_config(optim__epochs=1), output_dir=tmp_path / "other").load_state(state)


def test_crt_stage_two_freezes_backbone_and_retrains_classifier(tmp_path):
    stage1 = Trainer(tiny_config(optim__epochs=1), output_dir=tmp_path / "s1")
    stage1.fit()
    cfg = tiny_config(optim__epochs=2, data__sampler="class_balanced")
    cfg.train.init_from = str(tmp_path / "s1" / "checkpoints" / "last.pt")
    cfg.train.freeze_backbone = True
    cfg.train.reset_classifier = True
    stage2 = Trainer(cfg, output_dir=tmp_path / "s2")
    head_at_start = stage2.model.classifier.weight.detach().clone()
    assert not torch.equal(head_at_start, stage1.model.classifier.weight)  # re-initialised
    stage2.fit()
    before = stage1.model.backbone.state_dict()
    after = stage2.model.backbone.state_dict()
    for k in before:  # weights and BatchNorm running statistics untouched
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(stage2.model.classifier.weight, head_at_start)


def test_init_from_other_subset_is_refused(tmp_path):
    Trainer(tiny_config(optim__epochs=1), output_dir=tmp_path / "s1").fit()
    cfg = tiny_config(optim__epochs=1, data__subset_seed=3)
    cfg.train.init_from = str(tmp_path / "s1" / "checkpoints" / "last.pt")
    with pytest.raises(ConfigError, match="another subset"):
        Trainer(cfg, output_dir=tmp_path / "s2")


@pytest.mark.parametrize("loss", ["softmax_eql", "gala", "seesaw"])
def test_two_pass_sam_updates_loss_statistics_once_per_step(tmp_path, loss):
    cfg = tiny_config(optim__epochs=1)
    cfg.loss.name = loss
    cfg.update_rule.name = "sam"
    trainer = Trainer(cfg, output_dir=tmp_path)
    trainer.fit()
    steps = trainer.global_step
    assert trainer.diagnostics.stats.steps.item() == steps
    if loss == "seesaw":  # one epoch of the instance sampler sees every training image once
        assert trainer.loss_fn.cum_samples.tolist() == [float(n) for n in trainer.data.class_counts]
    else:
        assert trainer.loss_fn.stats.steps.item() == steps


def test_posthoc_adjusters_run_and_unknown_names_fail_before_training(tmp_path):
    cfg = tiny_config(optim__epochs=1)
    cfg.eval.posthoc = ["posthoc_la", "gala_rebalance", "tau_norm"]
    final = Trainer(cfg, output_dir=tmp_path).fit()
    assert set(final["posthoc"]) == {"posthoc_la", "gala_rebalance", "tau_norm"}
    for res in final["posthoc"].values():
        assert 0.0 <= res["top1"] <= 1.0 and "tau" in res["params"]
    cfg.eval.posthoc = ["posthoc_typo"]
    with pytest.raises(ConfigError, match="posthoc_typo"):
        Trainer(cfg, output_dir=tmp_path / "b")
    cfg.eval.posthoc = ["posthoc_la"]
    cfg.data.val_per_class = 0
    with pytest.raises(ConfigError, match="validation split"):
        Trainer(cfg, output_dir=tmp_path / "c")


def test_trains_on_an_image_list_dataset(tmp_path):
    """The trainer on the large-scale path (list files + decoding workers' code), with a tiny image tree."""
    import warnings

    import numpy as np
    from PIL import Image

    root = tmp_path / "places"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", [6, 3, 1]), ("val", [1, 1, 1]), ("test", [2, 2, 2])):
        lines = []
        for label, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/c{label}/img {i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / rel)
                lines.append(f"{rel} {label}")
        (root / f"Places_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    cfg = config_from_dict(
        {
            "name": "places_tiny",
            "data": {"dataset": "places_lt", "image_root": str(root), "image_size": 16, "num_workers": 0},
            "model": {"name": "resnet18"},
            "optim": {"batch_size": 4, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine"},
            "train": {"progress": False, "diagnostics": False},
            "eval": {"batch_size": 4},
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # list sizes differ from the real Places-LT
        trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
        final = trainer.fit()
    assert final["class_counts"][:3] == [6, 3, 1] and len(final["class_counts"]) == 365
    assert final["last_epoch"]["num_samples"] == 6
    subset = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert subset["train_images"] == 10 and len(subset["sha256"]) == 64


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path):
    cfg = tiny_config(optim__epochs=1)
    cfg.train.sync_batchnorm = True
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        Trainer(cfg, output_dir=tmp_path)


def test_checkpoint_carries_class_names_and_preprocessing(tmp_path):
    """What ``gradtail predict`` needs without the training data (contracts.RunData.preprocessing)."""
    trainer = Trainer(tiny_config(optim__epochs=1), output_dir=tmp_path)
    trainer.fit()
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["class_names"] == trainer.data.class_names and len(state["class_names"]) == 4
    pre = state["preprocessing"]
    assert pre["transform"] == "in_memory" and pre["mode"] == "L" and pre["size"] == [12, 12]
    assert pre["pad_to"] is None and pre["mean"] == trainer.data.mean and pre["std"] == trainer.data.std
