"""GradientRatioObserver and the g_j plot (eql.md §6): works on any loss, snapshots, checkpoints, PNG."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtail.contracts import StepObserver
from gradtail.diagnostics import GradientRatioObserver, classes_below_ratio, plot_gradient_ratios
from gradtail.errors import InputError, TrainingError
from gradtail.gradstats import frozen_statistics
from gradtail.losses.equalization import SoftmaxEQL

C = 4


def ce_step(observer: GradientRatioObserver, seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (n,), generator=gen)
    observer.observe(z, y)
    F.cross_entropy(z, y).backward()
    return z.detach(), y


def numpy_ce_sums(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed form for CE (eql.md §4 with I = 1): |softmax(z) - onehot(y)| / n, split by target."""
    e = np.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    onehot = np.eye(z.shape[1])[y]
    g = np.abs(p - onehot) / z.shape[0]
    return (g * onehot).sum(0), (g * (1 - onehot)).sum(0)


def test_is_a_step_observer_and_matches_closed_form_ce_statistics() -> None:
    observer = GradientRatioObserver(C)
    assert isinstance(observer, StepObserver)
    pos, neg = np.zeros(C), np.zeros(C)
    for s in range(3):
        z, y = ce_step(observer, s)
        p, n = numpy_ce_sums(z.numpy(), y.numpy())
        pos, neg = pos + p, neg + n
    np.testing.assert_allclose(observer.stats.pos.numpy(), pos, rtol=1e-12)
    np.testing.assert_allclose(observer.stats.neg.numpy(), neg, rtol=1e-12)
    snap = observer.end_epoch(1)
    assert snap["epoch"] == 1 and snap["steps"] == 3
    np.testing.assert_allclose(snap["g"], pos / (neg + 1e-10), rtol=1e-12)
    assert snap["P"] == observer.stats.pos.tolist() and snap["N"] == observer.stats.neg.tolist()


def test_observer_on_a_stateful_loss_sees_the_loss_own_statistics() -> None:
    """The gradient at the raw logits equals the gradient at softmax-EQL's adjusted logits."""
    observer, loss = GradientRatioObserver(C), SoftmaxEQL(C, ignore_index=-100)
    for s in range(3):
        gen = torch.Generator().manual_seed(s)
        z = torch.randn(6, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, C, (6, 2, 2), generator=gen)
        y[0, 0, 0] = -100  # ignored by both
        observer.observe(z, y)
        loss(z, y).backward()
    torch.testing.assert_close(observer.stats.pos, loss.stats.pos, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(observer.stats.neg, loss.stats.neg, rtol=1e-12, atol=1e-15)


def test_no_op_in_eval_no_grad_frozen_or_detached_logits() -> None:
    observer = GradientRatioObserver(C)
    z, y = torch.randn(4, C, requires_grad=True), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        observer.observe(z * 1.0, y)
    with torch.inference_mode():
        observer.observe(torch.randn(4, C), y)
    with frozen_statistics():
        observer.observe(z, y)
    observer.observe(z.detach(), y)
    observer.eval()
    observer.observe(z, y)
    F.cross_entropy(z, y).backward()
    assert observer.stats.is_empty and not observer.stats.hook_pending


def test_a_hook_that_never_fired_is_loud_at_end_of_epoch() -> None:
    observer = GradientRatioObserver(C)
    observer.observe(torch.randn(4, C, requires_grad=True), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TrainingError, match="never fired"):
        observer.end_epoch(1)
    with pytest.raises(InputError):
        observer.observe(torch.randn(4, C, requires_grad=True), torch.zeros(4))


def test_epoch_without_steps_warns() -> None:
    observer = GradientRatioObserver(C)
    ce_step(observer, 0)
    observer.end_epoch(1)
    with pytest.warns(RuntimeWarning, match="no training step"):
        observer.end_epoch(2)


def test_grad_scaler_gradients_are_unscaled() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, plain = GradientRatioObserver(C, grad_scaler=scaler), GradientRatioObserver(C)
    z, y = torch.randn(5, C, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, 2, 3, 0])
    assert scaler.is_enabled()
    scaled.observe(z, y)
    scaler.scale(F.cross_entropy(z, y)).backward()
    assert float(z.grad.abs().max()) > 10  # the backward really was scaled
    z2 = z.detach().clone().requires_grad_()
    plain.observe(z2, y)
    F.cross_entropy(z2, y).backward()
    torch.testing.assert_close(scaled.stats.pos, plain.stats.pos, rtol=1e-12, atol=0)


def test_state_dict_keeps_history_so_resume_loses_nothing() -> None:
    uninterrupted, first = GradientRatioObserver(C), GradientRatioObserver(C)
    for epoch in range(1, 5):
        for s in range(2):
            ce_step(uninterrupted, 10 * epoch + s)
            if epoch <= 2:
                ce_step(first, 10 * epoch + s)
        uninterrupted.end_epoch(epoch)
        if epoch <= 2:
            first.end_epoch(epoch)
    state = first.state_dict()
    resumed = GradientRatioObserver(C)
    resumed.load_state_dict(state)
    for epoch in (3, 4):
        for s in range(2):
            ce_step(resumed, 10 * epoch + s)
        resumed.end_epoch(epoch)
    assert resumed.history == uninterrupted.history
    assert json.loads(json.dumps(resumed.to_json())) == uninterrupted.to_json()


def test_plot_writes_a_png_and_lists_starved_classes(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "steps": 10 * e, "P": [0.0] * C, "N": [0.0] * C, "g": [1.1, 0.9, 0.45 + e / 100, e / 10]}
        for e in range(1, 4)
    ]
    record = {"num_classes": C, "history": history}
    assert classes_below_ratio(history) == [2, 3]
    assert classes_below_ratio(record, threshold=1.0) == [1, 2, 3]
    path = plot_gradient_ratios(record, [500, 100, 20, 5], tmp_path / "plots" / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(InputError):
        plot_gradient_ratios(history, [1, 2], tmp_path / "bad.png")
    with pytest.raises(InputError):
        classes_below_ratio([])


def test_saved_json_round_trips(tmp_path: Path) -> None:
    observer = GradientRatioObserver(C)
    ce_step(observer, 1)
    observer.end_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = observer.save_json(tmp_path / "diagnostics.json")
    assert json.loads(path.read_text())["history"][0]["steps"] == 1
