"""Equalization losses (eql.md §1-4, §8) against independent NumPy references, plus the §1 rules."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtail.diagnostics import GradientRatioObserver
from gradtail.errors import ConfigError, InputError
from gradtail.gradstats import flatten_class_dim, frozen_statistics
from gradtail.losses import create_loss
from gradtail.losses.equalization import (
    EqualizedFocalLoss,
    EqualizedQualityFocalLoss,
    SigmoidEQL,
    SoftmaxEQL,
    sigmoid_eql_scores,
)

C = 5


# ------------------------------------------------------------------ NumPy references (eql.md formulas)
def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def np_bce(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """BCE(z, t) = -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)), stable form."""
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def np_ratio(pos: np.ndarray, neg: np.ndarray, steps: int, init: float) -> np.ndarray:
    return pos / (neg + 1e-10) if steps > 0 else np.full(pos.shape, init)


def ref_sigmoid_eql(
    z: np.ndarray,
    y: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    steps: int,
    objectness: bool,
    alpha: float = 4.0,
    gamma: float = 12.0,
    mu: float = 0.8,
) -> float:
    """eql.md §2, written per element."""
    c = pos.shape[0]
    g = np_ratio(pos, neg, steps, 100.0)
    r = [1 / (1 + np.exp(-gamma * (gj - mu))) for gj in g]
    q = [1 + alpha * (1 - rj) for rj in r]
    if objectness:
        r, q = [*r, 1.0], [*q, 1.0]
    total = 0.0
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            hot = (j == y[i] and y[i] < c) or (objectness and j == c and y[i] == c)
            t = 1.0 if hot else 0.0
            total += (q[j] if hot else r[j]) * float(np_bce(np.array(z[i, j]), np.array(t)))
    return total / z.shape[0]


def ref_efl(
    z: np.ndarray,
    y: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    steps: int,
    gamma_b: float = 2.0,
    s: float = 8.0,
    alpha: float | None = 0.25,
) -> float:
    """eql.md §3: -alpha_t omega_j (1 - p_t)^gamma_j log p_t, summed over valid elements, / #pos."""
    g = np.clip(np_ratio(pos, neg, steps, 1.0), 0, 1)
    gam = gamma_b + s * (1 - g)
    total, num_pos = 0.0, 0
    for i in range(z.shape[0]):
        if y[i] == -1:
            continue
        num_pos += int(y[i] < len(pos))
        for j in range(z.shape[1]):
            p = 1 / (1 + np.exp(-z[i, j]))
            hot = j == y[i]
            pt = p if hot else 1 - p
            at = 1.0 if alpha is None else (alpha if hot else 1 - alpha)
            total += -at * (gam[j] / gamma_b) * (1 - pt) ** gam[j] * np.log(pt)
    return total / max(num_pos, 1)


def ref_eqfl(
    z: np.ndarray,
    y: np.ndarray,
    quality: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    steps: int,
    gamma_b: float = 2.0,
    s: float = 8.0,
) -> float:
    """eql.md §3 EQFL: negatives BCE(z, 0) p^gamma_j, positives BCE(z, q) |q - p|^gamma_j, times omega_j."""
    g = np.clip(np_ratio(pos, neg, steps, 1.0), 0, 1)
    gam = gamma_b + s * (1 - g)
    total, num_pos = 0.0, 0
    for i in range(z.shape[0]):
        if y[i] == -1:
            continue
        num_pos += int(y[i] < len(pos))
        for j in range(z.shape[1]):
            p = 1 / (1 + np.exp(-z[i, j]))
            target = quality[i] if j == y[i] else 0.0
            bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
            total += (gam[j] / gamma_b) * bce * abs(target - p) ** gam[j]
    return total / max(num_pos, 1)


def ref_softmax_eql(
    z: np.ndarray,
    y: np.ndarray,
    pos: np.ndarray,
    neg: np.ndarray,
    tau: float = 1.0,
    eps: float = 1e-4,
    indicator: str = "pos",
    ignore_index: int = -100,
) -> float:
    """eql.md §4 in the spec's own form: z~_j = z_j + tau log(I_j / I_y) for j != y, z~_y = z_y."""
    raw = {"pos": pos, "neg": neg, "pos_and_neg": pos + neg}[indicator]
    ind = np.maximum(raw, eps)
    total, count = 0.0, 0
    for i in range(z.shape[0]):
        if y[i] == ignore_index:
            continue
        zt = z[i] + tau * np.log(ind / ind[y[i]])
        zt[y[i]] = z[i, y[i]]
        m = zt.max()
        total += m + np.log(np.exp(zt - m).sum()) - zt[y[i]]
        count += 1
    return total / max(count, 1)


