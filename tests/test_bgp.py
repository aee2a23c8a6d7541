"""BGP (bgp.md): every closed form against the same quantity computed by double backprop, and gradchecks.

The references below never use the regularizer's closed forms: they build per-sample losses with
``reduction="none"``, form each present class's mean loss, and differentiate it with
``torch.autograd.grad(..., create_graph=True)`` with respect to the head's parameters (or the features,
the logits, or every parameter), then take norms and average over the present classes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradtail.errors import ConfigError, InputError
from gradtail.models.base import LongTailClassifier
from gradtail.models.heads import CosineHead, LinearHead
from gradtail.regularizers import create_regularizer, regularizer_names
from gradtail.regularizers.bgp import BalancedGradientPenalty

NUM_CLASSES = 4
IN_DIM, FEAT_DIM = 3, 5
PerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

COMPOSITIONS = {
    "one_class": [2, 2, 2, 2, 2, 2],
    "all_classes": [0, 1, 2, 3, 0, 1, 1, 3],
    "singletons": [3, 0, 2],
    "absent_class": [0, 0, 0, 0, 0, 2, 2, 3],
    "one_sample": [1],
}
CLOSED_FORMS = ("head", "logit", "feature", "unbalanced")


class TinyNet(LongTailClassifier):
    """Linear + tanh backbone (smooth, for finite differences) and a gradtail head."""

    def __init__(self, head: str = "linear") -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN_DIM, FEAT_DIM), nn.Tanh())
        self.feature_dim = FEAT_DIM
        if head == "linear_nobias":
            self.num_classes = NUM_CLASSES
            self.classifier = LinearHead(FEAT_DIM, NUM_CLASSES, bias=False)
        else:
            self._make_head(NUM_CLASSES, head, head_scale=3.0)


def make_net(head: str, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(head).double()
    with torch.no_grad():  # spread the logits so that gradients are far from zero
        net.backbone[0].weight.mul_(3.0)
        if isinstance(net.classifier, LinearHead):
            net.classifier.weight.mul_(3.0)
    return net


def ce_per_sample(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, y, reduction="none")


LOG_PRIOR = torch.log(torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64))


def la_per_sample(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logit-adjusted CE: CE(z + log prior, y); its gradient at the raw logits differs from CE's."""
    return F.cross_entropy(z + LOG_PRIOR.to(z), y, reduction="none")


LOSSES: dict[str, PerSample] = {"ce": ce_per_sample, "la": la_per_sample}


