"""torchvision backbones behind the model registry: shapes, feature dims, head kinds, parameter split."""

import pytest
import torch
from torch import nn

from gradtail.errors import ConfigError
from gradtail.models import CosineHead, LinearHead, create_model, model_names
from gradtail.models.base import LongTailClassifier


def test_registered():
    assert {"resnet18", "resnet50", "resnext50_32x4d"} <= set(model_names())


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048), ("resnext50_32x4d", 2048)])
def test_shapes_and_feature_dim(name, dim):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    assert isinstance(model, LongTailClassifier)
    assert model.feature_dim == dim
    assert isinstance(model.classifier, LinearHead)
    assert isinstance(model.backbone.fc, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h, z = model(x, return_features=True)
        assert h.shape == (2, dim)
        assert z.shape == (2, 7)
        torch.testing.assert_close(model.features(x), h)
        torch.testing.assert_close(model.classifier(h), z)


def test_backbone_parameters_exclude_head():
    model = create_model("resnet18", num_classes=5)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.classifier.parameters()}
    assert head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}


def test_cosine_head_and_reset():
    model = create_model("resnet18", num_classes=4, head="cosine", head_scale=30.0).eval()
    assert isinstance(model.classifier, CosineHead)
    assert model.classifier.scale == 30.0
    with torch.no_grad():
        z = model(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 4)
    assert z.abs().max() <= 30.0 + 1e-4
    model.reset_classifier(head="linear")
    assert isinstance(model.classifier, LinearHead)
    assert model.classifier.in_features == 512


def test_zero_init_residual():
    model = create_model("resnet18", num_classes=3, zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in model.backbone.layer1)


def test_train_step_updates_backbone_and_head():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.backbone.conv1.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_non_rgb_is_config_error():
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("resnet50", num_classes=10, in_channels=1)
