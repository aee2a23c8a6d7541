"""Post-hoc adjusters: posthoc_la, GALA re-balancing (gala.md §3), tau-norm, and the shared search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradtail.errors import ConfigError, InputError
from gradtail.models.heads import CosineHead, LinearHead
from gradtail.posthoc import create_posthoc, posthoc_names
from gradtail.posthoc.logit_adjust import PosthocLogitAdjuster
from gradtail.posthoc.rebalance import PredictionRebalancer, StreamingRebalancer, class_mass
from gradtail.posthoc.search import DEFAULT_TAU_GRID, balanced_accuracy, tune_scalar
from gradtail.posthoc.tau_norm import TauNormAdjuster, apply_tau_norm

COUNTS = [1000, 300, 100, 30]
C = len(COUNTS)


def skewed_logits(
    seed: int, per_class: int = 200, head_bias: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A balanced evaluation set scored by a head-biased model: z = 2 onehot(y) + noise + b, b decreasing."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(per_class)
    signal = 2.0 * torch.nn.functional.one_hot(y, C).float()
    bias = head_bias * torch.linspace(1.0, -1.0, C)
    return signal + torch.randn(y.numel(), C, generator=gen) + bias, y


def prior_skewed_logits(seed: int, per_class: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A model that learned the training prior: z = s + log pi (posthoc_la with tau = 1 undoes it)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(per_class)
    s = 2.0 * torch.nn.functional.one_hot(y, C).float() + torch.randn(y.numel(), C, generator=gen)
    log_prior = torch.log(torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS))
    return s + log_prior, y


# ------------------------------------------------------------------------------------------- search
def test_registry_names() -> None:
    assert {"posthoc_la", "gala_rebalance", "tau_norm"} <= set(posthoc_names())
    assert isinstance(create_posthoc("posthoc_la", class_counts=COUNTS), PosthocLogitAdjuster)
    assert isinstance(create_posthoc("gala_rebalance"), PredictionRebalancer)


def test_tune_scalar_tie_breaking() -> None:
    best, scores = tune_scalar(lambda t: 1.0, [-0.5, 0.3, 0.0, 1.0])
    assert best == 0.0 and scores == [1.0] * 4
    table = {0.0: 1.0, 2.0: 2.0, -1.0: 2.0, 3.0: 1.0}
    assert tune_scalar(lambda t: table[t], [0.0, 2.0, -1.0, 3.0])[0] == -1.0  # smallest |value|
    assert tune_scalar(lambda t: 0.5, [-1.0, 1.0])[0] == -1.0  # then the first
    assert tune_scalar(lambda t: math.nan if t == 1.0 else 0.1, [1.0, 2.0])[0] == 2.0  # NaN never wins
    assert DEFAULT_TAU_GRID[0] == 0.0 and DEFAULT_TAU_GRID[-1] == 2.0 and len(DEFAULT_TAU_GRID) == 21
    with pytest.raises(ConfigError):
        tune_scalar(lambda t: 0.0, [])


def test_balanced_accuracy() -> None:
    targets = torch.tensor([0, 0, 0, 1])
    preds = torch.tensor([0, 0, 1, 1])
    assert balanced_accuracy(preds, targets, 3) == pytest.approx((2 / 3 + 1) / 2)  # class 2 absent
    logits = torch.nn.functional.one_hot(preds, 3).float()
    assert balanced_accuracy(logits, targets, 3) == pytest.approx(5 / 6)
    with pytest.raises(InputError):
        balanced_accuracy(logits, targets, 4)
    with pytest.raises(InputError):
        balanced_accuracy(logits, targets[:3], 3)
    with pytest.raises(InputError):
        balanced_accuracy(logits, torch.tensor([0, 0, 0, 3]), 3)


# ----------------------------------------------------------------------------------------- posthoc_la
def test_posthoc_la_tau_zero_is_argmax_and_formula() -> None:
    z, _ = prior_skewed_logits(0)
    adj = PosthocLogitAdjuster(COUNTS, tau=0.0, tune=False)
    assert torch.equal(adj.transform(z), z)
    adj = PosthocLogitAdjuster(COUNTS, tau=0.7, tune=False)
    log_pi = torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS))
    torch.testing.assert_close(adj.transform(z), z - (0.7 * log_pi).float())


def test_posthoc_la_tuning_helps_on_skewed_validation() -> None:
    val_z, val_y = prior_skewed_logits(1)
    test_z, test_y = prior_skewed_logits(2)
    adj = create_posthoc("posthoc_la", class_counts=COUNTS, num_classes=C).fit(val_z, val_y)
    assert 0.5 <= adj.tau <= 1.5
    assert len(adj.scores) == len(DEFAULT_TAU_GRID)
    plain = balanced_accuracy(test_z, test_y, C)
    assert balanced_accuracy(adj.transform(test_z), test_y, C) > plain + 0.05
    fixed = PosthocLogitAdjuster(COUNTS, tau=0.3, tune=False).fit(val_z, val_y)
    assert fixed.tau == 0.3


def test_posthoc_la_bad_input() -> None:
    with pytest.raises(ConfigError, match="class_counts"):
        create_posthoc("posthoc_la")
    with pytest.raises(ConfigError):
        PosthocLogitAdjuster([10, 0, 3])
    with pytest.raises(ConfigError):
        PosthocLogitAdjuster(COUNTS, num_classes=C + 1)
    adj = PosthocLogitAdjuster(COUNTS)
    with pytest.raises(InputError):
        adj.transform(torch.randn(5, C + 1))
    with pytest.raises(InputError):
        adj.transform(torch.randn(C))
    with pytest.raises(InputError):
        adj.fit(torch.randn(5, C), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------- rebalance
def test_rebalance_tau_zero_is_plain_argmax() -> None:
    z, _ = skewed_logits(0)
    out = PredictionRebalancer(tau=0.0, tune=False).transform(z)
    assert torch.equal(out, z)
    assert torch.equal(out.argmax(1), z.argmax(1))


def test_rebalance_formula() -> None:
    z, _ = skewed_logits(3, per_class=10)
    q = torch.softmax(z.double(), dim=1).sum(0)
    torch.testing.assert_close(class_mass(z), q)
    out = PredictionRebalancer(tau=1.0).transform(z)
    torch.testing.assert_close(out, (z.double() - torch.log(q)).float())
    # argmax_j p_j / q_j^tau == argmax_j (z_j - tau log q_j)
    ratio = torch.softmax(z.double(), dim=1) / q**1.0
    assert torch.equal(ratio.argmax(1), out.argmax(1))


def test_rebalance_raises_balanced_accuracy_on_skewed_model() -> None:
    z, y = skewed_logits(4)
    plain = balanced_accuracy(z, y, C)
    rebalanced = balanced_accuracy(PredictionRebalancer(tau=1.0).transform(z), y, C)
    assert rebalanced > plain + 0.05


def test_rebalance_fit_picks_tau_on_validation() -> None:
    val_z, val_y = skewed_logits(5)
    adj = create_posthoc("gala_rebalance").fit(val_z, val_y)
    assert adj.tau > 0
    test_z, test_y = skewed_logits(6)
    assert balanced_accuracy(adj.transform(test_z), test_y, C) > balanced_accuracy(test_z, test_y, C)
    kept = PredictionRebalancer(tau=1.4, tune=False).fit(val_z, val_y)
    assert kept.tau == 1.4


def test_streaming_equals_batch() -> None:
    z, _ = skewed_logits(7, per_class=50)
    batch = PredictionRebalancer(tau=1.3, tune=False)
    stream = batch.streaming()
    chunks = torch.split(z, [1, 37, 64, 98])
    for chunk in chunks:
        stream.accumulate(chunk)
    assert stream.num_samples == z.shape[0]
    torch.testing.assert_close(stream.q, class_mass(z), rtol=1e-12, atol=1e-12)
    rescored = torch.cat([stream.rescore(chunk) for chunk in chunks])
    expected = batch.transform(z)
    torch.testing.assert_close(rescored, expected, rtol=0, atol=1e-6)
    assert torch.equal(rescored.argmax(1), expected.argmax(1))


def test_streaming_misuse() -> None:
    stream = StreamingRebalancer(tau=1.0)
    with pytest.raises(InputError, match="accumulate"):
        stream.rescore(torch.randn(3, C))
    stream.accumulate(torch.randn(3, C))
    with pytest.raises(InputError):
        stream.accumulate(torch.randn(3, C + 1))
    stream.rescore(torch.randn(2, C))
    with pytest.raises(InputError, match="reset"):
        stream.accumulate(torch.randn(3, C))
    stream.reset()
    stream.accumulate(torch.randn(3, C))
    with pytest.raises(ConfigError):
        StreamingRebalancer(tau=float("inf"))


# ----------------------------------------------------------------------------------------- tau-norm
def skewed_head_and_features(
    seed: int, per_class: int = 100
) -> tuple[LinearHead, torch.Tensor, torch.Tensor]:
    """Class prototypes as features; the head's weight norms grow with class frequency (the CE pattern)."""
    gen = torch.Generator().manual_seed(seed)
    dim = 8
    protos = torch.nn.functional.normalize(
        torch.randn(C, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    y = torch.arange(C).repeat_interleave(per_class)
    h = 2.0 * protos[y] + 0.9 * torch.randn(y.numel(), dim, generator=gen)
    head = LinearHead(dim, C)
    with torch.no_grad():
        head.weight.copy_(protos * torch.tensor([3.0, 2.0, 1.0, 0.5]).unsqueeze(1))
        head.bias.copy_(torch.tensor([0.3, 0.2, 0.0, -0.1]))
    return head, h, y


def test_tau_norm_tau_zero_is_original_and_norm_scaling() -> None:
    head, h, _ = skewed_head_and_features(0)
    adj = TauNormAdjuster.from_classifier(head.weight, head.bias, tau=0.0, tune=False)
    with torch.no_grad():
        original = head(h)
    assert torch.equal(adj.transform(h), original)
    norms = head.weight.detach().norm(dim=1)
    for tau in (0.0, 0.5, 1.0, 1.7):
        new_head = apply_tau_norm(head, tau)
        torch.testing.assert_close(new_head.weight.detach().norm(dim=1), norms ** (1 - tau))
        torch.testing.assert_close(new_head.bias.detach(), head.bias.detach() / norms**tau)
        with torch.no_grad():
            torch.testing.assert_close(new_head(h), adj.logits_from_features(h, tau))
    assert torch.equal(head.weight.detach().norm(dim=1), norms)  # the input head is untouched


def test_tau_norm_bias_modes() -> None:
    head, h, _ = skewed_head_and_features(1, per_class=5)
    keep = apply_tau_norm(head, 1.0, bias_mode="keep")
    assert torch.equal(keep.bias, head.bias)
    drop = apply_tau_norm(head, 1.0, bias_mode="drop")
    assert drop.bias is None
    adj = TauNormAdjuster(classifier=head, tau=1.0, tune=False, bias_mode="drop")
    with torch.no_grad():
        torch.testing.assert_close(adj.transform(h), drop(h))
        torch.testing.assert_close(adj.head()(h), drop(h))
    with pytest.raises(ConfigError):
        apply_tau_norm(head, 1.0, bias_mode="halve")  # type: ignore[arg-type]


def test_tau_norm_fit_helps_on_skewed_head() -> None:
    head, val_h, val_y = skewed_head_and_features(2)
    _, test_h, test_y = skewed_head_and_features(3)
    adj = create_posthoc("tau_norm", classifier=head).fit(val_h, val_y)
    assert adj.input_kind == "features"
    assert 0.0 < adj.tau <= 2.0
    with torch.no_grad():
        plain = balanced_accuracy(head(test_h), test_y, C)
    assert balanced_accuracy(adj.transform(test_h), test_y, C) > plain + 0.05


def test_tau_norm_bad_input() -> None:
    head, h, y = skewed_head_and_features(4, per_class=3)
    with pytest.raises(ConfigError):
        create_posthoc("tau_norm")
    with pytest.raises(ConfigError):
        TauNormAdjuster(classifier=CosineHead(8, C))
    with pytest.raises(ConfigError):
        apply_tau_norm(CosineHead(8, C), 1.0)
    with pytest.raises(ConfigError):
        TauNormAdjuster(classifier=head, weight=head.weight)
    with pytest.raises(InputError):
        TauNormAdjuster(weight=torch.randn(C, 8), bias=torch.randn(C + 1))
    adj = TauNormAdjuster(classifier=head)
    with pytest.raises(InputError):
        adj.transform(torch.randn(4, 9))
    with pytest.raises(InputError):
        adj.fit(h, y[:-1])
    assert isinstance(adj.head(), nn.Linear)


def test_harness_contract() -> None:
    """What the trainer relies on: the declared ``construction_inputs`` and ``input_kind`` of each
    registered adjuster class, ``fitted_params()``; every registered adjuster is a PosthocAdjuster."""
    from gradtail.contracts import PosthocAdjuster
    from gradtail.posthoc import POSTHOC

    for name in POSTHOC.names():
        assert issubclass(POSTHOC.get(name), PosthocAdjuster), name  # type: ignore[arg-type]
    assert POSTHOC.get("posthoc_la").construction_inputs == ("class_counts",)  # type: ignore[attr-defined]
    assert POSTHOC.get("gala_rebalance").construction_inputs == ()  # type: ignore[attr-defined]
    assert POSTHOC.get("tau_norm").construction_inputs == ("classifier",)  # type: ignore[attr-defined]
    z, y = skewed_logits(8, per_class=20)
    assert create_posthoc("gala_rebalance").fit(z, y).fitted_params().keys() == {"tau"}
    assert create_posthoc("posthoc_la", class_counts=COUNTS).fit(z, y).fitted_params().keys() == {"tau"}
    head, h, hy = skewed_head_and_features(9, per_class=20)
    adj = create_posthoc("tau_norm", classifier=head)
    assert create_posthoc("gala_rebalance").input_kind == "logits"
    assert adj.input_kind == "features"
    adj.fit(h, hy)
    assert adj.fitted_params()["tau"] == adj.tau
