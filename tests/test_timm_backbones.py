"""timm backbones behind ``timm:<name>`` (issue 14): training through the Trainer, features / classifier,
local checkpoints, the cosine head, the parameter checks and the error messages. Tests that build timm
models skip when timm is not installed (it is an optional extra, in ``.[dev]``)."""

import json
import sys

import pytest
import torch
from torch import nn

from gradtail.cli.main import main
from gradtail.config import config_from_dict
from gradtail.engine.components import check_component_params
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError
from gradtail.models import MODELS, CosineHead, LinearHead, create_model, model_name_patterns
from gradtail.models.base import LongTailClassifier


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def _config(model, **sections):
    cfg = {
        "name": "timm_tiny",
        "data": {
            "dataset": "synthetic",
            "imbalance_factor": 4,
            "val_per_class": 2,
            "synthetic": {"num_classes": 3, "per_class": 18, "test_per_class": 6, "image_size": 32},
            "augment": {"crop_padding": 2, "hflip": True},
        },
        "model": model,
        "loss": {"name": "balanced_softmax"},
        "optim": {"lr": 0.05, "batch_size": 8, "epochs": 1, "warmup_epochs": 0, "schedule": "constant"},
        "train": {"seed": 0, "progress": False, "diagnostics": False},
    }
    cfg.update(sections)
    return config_from_dict(cfg)


# ------------------------------------------------------------------------------------------- training
def test_trains_one_epoch_through_the_trainer(timm, tmp_path):
    cfg = _config({"name": "timm:test_efficientnet", "params": {"drop_rate": 0.1}})  # timm's tiny test net
    check_component_params(cfg)
    trainer = Trainer(cfg, output_dir=tmp_path, verbose=False)
    model = trainer.model
    assert isinstance(model, LongTailClassifier) and model.timm_name == "test_efficientnet"
    stem = model.backbone.conv_stem.weight
    assert stem.shape[1] == 1  # in_chans from the data (1-channel synthetic images)
    before = stem.detach().clone()
    final = trainer.fit()
    assert not torch.equal(before, model.backbone.conv_stem.weight)  # the backbone trained
    assert final["epochs"] == 1 and 0.0 <= final["last_epoch"]["top1"] <= 1.0
    saved = json.loads((tmp_path / "final.json").read_text())
    assert saved["last_epoch"]["per_class"] == final["last_epoch"]["per_class"]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize(
    ("name", "params", "dim"),
    [
        ("resnet10t", {}, 512),
        ("mobilenetv3_small_050", {}, 1024),  # the pooled feature is head_hidden_size wide, not num_features
        ("vit_tiny_patch16_224", {"img_size": 32}, 192),
    ],
)
def test_features_and_classifier(timm, name, params, dim):
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=5, in_channels=1, **params).eval()
    assert model.feature_dim == dim and model.head_kind == "linear"
    assert isinstance(model.classifier, LinearHead) and model.classifier.in_features == dim
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        h, z = model(x, return_features=True)
        assert h.shape == (2, dim) and z.shape == (2, 5)
        torch.testing.assert_close(model.features(x), h)
        torch.testing.assert_close(model.classifier(h), z)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.classifier.parameters()}
    assert head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert name in repr(model)


def test_cosine_head(timm):
    model = create_model(
        "timm:resnet10t", num_classes=4, in_channels=3, head="cosine", head_scale=30.0
    ).eval()
    assert isinstance(model.classifier, CosineHead) and model.head_kind == "cosine"
    with torch.no_grad():
        z = model(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 4) and z.abs().max() <= 30.0 + 1e-4
    model.reset_classifier(head="linear")
    assert isinstance(model.classifier, LinearHead) and model.classifier.in_features == 512


def test_cosine_head_trains_through_the_trainer(timm, tmp_path):
    cfg = _config({"name": "timm:test_resnet", "head": "cosine", "head_scale": 16.0})  # timm's tiny test net
    trainer = Trainer(cfg, output_dir=tmp_path, verbose=False)
    assert isinstance(trainer.model.classifier, CosineHead)
    assert trainer.fit()["epochs"] == 1


def test_sync_batchnorm_keeps_timm_activations(timm):
    """timm's BatchNormAct2d layers become SyncBatchNormAct (PyTorch's converter would drop the
    activation): the converted model computes the same function with the same parameters."""
    torch.manual_seed(0)
    model = create_model("timm:test_efficientnet", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    params = {id(p) for p in model.parameters()}
    synced = model.convert_sync_batchnorm().eval()
    assert type(synced.backbone.bn1).__name__ == "SyncBatchNormAct"
    assert {id(p) for p in synced.parameters()} == params  # the optimizer built afterwards sees them
    with torch.no_grad():
        torch.testing.assert_close(synced(x), expected)


# ------------------------------------------------------------------------------------------- checkpoints
def _same_backbone(model, state):
    own = model.backbone.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k in own) and own.keys() <= state.keys()


