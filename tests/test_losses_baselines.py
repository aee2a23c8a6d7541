"""Baseline losses (baselines.md) against independent NumPy / loop implementations of their formulas.

Values are compared directly; gradients with respect to the logits are compared with central finite
differences of the NumPy reference (float64). Quantities a loss detaches (seesaw's compensation factor)
are held at the evaluation point in the reference, as the definition requires.
"""

from __future__ import annotations

import functools
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradtail import distributed
from gradtail.errors import ConfigError, InputError
from gradtail.losses import LongTailLoss, create_loss
from gradtail.losses.reweighting import DeferredReweighting, pop_drw_options, with_deferred_reweighting

# ----------------------------------------------------------------------------- NumPy references


def np_log_softmax_row(row: np.ndarray) -> np.ndarray:
    """log softmax of one row: z_j - max - log sum_k exp(z_k - max)."""
    m = row.max()
    return row - m - math.log(sum(math.exp(v - m) for v in row))


def ref_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-log p_{i, y_i}, one sample at a time."""
    return np.array([-np_log_softmax_row(z[i])[y[i]] for i in range(len(y))])


def ref_focal(z: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    """-(1 - p_y)^gamma log p_y."""
    out = []
    for i in range(len(y)):
        logp = np_log_softmax_row(z[i])[y[i]]
        out.append(-((1.0 - math.exp(logp)) ** gamma) * logp)
    return np.array(out)


def ref_sigmoid(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_j BCE(z_ij, 1[j = y_i]) with log sigma(x) = -log(1 + e^{-x})."""
    out = []
    for i in range(len(y)):
        total = 0.0
        for j, v in enumerate(z[i]):
            total += math.log1p(math.exp(-v)) if j == y[i] else math.log1p(math.exp(v))
        out.append(total)
    return np.array(out)


def ref_cb_weights(counts: list[float], beta: float) -> np.ndarray:
    """(1 - beta) / (1 - beta^n_j), normalised to sum C."""
    w = [(1.0 - beta) / (1.0 - beta**n) for n in counts]
    s = sum(w)
    return np.array([v * len(counts) / s for v in w])


def ref_ldam(z: np.ndarray, y: np.ndarray, counts: list[float], m_max: float, s: float) -> np.ndarray:
    """CE(s * (z - m_y e_y), y), m_j = m_max n_j^(-1/4) / max_k n_k^(-1/4)."""
    quarter = [n**-0.25 for n in counts]
    margins = [m_max * v / max(quarter) for v in quarter]
    shifted = z.copy()
    for i in range(len(y)):
        shifted[i, y[i]] -= margins[y[i]]
    return ref_ce(s * shifted, y)