def fd_grad(f: Any, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a NumPy scalar function: an independent gradient reference."""
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


# ------------------------------------------------------------------ fixtures / helpers
def batch(n: int = 8, channels: int = C, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, channels, generator=gen)).to(dtype)


def labels(n: int = 8, high: int = C, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed + 1000))


def set_stats(loss: Any, seed: int = 3, steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Give a loss non-trivial statistics; return (P, N) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.01, 1.0, loss.num_classes)
    neg = rng.uniform(0.2, 1.5, loss.num_classes)
    loss.stats.pos.copy_(torch.tensor(pos))
    loss.stats.neg.copy_(torch.tensor(neg))
    loss.stats.steps.fill_(steps)
    return pos, neg


def stats_of(loss: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loss.stats.state_dict().items()}


def sums_from_grad(grad: torch.Tensor, target_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class P, N of one step from an autograd gradient (eql.md §1 definitions)."""
    a = grad.detach().abs().double()
    t = target_matrix.double()
    return (a * t).sum(0), (a * (1 - t)).sum(0)


# Each case: (registry name, kwargs, logit channels, labels(n, seed), target matrix of the statistics)
def _sig_targets(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, C + 1)[:, :C]


def _efl_targets(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(torch.where(y < 0, C, y), C + 1)[:, :C]


def _sm_targets(y: torch.Tensor) -> torch.Tensor:
    valid = (y != -100).view(-1, 1)
    return F.one_hot(y.clamp(min=0), C) * valid


def efl_labels(n: int, seed: int) -> torch.Tensor:
    y = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))
    y[0], y[1] = -1, C  # one ignored, one background sample
    return y


def sm_labels(n: int, seed: int) -> torch.Tensor:
    y = torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))
    y[2] = -100
    return y


def det_labels(n: int, seed: int) -> torch.Tensor:
    return labels(n, C + 1, seed)  # label C: background


# label C (background) and -1 / -100 (ignored) are opt-in conventions (losses/base.py, convention L)
BG = {"background_label": True}
DET = {"background_label": True, "ignore_index": -1}
SEG = {"ignore_index": -100}
CASES = {
    "sigmoid_eql": ("sigmoid_eql", BG, C, det_labels, _sig_targets),
    "sigmoid_eql_obj": ("sigmoid_eql", {"objectness": True, **BG}, C + 1, det_labels, _sig_targets),
    "sigmoid_eql_exact": ("sigmoid_eql", {"accumulation": "exact", **BG}, C, det_labels, _sig_targets),
    "efl": ("efl", DET, C, efl_labels, _efl_targets),
    "efl_no_alpha": ("efl", {"alpha": None, **DET}, C, efl_labels, _efl_targets),
    "eqfl": ("eqfl", DET, C, efl_labels, _efl_targets),
    "softmax_eql": ("softmax_eql", SEG, C, sm_labels, _sm_targets),
    "softmax_eql_neg": ("softmax_eql", {"indicator": "neg", "tau": 0.7, **SEG}, C, sm_labels, _sm_targets),
    "softmax_eql_both": ("softmax_eql", {"indicator": "pos_and_neg", **SEG}, C, sm_labels, _sm_targets),
}


def official_factor(loss: Any, n_valid: int) -> int:
    """Statistics / |dL/dz|: n for EQLv2's official accumulation (no 1/n, eql.md §9), else 1."""
    return max(n_valid, 1) if isinstance(loss, SigmoidEQL) and loss.accumulation == "official" else 1


def make(case: str) -> Any:
    name, kwargs, *_ = CASES[case]
    return create_loss(name, C, **kwargs)


