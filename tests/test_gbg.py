"""The GBG update rule (gbg.md §2, tests §6): one-group steps, MGDA steps against a hand computation."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtail.contracts import Regularizer, StepContext, TrainingView, UpdateRule
from gradtail.errors import ConfigError
from gradtail.gradstats import GradientStatistics
from gradtail.models.base import LongTailClassifier
from gradtail.models.small_cnn import SmallCNN
from gradtail.optim import create_update_rule, update_rule_names
from gradtail.optim.gbg import GBGRule, last_layer_parameters, parse_group_at
from gradtail.optim.min_norm import min_norm_weights

NUM_CLASSES = 6
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])


class Net(LongTailClassifier):
    """Two Linear + BatchNorm + tanh layers, linear head (float64)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh()
        )
        self.feature_dim = 5
        self._make_head(num_classes, "linear", 1.0)


class StatefulCE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stats = GradientStatistics(NUM_CLASSES)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


class CE(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


class FeaturePenalty(Regularizer):
    def forward(self, features, logits, targets, loss, model) -> torch.Tensor:
        return 0.3 * features.square().mean()


class GradHook:
    """An observer that hooks the logits' gradient, as diagnostics do."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits.register_hook(lambda g: self.grads.append(g.detach().clone()))


def setup(labels: list[int] | None = None, seed: int = 0, lr: float = 0.1, **ctx_kw):
    torch.manual_seed(seed)
    net = Net().double().train()
    y = torch.tensor(labels) if labels is not None else torch.arange(NUM_CLASSES).repeat(4)
    x = torch.randn(y.numel(), 4, dtype=torch.float64)
    kw = {"loss_fn": CE(), "regularizer": None, **ctx_kw}
    ctx = StepContext(model=net, epoch=0, **kw)
    return net, x, y, ctx


def make_rule(groups: torch.Tensor | None = GROUPS, **kw) -> GBGRule:
    rule = GBGRule(**kw)
    if groups is not None:
        rule.set_groups(groups)
    return rule


def shared_of(net: Net, h: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode == "features":
        return [h]
    if mode == "last_layer":
        return [*net.backbone[3].parameters(), *net.backbone[4].parameters()]
    return list(net.backbone.parameters())


def reference(net: Net, x, y, groups, normalization="loss+", params="backbone", combiner="mgda", reg=None):
    """GBG written out with boolean masks: alpha and the gradient of sum alpha_g L_g (+ reg)."""
    net = copy.deepcopy(net)
    h = net.features(x)
    z = net.classifier(h)
    gy = groups[y]
    losses = [F.cross_entropy(z[gy == g], y[gy == g]) for g in sorted(set(gy.tolist()))]
    if combiner == "sum":
        alpha = torch.ones(len(losses), dtype=torch.float64)
    elif combiner == "mean":
        alpha = torch.full((len(losses),), 1.0 / len(losses), dtype=torch.float64)
    else:
        shared = shared_of(net, h, params)
        rows = []
        for loss in losses:
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, shared, retain_graph=True)])
            if normalization != "none":
                g = g / g.norm()
            if normalization == "loss+":
                g = g / loss.detach()
            rows.append(g)
        stacked = torch.stack(rows)
        alpha = min_norm_weights(stacked @ stacked.T).double()
    total = sum(a * loss for a, loss in zip(alpha, losses, strict=True))
    if reg is not None:
        total = total + reg(h, z, y, total, net)
    grads = torch.autograd.grad(total, list(net.parameters()))
    return alpha, total.detach(), grads


# ------------------------------------------------------------------ settings and registry
def test_registered_and_defaults() -> None:
    assert "gbg" in update_rule_names()
    rule = create_update_rule("gbg", num_groups=2, grouping="frequency")
    assert isinstance(rule, GBGRule) and isinstance(rule, UpdateRule)
    d = GBGRule()
    assert (d.num_groups, d.grouping, d.group_at, d.normalization, d.combiner, d.params) == (
        4,
        "spectral",
        "init",
        "loss+",
        "mgda",
        "backbone",
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"num_groups": 0},
        {"grouping": "kmeans"},
        {"normalization": "l1"},
        {"combiner": "max"},
        {"params": "head"},
        {"group_at": "sometimes"},
        {"group_at": "after:-1"},
        {"group_at": "every:0"},
        {"group_at": "every:x"},
        {"sketch_dim": 0},
    ],
)
def test_bad_settings(kw) -> None:
    with pytest.raises(ConfigError):
        GBGRule(**kw)


def test_parse_group_at() -> None:
    assert parse_group_at("init") == ("init", 0)
    assert parse_group_at("after:3") == ("after", 3)
    assert parse_group_at("after:0") == ("after", 0)
    assert parse_group_at("every:5") == ("every", 5)


# ------------------------------------------------------------------ one group: the plain step
@pytest.mark.parametrize("combiner", ["sum", "mgda", "mean"])
def test_one_group_step_equals_plain_step(combiner: str) -> None:
    labels = [2, 3, 2, 2, 3, 3, 2, 3]  # classes 2 and 3: group 1 only
    net, x, y, ctx = setup(labels)
    plain = copy.deepcopy(net)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(x), y).backward()
    plain_opt.step()

    out = make_rule(combiner=combiner)(ctx, x, y)
    torch.optim.SGD(net.parameters(), lr=0.1).step()  # the trainer's optimizer steps after the rule
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    for (name, b), c in zip(net.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name
    assert out.extras == {"groups_present": 1.0}
    assert not out.loss.requires_grad and not out.logits.requires_grad


def test_before_grouping_every_class_is_one_group() -> None:
    net, x, y, ctx = setup()
    plain = copy.deepcopy(net)
    F.cross_entropy(plain(x), y).backward()
    out = make_rule(groups=None, group_at="after:2")(ctx, x, y)
    assert out.extras["groups_present"] == 1.0
    for p, q in zip(net.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("num_groups", [1, 4])
def test_one_group_batch_never_crashes(num_groups: int) -> None:
    net, x, y, ctx = setup([5, 5, 5, 4])
    groups = (
        torch.zeros(NUM_CLASSES, dtype=torch.long) if num_groups == 1 else torch.tensor([0, 1, 2, 3, 3, 3])
    )
    out = make_rule(groups, num_groups=num_groups)(ctx, x, y)
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------ several groups
@pytest.mark.parametrize("params", ["backbone", "last_layer", "features"])
@pytest.mark.parametrize("normalization", ["loss+", "l2", "none"])
def test_mgda_step_gradient_is_alpha_weighted_sum(normalization: str, params: str) -> None:
    net, x, y, ctx = setup()
    want_alpha, want_loss, want_grads = reference(net, x, y, GROUPS, normalization, params)
    rule = make_rule(normalization=normalization, params=params)
    out = rule(ctx, x, y)
    assert out.extras == {"groups_present": 3.0}
    assert rule.last_alpha is not None
    torch.testing.assert_close(rule.last_alpha.double(), want_alpha, rtol=1e-4, atol=1e-5)
    assert (rule.last_alpha >= 0).all() and float(rule.last_alpha.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(out.loss, want_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(net.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_mgda_two_groups_present_of_three() -> None:
    net, x, y, ctx = setup([0, 1, 4, 5, 0, 5, 4, 1, 1])
    want_alpha, _, want_grads = reference(net, x, y, GROUPS)
    rule = make_rule()
    out = rule(ctx, x, y)
    assert out.extras["groups_present"] == 2.0
    torch.testing.assert_close(rule.last_alpha.double(), want_alpha, rtol=1e-4, atol=1e-5)
    for p, g in zip(net.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_sum_and_mean_combiners(combiner: str) -> None:
    net, x, y, ctx = setup()
    _, want_loss, want_grads = reference(net, x, y, GROUPS, combiner=combiner)
    out = make_rule(combiner=combiner)(ctx, x, y)
    torch.testing.assert_close(out.loss, want_loss)
    for p, g in zip(net.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_regularizer_added_outside_balancing() -> None:
    reg = FeaturePenalty()
    net, x, y, ctx = setup(regularizer=reg)
    _, want_loss, want_grads = reference(net, x, y, GROUPS, reg=reg)
    out = make_rule()(ctx, x, y)
    torch.testing.assert_close(out.loss, want_loss)
    for p, g in zip(net.parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_observer_hook_fires_once_with_the_final_gradient() -> None:
    hook = GradHook()
    net, x, y, ctx = setup(observers=[hook])
    rule = make_rule()
    rule(ctx, x, y)
    assert len(hook.grads) == 1
    # d(sum alpha_g L_g)/dz, written out
    probe = copy.deepcopy(net)
    z = probe(x).detach().requires_grad_(True)
    gy = GROUPS[y]
    total = sum(
        a * F.cross_entropy(z[gy == g], y[gy == g])
        for a, g in zip(rule.last_alpha.double(), range(3), strict=True)
    )
    (want,) = torch.autograd.grad(total, z)
    torch.testing.assert_close(hook.grads[0], want)


def test_grad_scaler_leaves_alpha_unchanged() -> None:
    net, x, y, ctx = setup()
    ref_net = copy.deepcopy(net)
    rule = make_rule()
    rule(ctx, x, y)
    alpha = rule.last_alpha.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, _, _, ctx2 = setup()
    ctx2.model, ctx2.scaler = ref_net, scaler
    rule(ctx2, x, y)
    torch.testing.assert_close(rule.last_alpha, alpha, rtol=1e-5, atol=1e-6)
    for p, q in zip(ref_net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p.grad / 1024.0, q.grad)


def test_stateful_loss_is_refused() -> None:
    _, x, y, ctx = setup(loss_fn=StatefulCE())
    with pytest.raises(ConfigError, match="statistics"):
        make_rule()(ctx, x, y)


# ------------------------------------------------------------------ grouping schedule and checkpoint
def counting_rule(**kw) -> tuple[GBGRule, list[int]]:
    rule = GBGRule(**kw)
    calls: list[int] = []

    def compute(view):
        calls.append(view.epoch)
        return GROUPS.clone()

    rule.compute_groups = compute  # type: ignore[method-assign]
    return rule, calls


def run_epochs(rule: GBGRule, epochs) -> None:
    for e in epochs:
        rule.on_epoch_start(e, SimpleNamespace(epoch=e))


def test_schedules() -> None:
    rule, calls = counting_rule(group_at="init")
    run_epochs(rule, range(5))
    assert calls == [0]
    rule, calls = counting_rule(group_at="after:2")
    run_epochs(rule, range(5))
    assert calls == [2]
    rule, calls = counting_rule(group_at="every:2")
    run_epochs(rule, range(5))
    assert calls == [0, 2, 4]


@pytest.mark.parametrize(
    ("group_at", "resume_at", "expected"), [("init", 3, []), ("every:2", 4, []), ("every:2", 5, [6])]
)
def test_resume_does_not_regroup_unless_scheduled(group_at: str, resume_at: int, expected: list[int]) -> None:
    first, _ = counting_rule(group_at=group_at)
    run_epochs(first, range(resume_at + 1))
    state = first.state_dict()
    assert torch.equal(state["groups"], GROUPS)
    resumed, calls = counting_rule(group_at=group_at)
    resumed.load_state_dict(copy.deepcopy(state))
    assert torch.equal(resumed.groups, GROUPS) and resumed.grouped_epoch == first.grouped_epoch
    run_epochs(resumed, [resume_at, resume_at + 1])
    assert calls == expected


def test_state_before_grouping() -> None:
    rule = GBGRule()
    state = rule.state_dict()
    assert state["groups"] is None
    other = make_rule()
    other.load_state_dict(state)
    assert other.groups is None


class OppositeNet(LongTailClassifier):
    """Head rows +a (first half of the classes) / -a (second half): opposite backbone gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
        self.feature_dim = 5
        self._make_head(NUM_CLASSES, "linear", 1.0)
        sign = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
        with torch.no_grad():
            self.classifier.weight.copy_(sign[:, None] * torch.linspace(-1, 1, 5)[None, :])
            self.classifier.bias.zero_()


def grouping_view(model: nn.Module) -> TrainingView:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(5)
    counts = torch.bincount(labels)
    counts[0] = 50  # frequency order: class 0 first
    return TrainingView(
        model=model,
        train_images=torch.randint(0, 256, (labels.numel(), 1, 3, 4), generator=gen, dtype=torch.uint8),
        train_labels=labels,
        num_classes=NUM_CLASSES,
        class_counts=counts.tolist(),
        loss_fn=CE(),
        normalize=lambda x: x.float() / 255.0,
    )


@pytest.mark.parametrize("sketch_dim", [None, 16])
def test_on_epoch_start_spectral_end_to_end(sketch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = OppositeNet().train()
    rule = GBGRule(num_groups=2, sketch_dim=sketch_dim, batch_size=4)
    rule.on_epoch_start(0, grouping_view(model))
    assert rule.groups is not None and rule.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert rule.grouped_epoch == 0 and model.training


def test_on_epoch_start_frequency_and_random() -> None:
    view = grouping_view(OppositeNet())
    rule = GBGRule(num_groups=3, grouping="frequency")
    rule.on_epoch_start(0, view)
    assert rule.groups is not None and rule.groups.tolist() == [0, 0, 1, 1, 2, 2]
    rule = GBGRule(num_groups=3, grouping="random", seed=1)
    rule.on_epoch_start(0, view)
    assert rule.groups is not None and sorted(torch.bincount(rule.groups).tolist()) == [2, 2, 2]


def test_last_layer_parameters_of_small_cnn() -> None:
    model = SmallCNN(num_classes=3, width=4)
    got = last_layer_parameters(model)
    want = [model.backbone[10].weight, model.backbone[11].weight, model.backbone[11].bias]
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want, strict=True))