def ref_seesaw(
    z: np.ndarray,
    y: np.ndarray,
    cum: np.ndarray,
    at: np.ndarray,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> np.ndarray:
    """CE with z_j += log(M_ij C_ij) for j != y_i; M from counts (clamped to >= 1), C from softmax(at)."""
    out = []
    for i in range(len(y)):
        t = int(y[i])
        sig = np.exp(np_log_softmax_row(at[i]))
        row = z[i].copy()
        for j in range(z.shape[1]):
            if j == t:
                continue
            n_j, n_t = max(cum[j], 1.0), max(cum[t], 1.0)
            mitigation = (n_j / n_t) ** p if n_j < n_t else 1.0
            ratio = sig[j] / max(sig[t], eps)
            compensation = ratio**q if ratio > 1.0 else 1.0
            row[j] += math.log(mitigation * compensation)
        out.append(-np_log_softmax_row(row)[t])
    return np.array(out)


def weighted(per_sample: np.ndarray, y: np.ndarray, w: np.ndarray, normalize: str) -> float:
    """sum_i w_{y_i} l_i / sum_i w_{y_i} or / B."""
    ws = np.array([w[t] for t in y])
    total = float((ws * per_sample).sum())
    return total / (ws.sum() if normalize == "weights" else len(y))


def numeric_grad(f: Callable[[np.ndarray], float], z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences (f(z + h e_k) - f(z - h e_k)) / 2h."""
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


def batch_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=num_classes).astype(np.float64)


# ----------------------------------------------------------------------------- cases and specs

Ref = Callable[[np.ndarray, np.ndarray, list[float], np.ndarray], float]


@dataclass
class Case:
    name: str
    counts: list[float]
    targets: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.counts)


CASES = [
    Case("class_absent", [100, 40, 10, 3, 1], [0, 0, 1, 2, 0, 1, 3, 0]),  # class 4 absent
    Case("count_one", [50, 7, 1, 2], [2, 0, 1, 2, 3, 0]),  # class 2 has one training image
    Case("two_classes", [30, 2], [0, 1, 0, 0, 1]),
    Case("one_sample", [20, 5, 1], [2]),
]


@dataclass
class Spec:
    id: str
    name: str
    ref: Ref
    kwargs: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    cosine: bool = False  # feed cosines in [-1, 1] (LDAM's head)


def ref_cb_focal_released(
    z: np.ndarray, y: np.ndarray, counts: list[float], beta: float, gamma: float
) -> float:
    """The class-balanced focal loss as the authors' released code computes it (Cui et al. 2019,
    class-balanced-loss ``src/cifar_main.py``: the class weights of ``main``, their tiling in ``_tower_fn``
    and ``focal_loss``), transcribed to NumPy line by line."""
    num_classes = z.shape[1]
    effective_num = 1.0 - np.power(beta, np.array(counts, dtype=np.float64))
    weights = (1.0 - beta) / effective_num
    weights = weights / np.sum(weights) * num_classes
    labels = np.eye(num_classes)[y]  # tf.one_hot
    w = np.tile(weights[None, :], (labels.shape[0], 1)) * labels
    w = np.tile(w.sum(axis=1)[:, None], (1, num_classes))  # the sample's class weight on every channel
    # tf.nn.sigmoid_cross_entropy_with_logits: max(z, 0) - z * t + log(1 + exp(-|z|))
    cross_entropy = np.maximum(z, 0.0) - z * labels + np.log1p(np.exp(-np.abs(z)))
    modulator = np.exp(-gamma * labels * z - gamma * np.log1p(np.exp(-1.0 * z))) if gamma else 1.0
    loss = modulator * cross_entropy
    weighted_loss = w * loss
    return float(np.sum(weighted_loss) / np.sum(labels))  # normalised by the number of positives


def cb_ref(beta: float, base: str, gamma: float = 1.0) -> Ref:
    def ref(z: np.ndarray, y: np.ndarray, counts: list[float], at: np.ndarray) -> float:
        per = {
            "ce": lambda: ref_ce(z, y),
            "focal": lambda: ref_focal(z, y, gamma),
            "sigmoid": lambda: ref_sigmoid(z, y),
        }
        return weighted(per[base](), y, ref_cb_weights(counts, beta), "batch")

    return ref


def drw_ref(
    base: Callable[[np.ndarray, np.ndarray, list[float], np.ndarray], np.ndarray], normalize: str
) -> Ref:
    def ref(z: np.ndarray, y: np.ndarray, counts: list[float], at: np.ndarray) -> float:
        return weighted(base(z, y, counts, at), y, ref_cb_weights(counts, 0.9999), normalize)

    return ref


def seesaw_ps(z: np.ndarray, y: np.ndarray, counts: list[float], at: np.ndarray) -> np.ndarray:
    """Seesaw after its first training step: N = the batch's own label counts."""
    return ref_seesaw(z, y, batch_counts(y, z.shape[1]), at)


SPECS = [
    Spec("ce", "ce", lambda z, y, n, a: ref_ce(z, y).mean()),
    Spec("focal_g1", "focal", lambda z, y, n, a: ref_focal(z, y, 1.0).mean()),
    Spec("focal_g2", "focal", lambda z, y, n, a: ref_focal(z, y, 2.0).mean(), {"gamma": 2.0}),
    Spec("focal_g0.5", "focal", lambda z, y, n, a: ref_focal(z, y, 0.5).mean(), {"gamma": 0.5}),
    Spec("cb_ce", "cb", cb_ref(0.9999, "ce")),
    Spec("cb_ce_b0.9", "cb", cb_ref(0.9, "ce"), {"beta": 0.9}),
    Spec("cb_focal", "cb", cb_ref(0.9999, "focal", 2.0), {"base": "focal", "gamma": 2.0}),
    Spec("cb_softmax_focal", "cb", cb_ref(0.999, "focal", 1.0), {"base": "softmax_focal", "beta": 0.999}),
    Spec(
        "cb_sigmoid_focal",
        "cb",
        lambda z, y, n, a: ref_cb_focal_released(z, y, n, 0.9999, 1.0),
        {"base": "sigmoid_focal"},
    ),
    Spec(
        "cb_sigmoid_focal_g2",
        "cb",
        lambda z, y, n, a: ref_cb_focal_released(z, y, n, 0.99, 2.0),
        {"base": "sigmoid_focal", "gamma": 2.0, "beta": 0.99},
    ),
    Spec("cb_sigmoid", "cb", cb_ref(0.99, "sigmoid"), {"base": "sigmoid", "beta": 0.99}),
    Spec("ldam", "ldam", lambda z, y, n, a: ref_ldam(z, y, n, 0.5, 30.0).mean(), cosine=True),
    Spec(
        "ldam_m0.3_s10",
        "ldam",
        lambda z, y, n, a: ref_ldam(z, y, n, 0.3, 10.0).mean(),
        {"max_margin": 0.3, "scale": 10.0},
        cosine=True,
    ),
    Spec(
        "balanced_softmax",
        "balanced_softmax",
        lambda z, y, n, a: ref_ce(z + np.log(np.array(n, dtype=float)), y).mean(),
    ),
    Spec(
        "logit_adjust_tau0.5",
        "logit_adjust",
        lambda z, y, n, a: ref_ce(z + 0.5 * np.log(np.array(n, dtype=float) / sum(n)), y).mean(),
        {"tau": 0.5},
    ),
    Spec("seesaw", "seesaw", lambda z, y, n, a: seesaw_ps(z, y, n, a).mean()),
    Spec("drw_ce", "drw", drw_ref(lambda z, y, n, a: ref_ce(z, y), "weights"), epoch=160),
    Spec(
        "drw_ce_batch",
        "drw",
        drw_ref(lambda z, y, n, a: ref_ce(z, y), "batch"),
        {"drw_normalize": "batch"},
        epoch=160,
    ),
    Spec(
        "ldam_drw",
        "drw",
        drw_ref(lambda z, y, n, a: ref_ldam(z, y, n, 0.5, 30.0), "weights"),
        {"base": "ldam"},
        epoch=170,
        cosine=True,
    ),
    Spec(
        "focal_drw_at3",
        "drw",
        drw_ref(lambda z, y, n, a: ref_focal(z, y, 1.0), "weights"),
        {"base": "focal", "drw_epoch": 3},
        epoch=3,
    ),
    Spec("seesaw_drw", "drw", drw_ref(seesaw_ps, "weights"), {"base": "seesaw", "drw_epoch": 0}),
]


def make_logits(case: Case, cosine: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 17 * len(case.targets) + case.num_classes)
    z = rng.normal(scale=1.5, size=(len(case.targets), case.num_classes))
    return np.tanh(z) if cosine else z


def run_loss(loss: LongTailLoss, z_np: np.ndarray, y_np: np.ndarray) -> tuple[float, np.ndarray]:
    z = torch.tensor(z_np, dtype=torch.float64, requires_grad=True)
    out = loss(z, torch.tensor(y_np))
    assert out.dim() == 0
    out.backward()
    assert z.grad is not None
    return out.item(), z.grad.numpy()


# ----------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_value_and_gradient_match_reference(spec: Spec, case: Case) -> None:
    loss = create_loss(spec.name, case.num_classes, case.counts, **spec.kwargs)
    loss.set_epoch(spec.epoch)
    z_np = make_logits(case, spec.cosine)
    y_np = np.array(case.targets)
    value, grad = run_loss(loss, z_np, y_np)
    expected = spec.ref(z_np, y_np, case.counts, z_np)
    expected_grad = numeric_grad(lambda zz: spec.ref(zz, y_np, case.counts, z_np), z_np)
    np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_float32_logits_keep_dtype_and_half_is_upcast() -> None:
    counts = [40, 9, 2]
    z = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 0, 1])
    for name in ("ce", "focal", "cb", "ldam", "balanced_softmax", "logit_adjust", "seesaw", "drw"):
        loss = create_loss(name, 3, counts)
        assert loss(z, y).dtype == torch.float32
        out16 = loss(z.to(torch.bfloat16), y)
        assert out16.dtype == torch.float32 and torch.isfinite(out16)