def call(loss: Any, z: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    if isinstance(loss, EqualizedQualityFocalLoss):
        q = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        return loss(z, y, q)
    return loss(z, y)


def reference(
    case: str, z: np.ndarray, y: np.ndarray, pos: np.ndarray, neg: np.ndarray, steps: int, seed: int = 0
) -> float:
    """The NumPy reference of a CASES entry, with statistics (P, N, steps) held fixed."""
    kwargs = CASES[case][1]
    if case.startswith("sigmoid_eql"):
        return ref_sigmoid_eql(z, y, pos, neg, steps, objectness=kwargs.get("objectness", False))
    if case.startswith("efl"):
        return ref_efl(z, y, pos, neg, steps, alpha=kwargs.get("alpha", 0.25))
    if case == "eqfl":
        q = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        return ref_eqfl(z, y, q.numpy(), pos, neg, steps)
    tau, indicator = kwargs.get("tau", 1.0), kwargs.get("indicator", "pos")
    return ref_softmax_eql(z, y, pos, neg, tau=tau, indicator=indicator)


# ------------------------------------------------------------------ registry and configuration
def test_registered_with_the_common_factory_signature() -> None:
    assert isinstance(create_loss("sigmoid_eql", C, class_counts=[5] * C), SigmoidEQL)
    assert isinstance(create_loss("efl", C), EqualizedFocalLoss)
    assert isinstance(create_loss("eqfl", C), EqualizedQualityFocalLoss)
    assert isinstance(create_loss("softmax_eql", C), SoftmaxEQL)
    with pytest.raises(ConfigError):
        create_loss("softmax_eql", C, indicator="median")
    with pytest.raises(ConfigError):
        create_loss("softmax_eql", C, ignore_index=2)


# ------------------------------------------------------------------ §8: initial state == base loss
def test_initial_state_equals_base_losses() -> None:
    z = batch(16, C + 1, seed=1, dtype=torch.float32)
    y = labels(16, C + 1, seed=1)
    t = F.one_hot(y, C + 1).float()
    base_bce = F.binary_cross_entropy_with_logits(z[:, :C], t[:, :C], reduction="sum") / 16
    assert torch.equal(create_loss("sigmoid_eql", C, **BG)(z[:, :C], y), base_bce)
    base_obj = F.binary_cross_entropy_with_logits(z, t, reduction="sum") / 16
    assert torch.equal(create_loss("sigmoid_eql", C, objectness=True, **BG)(z, y), base_obj)

    ye = efl_labels(16, seed=2)
    te = _efl_targets(ye).float()
    tv_ops = pytest.importorskip("torchvision.ops")
    focal = tv_ops.sigmoid_focal_loss(z[:, :C], te, alpha=0.25, gamma=2.0, reduction="none")
    focal = (focal * (ye != -1).view(-1, 1)).sum() / int(((ye >= 0) & (ye < C)).sum())
    torch.testing.assert_close(create_loss("efl", C, **DET)(z[:, :C], ye), focal, rtol=1e-6, atol=0)

    q = torch.rand(16, generator=torch.Generator().manual_seed(5))
    qfl = ref_eqfl(z[:, :C].double().numpy(), ye.numpy(), q.double().numpy(), np.zeros(C), np.zeros(C), 0)
    assert create_loss("eqfl", C, **DET)(z[:, :C], ye, q).item() == pytest.approx(qfl, rel=1e-6)

    ys = labels(16, C, seed=3)
    assert torch.equal(create_loss("softmax_eql", C)(z[:, :C], ys), F.cross_entropy(z[:, :C], ys))
    zseg = torch.randn(2, C, 3, 4)
    yseg = torch.randint(0, C, (2, 3, 4))
    yseg[0, 0] = -100
    expected_seg = F.cross_entropy(zseg, yseg, ignore_index=-100)
    assert torch.equal(create_loss("softmax_eql", C, **SEG)(zseg, yseg), expected_seg)


# ------------------------------------------------------------------ value and gradient vs NumPy
@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_numpy_reference(case: str) -> None:
    loss = make(case)
    pos, neg = set_stats(loss)
    _, _, channels, make_labels, _ = CASES[case]
    z = batch(6, channels, seed=4).requires_grad_()
    y = make_labels(6, 4)
    value = call(loss, z, y)
    (grad,) = torch.autograd.grad(value, z)

    def f(zz: np.ndarray) -> float:
        return reference(case, zz, y.numpy(), pos, neg, steps=3)

    assert value.item() == pytest.approx(f(z.detach().numpy()), rel=1e-10)
    np.testing.assert_allclose(grad.numpy(), fd_grad(f, z.detach().numpy()), atol=2e-7, rtol=1e-6)


# ------------------------------------------------------------------ §2 check values
def test_eqlv2_weights_check_values() -> None:
    loss = SigmoidEQL(2)
    loss.stats.pos.copy_(torch.tensor([0.8, 0.0], dtype=torch.float64))
    loss.stats.neg.copy_(torch.tensor([1.0, 1.0], dtype=torch.float64))
    loss.stats.steps.fill_(1)
    r, q = loss.class_weights()
    assert r[0].item() == pytest.approx(0.5, abs=1e-8) and q[0].item() == pytest.approx(3.0, abs=1e-8)
    assert r[1].item() == pytest.approx(6.8e-5, abs=1e-6) and q[1].item() == pytest.approx(5.0, abs=1e-3)
    fresh_r, fresh_q = SigmoidEQL(2, objectness=True, background_label=True).class_weights()
    assert torch.equal(fresh_r, torch.ones(3, dtype=torch.float64))
    assert torch.equal(fresh_q, torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------ §8: closed form == autograd
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form_statistics_equal_autograd_gradients(case: str, dtype: torch.dtype) -> None:
    loss = make(case)
    _, _, channels, make_labels, target_matrix = CASES[case]
    for warm in range(2):  # non-trivial weights first
        call(loss, batch(8, channels, seed=10 + warm, dtype=dtype), make_labels(8, 10 + warm), seed=warm)
    before = stats_of(loss)
    z = batch(8, channels, seed=20, dtype=dtype).requires_grad_()
    y = make_labels(8, 20)
    (grad,) = torch.autograd.grad(call(loss, z, y, seed=3), z)
    grad = grad * official_factor(loss, z.shape[0])
    pos, neg = sums_from_grad(grad[:, :C], target_matrix(y))
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.stats.pos - before["pos"], pos, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(loss.stats.neg - before["neg"], neg, rtol=rtol, atol=1e-12)
    assert int(loss.stats.steps) == 3


def test_closed_form_equals_autograd_for_segmentation() -> None:
    loss = SoftmaxEQL(C, ignore_index=-100)
    for _ in range(2):
        loss(torch.randn(2, C, 3, 3, dtype=torch.float64), torch.randint(0, C, (2, 3, 3)))
    before = stats_of(loss)
    z = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (2, 3, 3))
    y[1, :, 0] = -100
    (grad,) = torch.autograd.grad(loss(z, y), z)
    pos, neg = sums_from_grad(flatten_class_dim(grad), _sm_targets(y.reshape(-1)))
    torch.testing.assert_close(loss.stats.pos - before["pos"], pos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.stats.neg - before["neg"], neg, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(["softmax_eql", "sigmoid_eql", "efl", "eqfl"]),
)
def test_closed_form_equals_autograd_property(n: int, c: int, seed: int, name: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = create_loss(name, c)
    loss(3 * torch.randn(n, c, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen))
    before = stats_of(loss)
    z = (3 * torch.randn(n, c, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, c, (n,), generator=gen)
    value = loss(z, y)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, z)
    pos, neg = sums_from_grad(grad * official_factor(loss, n), F.one_hot(y, c))
    torch.testing.assert_close(loss.stats.pos - before["pos"], pos, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.stats.neg - before["neg"], neg, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ §1 rule 1: timing
@pytest.mark.parametrize("case", ["sigmoid_eql", "efl", "eqfl", "softmax_eql"])
def test_weights_at_step_t_come_from_statistics_through_t_minus_1(case: str) -> None:
    loss = make(case)
    _, _, channels, make_labels, _ = CASES[case]
    call(loss, batch(8, channels, seed=1), make_labels(8, 1), seed=1)
    s1 = stats_of(loss)
    z2, y2 = batch(8, channels, seed=2), make_labels(8, 2)
    value = call(loss, z2, y2, seed=2).item()
    s2 = stats_of(loss)
    assert not torch.equal(s1["pos"], s2["pos"])
    zn, yn = z2.numpy(), y2.numpy()
    with_t_minus_1 = reference(case, zn, yn, s1["pos"].numpy(), s1["neg"].numpy(), 1, seed=2)
    with_t = reference(case, zn, yn, s2["pos"].numpy(), s2["neg"].numpy(), 2, seed=2)
    assert value == pytest.approx(with_t_minus_1, rel=1e-10)
    assert value != pytest.approx(with_t, rel=1e-6)


# ------------------------------------------------------------------ §1 rule 2: detachment
@pytest.mark.parametrize("case", ["sigmoid_eql", "efl", "eqfl", "softmax_eql"])
def test_statistics_are_detached_and_the_in_place_update_does_not_touch_the_graph(case: str) -> None:
    loss = make(case)
    _, _, channels, make_labels, _ = CASES[case]
    set_stats(loss)
    frozen_copy = copy.deepcopy(loss).eval()  # same statistics, no update
    z = batch(8, channels, seed=5).requires_grad_()
    y = make_labels(8, 5)
    value = call(loss, z, y)  # updates the statistics in place after building the graph
    after_forward = stats_of(loss)
    value.backward()
    for buf in loss.stats.buffers():
        assert not buf.requires_grad and buf.grad_fn is None
    assert all(torch.equal(after_forward[k], v) for k, v in stats_of(loss).items())  # backward: no change
    z_ref = z.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        call(frozen_copy, z_ref, y).backward()
    assert torch.equal(z.grad, z_ref.grad)  # weights were constants of the pre-update statistics


def test_no_update_in_eval_no_grad_or_frozen_and_eval_warns_once() -> None:
    loss = SoftmaxEQL(C)
    z, y = batch(4, C, seed=1), labels(4, C)
    with torch.no_grad():
        loss(z, y)
    with frozen_statistics():
        loss(z.clone().requires_grad_(), y)
    loss.eval()
    with pytest.warns(RuntimeWarning, match="eval mode"):
        loss(z.clone().requires_grad_(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(z.clone().requires_grad_(), y)  # only once
        loss(z, y)  # no grad required: silent
    assert loss.stats.is_empty


# ------------------------------------------------------------------ §4
@pytest.mark.parametrize("indicator", ["pos", "neg", "pos_and_neg"])
def test_softmax_eql_equals_ce_on_logits_plus_tau_log_indicator(indicator: str) -> None:
    loss = SoftmaxEQL(C, indicator=indicator, tau=1.3)
    for s in range(4):
        loss(batch(16, C, seed=s, dtype=torch.float32), labels(16, C - 1, seed=s))  # class C-1 never seen
    pos, neg = loss.stats.pos, loss.stats.neg
    raw = {"pos": pos, "neg": neg, "pos_and_neg": pos + neg}[indicator]
    z, y = batch(16, C, seed=9, dtype=torch.float32), labels(16, C, seed=9)
    expected = F.cross_entropy(z + 1.3 * torch.log(raw.clamp(min=1e-4)).float(), y)
    loss.eval()
    torch.testing.assert_close(loss(z, y), expected, rtol=1e-6, atol=1e-7)


def test_softmax_eql_segmentation_equals_flattened_samples() -> None:
    seg, flat = SoftmaxEQL(C, ignore_index=255), SoftmaxEQL(C, ignore_index=255)
    for s in range(3):
        gen = torch.Generator().manual_seed(s)
        z = torch.randn(2, C, 4, 3, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (2, 4, 3), generator=gen)
        y[0, 1] = 255
        a = seg(z, y)
        b = flat(flatten_class_dim(z), y.reshape(-1))
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    torch.testing.assert_close(seg.stats.pos, flat.stats.pos, rtol=1e-14, atol=0)
    torch.testing.assert_close(seg.stats.neg, flat.stats.neg, rtol=1e-14, atol=0)
    all_ignored = seg(torch.randn(1, C, 2, 2, requires_grad=True), torch.full((1, 2, 2), 255))
    assert all_ignored.item() == 0.0 and int(seg.stats.steps) == 3  # all ignored = empty: not counted


# ------------------------------------------------------------------ §3 masking and quality
def test_efl_ignored_rows_are_out_of_loss_and_statistics_and_background_is_negative() -> None:
    y = torch.tensor([0, -1, C, 2])
    z = batch(4, C, seed=3)
    z_changed = z.clone()
    z_changed[1] += 5.0  # the ignored row
    a, b = EqualizedFocalLoss(C, **DET), EqualizedFocalLoss(C, **DET)
    assert torch.equal(a(z, y), b(z_changed, y))
    assert torch.equal(a.stats.pos, b.stats.pos) and torch.equal(a.stats.neg, b.stats.neg)
    only_bg = EqualizedFocalLoss(C, **DET)
    only_bg(z[2:3], torch.tensor([C]))
    assert float(only_bg.stats.pos.abs().sum()) == 0.0 and float(only_bg.stats.neg.sum()) > 0
    # normalizer: the number of positives (2 here); at least 1 when there is none
    fresh = EqualizedFocalLoss(C, **DET)
    expected = ref_efl(z.numpy(), y.numpy(), np.zeros(C), np.zeros(C), 0)
    assert fresh(z, y).item() == pytest.approx(expected, rel=1e-10)
    no_pos = torch.tensor([-1, C, C, -1])
    expected_no_pos = ref_efl(z.numpy(), no_pos.numpy(), np.zeros(C), np.zeros(C), 0)
    assert EqualizedFocalLoss(C, **DET)(z, no_pos).item() == pytest.approx(expected_no_pos, rel=1e-10)


def test_eqfl_quality_default_and_validation() -> None:
    z, y = batch(6, C, seed=2), efl_labels(6, 2)
    a, b = EqualizedQualityFocalLoss(C, **DET), EqualizedQualityFocalLoss(C, **DET)
    assert torch.equal(a(z, y), b(z, y, torch.ones(6, dtype=torch.float64)))
    assert torch.equal(a.stats.pos, b.stats.pos)
    with pytest.raises(InputError):
        b(z, y, torch.full((6,), 1.5))
    with pytest.raises(InputError):
        b(z, y, torch.ones(5))


# ------------------------------------------------------------------ §2 objectness, targets, scores
def test_sigmoid_eql_objectness_targets_and_scores() -> None:
    loss = SigmoidEQL(C, objectness=True, background_label=True)
    z = batch(6, C + 1, seed=6)
    y = torch.tensor([0, C, 3, C, 1, 4])
    loss(z, y)
    assert loss.stats.pos.shape == (C,)
    r, q = loss.class_weights()
    assert r.shape == (C + 1,) and r[-1].item() == 1.0 and q[-1].item() == 1.0
    scores = sigmoid_eql_scores(z)
    zn = z.numpy()
    expected = np_sigmoid(zn[:, :C]) * (1 - np_sigmoid(zn[:, C:]))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(loss.scores(z), scores)
    # multi-label (n, C) targets equal the index form without objectness
    plain_a, plain_b = SigmoidEQL(C, background_label=True), SigmoidEQL(C, background_label=True)
    ya = torch.tensor([0, C, 3, 2])
    assert torch.equal(plain_a(z[:4, :C], ya), plain_b(z[:4, :C], F.one_hot(ya, C + 1)[:, :C].double()))
    assert torch.equal(plain_a.stats.neg, plain_b.stats.neg)
    with pytest.raises(InputError):
        plain_a(z[:4, :C], torch.full((4, C), 0.5, dtype=torch.float64))
    with pytest.raises(InputError):
        plain_a(z[:4, :C], torch.tensor([0, C + 1, 1, 1]))


# ------------------------------------------------------------------ §1 rule 4: resume
@pytest.mark.parametrize("case", ["sigmoid_eql_obj", "efl", "eqfl", "softmax_eql"])
def test_resume_from_state_dict_continues_identically(case: str) -> None:
    _, _, channels, make_labels, _ = CASES[case]
    stream = [(batch(8, channels, seed=s, dtype=torch.float32), make_labels(8, s)) for s in range(6)]
    uninterrupted = make(case)
    values = [call(uninterrupted, z, y, seed=s).item() for s, (z, y) in enumerate(stream)]
    first = make(case)
    for s, (z, y) in enumerate(stream[:3]):
        call(first, z, y, seed=s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(case)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed_values = [call(resumed, z, y, seed=s).item() for s, (z, y) in enumerate(stream) if s >= 3]
    assert resumed_values == values[3:]
    for k, v in stats_of(uninterrupted).items():
        assert torch.equal(v, stats_of(resumed)[k]), k


# ------------------------------------------------------------------ §1 rule 5: bf16 autocast
@pytest.mark.parametrize("case", ["sigmoid_eql", "efl", "eqfl", "softmax_eql"])
def test_bf16_autocast_gives_the_fp32_statistics(case: str) -> None:
    _, _, channels, make_labels, _ = CASES[case]
    torch.manual_seed(0)
    model = torch.nn.Linear(16, channels)
    x = torch.randn(32, 16)
    y = make_labels(32, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf16 = model(x)
    assert z_bf16.dtype == torch.bfloat16
    under_autocast, plain = make(case), make(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1 = call(under_autocast, z_bf16, y)
    v2 = call(plain, z_bf16.detach().float().requires_grad_(), y)
    assert v1.dtype == torch.float32 and torch.equal(v1, v2)  # same inputs: identical
    assert torch.equal(under_autocast.stats.pos, plain.stats.pos)
    assert torch.equal(under_autocast.stats.neg, plain.stats.neg)
    full_fp32 = make(case)
    call(full_fp32, model(x), y)  # bf16 logits are rounded: equal to bf16 tolerance
    torch.testing.assert_close(under_autocast.stats.pos, full_fp32.stats.pos, rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(under_autocast.stats.neg, full_fp32.stats.neg, rtol=5e-2, atol=1e-3)


def test_input_errors() -> None:
    with pytest.raises(InputError):
        SoftmaxEQL(C)(torch.randn(4, C), torch.tensor([0, 1, C, 2]))
    with pytest.raises(InputError):
        SoftmaxEQL(C)(torch.randn(4, C + 1), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(InputError):
        EqualizedFocalLoss(C)(torch.randn(4, C), torch.tensor([0, 1, -2, 2]))
    with pytest.raises(InputError):
        SigmoidEQL(C, objectness=True, background_label=True)(torch.randn(4, C), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(InputError):
        EqualizedFocalLoss(C)(torch.randn(4, C), torch.zeros(4))


# ------------------------------------------------------------------ §8: two processes == one process
N_DIST, STEPS_DIST = 8, 3


def _dist_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Feed rank ``rank``'s share of STEPS_DIST global batches to every loss and a CE observer."""
    losses = {
        "softmax_eql": SoftmaxEQL(C, **SEG),
        "sigmoid_eql": SigmoidEQL(C, objectness=True, **BG),
        "efl": EqualizedFocalLoss(C, **DET),
        "eqfl": EqualizedQualityFocalLoss(C, **DET),
    }
    observer = GradientRatioObserver(C)
    half = N_DIST // world
    share = slice(rank * half, (rank + 1) * half)
    for step in range(STEPS_DIST):
        gen = torch.Generator().manual_seed(100 + step)
        z = 2.0 * torch.randn(N_DIST, C + 1, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (N_DIST,), generator=gen)
        quality = torch.rand(N_DIST, generator=gen, dtype=torch.float64)
        first = [0, N_DIST // 2]  # the same pattern in each half: equal per-rank normalizers
        y_soft, y_det, y_focal = y.clone(), y.clone(), y.clone()
        y_soft[first] = -100
        y_det[[1, N_DIST // 2 + 1]] = C
        y_focal[first] = -1
        y_focal[[1, N_DIST // 2 + 1]] = C
        inputs = {
            "softmax_eql": (z[share, :C], y_soft[share]),
            "sigmoid_eql": (z[share], y_det[share]),
            "efl": (z[share, :C], y_focal[share]),
            "eqfl": (z[share, :C], y_focal[share], quality[share]),
        }
        for name, loss in losses.items():
            zz, *rest = inputs[name]
            loss(zz.clone().requires_grad_(), *rest).backward()
        zz = z[share, :C].clone().requires_grad_()
        observer.observe(zz, y[share])
        F.cross_entropy(zz, y[share]).backward()
    out = {f"{k}.{b}": v for k, loss in losses.items() for b, v in loss.stats.state_dict().items()}
    out.update({f"observer.{b}": v for b, v in observer.stats.state_dict().items()})
    return out


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_dist_run(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_with_half_batches_accumulate_the_single_process_statistics(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _dist_run(0, 1)
    assert set(ranks[0]) == set(single)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds identical statistics
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-13, atol=1e-16, msg=key)
    assert int(single["softmax_eql.steps"]) == STEPS_DIST
    assert all(float(single[f"{k}.pos"].sum()) > 0 for k in ("softmax_eql", "sigmoid_eql", "efl", "eqfl"))


# ------------------------------------------------------------------ §9: official accumulation, n varying
VARYING_N = [8, 200, 17, 120, 8, 64, 200, 33, 8, 150]


def _varying_batches(channels: int, background: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Detection-like steps: n from 8 to 200, about 3/4 background (label ``background``)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in VARYING_N:
        z = 2.0 * rng.standard_normal((n, channels))
        y = np.where(rng.random(n) < 0.75, background, rng.integers(0, C, n))
        out.append((z, y))
    return out


def np_official_eqlv2(
    batches: list[tuple[np.ndarray, np.ndarray]], objectness: bool
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """The released EQLv2 code's accumulation, per element in loops (eql.md §2, §9): the loss is
    sum w BCE / n, the statistics add |sigmoid(z) - T| w over the step's samples without the 1/n."""
    pos, neg, steps, values = np.zeros(C), np.zeros(C), 0, []
    for z, y in batches:
        g = pos / (neg + 1e-10) if steps else np.full(C, 100.0)
        r = [1 / (1 + np.exp(-12.0 * (gj - 0.8))) for gj in g]
        q = [1 + 4.0 * (1 - rj) for rj in r]
        if objectness:
            r, q = [*r, 1.0], [*q, 1.0]
        total = 0.0
        add_pos, add_neg = np.zeros(C), np.zeros(C)
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                hot = (j == y[i] and y[i] < C) or (objectness and j == C and y[i] == C)
                t = 1.0 if hot else 0.0
                w = q[j] if hot else r[j]
                total += w * float(np_bce(np.array(z[i, j]), np.array(t)))
                if j < C:  # the objectness channel is never counted
                    p = 1 / (1 + np.exp(-z[i, j]))
                    if hot:
                        add_pos[j] += abs(p - t) * w
                    else:
                        add_neg[j] += abs(p - t) * w
        values.append(total / z.shape[0])
        pos, neg, steps = pos + add_pos, neg + add_neg, steps + 1
    return values, pos, neg


@pytest.mark.parametrize("objectness", [False, True])
def test_sigmoid_eql_official_accumulation_with_varying_batch_sizes(objectness: bool) -> None:
    channels = C + int(objectness)
    batches = _varying_batches(channels, C, seed=4)
    values, ref_pos, ref_neg = np_official_eqlv2(batches, objectness)
    loss = SigmoidEQL(C, objectness=objectness, background_label=True)  # accumulation="official" default
    exact = SigmoidEQL(C, objectness=objectness, background_label=True, accumulation="exact")
    got, got_exact = [], []
    for z, y in batches:
        got.append(loss(torch.from_numpy(z), torch.from_numpy(y)).item())
        got_exact.append(exact(torch.from_numpy(z), torch.from_numpy(y)).item())
    np.testing.assert_allclose(got, values, rtol=1e-10)
    np.testing.assert_allclose(loss.stats.pos.numpy(), ref_pos, rtol=1e-10)
    np.testing.assert_allclose(loss.stats.neg.numpy(), ref_neg, rtol=1e-10)
    assert int(loss.stats.steps) == len(VARYING_N)
    # the exact-gradient accumulation (1/n per step) gives other ratios and other losses when n varies
    rel = (exact.ratio() - loss.ratio()).abs() / loss.ratio()
    assert float(rel.max()) > 0.05
    assert got_exact[0] == got[0] and got_exact[1:] != pytest.approx(got[1:], rel=1e-6)


def test_sigmoid_eql_accumulations_agree_when_n_is_constant() -> None:
    """A factor that is the same at every step (1/n with n fixed) leaves ratios and losses unchanged."""
    official = SigmoidEQL(C, background_label=True)
    exact = SigmoidEQL(C, background_label=True, accumulation="exact")
    for step in range(6):
        z, y = batch(32, C, seed=50 + step), det_labels(32, 50 + step)
        assert official(z, y).item() == pytest.approx(exact(z, y).item(), rel=1e-9)
    torch.testing.assert_close(official.ratio(), exact.ratio(), rtol=1e-9, atol=0)
    torch.testing.assert_close(official.stats.pos, 32 * exact.stats.pos, rtol=1e-8, atol=0)
    with pytest.raises(ConfigError, match="accumulation"):
        SigmoidEQL(C, accumulation="mean")  # type: ignore[arg-type]


def np_official_efl(
    batches: list[tuple[np.ndarray, np.ndarray]], normalizers: list[float | None]
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """The released EFL code's accumulation in loops (eql.md §3, §9): statistics are |dl/dz| of the loss
    including its normaliser (#positives at least 1, or the one given); ignored samples (-1) excluded."""
    gamma_b, s, alpha = 2.0, 8.0, 0.25
    pos, neg, steps, values = np.zeros(C), np.zeros(C), 0, []
    for (z, y), given_norm in zip(batches, normalizers, strict=True):
        g = np.clip(pos / (neg + 1e-10), 0, 1) if steps else np.ones(C)
        gam = gamma_b + s * (1 - g)
        num_pos = sum(1 for v in y if 0 <= v < C)
        norm = max(num_pos, 1) if given_norm is None else given_norm
        total = 0.0
        add_pos, add_neg = np.zeros(C), np.zeros(C)
        for i in range(z.shape[0]):
            if y[i] == -1:
                continue
            for j in range(C):
                p = 1 / (1 + np.exp(-z[i, j]))
                hot = j == y[i]
                pt = p if hot else 1 - p
                at = alpha if hot else 1 - alpha
                om = gam[j] / gamma_b
                total += -at * om * (1 - pt) ** gam[j] * np.log(pt)
                d = at * om * (1 - pt) ** gam[j] * ((1 - pt) - gam[j] * pt * np.log(pt)) / norm
                if hot:
                    add_pos[j] += d
                else:
                    add_neg[j] += d
        values.append(total / norm)
        pos, neg, steps = pos + add_pos, neg + add_neg, steps + 1
    return values, pos, neg


@pytest.mark.parametrize("with_normalizer", [False, True])
def test_efl_official_accumulation_with_varying_batch_sizes(with_normalizer: bool) -> None:
    batches = _varying_batches(C, C, seed=9)
    for k, (_, y) in enumerate(batches):  # a few ignored anchors in every step
        y[k % 3 :: 7] = -1
    normalizers: list[float | None] = [(3.5 + k if with_normalizer else None) for k in range(len(batches))]
    values, ref_pos, ref_neg = np_official_efl(batches, normalizers)
    loss = EqualizedFocalLoss(C, background_label=True, ignore_index=-1)
    got = []
    for (z, y), norm in zip(batches, normalizers, strict=True):
        got.append(loss(torch.from_numpy(z), torch.from_numpy(y), normalizer=norm).item())
    np.testing.assert_allclose(got, values, rtol=1e-10)
    np.testing.assert_allclose(loss.stats.pos.numpy(), ref_pos, rtol=1e-10)
    np.testing.assert_allclose(loss.stats.neg.numpy(), ref_neg, rtol=1e-10)
    with pytest.raises(InputError, match="normalizer must be > 0"):
        loss(torch.zeros(2, C), torch.tensor([0, C]), normalizer=0.0)


def test_eqfl_normalizer_replaces_the_positive_count() -> None:
    z, y = batch(12, C, seed=3), efl_labels(12, 3)
    q = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = EqualizedQualityFocalLoss(C, **DET), EqualizedQualityFocalLoss(C, **DET)
    num_pos = int(((y >= 0) & (y < C)).sum())
    value_a = a(z, y, q)
    value_b = b(z, y, q, normalizer=2.0 * num_pos)
    assert value_b.item() == pytest.approx(value_a.item() / 2.0, rel=1e-12)
    torch.testing.assert_close(b.stats.pos, a.stats.pos / 2.0, rtol=1e-12, atol=0)
