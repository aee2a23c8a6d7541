"""The min-norm solver (gbg.md §2.4, tests §6): closed forms, known optima, simplex and optimality checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtail.errors import InputError
from gradtail.optim.min_norm import gram_matrix, min_norm_weights, project_to_simplex


def value(alpha: torch.Tensor, gram: torch.Tensor) -> float:
    a = alpha.double()
    return float(a @ gram.double() @ a)


def assert_on_simplex(alpha: torch.Tensor) -> None:
    assert (alpha >= 0).all()
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-6)


def exact_min_norm(gram: torch.Tensor) -> float:
    """Brute-force QP: the KKT point of every support, keep the feasible one of least value."""
    m = gram.double()
    k = m.shape[0]
    best = math.inf
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            idx = list(support)
            kkt = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            kkt[:r, :r] = m[idx][:, idx]
            kkt[:r, r] = 1.0
            kkt[r, :r] = 1.0
            rhs = torch.zeros(r + 1, 1, dtype=torch.float64)
            rhs[r] = 1.0
            sol = torch.linalg.lstsq(kkt, rhs).solution[:r, 0]
            if (sol < -1e-10).any() or abs(float(sol.sum()) - 1.0) > 1e-8:
                continue
            x = torch.zeros(k, dtype=torch.float64)
            x[idx] = sol
            best = min(best, float(x @ m @ x))
    return best


def test_one_objective() -> None:
    assert torch.equal(min_norm_weights(torch.tensor([[3.0]])), torch.ones(1))


def test_orthogonal_unit_vectors_give_half_half() -> None:
    alpha = min_norm_weights(gram_matrix(torch.eye(2)))
    assert torch.allclose(alpha, torch.tensor([0.5, 0.5]))


def test_orthogonal_unit_vectors_k5_give_uniform() -> None:
    alpha = min_norm_weights(gram_matrix(torch.eye(5)))
    assert torch.allclose(alpha, torch.full((5,), 0.2), atol=1e-5)


def test_two_vectors_closed_form_clips() -> None:
    # v2 = 2 v1: the min-norm point is v1 alone (gamma clipped to 1).
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(min_norm_weights(gram_matrix(v)), torch.tensor([1.0, 0.0]))
    # gamma = (M22 - M12) / (M11 + M22 - 2 M12) for a generic pair.
    v = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
    m = gram_matrix(v)
    gamma = (m[1, 1] - m[0, 1]) / (m[0, 0] + m[1, 1] - 2 * m[0, 1])
    assert torch.allclose(min_norm_weights(m), torch.stack([gamma, 1 - gamma]))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_identical_vectors_any_point_same_norm(k: int) -> None:
    v = torch.tensor([1.0, -2.0, 0.5]).repeat(k, 1)
    m = gram_matrix(v)
    alpha = min_norm_weights(m)
    assert_on_simplex(alpha)
    assert value(alpha, m) == pytest.approx(float(m[0, 0]), rel=1e-6)


def test_equilateral_triangle_interior_optimum() -> None:
    angles = [0.0, 2 * math.pi / 3, 4 * math.pi / 3]
    v = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    alpha = min_norm_weights(gram_matrix(v))
    assert torch.allclose(alpha, torch.full((3,), 1 / 3), atol=1e-5)
    assert float((alpha @ v).norm()) < 1e-5


def test_zero_and_nonfinite_gram() -> None:
    alpha = min_norm_weights(torch.zeros(4, 4))
    assert_on_simplex(alpha)
    for k in (2, 3):
        bad = torch.full((k, k), float("nan"))
        assert torch.allclose(min_norm_weights(bad), torch.full((k,), 1.0 / k))


def test_gram_matrix_list_and_tensor_agree() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(3)]
    stacked = torch.stack([g.reshape(-1) for g in grads])
    assert torch.allclose(gram_matrix(grads), gram_matrix(stacked))
    assert torch.allclose(gram_matrix(stacked), stacked @ stacked.T)


def test_bad_shapes() -> None:
    with pytest.raises(InputError):
        min_norm_weights(torch.zeros(2, 3))
    with pytest.raises(InputError):
        gram_matrix(torch.zeros(3))
    with pytest.raises(InputError):
        gram_matrix([])


def test_stays_on_device_and_dtype() -> None:
    m = gram_matrix(torch.randn(4, 6, dtype=torch.float64))
    alpha = min_norm_weights(m)
    assert alpha.dtype == torch.float64 and alpha.device == m.device
    assert min_norm_weights(m.float()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_result_on_cuda() -> None:
    m = gram_matrix(torch.randn(5, 100, device="cuda"))
    assert min_norm_weights(m).device.type == "cuda"


def test_projection_onto_simplex() -> None:
    v = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.allclose(project_to_simplex(v), v)
    assert torch.allclose(project_to_simplex(torch.tensor([5.0, 0.0, 0.0])), torch.tensor([1.0, 0.0, 0.0]))
    p = project_to_simplex(torch.tensor([[0.9, 0.9, -3.0]]))
    assert torch.allclose(p, torch.tensor([[0.5, 0.5, 0.0]]))


def test_k3_against_brute_force_grid() -> None:
    """k = 3: no simplex grid point (step 1/200) beats the solver."""
    torch.manual_seed(3)
    steps = 200
    grid = torch.tensor(
        [
            [i / steps, j / steps, (steps - i - j) / steps]
            for i in range(steps + 1)
            for j in range(steps + 1 - i)
        ],
        dtype=torch.float64,
    )
    for _ in range(5):
        v = torch.randn(3, 4, dtype=torch.float64) + 1.5 * torch.randn(4, dtype=torch.float64)
        m = gram_matrix(v)
        alpha = min_norm_weights(m)
        assert_on_simplex(alpha)
        grid_min = float(((grid @ m) * grid).sum(dim=1).min())
        assert value(alpha, m) <= grid_min + 1e-9


vectors = st.integers(2, 6).flatmap(
    lambda k: st.integers(1, 8).flatmap(
        lambda d: st.tuples(
            st.lists(st.floats(-3, 3, allow_nan=False), min_size=k * d, max_size=k * d).map(
                lambda xs, k=k, d=d: torch.tensor(xs, dtype=torch.float64).reshape(k, d)
            ),
            st.lists(st.floats(-3, 3, allow_nan=False), min_size=d, max_size=d).map(
                lambda xs: torch.tensor(xs, dtype=torch.float64)
            ),
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_random_gram_on_simplex_and_no_worse_than_vertices_or_exact_qp(data) -> None:
    v, shift = data
    v = v + shift  # a common component makes interior optima and ill-conditioning likely
    m = gram_matrix(v)
    alpha = min_norm_weights(m)
    assert_on_simplex(alpha)
    f = value(alpha, m)
    scale = max(float(m.diagonal().max()), 1e-12)
    assert f <= float(m.diagonal().min()) + 1e-9 * scale
    if m.shape[0] <= 5:
        assert f <= exact_min_norm(m) + 1e-7 * scale