# ----------------------------------------------------------------------------- identities


def test_focal_gamma0_equals_ce() -> None:
    case = CASES[0]
    z_np, y_np = make_logits(case, False), np.array(case.targets)
    v_ce, g_ce = run_loss(create_loss("ce", 5), z_np, y_np)
    v_f, g_f = run_loss(create_loss("focal", 5, gamma=0.0), z_np, y_np)
    assert v_f == pytest.approx(v_ce, rel=1e-14)
    np.testing.assert_allclose(g_f, g_ce, rtol=1e-13, atol=1e-15)


def test_balanced_softmax_equals_logit_adjust_tau1() -> None:
    case = CASES[1]
    z_np, y_np = make_logits(case, False), np.array(case.targets)
    v_bs, g_bs = run_loss(create_loss("balanced_softmax", 4, case.counts), z_np, y_np)
    v_la, g_la = run_loss(create_loss("logit_adjust", 4, case.counts), z_np, y_np)
    assert v_la == pytest.approx(v_bs, rel=1e-12)
    np.testing.assert_allclose(g_la, g_bs, rtol=1e-10, atol=1e-14)


def test_cb_with_beta0_is_ce_and_drw_batch_equals_cb() -> None:
    case = CASES[0]
    z_np, y_np = make_logits(case, False), np.array(case.targets)
    v_ce, _ = run_loss(create_loss("ce", 5), z_np, y_np)
    v_cb0, _ = run_loss(create_loss("cb", 5, case.counts, beta=0.0), z_np, y_np)
    assert v_cb0 == pytest.approx(v_ce, rel=1e-13)
    drw = create_loss("drw", 5, case.counts, drw_epoch=0, drw_normalize="batch")
    v_cb, g_cb = run_loss(create_loss("cb", 5, case.counts), z_np, y_np)
    v_drw, g_drw = run_loss(drw, z_np, y_np)
    assert v_drw == pytest.approx(v_cb, rel=1e-13)
    np.testing.assert_allclose(g_drw, g_cb, rtol=1e-12)