def sq_norm(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([t.square().sum() for t in tensors]).sum()


def reference_r(variant: str, squared: bool, net: TinyNet, x: torch.Tensor, y: torch.Tensor, loss: PerSample):
    """R by double backprop, straight from the definitions in bgp.md §2-3 (no closed forms)."""
    grad = torch.autograd.grad
    norm = (lambda s: s) if squared else (lambda s: torch.sqrt(s + 1e-12))
    h = net.features(x)
    head = net.classifier
    if isinstance(head, CosineHead):  # differentiate w.r.t. the normalised weight and feature
        w_hat, feat = F.normalize(head.weight, dim=1), F.normalize(h, dim=1)
        z = head.scale * feat @ w_hat.T
        head_params = [w_hat]
    else:
        feat, z = h, head(h)
        head_params = [p for p in head.parameters()]
    ell = loss(z, y)
    if variant == "unbalanced":
        return norm(sq_norm(grad(ell.mean(), head_params, create_graph=True)))
    values = []
    for c in sorted(set(y.tolist())):
        members = y == c
        n_c = int(members.sum())
        loss_c = ell[members].mean()
        if variant == "head":
            values.append(norm(sq_norm(grad(loss_c, head_params, create_graph=True))))
        elif variant == "feature":
            (per_row,) = grad(loss_c, feat, create_graph=True)  # row i: (1/n_c) grad of l_i at its feature
            values.append(norm(per_row.sum(dim=0).square().sum()))
        elif variant == "logit":
            (per_row,) = grad(loss_c, z, create_graph=True)
            g = per_row[members] * n_c
            values.append(torch.stack([norm(gi.square().sum()) for gi in g]).mean())
        elif variant == "exact":
            params = list(net.parameters())
            values.append(norm(sq_norm(grad(loss_c, params, create_graph=True))))
    return torch.stack(values).mean()


def bgp_value(reg: BalancedGradientPenalty, net: TinyNet, x: torch.Tensor, y: torch.Tensor, loss: PerSample):
    h, z = net(x, return_features=True)
    return reg(h, z, y, loss(z, y).mean(), net)


def grads_of(value: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = torch.autograd.grad(value, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, out, strict=True)]


def batch(composition: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor(COMPOSITIONS[composition])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), IN_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, y


def check_against_reference(variant: str, squared: bool, head: str, loss_name: str, composition: str) -> None:
    """beta * R and its gradient (input, every parameter) equal the double-backprop reference."""
    net = make_net(head)
    x, y = batch(composition)
    loss = LOSSES[loss_name]
    reg = BalancedGradientPenalty(variant=variant, beta=0.7, squared=squared)
    got = bgp_value(reg, net, x, y, loss)
    want = 0.7 * reference_r(variant, squared, net, x, y, loss)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = [x, *net.parameters()]
    for g_got, g_want in zip(grads_of(got, inputs), grads_of(want, inputs), strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("head", ["linear", "linear_nobias", "cosine"])
@pytest.mark.parametrize("variant", [*CLOSED_FORMS, "exact"])
def test_norms_match_double_backprop(variant, head, loss_name, composition):
    check_against_reference(variant, False, head, loss_name, composition)


@pytest.mark.parametrize("composition", sorted(COMPOSITIONS))
@pytest.mark.parametrize("variant", [*CLOSED_FORMS, "exact"])
def test_squared_norms_match_double_backprop(variant, composition):
    check_against_reference(variant, True, "linear", "la", composition)


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, NUM_CLASSES - 1), min_size=1, max_size=10), seed=st.integers(0, 99))
def test_head_variant_any_composition(labels, seed):
    net = make_net("linear", seed)
    y = torch.tensor(labels)
    x = torch.randn(len(labels), IN_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    reg = BalancedGradientPenalty(variant="head")
    torch.testing.assert_close(
        bgp_value(reg, net, x, y, la_per_sample), 0.1 * reference_r("head", False, net, x, y, la_per_sample)
    )


def test_unbalanced_is_norm_of_full_batch_head_gradient():
    net = make_net("linear")
    x, y = batch("absent_class")
    h, z = net(x, return_features=True)
    loss = F.cross_entropy(z, y)
    got = BalancedGradientPenalty(variant="unbalanced", beta=1.0)(h, z, y, loss, net)
    gw, gb = torch.autograd.grad(loss, [net.classifier.weight, net.classifier.bias], retain_graph=True)
    want = torch.sqrt(gw.square().sum() + gb.square().sum() + 1e-12)
    torch.testing.assert_close(got, want)
    # and differs from the balanced head penalty on an imbalanced batch
    balanced = BalancedGradientPenalty(variant="head", beta=1.0)(h, z, y, loss, net)
    assert not torch.allclose(got, balanced)


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("variant", [*CLOSED_FORMS, "exact"])
def test_penalty_gradient_matches_finite_differences(variant, head):
    """gradcheck of the penalty w.r.t. the input and every parameter (float64 central differences)."""
    net = make_net(head)
    x, y = batch("absent_class")
    reg = BalancedGradientPenalty(variant=variant, beta=1.0)
    names = [n for n, _ in net.named_parameters()]

    class Penalty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return bgp_value(reg, self.net, inp, y, ce_per_sample)

    wrapper = Penalty()

    def fn(inp: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        swapped = {f"net.{n}": p for n, p in zip(names, params, strict=True)}
        return torch.func.functional_call(wrapper, swapped, (inp,))

    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("variant", CLOSED_FORMS)
def test_detach_features_stops_gradient_to_features(variant, head):
    net = make_net(head)
    x, y = batch("all_classes")
    h, z = net(x, return_features=True)
    loss = la_per_sample(z, y).mean()
    attached = BalancedGradientPenalty(variant=variant, beta=1.0)(h, z, y, loss, net)
    detached = BalancedGradientPenalty(variant=variant, beta=1.0, detach_features=True)(h, z, y, loss, net)
    torch.testing.assert_close(detached, attached)
    head_params = list(net.classifier.parameters())
    to_h, *to_head = grads_of(detached, [h, *head_params])
    assert torch.count_nonzero(to_h) == 0
    for g in grads_of(detached, list(net.backbone.parameters())):
        assert torch.count_nonzero(g) == 0
    # the head still gets exactly the gradient of the penalty evaluated on constant features
    h_const = net.features(x).detach()
    z_const = net.classifier(h_const)
    ref = BalancedGradientPenalty(variant=variant, beta=1.0)(
        h_const, z_const, y, la_per_sample(z_const, y).mean(), net
    )
    for g_got, g_want in zip(to_head, grads_of(ref, head_params), strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert any(torch.count_nonzero(g) > 0 for g in to_head)


def test_attached_features_receive_gradient():
    net = make_net("linear")
    x, y = batch("all_classes")
    h, z = net(x, return_features=True)
    pen = BalancedGradientPenalty()(h, z, y, F.cross_entropy(z, y), net)
    (to_h,) = grads_of(pen, [h])
    assert torch.count_nonzero(to_h) > 0


def test_settings_and_registry():
    assert "bgp" in regularizer_names()
    reg = create_regularizer("bgp", variant="squared", beta=0.5, start_epoch=3)
    assert isinstance(reg, BalancedGradientPenalty)
    assert (reg.variant, reg.squared, reg.beta, reg.start_epoch) == ("head", True, 0.5, 3)
    defaults = BalancedGradientPenalty()
    assert (defaults.variant, defaults.squared, defaults.beta) == ("logit", False, 0.1)  # bgp.md §2
    assert (defaults.start_epoch, defaults.detach_features) == (0, False)
    with pytest.raises(ConfigError, match="unknown bgp variant"):
        BalancedGradientPenalty(variant="sharp")
    with pytest.raises(ConfigError, match="beta"):
        BalancedGradientPenalty(beta=-1.0)
    with pytest.raises(ConfigError, match="start_epoch"):
        BalancedGradientPenalty(start_epoch=-1)
    with pytest.raises(ConfigError, match="detach_features"):
        BalancedGradientPenalty(variant="exact", detach_features=True)


def test_other_heads_need_logit_or_exact():
    net = make_net("linear")
    net.classifier = nn.Sequential(nn.Linear(FEAT_DIM, NUM_CLASSES)).double()
    x, y = batch("all_classes")
    h, z = net(x, return_features=True)
    loss = F.cross_entropy(z, y)
    with pytest.raises(ConfigError, match="linear or cosine"):
        BalancedGradientPenalty(variant="head")(h, z, y, loss, net)
    for variant in ("logit", "exact"):
        assert torch.isfinite(BalancedGradientPenalty(variant=variant)(h, z, y, loss, net))


def test_input_checks_and_no_grad():
    net = make_net("linear")
    x, y = batch("all_classes")
    h, z = net(x, return_features=True)
    reg = BalancedGradientPenalty()
    with pytest.raises(InputError):
        reg(h, z, y[:-1], F.cross_entropy(z, y), net)
    with pytest.raises(InputError):
        reg(h, z, y + NUM_CLASSES, F.cross_entropy(z, y), net)
    with pytest.raises(InputError, match="attached"):
        reg(h, z, y, F.cross_entropy(z.detach(), y), net)
    with torch.no_grad():
        h0, z0 = net(x, return_features=True)
        assert reg(h0, z0, y, F.cross_entropy(z0, y), net).item() == 0.0


def test_ddp_style_wrapper_is_unwrapped():
    net = make_net("linear")
    wrapper = nn.DataParallel(net)  # on CPU: a plain wrapper holding the model in ``.module``, like DDP
    x, y = batch("all_classes")
    h, z = net(x, return_features=True)
    loss = F.cross_entropy(z, y)
    reg = BalancedGradientPenalty()
    torch.testing.assert_close(reg(h, z, y, loss, wrapper), reg(h, z, y, loss, net))


def test_bf16_autocast_penalty_is_float32_and_close():
    torch.manual_seed(0)
    net = TinyNet("linear")
    x = torch.randn(16, IN_DIM)
    y = torch.arange(16) % NUM_CLASSES
    reg = BalancedGradientPenalty(beta=1.0)
    h, z = net(x, return_features=True)
    full = reg(h, z, y, F.cross_entropy(z, y), net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, z = net(x, return_features=True)
        low = reg(h, z, y, F.cross_entropy(z, y), net)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=5e-2, atol=1e-3)
