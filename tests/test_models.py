"""Model layers whose order or layout was chosen for speed compute the same function as the plain layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtail.models import create_model
from gradtail.models.base import GlobalAvgPool, global_avg_pool


def _relu_before_pool(model: nn.Module) -> nn.Sequential:
    """The textbook small CNN (conv, BN, ReLU, max-pool) built from a copy of ``model``'s own layers."""
    layers = list(copy.deepcopy(model.backbone))
    out: list[nn.Module] = []
    i = 0
    while i < len(layers):
        if isinstance(layers[i], nn.MaxPool2d):  # max-pool, ReLU -> ReLU, max-pool
            out += [layers[i + 1], layers[i]]
            i += 2
        else:
            out.append(layers[i])
            i += 1
    return nn.Sequential(*out)


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("ties", [False, True])
def test_small_cnn_relu_after_pool_equals_relu_before_pool(norm: str, ties: bool) -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=5, in_channels=1, width=4, norm=norm).double()
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    if ties:  # piecewise-constant images: many pooling windows hold equal maxima, positive and <= 0
        x = torch.randn(6, 1, 3, 3, dtype=torch.float64).repeat_interleave(8, 2).repeat_interleave(8, 3)
        with torch.no_grad():
            first_pool = next(i for i, m in enumerate(model.backbone) if isinstance(m, nn.MaxPool2d))
            h = model.backbone[:first_pool](x)
        windows = h.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)
        top = windows.amax(-1, keepdim=True)
        tied = (windows == top).sum(-1) > 1
        assert (tied & (top[..., 0] > 0)).sum() > 20 and (tied & (top[..., 0] <= 0)).sum() > 20
    reference = _relu_before_pool(model)
    pools = [i for i, m in enumerate(reference) if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and all(isinstance(reference[i - 1], nn.ReLU) for i in pools)
    assert all(isinstance(model.backbone[i], nn.MaxPool2d) for i in (j - 1 for j in pools))

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ha, hb = model.features(xa), reference(xb)
    assert torch.equal(ha, hb)
    weights = torch.randn_like(ha)
    (ha * weights).sum().backward()
    (hb * weights).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for pa, pb in zip(model.backbone.parameters(), reference.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_small_cnn_state_dict_keys_are_those_of_relu_before_pool() -> None:
    """Checkpoints written before the ReLU moved after the max-pool still load: parameter layers kept
    their indices."""
    state = create_model("small_cnn", num_classes=3, width=4).state_dict()
    keys = [k for k in state if k.startswith("backbone")]
    convs, bns = [0, 3, 7, 10], [1, 4, 8, 11]
    want = [f"backbone.{i}.weight" for i in convs] + [
        f"backbone.{i}.{name}" for i in bns for name in ("weight", "bias", "running_mean", "running_var",
                                                         "num_batches_tracked")
    ]  # fmt: skip
    assert sorted(keys) == sorted(want)


def _input_gradient(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """The gradient that reaches the layer below the pool (not the leaf's, which autograd re-lays out)."""
    seen: list[torch.Tensor] = []
    inner = x * 1.0
    inner.register_hook(seen.append)
    pool(inner).pow(2).sum().backward()
    return seen[0]


@pytest.mark.parametrize("channels_last", [True, False])
def test_global_avg_pool_value_and_gradient_layout(channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    h = global_avg_pool(x)
    assert h.shape == (3, 5)
    torch.testing.assert_close(h, F.adaptive_avg_pool2d(x, 1).flatten(1), rtol=1e-6, atol=1e-7)
    g = _input_gradient(x, GlobalAvgPool())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert g.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(g, (2 * h / 24)[:, :, None, None].expand_as(x).detach())


def test_adaptive_avg_pool_gradient_is_not_channels_last() -> None:
    """Why global_avg_pool exists: if PyTorch starts returning channels-last gradients here, it can go."""
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = _input_gradient(x, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    assert not g.is_contiguous(memory_format=torch.channels_last)


def test_resnet32_features_are_the_spatial_mean() -> None:
    torch.manual_seed(0)
    model = create_model("resnet32", num_classes=4).eval()
    x = torch.randn(2, 3, 16, 16)
    body = model.backbone
    with torch.no_grad():
        out = F.relu(body.bn1(body.conv1(x)))
        want = body.layers(out).mean((2, 3))
        torch.testing.assert_close(model.features(x), want)