def test_cb_sigmoid_focal_equals_the_released_code() -> None:
    """The published class-balanced focal loss (the ``cb_focal`` configs): value and gradient against the
    NumPy transcription of the released code, at logits large enough to saturate the sigmoids; gamma 0
    is the class-balanced sigmoid loss."""
    counts = [500, 120, 30, 8, 2]
    rng = np.random.default_rng(4)
    z_np = rng.normal(scale=4.0, size=(12, 5))
    y_np = rng.integers(0, 5, size=12)
    value, grad = run_loss(create_loss("cb", 5, counts, base="sigmoid_focal"), z_np, y_np)
    assert value == pytest.approx(ref_cb_focal_released(z_np, y_np, counts, 0.9999, 1.0), rel=1e-12)
    want_grad = numeric_grad(lambda zz: ref_cb_focal_released(zz, y_np, counts, 0.9999, 1.0), z_np)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    v0, _ = run_loss(create_loss("cb", 5, counts, base="sigmoid_focal", gamma=0.0), z_np, y_np)
    v_sig, _ = run_loss(create_loss("cb", 5, counts, base="sigmoid"), z_np, y_np)
    assert v0 == pytest.approx(v_sig, rel=1e-13)
    assert v0 == pytest.approx(ref_cb_focal_released(z_np, y_np, counts, 0.9999, 0.0), rel=1e-12)
    with pytest.raises(ConfigError, match="focal bases"):
        create_loss("cb", 5, counts, base="sigmoid", gamma=2.0)


def test_cb_focal_configs_use_the_published_form() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    for path in ("configs/fashion_mnist_lt/cb_focal.yaml", "configs/cifar100_lt_if100/cb_focal.yaml"):
        loss = yaml.safe_load((root / path).read_text())["loss"]
        assert loss["name"] == "cb" and loss["params"]["base"] == "sigmoid_focal", path
        create_loss("cb", 3, [10, 5, 1], **loss["params"])  # the parameters build


