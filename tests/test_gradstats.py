"""GradientStatistics: sums vs NumPy loops, masking, scale, non-finite skip, hooks (eql.md §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtail.errors import InputError, TrainingError
from gradtail.gradstats import GradientStatistics, flatten_class_dim, frozen_statistics, statistics_frozen


def _loop_sums(grad: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P_j, N_j by explicit loops (eql.md §1 definitions)."""
    n, c = grad.shape
    pos, neg = np.zeros(c), np.zeros(c)
    for i in range(n):
        if not valid[i]:
            continue
        for j in range(c):
            if j == targets[i]:
                pos[j] += abs(grad[i, j])
            else:
                neg[j] += abs(grad[i, j])
    return pos, neg


def test_softmax_update_matches_loops_with_mask_and_scale() -> None:
    rng = np.random.default_rng(0)
    grad = rng.standard_normal((9, 4))
    targets = np.array([0, 1, 2, 3, -100, 1, 1, 7, 0])  # -100 and 7 are masked out
    valid = (targets >= 0) & (targets < 4)
    stats = GradientStatistics(4)
    stats.update_from_softmax_grad(
        torch.tensor(grad).abs(), torch.tensor(targets), torch.tensor(valid), scale=torch.tensor(0.25)
    )
    pos, neg = _loop_sums(grad, targets, valid)
    np.testing.assert_allclose(stats.pos.numpy(), 0.25 * pos, rtol=1e-14)
    np.testing.assert_allclose(stats.neg.numpy(), 0.25 * neg, rtol=1e-14)
    assert stats.pos.dtype == torch.float64 and int(stats.steps) == 1
    np.testing.assert_allclose(stats.ratio().numpy(), 0.25 * pos / (0.25 * neg + 1e-10), rtol=1e-14)


def test_elementwise_update_matches_loops() -> None:
    rng = np.random.default_rng(1)
    grad = np.abs(rng.standard_normal((6, 3)))
    t = (rng.random((6, 3)) < 0.3).astype(np.float64)
    stats = GradientStatistics(3)
    stats.update_from_elementwise_grad(torch.tensor(grad, dtype=torch.float32), torch.tensor(t), scale=0.5)
    g32 = grad.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.pos.numpy(), 0.5 * (g32 * t).sum(0), rtol=1e-14)
    np.testing.assert_allclose(stats.neg.numpy(), 0.5 * (g32 * (1 - t)).sum(0), rtol=1e-14)


def test_produced_equals_the_matrix_reading_with_valid_mask() -> None:
    """phi (``produced``) is the off-diagonal column sums of GALA's matrix M[j, c] (gala.md §1), P its
    diagonal, N its off-diagonal row sums; M is built here by a loop, the statistics keep vectors only."""
    rng = np.random.default_rng(2)
    grad = np.abs(rng.standard_normal((7, 3)))
    targets = np.array([0, 2, 2, 1, -1, 0, 1])
    valid = targets >= 0
    stats = GradientStatistics(3, track_produced=True)
    stats.update_from_softmax_grad(torch.tensor(grad), torch.tensor(targets), torch.tensor(valid))
    m = np.zeros((3, 3))
    for i in range(7):
        if valid[i]:
            m[:, targets[i]] += grad[i]
    assert sorted(stats.state_dict()) == ["neg", "pos", "produced", "steps"]
    np.testing.assert_allclose(stats.pos.numpy(), np.diag(m), rtol=1e-14)
    np.testing.assert_allclose(stats.produced.numpy(), m.sum(0) - np.diag(m), rtol=1e-14)
    np.testing.assert_allclose(stats.negative_produced().numpy(), m.sum(0) - np.diag(m), rtol=1e-14)
    np.testing.assert_allclose(stats.neg.numpy(), m.sum(1) - np.diag(m), rtol=1e-14)
    with pytest.raises(TrainingError, match="track_produced"):
        GradientStatistics(3).negative_produced()


def test_a_matrix_in_an_old_checkpoint_becomes_produced() -> None:
    """Checkpoints written before issue #29 hold ``matrix``; its off-diagonal column sums are loaded."""
    m = torch.arange(9, dtype=torch.float64).view(3, 3)
    old = {"pos": torch.diagonal(m).clone(), "neg": torch.ones(3, dtype=torch.float64),
           "steps": torch.tensor(4), "matrix": m}  # fmt: skip
    stats = GradientStatistics(3, track_produced=True)
    stats.load_state_dict(old)
    assert stats.produced.tolist() == (m.sum(0) - torch.diagonal(m)).tolist() == [9.0, 8.0, 7.0]
    assert int(stats.steps) == 4 and "matrix" not in stats.state_dict()


def test_class_sums_equal_float64_sums_in_every_layout() -> None:
    """class_sums: the per-class float64 sums of a step, also in blocks (many rows) and per pixel."""
    from gradtail.gradstats import class_sums

    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 3), (3000, 200), (4, 3, 5, 7), (0, 4)]:
        x = torch.randn(*shape, generator=gen)
        dims = [0, *range(2, x.dim())]
        want = x.double().sum(dim=dims)
        got = class_sums(x)
        assert got.dtype == torch.float64 and got.shape == (shape[1],)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_non_finite_step_is_skipped_and_not_counted() -> None:
    stats = GradientStatistics(3)
    stats.update_from_softmax_grad(torch.ones(2, 3), torch.tensor([0, 1]))
    before = (stats.pos.clone(), stats.neg.clone())
    bad = torch.ones(2, 3)
    bad[1, 2] = float("inf")
    stats.update_from_softmax_grad(bad, torch.tensor([0, 1]))
    assert torch.equal(stats.pos, before[0]) and torch.equal(stats.neg, before[1])
    assert int(stats.steps) == 1