def test_groups_must_match_the_number_of_classes() -> None:
    _, x, y, ctx = setup()
    with pytest.raises(ConfigError, match="class groups"):
        make_rule(torch.tensor([0, 1, 0]))(ctx, x, y)


def test_spectral_grouping_without_in_memory_images_is_a_clear_error():
    rule = GBGRule(num_groups=2, grouping="spectral")
    view = TrainingView(
        model=OppositeNet(), train_images=None, train_labels=torch.arange(6), num_classes=6,
        class_counts=[1] * 6, loss_fn=CE(), normalize=lambda x: x.float(),
    )
    with pytest.raises(ConfigError, match="in-memory"):
        rule.compute_groups(view)


def test_epoch_summary_is_the_mean_weight_of_each_group() -> None:
    """Three steps: all groups (mgda alpha a), groups 0 and 2 only (alpha b), group 1 only (alpha [1]);
    the summary is the per-group mean over the steps, 0 where a group was absent, then it resets."""
    rule = make_rule()
    assert rule.epoch_summary() == {}
    weights = []
    for labels in ([0, 1, 2, 3, 4, 5, 0, 3], [0, 1, 4, 5, 0, 5], [2, 3, 3, 2]):
        _, x, y, ctx = setup(labels)
        rule(ctx, x, y)
        weights.append(rule.last_alpha.double())
    groups_in = [[0, 1, 2], [0, 2], [1]]
    expected = torch.zeros(3, dtype=torch.float64)
    for present, alpha in zip(groups_in, weights, strict=True):
        expected[present] += alpha
    summary = rule.epoch_summary()
    assert list(summary) == ["alpha_group0", "alpha_group1", "alpha_group2"]
    torch.testing.assert_close(torch.tensor(list(summary.values()), dtype=torch.float64), expected / 3)
    assert rule.epoch_summary() == {}  # reset after reading
