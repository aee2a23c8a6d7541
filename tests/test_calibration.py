"""Calibration: class-wise ECE against a NumPy loop, temperature scaling against a brute-force NLL
minimum, and on a trained run (validation NLL lowered, accuracy unchanged)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradtail.config import config_from_dict
from gradtail.engine.trainer import Trainer
from gradtail.errors import InputError
from gradtail.metrics import classwise_calibration_error, evaluate_logits
from gradtail.posthoc import create_posthoc


def classwise_ece_numpy(logits: np.ndarray, y: np.ndarray, bins: int) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n, c = p.shape
    total = 0.0
    for j in range(c):
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            inside = (p[:, j] <= hi) & ((p[:, j] > lo) if b > 0 else True)
            if inside.any():
                total += inside.sum() / n * abs((y[inside] == j).mean() - p[inside, j].mean())
    return total / c


@pytest.mark.parametrize("bins", [5, 15])
def test_classwise_ece_matches_numpy_loop(bins):
    gen = torch.Generator().manual_seed(bins)
    logits = 3 * torch.randn(200, 6, generator=gen)
    y = torch.randint(0, 6, (200,), generator=gen)
    expected = classwise_ece_numpy(logits.double().numpy(), y.numpy(), bins)
    assert classwise_calibration_error(logits, y, bins) == pytest.approx(expected, abs=1e-12)
    result = evaluate_logits(logits, y, train_counts=[100, 50, 20, 10, 5, 2], num_bins=bins)
    assert result.classwise_ece == pytest.approx(expected, abs=1e-12)
    assert result.summary()["classwise_ece"] == result.classwise_ece


def test_temperature_matches_brute_force_minimum_and_keeps_predictions():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(60)
    logits = 5.0 * (torch.randn(240, 4, generator=gen) + 1.2 * torch.eye(4)[y])  # overconfident
    ts = create_posthoc("temperature").fit(logits, y)
    z = logits.double().numpy()

    def nll(t: float) -> float:
        s = z / t
        s = s - s.max(axis=1, keepdims=True)
        return float(-(s[np.arange(len(y)), y.numpy()] - np.log(np.exp(s).sum(axis=1))).mean())

    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 20001))
    best = grid[np.argmin([nll(t) for t in grid])]
    assert ts.temperature == pytest.approx(best, rel=2e-3)
    assert ts.temperature > 1.5  # sharp logits are softened
    params = ts.fitted_params()
    assert params["val_nll_after"] < params["val_nll_before"]
    assert torch.equal(ts.transform(logits).argmax(1), logits.argmax(1))
    restored = create_posthoc("temperature")
    restored.load_state_dict(ts.state_dict())
    assert torch.equal(restored.transform(logits), ts.transform(logits))


def test_temperature_rejects_bad_input():
    ts = create_posthoc("temperature")
    with pytest.raises(InputError, match="NaN"):
        ts.fit(torch.tensor([[0.0, math.nan]]), torch.tensor([0]))
    with pytest.raises(InputError, match=r"labels must be in \[0, 2\)"):
        ts.fit(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(InputError, match="expected"):
        ts.fit(torch.zeros(3), torch.tensor([0, 1, 0]))


def test_temperature_on_a_trained_run_lowers_validation_nll_and_keeps_accuracy(tmp_path):
    cfg = config_from_dict(
        {
            "name": "calib",
            "data": {
                "dataset": "synthetic",
                "imbalance_factor": 10,
                "val_per_class": 10,
                "synthetic": {"num_classes": 4, "per_class": 60, "test_per_class": 30, "image_size": 12},
            },
            "model": {"name": "small_cnn", "params": {"width": 8}},
            "optim": {"lr": 0.1, "batch_size": 16, "epochs": 4, "warmup_epochs": 0},
            "train": {"seed": 0, "progress": False},
            "eval": {"posthoc": ["temperature"]},
        }
    )
    final = Trainer(cfg, output_dir=tmp_path, verbose=False).fit()
    raw, scaled = final["last_epoch"], final["posthoc"]["temperature"]
    params = scaled["params"]
    assert params["val_nll_after"] < params["val_nll_before"]
    assert params["temperature"] != pytest.approx(1.0)
    for key in ("top1", "balanced_accuracy", "per_class", "many", "medium", "few"):
        assert scaled[key] == raw[key], key  # dividing by T > 0 keeps every prediction
    assert scaled["nll"] != pytest.approx(raw["nll"])
    assert (tmp_path / "extras" / "posthoc" / "temperature.pt").is_file()  # gradtail predict can apply it