def test_loads_a_local_checkpoint_without_its_head(timm, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=1000, in_chans=1)
    state = source.state_dict()
    assert "fc.weight" in state  # the source's classifier: dropped on load
    path = tmp_path / "resnet10t.pth"
    torch.save(state, path)
    model = create_model("timm:resnet10t", num_classes=6, in_channels=1, checkpoint=str(path))
    assert _same_backbone(model, state)
    assert model.classifier.weight.shape == (6, 512)  # a new gradtail head
    fresh = create_model("timm:resnet10t", num_classes=6, in_channels=1)
    assert not _same_backbone(fresh, state)  # without a checkpoint: random weights

    # timm train.py-style wrappers and DistributedDataParallel prefixes
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    assert _same_backbone(create_model("timm:resnet10t", 6, in_channels=1, checkpoint=str(wrapped)), state)

    # .safetensors, as timm publishes its weights
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    assert _same_backbone(create_model("timm:resnet10t", 6, in_channels=1, checkpoint=str(st)), state)


def test_rgb_checkpoint_adapts_to_one_channel(timm, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet18(weights=None)  # torchvision and timm ResNets share key names
    path = tmp_path / "tv_resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("timm:resnet18", num_classes=3, in_channels=1, checkpoint=str(path))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_checkpoint_through_a_config(timm, tmp_path):
    source = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    cfg = _config({"name": "timm:resnet10t", "params": {"checkpoint": str(path)}})
    check_component_params(cfg)
    trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
    assert _same_backbone(trainer.model, source.state_dict())


def test_checkpoint_errors(timm, tmp_path):
    with pytest.raises(ConfigError, match=r"model.params.checkpoint.*no such file"):
        create_model("timm:resnet10t", 3, checkpoint=str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ConfigError, match=r"corrupt.pth cannot be read as a state dict"):
        create_model("timm:resnet10t", 3, checkpoint=str(corrupt))
    truncated = tmp_path / "truncated.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"cannot be read as a state dict"):
        create_model("timm:resnet10t", 3, checkpoint=str(truncated))
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), other)
    with pytest.raises(
        ConfigError, match=r"does not match timm model 'resnet10t': missing keys .*shapes"
    ) as e:
        create_model("timm:resnet10t", 3, checkpoint=str(other))
    assert "\n" not in str(e.value)
    objects = tmp_path / "objects.pth"
    torch.save({"weight": torch.zeros(1), "optimizer": nn.Linear(1, 1)}, objects)
    with pytest.raises(ConfigError, match=r"objects besides tensors"):
        create_model("timm:resnet10t", 3, checkpoint=str(objects))


# ------------------------------------------------------------------------------------------- names, params
def test_unknown_name_suggests_close_names(timm):
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet81'.*close names: .*resnet18") as e:
        create_model("timm:resnet81", 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"close names: vit_tiny_patch16_224"):
        check_component_params(_config({"name": "timm:vit_tiny"}))
    with pytest.raises(ConfigError, match=r"needs a timm model name"):
        MODELS.get("timm:")
    assert "timm:resnet18" in MODELS and "timm:resnet81" not in MODELS


def test_unknown_model_lists_the_timm_pattern():
    with pytest.raises(ConfigError, match=r"unknown model 'timmy:resnet18'; valid: .*small_cnn, timm:<name>"):
        MODELS.get("timmy:resnet18")


def test_params_gradtail_sets_are_refused_when_the_config_is_checked(timm):
    for key, source in [
        ("pretrained", "nothing is downloaded"),
        ("in_chans", "the dataset"),
        ("checkpoint_path", "model.params.checkpoint"),
        ("num_classes", "the dataset"),
        ("head", "model.head"),
    ]:
        cfg = _config({"name": "timm:resnet10t", "params": {key: 1}})
        with pytest.raises(ConfigError, match=rf"'model.params.{key}' cannot be set: .*{source}"):
            check_component_params(cfg)
    with pytest.raises(ConfigError, match=r"'model.params.pretrained' cannot be set"):
        create_model("timm:resnet10t", 3, pretrained=True)  # the same check outside a config


def test_params_timm_does_not_take_are_one_line_errors(timm):
    cfg = _config({"name": "timm:resnet10t", "params": {"drop_rat": 0.1}})
    check_component_params(cfg)  # forwarded to timm's **kwargs: checked when the model is built
    with pytest.raises(
        ConfigError, match=r"config key 'model.params': model timm:resnet10t does not take"
    ) as e:
        create_model("timm:resnet10t", 3, drop_rat=0.1)
    assert "drop_rat" in str(e.value) and "\n" not in str(e.value)


def test_missing_timm_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'gradtail\[timm\]'") as e:
        create_model("timm:resnet18", 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"timm library, which is not installed"):
        check_component_params(_config({"name": "timm:resnet18"}))


def test_list_mentions_timm_names(capsys):
    assert any(p.startswith("timm:<name>") for p in model_name_patterns())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "timm:<name>" in out and "gradtail[timm]" in out