def test_frozen_statistics_blocks_updates() -> None:
    stats = GradientStatistics(2)
    with frozen_statistics():
        assert statistics_frozen()
        stats.update_from_softmax_grad(torch.ones(1, 2), torch.tensor([0]))
        stats.update_from_elementwise_grad(torch.ones(1, 2), torch.ones(1, 2))
    assert not statistics_frozen()
    assert stats.is_empty and float(stats.pos.sum()) == 0.0


def test_shape_errors_are_loud() -> None:
    stats = GradientStatistics(3)
    with pytest.raises(InputError):
        stats.update_from_softmax_grad(torch.ones(2, 4), torch.tensor([0, 1]))
    with pytest.raises(InputError):
        stats.update_from_elementwise_grad(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(TrainingError):
        produced_stats = GradientStatistics(3, track_produced=True)
        produced_stats.update_from_elementwise_grad(torch.ones(2, 3), torch.ones(2, 3))


def test_flatten_class_dim() -> None:
    x = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    flat = flatten_class_dim(x)
    assert flat.shape == (8, 3)
    assert torch.equal(flat[1], x[0, :, 0, 1])


# ------------------------------------------------------------------ hooks
def test_hook_collects_autograd_gradient_of_ce() -> None:
    torch.manual_seed(0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 3, 3, 2, 0])
    stats = GradientStatistics(4)
    stats.attach_hook(z, y)
    assert stats.hook_pending
    F.cross_entropy(z, y).backward()
    assert not stats.hook_pending
    expected = (torch.softmax(z.detach(), 1) - F.one_hot(y, 4)).abs().numpy() / 6
    pos, neg = _loop_sums(expected, y.numpy(), np.ones(6, dtype=bool))
    np.testing.assert_allclose(stats.pos.numpy(), pos, rtol=1e-12)
    np.testing.assert_allclose(stats.neg.numpy(), neg, rtol=1e-12)


def test_hook_that_never_fires_is_an_error() -> None:
    stats = GradientStatistics(3)
    z = torch.randn(2, 3, requires_grad=True)
    stats.attach_hook(z, torch.tensor([0, 1]))
    with pytest.raises(TrainingError, match="never fired"):
        stats.attach_hook(torch.randn(2, 3, requires_grad=True), torch.tensor([0, 1]))
    stats.attach_hook(z, torch.tensor([0, 1]))
    with pytest.raises(TrainingError, match="never fired"):
        stats.check_hook_fired()
    with pytest.raises(TrainingError, match="require grad"):
        stats.attach_hook(torch.randn(2, 3), torch.tensor([0, 1]))


def test_hook_ignores_create_graph_gradients_but_counts_the_backward() -> None:
    """A regularizer's autograd.grad(loss, logits, create_graph=True) (BGP) must not be accumulated."""
    torch.manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64)
    lin = torch.nn.Linear(3, 4).double()
    z = lin(x)
    y = torch.tensor([0, 1, 2, 3, 0])
    stats = GradientStatistics(4)
    stats.attach_hook(z, y)
    loss = F.cross_entropy(z, y)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    assert int(stats.steps) == 0
    total = loss + 0.1 * g.norm()
    total.backward()
    assert int(stats.steps) == 1
    z2 = lin(x)
    loss2 = F.cross_entropy(z2, y)
    (g2,) = torch.autograd.grad(loss2, z2, create_graph=True)
    (expected,) = torch.autograd.grad(loss2 + 0.1 * g2.norm(), z2)
    onehot = F.one_hot(y, 4).double()
    np.testing.assert_allclose(stats.pos.numpy(), (expected.abs() * onehot).sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.neg.numpy(), (expected.abs() * (1 - onehot)).sum(0).numpy(), rtol=1e-12)


def test_hook_segmentation_shapes_valid_mask_and_loss_scale() -> None:
    torch.manual_seed(2)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5))
    y[0, 0, :2] = -100
    valid = y != -100
    stats = GradientStatistics(3)
    stats.attach_hook(z, torch.where(valid, y, 0), valid, loss_scale=lambda: torch.tensor(8.0))
    (8.0 * F.cross_entropy(z, y, ignore_index=-100)).backward()
    zf = flatten_class_dim(z.detach())
    yf, vf = y.reshape(-1), valid.reshape(-1)
    grad = (torch.softmax(zf, 1) - F.one_hot(yf.clamp(min=0), 3)).abs().numpy() / int(vf.sum())
    pos, neg = _loop_sums(grad, yf.numpy(), vf.numpy())
    np.testing.assert_allclose(stats.pos.numpy(), pos, rtol=1e-12)
    np.testing.assert_allclose(stats.neg.numpy(), neg, rtol=1e-12)


def test_buffers_round_trip_and_never_require_grad() -> None:
    stats = GradientStatistics(3, track_produced=True)
    z = torch.randn(4, 3, requires_grad=True)
    stats.attach_hook(z, torch.tensor([0, 1, 2, 0]))
    F.cross_entropy(z, torch.tensor([0, 1, 2, 0])).backward()
    assert not any(b.requires_grad for b in stats.buffers())
    other = GradientStatistics(3, track_produced=True)
    other.load_state_dict(stats.state_dict())
    for name, buf in stats.named_buffers():
        assert torch.equal(buf, dict(other.named_buffers())[name])