def test_ldam_drw_matches_reference_code_form() -> None:
    """LDAM-DRW reference code: F.cross_entropy(s * out, y, weight=per_cls_weights) from epoch 160."""
    counts = [500, 120, 30, 8, 2]
    torch.manual_seed(0)
    z = torch.rand(16, 5, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 5, (16,))
    loss = create_loss("drw", 5, counts, base="ldam")
    assert loss.required_head == "cosine"
    n = torch.tensor(counts, dtype=torch.float64)
    margins = n.pow(-0.25) * (0.5 / n.pow(-0.25).max())
    out = torch.where(torch.nn.functional.one_hot(y, 5).bool(), z - margins[y, None], z)
    eff = (1 - 0.9999) / (1 - torch.tensor(0.9999, dtype=torch.float64) ** n)
    w = eff / eff.sum() * 5
    loss.set_epoch(159)
    assert loss(z, y).item() == pytest.approx(
        torch.nn.functional.cross_entropy(30 * out, y).item(), rel=1e-12
    )
    loss.set_epoch(160)
    expected = torch.nn.functional.cross_entropy(30 * out, y, weight=w).item()
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- DRW schedule


def test_drw_switches_on_exactly_at_drw_epoch() -> None:
    case = CASES[0]
    z_np, y_np = make_logits(case, False), np.array(case.targets)
    plain = ref_ce(z_np, y_np).mean()
    reweighted = weighted(ref_ce(z_np, y_np), y_np, ref_cb_weights(case.counts, 0.9999), "weights")
    assert abs(plain - reweighted) > 1e-3
    routes = [
        create_loss("drw", 5, case.counts, drw_epoch=7),
        with_deferred_reweighting(create_loss("ce", 5), case.counts, drw_epoch=7),
    ]
    for loss in routes:
        for epoch, expected in [(0, plain), (6, plain), (7, reweighted), (8, reweighted), (200, reweighted)]:
            loss.set_epoch(epoch)
            assert loss.active == (epoch >= 7)
            assert loss(torch.tensor(z_np), torch.tensor(y_np)).item() == pytest.approx(expected, rel=1e-12)


def test_drw_options_route_and_replacement() -> None:
    kwargs: dict[str, Any] = {"drw_epoch": 5, "drw_beta": 0.99, "gamma": 2.0}
    drw_kw = pop_drw_options(kwargs)
    assert kwargs == {"gamma": 2.0} and drw_kw == {"drw_epoch": 5, "drw_beta": 0.99}
    focal = create_loss("focal", 3, **kwargs)
    wrapped = with_deferred_reweighting(focal, [10, 4, 1], **drw_kw)
    assert isinstance(wrapped, DeferredReweighting) and wrapped.inner is focal
    again = with_deferred_reweighting(wrapped, [10, 4, 1], drw_epoch=9)
    assert isinstance(again, DeferredReweighting) and again.inner is focal and again.drw_epoch == 9
    assert with_deferred_reweighting(focal, [10, 4, 1]) is focal
    with pytest.raises(ConfigError, match="without drw_epoch"):
        with_deferred_reweighting(focal, [10, 4, 1], drw_beta=0.9)
    with pytest.raises(ConfigError, match="already"):
        DeferredReweighting(wrapped, [10, 4, 1])
    # the wrapped loss sees the epoch and checkpoints under inner.*
    wrapped.set_epoch(4)
    assert focal.epoch == 4 and not wrapped.active
    keys = set(create_loss("drw", 3, [10, 4, 1], base="seesaw").state_dict())
    assert keys == {"weights", "inner.cum_samples"}


def test_drw_rejects_a_loss_without_per_sample_terms() -> None:
    class ScalarOnly(LongTailLoss):
        def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return logits.sum()

    with pytest.raises(ConfigError, match="per_sample_loss"):
        DeferredReweighting(ScalarOnly(3), [1, 2, 3])


# ----------------------------------------------------------------------------- seesaw statistics


