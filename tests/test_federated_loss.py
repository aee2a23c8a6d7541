"""The federated loss (``federated``; instance.md §2, §5) against independent references: its value and
gradient against a NumPy loop over samples and classes for a given class set S; the drawn set (every
ground-truth class, never the background, exactly max(k, |unique gt|) classes, frequencies following the
weights over many draws, with and without replacement effects); the two-stage layout (an unused background
column); one-line errors before anything is drawn; the RNG makes it reproducible."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gradtail.errors import ConfigError, InputError
from gradtail.losses import create_loss
from gradtail.losses.federated import FederatedLoss, federated_class_weights


def np_bce(z: float, t: float) -> float:
    return max(z, 0.0) - z * t + float(np.log1p(np.exp(-abs(z))))


def np_sigmoid(z: float) -> float:
    return 1.0 / (1.0 + float(np.exp(-z)))


def reference(
    z: np.ndarray, y: np.ndarray, classes: list[int], num_classes: int, ignore: int | None = None
) -> tuple[float, np.ndarray]:
    """The loss and dL/dz by loops: (1/n) sum over non-ignored rows i, j in S of BCE(z_ij, [y_i = j])."""
    rows = [i for i in range(len(y)) if ignore is None or y[i] != ignore]
    n = max(len(rows), 1)
    value, grad = 0.0, np.zeros_like(z)
    for i in rows:
        for j in classes:
            t = 1.0 if y[i] == j else 0.0
            value += np_bce(float(z[i, j]), t) / n
            grad[i, j] = (np_sigmoid(float(z[i, j])) - t) / n
    assert num_classes <= z.shape[1]
    return value, grad


def random_case(seed: int, n: int = 12, c: int = 7, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, c + extra, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


@pytest.mark.parametrize("classes", [[0, 3], [6, 1, 2, 5], list(range(7))])
def test_value_and_gradient_equal_a_numpy_loop_for_a_given_class_set(classes: list[int]) -> None:
    loss = create_loss("federated", 7, class_counts=[50, 30, 20, 9, 5, 2, 1])
    z, y = random_case(0)
    z.requires_grad_()
    value = loss.loss_on_classes(z, y, torch.tensor(classes))
    value.backward()
    want, grad = reference(z.detach().numpy(), y.numpy(), classes, 7)
    assert value.item() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), grad, rtol=1e-10, atol=1e-15)


def test_two_stage_layout_background_rows_and_ignored_rows() -> None:
    """C + 1 columns (background last, unused), background label C (all targets 0), ignored rows out of the
    loss and the normaliser: still the loop."""
    c = 7
    loss = create_loss("federated", c, class_counts=[50, 30, 20, 9, 5, 2, 1], background_column=True,
                       background_label=True, ignore_index=-1)  # fmt: skip
    z, y = random_case(1, n=16, extra=1)
    y[[0, 3, 4, 9]] = c  # background RoIs
    y[[5, 11]] = -1  # ignored
    z.requires_grad_()
    classes = [2, 0, 6]
    value = loss.loss_on_classes(z, y, torch.tensor(classes))
    value.backward()
    want, grad = reference(z.detach().numpy(), y.numpy(), classes, c, ignore=-1)
    assert value.item() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), grad, rtol=1e-10, atol=1e-15)
    assert torch.count_nonzero(z.grad[:, c]) == 0  # the background column is never trained
    assert torch.count_nonzero(z.grad[[5, 11]]) == 0


def test_forward_is_the_loss_on_the_drawn_set() -> None:
    loss = create_loss("federated", 7, class_counts=[50, 30, 20, 9, 5, 2, 1], k=4)
    z, y = random_case(2)
    y[:] = torch.tensor([0, 0, 1] * 4)
    torch.manual_seed(123)
    value = loss(z, y)
    torch.manual_seed(123)
    classes = loss.sample_classes(y)
    assert len(classes) == 4 and set(classes[:2].tolist()) == {0, 1}
    want, _ = reference(z.numpy(), y.numpy(), classes.tolist(), 7)
    assert value.item() == pytest.approx(want, rel=1e-12)
    torch.manual_seed(123)
    assert loss(z, y).item() == value.item()  # the draw is the global generator's: reproducible


@pytest.mark.parametrize("k", [1, 5, 10, 20, 30])
def test_the_drawn_set_holds_every_ground_truth_class_never_the_background_and_max_k_gt_classes(
    k: int,
) -> None:
    c = 20
    counts = [int(1000 / (i + 1) ** 1.5) for i in range(c)]
    loss = create_loss("federated", c, class_counts=counts, k=k, background_label=True, ignore_index=-1)
    g = torch.Generator().manual_seed(k)
    for trial in range(200):
        n = int(torch.randint(0, 40, (1,), generator=g))
        y = torch.randint(0, 4 + trial % 17, (n,), generator=g)  # a varying number of distinct classes
        y[torch.rand(n, generator=g) < 0.4] = c  # background
        y[torch.rand(n, generator=g) < 0.1] = -1  # ignored
        kept = y[y != -1]
        s = loss.sample_classes(kept)
        gt = set(kept[kept < c].tolist())
        members = s.tolist()
        assert len(members) == len(set(members)), "a class twice"
        assert gt <= set(members) and c not in members and all(0 <= m < c for m in members)
        assert len(members) == min(c, max(k, len(gt)))


def test_frequencies_of_one_drawn_class_are_proportional_to_the_weights() -> None:
    counts = [400, 100, 25, 9, 4, 1]  # w = count ** 0.5 = 20, 10, 5, 3, 2, 1
    loss = create_loss("federated", 6, class_counts=counts, k=2)
    torch.manual_seed(0)
    draws = 20000
    hits = np.zeros(6)
    y = torch.tensor([0, 0])
    for _ in range(draws):
        s = loss.sample_classes(y)
        hits[int(s[1])] += 1
    w = np.array([10.0, 5.0, 3.0, 2.0, 1.0])
    expected = w / w.sum()
    freq = hits[1:] / draws
    assert hits[0] == 0
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 4.5 * sigma), (freq, expected)


def test_inclusion_frequencies_of_two_draws_without_replacement_match_the_exact_probabilities() -> None:
    """Two classes drawn without replacement (successive sampling): P(j in S) by enumeration of ordered
    pairs, p(a) p(b | a) with p(b | a) = w_b / (W - w_a)."""
    counts = [400, 100, 25, 9, 4, 1]
    power = 0.7
    loss = create_loss("federated", 6, class_counts=counts, k=3, power=power)
    w = {j: counts[j] ** power for j in range(1, 6)}
    total = sum(w.values())
    exact = dict.fromkeys(w, 0.0)
    for a, b in itertools.permutations(w, 2):
        p = w[a] / total * w[b] / (total - w[a])
        exact[a] += p
        exact[b] += p
    torch.manual_seed(1)
    draws = 20000
    hits = dict.fromkeys(w, 0)
    for _ in range(draws):
        for j in loss.sample_classes(torch.tensor([0]))[1:].tolist():
            hits[j] += 1
    for j, p in exact.items():
        sigma = np.sqrt(p * (1 - p) / draws)
        assert abs(hits[j] / draws - p) < 4.5 * sigma, (j, hits[j] / draws, p)


def test_weights_come_from_the_counts_and_a_class_without_images_is_never_drawn() -> None:
    w = federated_class_weights([100, 0, 9], 3, 0.5)
    assert w.dtype == torch.float64 and w.tolist() == [10.0, 0.0, 3.0]
    loss = create_loss("federated", 3, class_counts=[100, 0, 9], k=3)
    for _ in range(50):
        assert sorted(loss.sample_classes(torch.tensor([0])).tolist()) == [0, 2]
    assert loss.class_weights.dtype == torch.float64
    assert create_loss("federated", 3, class_counts=[4, 1, 9], power=0.0).class_weights.tolist() == [1, 1, 1]


def test_errors_are_one_line_and_draw_nothing() -> None:
    loss = create_loss("federated", 4, class_counts=[5, 4, 3, 2], k=3)
    z = torch.randn(3, 4, requires_grad=True)
    wide = torch.randn(3, 5)
    state = torch.get_rng_state()
    for call, fragment in [
        (lambda: loss(z, torch.tensor([0, 4, 1])), "[0, 4)"),
        (lambda: loss(z, torch.tensor([0, -1, 1])), "[0, 4)"),
        (lambda: loss(z.long(), torch.tensor([0, 1, 1])), "floating point"),
        (lambda: loss(wide, torch.tensor([0, 1, 1])), "expects 4"),
        (lambda: loss(z, torch.tensor([0.0, 1.0, 1.0])), "integer"),
    ]:
        with pytest.raises(InputError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)
    assert torch.equal(state, torch.get_rng_state())  # nothing was drawn
    for kwargs, fragment in [
        ({"class_counts": None}, "needs class_counts"),
        ({"class_counts": [1, 2, 3]}, "3 entries"),
        ({"class_counts": [1, -2, 3, 4]}, ">= 0"),
        ({"class_counts": [1, 2, 3, 4], "k": 0}, "k must be"),
        ({"class_counts": [1, 2, 3, 4], "power": -1.0}, "power"),
        ({"class_counts": [1, 2, 3, 4], "ignore_index": 2}, "ignore_index"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            create_loss("federated", 4, **kwargs)


def test_empty_and_all_ignored_batches_draw_nothing_and_give_an_attached_zero() -> None:
    loss = FederatedLoss(4, [5, 4, 3, 2], ignore_index=-1)
    state = torch.get_rng_state()
    for z, y in [(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long)),
                 (torch.zeros(2, 4, requires_grad=True), torch.tensor([-1, -1]))]:  # fmt: skip
        value = loss(z, y)
        assert value.item() == 0.0 and value.grad_fn is not None
        value.backward()
        assert torch.count_nonzero(z.grad) == 0
    assert torch.equal(state, torch.get_rng_state())


def test_scores_are_the_sigmoid_of_the_class_columns() -> None:
    z = torch.randn(5, 4)
    torch.testing.assert_close(FederatedLoss.scores(z, 3), torch.sigmoid(z[:, :3]))
