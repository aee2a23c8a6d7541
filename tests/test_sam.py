"""SAM update rule (baselines.md ``sam``): one step against a hand-written SAM computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import StepContext
from gradtail.errors import ConfigError
from gradtail.gradstats import statistics_frozen
from gradtail.models.base import LongTailClassifier
from gradtail.optim import create_update_rule, update_rule_names
from gradtail.optim.sam import SAM
from gradtail.regularizers.bgp import BalancedGradientPenalty

NUM_CLASSES = 3


class BNNet(LongTailClassifier):
    """Linear + BatchNorm + tanh backbone, linear head (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.feature_dim = 6
        self._make_head(NUM_CLASSES, "linear", 1.0)


class Recorder:
    """An observer that keeps the logits it is shown."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.seen.append(logits.detach().clone())


class CountingCE(nn.Module):
    """CE that counts the calls that would update statistics (the contract of every stateful loss:
    training mode, grad enabled, statistics not frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not statistics_frozen():
            self.updates += 1
        return F.cross_entropy(logits, targets)


def setup(seed: int = 0, lr: float = 0.1, **ctx_kw):
    torch.manual_seed(seed)
    net = BNNet().double().train()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    kw = {"loss_fn": CountingCE(), "regularizer": None, **ctx_kw}
    ctx = StepContext(model=net, epoch=0, **kw)
    return net, x, y, ctx


def hand_sam(net: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float):
    """SAM written out: g at theta, e = rho g/||g||, gradient at theta + e (on a copy of the model)."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    loss = F.cross_entropy(net(x), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(rho * gi / norm)
    g_sam = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    return loss, g_sam


def test_registered():
    assert "sam" in update_rule_names()
    rule = create_update_rule("sam", rho=0.1)
    assert isinstance(rule, SAM) and rule.rho == 0.1
    assert SAM().rho == 0.05
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="rho"):
            SAM(rho=bad)


def test_one_step_equals_hand_written_sam():
    net, x, y, ctx = setup()
    want_loss, want_grads = hand_sam(net, x, y, rho=0.05)
    theta = [p.detach().clone() for p in net.parameters()]
    out = SAM(rho=0.05)(ctx, x, y)
    torch.testing.assert_close(out.loss, want_loss.detach())
    for p, g in zip(net.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    # the trainer's optimizer then steps from theta with the SAM gradient
    torch.optim.SGD(net.parameters(), lr=0.1).step()  # the trainer's optimizer steps after the rule
    for p, old, g in zip(net.parameters(), theta, want_grads, strict=True):
        torch.testing.assert_close(p.detach(), old - 0.1 * g, rtol=1e-10, atol=1e-12)


def test_parameters_restored_exactly_and_second_pass_differs():
    net, x, y, ctx = setup()
    theta = [p.detach().clone() for p in net.parameters()]
    plain = copy.deepcopy(net)
    F.cross_entropy(plain(x), y).backward()
    SAM(rho=0.5)(ctx, x, y)
    for p, old in zip(net.parameters(), theta, strict=True):
        assert torch.equal(p.detach(), old)
    pairs = zip(net.parameters(), plain.parameters(), strict=True)
    assert any(not torch.allclose(p.grad, q.grad) for p, q in pairs)


def test_batchnorm_running_stats_are_the_first_pass_only():
    net, x, y, ctx = setup()
    plain = copy.deepcopy(net)
    plain(x)  # one training-mode forward: what a plain step leaves in the running statistics
    SAM()(ctx, x, y)
    for name, buf in net.named_buffers():
        assert torch.equal(buf, dict(plain.named_buffers())[name]), name
    assert int(net.backbone[1].num_batches_tracked) == 1


def test_observers_see_first_pass_only_and_loss_updates_once():
    recorder = Recorder()
    _, x, y, ctx = setup(observers=[recorder])
    out = SAM()(ctx, x, y)
    assert len(recorder.seen) == 1
    torch.testing.assert_close(recorder.seen[0], out.logits)
    assert ctx.loss_fn.updates == 1
    assert ctx.loss_fn.training
    assert not out.loss.requires_grad and not out.logits.requires_grad


def test_fp16_grad_scaler_is_rejected():
    net, x, y, ctx = setup(scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ConfigError, match="bf16"):
        SAM()(ctx, x, y)
    # a disabled scaler is plain fp32
    net, x, y, ctx = setup(scaler=torch.amp.GradScaler("cpu", enabled=False))
    SAM()(ctx, x, y)
    assert all(p.grad is not None for p in net.parameters())


def test_composes_with_bgp_regularizer():
    net, x, y, ctx = setup(regularizer=BalancedGradientPenalty(beta=0.5))
    theta = [p.detach().clone() for p in net.parameters()]
    out = SAM()(ctx, x, y)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    for p, old in zip(net.parameters(), theta, strict=True):
        assert torch.equal(p.detach(), old)