def test_seesaw_statistics_evolve_over_steps() -> None:
    num_classes = 6
    loss = create_loss("seesaw", num_classes)
    rng = np.random.default_rng(3)
    probs = np.array([0.5, 0.25, 0.12, 0.08, 0.05, 0.0])  # class 5 never seen
    seen = np.zeros(num_classes)
    for step in range(5):
        y_np = rng.choice(num_classes, size=12, p=probs)
        z_np = rng.normal(scale=2.0, size=(12, num_classes))
        seen += batch_counts(y_np, num_classes)  # updated BEFORE the factors (mmdet order)
        value, grad = run_loss(loss, z_np, y_np)
        np.testing.assert_array_equal(loss.cum_samples.numpy(), seen)
        assert loss.cum_samples.dtype == torch.float64
        expected = ref_seesaw(z_np, y_np, seen, z_np).mean()
        frozen = functools.partial(ref_seesaw, y=y_np, cum=seen.copy(), at=z_np)
        expected_grad = numeric_grad(lambda zz, f=frozen: f(zz).mean(), z_np)
        np.testing.assert_allclose(value, expected, rtol=1e-10)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7, err_msg=f"step {step}")
    # evaluation mode and no_grad read the counts without adding to them
    z, y = torch.randn(4, num_classes, dtype=torch.float64), torch.tensor([0, 1, 2, 5])
    loss.eval()
    loss(z, y)
    loss.train()
    with torch.no_grad():
        value_ng = loss(z, y).item()
    np.testing.assert_array_equal(loss.cum_samples.numpy(), seen)
    assert value_ng == pytest.approx(ref_seesaw(z.numpy(), y.numpy(), seen, z.numpy()).mean(), rel=1e-10)
    # checkpointed
    restored = create_loss("seesaw", num_classes)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.cum_samples, loss.cum_samples)


def test_seesaw_compensation_eps_floor_and_factors_off() -> None:
    """A target with sigma_y < eps: the ratio uses max(sigma_y, eps); p = q = 0 gives plain CE."""
    z_np = np.array([[-6.0, 3.0, 2.5, -1.0], [4.0, -2.0, 0.0, 1.0]])
    y_np = np.array([0, 3])
    loss = create_loss("seesaw", 4)
    value, grad = run_loss(loss, z_np, y_np)
    cum = batch_counts(y_np, 4)
    assert value == pytest.approx(ref_seesaw(z_np, y_np, cum, z_np).mean(), rel=1e-10)
    expected_grad = numeric_grad(lambda zz: ref_seesaw(zz, y_np, cum, z_np).mean(), z_np)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    off = create_loss("seesaw", 4, p=0.0, q=0.0)
    assert run_loss(off, z_np, y_np)[0] == pytest.approx(ref_ce(z_np, y_np).mean(), rel=1e-13)


def test_seesaw_all_reduces_every_training_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each training step's counts go through all_reduce_sum_ (simulated: two identical ranks)."""
    calls: list[torch.Tensor] = []

    def fake_all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return t.mul_(2)

    monkeypatch.setattr(distributed, "all_reduce_sum_", fake_all_reduce)
    loss = create_loss("seesaw", 3)
    y = torch.tensor([0, 0, 2])
    for _ in range(3):
        loss(torch.randn(3, 3), y)
    assert len(calls) == 3 and all(
        torch.equal(c, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)) for c in calls
    )
    assert torch.equal(loss.cum_samples, torch.tensor([12.0, 0.0, 6.0], dtype=torch.float64))
    loss.eval()
    loss(torch.randn(3, 3), y)
    assert len(calls) == 3


