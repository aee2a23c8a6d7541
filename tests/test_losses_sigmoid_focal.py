"""The sigmoid focal loss (``sigmoid_focal``) against a NumPy loop of Lin et al.'s formula, value and
gradient, with the detection label options (background, ignore), the normaliser, and accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtail.errors import InputError
from gradtail.losses import create_loss


def _reference(z: np.ndarray, y: np.ndarray, c: int, alpha: float, gamma: float, ignore: int | None):
    """sum_ij alpha_t (1 - p_t)^gamma BCE(z_ij, t_ij) / max(1, positives), and its gradient (central
    differences of the loop)."""

    def value(zz: np.ndarray) -> float:
        total, positives = 0.0, 0
        for i in range(zz.shape[0]):
            if ignore is not None and y[i] == ignore:
                continue
            positives += int(y[i] < c)
            for j in range(c):
                t = 1.0 if y[i] == j else 0.0
                p = 1.0 / (1.0 + np.exp(-zz[i, j]))
                bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
                p_t = p * t + (1 - p) * (1 - t)
                a_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
                total += a_t * (1 - p_t) ** gamma * bce
        return total / max(positives, 1)

    grad = np.zeros_like(z)
    eps = 1e-6
    for idx in np.ndindex(*z.shape):
        up, down = z.copy(), z.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (value(up) - value(down)) / (2 * eps)
    return value(z), grad


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)])
def test_value_and_gradient_equal_the_formula(alpha: float, gamma: float) -> None:
    rng = np.random.default_rng(0)
    c = 4
    z = rng.normal(size=(7, c)) * 2
    y = np.array([0, 3, 4, 2, -1, 4, 1])  # 4 = background (label C), -1 = ignored
    loss = create_loss("sigmoid_focal", c, alpha=alpha, gamma=gamma, background_label=True, ignore_index=-1)
    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    out = loss(logits, torch.tensor(y))
    out.backward()
    value, grad = _reference(z, y, c, alpha, gamma, ignore=-1)
    assert out.item() == pytest.approx(value, rel=1e-10)
    np.testing.assert_allclose(logits.grad.numpy(), grad, rtol=1e-6, atol=1e-9)


def test_equals_torchvisions_sigmoid_focal_loss_summed_over_positives() -> None:
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    z = torch.randn(9, 5)
    y = torch.tensor([0, 1, 5, 5, 2, 4, 5, 3, 0])
    loss = create_loss("sigmoid_focal", 5, background_label=True)
    target = torch.nn.functional.one_hot(y, 6)[:, :5].float()
    expected = sigmoid_focal_loss(z, target, reduction="sum") / (y < 5).sum()
    torch.testing.assert_close(loss(z, y), expected)
    torch.testing.assert_close(loss(z, y, normalizer=3.0), sigmoid_focal_loss(z, target, reduction="sum") / 3)


def test_accumulated_micro_batches_equal_the_whole_batch() -> None:
    torch.manual_seed(1)
    z = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 3, 2, 3, 0, 1, 3, 3, 2, 0])
    loss = create_loss("sigmoid_focal", 3, background_label=True)
    loss(z, y).backward()
    whole = z.grad.clone()
    z.grad = None
    with loss.accumulate(targets=y):
        for part in (slice(0, 5), slice(5, 12)):
            loss(z[part], y[part]).backward()
    torch.testing.assert_close(z.grad, whole)


def test_bad_input_is_one_line() -> None:
    loss = create_loss("sigmoid_focal", 3)
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\)"):
        loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="floating point"):
        loss(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="normalizer must be > 0"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1]), normalizer=0.0)