def _seesaw_worker(rank: int, world: int, port: int, queue: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss = create_loss("seesaw", 4)
        labels = [torch.tensor([0, 0, 1]), torch.tensor([3, 0])][rank]
        for _ in range(2):
            loss(torch.randn(len(labels), 4), labels)
        queue.put((rank, loss.cum_samples.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_seesaw_counts_synchronised_across_two_processes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_seesaw_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert results[0] == results[1] == [6.0, 2.0, 0.0, 2.0]


# ----------------------------------------------------------------------------- errors

NEEDS_COUNTS = ["cb", "ldam", "balanced_softmax", "logit_adjust", "drw"]
ALL_LOSSES = ["ce", "focal", "cb", "ldam", "balanced_softmax", "logit_adjust", "seesaw", "drw"]


@pytest.mark.parametrize("name", NEEDS_COUNTS)
def test_construction_errors_name_the_loss(name: str) -> None:
    for counts, message in [
        (None, "needs class_counts"),
        ([5, 0, 2], "zero"),
        ([5, 3], "3 entries|2 entries"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            create_loss(name, 3, counts)
        assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("focal", {"gamma": -1.0}),
        ("cb", {"base": "softmax"}),
        ("cb", {"beta": 1.0}),
        ("cb", {"base": "focal", "gamma": -0.5}),
        ("cb", {"gamma": 2.0}),  # gamma without the focal base
        ("ldam", {"scale": 0.0}),
        ("ldam", {"max_margin": -0.1}),
        ("logit_adjust", {"tau": float("nan")}),
        ("seesaw", {"p": -1.0}),
        ("seesaw", {"q": float("inf")}),
        ("seesaw", {"eps": 0.0}),
        ("drw", {"drw_epoch": -1}),
        ("drw", {"drw_epoch": 1.5}),
        ("drw", {"drw_epoch": "160"}),
        ("drw", {"drw_normalize": "mean"}),
        ("drw", {"drw_beta": 1.5}),
        ("drw", {"base": "drw"}),
        ("drw", {"base": "nope"}),
    ],
)
def test_bad_hyperparameters(name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        create_loss(name, 3, [10, 4, 1], **kwargs)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_inputs_raise_input_error(name: str) -> None:
    loss = create_loss(name, 3, [10, 4, 1])
    z = torch.randn(4, 3)
    bad = [
        (z, torch.tensor([0, 1, 3, 0])),  # label == C
        (z, torch.tensor([0, -1, 2, 0])),  # negative label
        (z, torch.tensor([0, 1, 2])),  # length mismatch
        (torch.randn(4, 4), torch.tensor([0, 1, 2, 0])),  # wrong number of classes
        (torch.randn(4), torch.tensor([0, 1, 2, 0])),  # 1-D logits
        (z, torch.tensor([[0], [1], [2], [0]])),  # 2-D targets
        (z, torch.tensor([0.0, 1.0, 2.0, 0.0])),  # float labels
    ]
    for logits, targets in bad:
        with pytest.raises(InputError):
            loss(logits, targets)
    if name == "seesaw" or name == "drw":
        inner = loss.inner if isinstance(loss, DeferredReweighting) else loss
        assert float(getattr(inner, "cum_samples", torch.zeros(1)).sum()) == 0.0  # nothing counted


def test_buffers_move_with_the_module() -> None:
    expected = {
        "cb": {"weights"},
        "ldam": {"margins"},
        "balanced_softmax": {"adjustment"},
        "logit_adjust": {"adjustment"},
        "seesaw": {"cum_samples"},
    }
    for name, buffers in expected.items():
        loss = create_loss(name, 3, [10, 4, 1])
        assert {n for n, _ in loss.named_buffers()} == buffers
        assert set(loss.state_dict()) == buffers
        loss.to(torch.device("meta"))  # buffers follow .to(device)
        assert all(b.device.type == "meta" for b in loss.buffers())


# ----------------------------------------------------------------------------- properties (hypothesis)

STATELESS = ["ce", "focal", "cb", "ldam", "balanced_softmax", "logit_adjust", "drw"]


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from([*STATELESS, "seesaw"]),
    logits=arrays(np.float64, (7, 4), elements=st.floats(-60, 60, allow_nan=False)),
    targets=arrays(np.int64, (7,), elements=st.integers(0, 3)),
    perm=st.permutations(list(range(7))),
)
def test_finite_and_batch_permutation_invariant(
    name: str, logits: np.ndarray, targets: np.ndarray, perm: list[int]
) -> None:
    counts = [200, 30, 5, 1]
    losses = [
        create_loss(name, 4, counts, drw_epoch=0) if name == "drw" else create_loss(name, 4, counts)
        for _ in "ab"
    ]
    z = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(targets)
    out = losses[0](z, y)
    (grad,) = torch.autograd.grad(out, z)
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    idx = torch.tensor(perm)
    z_p = z.detach()[idx].requires_grad_(True)
    out_p = losses[1](z_p, y[idx])
    (grad_p,) = torch.autograd.grad(out_p, z_p)
    torch.testing.assert_close(out_p, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_p, grad[idx], rtol=1e-10, atol=1e-12)


def test_inference_logits_carry_ldams_scale_through_drw():
    """Test-time probabilities use LDAM's trained scale s (not the margin); other losses: identity."""
    counts = [50, 20, 5]
    z = torch.tensor([[0.2, -0.1, 0.4]])
    ldam = create_loss("ldam", 3, class_counts=counts, scale=30.0, drw_epoch=2)
    torch.testing.assert_close(ldam.inference_logits(z), 30.0 * z)
    for name in ("ce", "balanced_softmax", "logit_adjust"):
        assert torch.equal(create_loss(name, 3, class_counts=counts).inference_logits(z), z)
