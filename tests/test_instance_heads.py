"""Mask R-CNN and its box classifiers (instance.md §1, §2, §5): the seesaw head with two objectness channels
and the normed-linear classifier against a NumPy reference (value, gradient, counts, scores); the
federated loss and the seesaw head inside Faster R-CNN / Mask R-CNN equal the standalone losses on the
sampled RoIs; the mask branch trains, inference returns a mask per detection, torchvision's own
classification loss is never computed; ResNet-50-FPN Mask R-CNN (v1 and v2) is torchvision's, layer for
layer; local checkpoints load (class-specific layers of another class count are left out) and bad ones are
one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradtail.errors import ConfigError, DataError
from gradtail.losses import create_loss
from gradtail.models.detection import DetectorSpec, build_detector
from gradtail.models.detection.detectors import load_detector_checkpoint
from gradtail.models.detection.objectness import (
    NormedLinear,
    SeesawObjectnessTerm,
    seesaw_objectness_loss,
    seesaw_objectness_scores,
)

C = 4


# ----------------------------------------------------------------------------------------- NumPy references
def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def np_seesaw_objectness(
    z: np.ndarray, y: np.ndarray, counts: np.ndarray, p: float = 0.8, q: float = 2.0, eps: float = 1e-2
) -> tuple[float, np.ndarray, np.ndarray]:
    """mmdetection's SeesawLoss with objectness, by loops: (loss, dL/dz, counts after the step). ``z``
    (n, C + 2): categories, foreground, background; ``y`` 0..C-1, C = background."""
    n, c = z.shape[0], z.shape[1] - 2
    counts = counts.copy()
    for label in y:  # mmdetection accumulates the step's labels before the loss (foreground ones used)
        if label < c:
            counts[label] += 1
    total, grad = 0.0, np.zeros_like(z)
    for i in range(n):
        obj = z[i, c:]
        t_obj = 0 if y[i] < c else 1
        s_obj = np_softmax(obj)
        total += -np.log(s_obj[t_obj])
        grad[i, c:] += s_obj - np.eye(2)[t_obj]
        if y[i] >= c:
            continue
        yi = y[i]
        sigma = np_softmax(z[i, :c])
        adjusted = z[i, :c].copy()
        for j in range(c):
            if j == yi:
                continue
            nj, ni = max(counts[j], 1.0), max(counts[yi], 1.0)
            mitigation = (nj / ni) ** p if nj < ni else 1.0
            ratio = sigma[j] / max(sigma[yi], eps)
            compensation = ratio**q if ratio > 1 else 1.0
            adjusted[j] += np.log(mitigation * compensation)
        s = np_softmax(adjusted)
        total += -np.log(s[yi])
        grad[i, :c] += s - np.eye(c)[yi]
    return total / n, grad / n, counts


def rois(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 2.5 * torch.randn(n, C + 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.5] = C  # background RoIs
    y[torch.rand(n, generator=g) < 0.3] = 0  # a frequent class
    return z, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seesaw_with_objectness_equals_numpy(seed: int) -> None:
    loss = create_loss("seesaw", C)
    loss.cum_samples.copy_(torch.tensor([40.0, 9.0, 2.0, 0.0], dtype=torch.float64))  # a long tail seen
    z, y = rois(seed)
    want, grad, counts = np_seesaw_objectness(z.numpy(), y.numpy(), loss.cum_samples.numpy())
    z.requires_grad_()
    value = seesaw_objectness_loss(loss, z, y, C)
    value.backward()
    assert value.item() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), grad, rtol=1e-9, atol=1e-14)
    np.testing.assert_array_equal(loss.cum_samples.numpy(), counts)  # foreground labels only


def test_seesaw_objectness_with_only_background_rois_trains_objectness_only() -> None:
    loss = create_loss("seesaw", C)
    z = torch.randn(5, C + 2, dtype=torch.float64, requires_grad=True)
    y = torch.full((5,), C)
    value = seesaw_objectness_loss(loss, z, y, C)
    value.backward()
    want, _, _ = np_seesaw_objectness(z.detach().numpy(), y.numpy(), np.zeros(C))
    assert value.item() == pytest.approx(want, rel=1e-12)
    assert torch.count_nonzero(z.grad[:, :C]) == 0 and loss.cum_samples.sum() == 0


def test_seesaw_objectness_scores_and_normed_linear_equal_their_formulas() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, C + 2, generator=g, dtype=torch.float64)
    got = seesaw_objectness_scores(z, C).numpy()
    for i in range(6):
        want = np_softmax(z[i, :C].numpy()) * np_softmax(z[i, C:].numpy())[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-12)
    layer = NormedLinear(5, 3, temperature=20.0).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = layer(x).detach().numpy()
    for i in range(4):
        for j in range(3):
            xi = x[i].numpy()
            cos = xi @ w[j] / ((np.linalg.norm(xi) + 1e-6) * (np.linalg.norm(w[j]) + 1e-6))
            assert out[i, j] == pytest.approx(20.0 * cos + b[j], rel=1e-10)
    assert float(NormedLinear(8, 3).weight.detach().std()) < 0.05  # mmdetection's N(0, 0.01) initialisation


# ----------------------------------------------------------------------------------------- in the detectors
def scene(seed: int, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image with 2 objects: boxes and masks (each mask an ellipse inside its box)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g) * 0.2
    boxes, masks = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(2):
        w, h = torch.randint(14, 30, (2,), generator=g).tolist()
        x = int(torch.randint(0, size - w, (1,), generator=g))
        y = int(torch.randint(0, size - h, (1,), generator=g))
        m = (((yy - (y + h / 2)) / (h / 2)) ** 2 + ((xx - (x + w / 2)) / (w / 2)) ** 2 <= 1).to(torch.uint8)
        image[:, m.bool()] += 0.7
        boxes.append([x, y, x + w, y + h])
        masks.append(m)
    labels = torch.randint(0, C, (2,), generator=g)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": labels,
        "masks": torch.stack(masks),
    }
    return image.clamp(0, 1), target


def batch(seeds: list[int]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    pairs = [scene(s) for s in seeds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def spec(arch: str, loss: str, **kw: Any) -> DetectorSpec:
    params = {"class_counts": [50, 20, 5, 1]} if loss == "federated" else {}
    return DetectorSpec(
        arch=arch, num_classes=C, loss=loss, loss_params=params, width=16, representation=64, **kw
    )


def _capture(det: Any) -> dict[str, Any]:
    """The class logits (gradient retained) and the sampled labels of the next training forward."""
    seen: dict[str, Any] = {}
    heads = det.model.roi_heads

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        out[0].retain_grad()
        seen["logits"] = out[0]

    handle = heads.box_predictor.predictor.register_forward_hook(hook)
    original = heads.select_training_samples

    def select(proposals: Any, targets: Any) -> Any:
        out = original(proposals, targets)
        seen["labels"] = torch.cat(out[2]).clone()
        return out

    heads.select_training_samples = select  # type: ignore[method-assign]
    seen["undo"] = lambda: (handle.remove(), delattr(heads, "select_training_samples"))
    return seen


def _warm(det: Any, steps: int = 2) -> None:
    opt = torch.optim.SGD(det.parameters(), lr=0.005)
    det.train()
    for s in range(steps):
        images, targets = batch([100 + 2 * s, 101 + 2 * s])
        total = sum(det(images, targets).values())
        opt.zero_grad()
        total.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_federated_term_in_the_detector_equals_the_standalone_loss(arch: str) -> None:
    torch.manual_seed(0)
    det = build_detector(spec(arch, "federated"))
    _warm(det)
    term = det.model.roi_heads.term
    drawn: list[torch.Tensor] = []
    original = term.loss.sample_classes
    term.loss.sample_classes = lambda y: drawn.append(original(y)) or drawn[-1]  # type: ignore[method-assign]
    seen = _capture(det)
    images, targets = batch([7, 8])
    losses = det(images, targets)
    seen["undo"]()
    losses["loss_classifier"].backward(retain_graph=True)
    tv_logits, tv_labels = seen["logits"], seen["labels"]
    assert (tv_labels == 0).any() and (tv_labels > 0).any()
    # torchvision's layout [bg, 1..C] -> [1..C, bg]; label 0 -> C (background), l -> l - 1
    z = tv_logits.detach()[:, [*range(1, C + 1), 0]].clone().requires_grad_()
    y = torch.tensor([C if int(v) == 0 else int(v) - 1 for v in tv_labels])
    standalone = create_loss("federated", C, [50, 20, 5, 1], background_column=True, background_label=True)
    assert len(drawn) == 1 and set(y[y < C].tolist()) <= set(drawn[0].tolist())
    value = standalone.loss_on_classes(z, y, drawn[0])
    value.backward()
    assert losses["loss_classifier"].item() == pytest.approx(value.item(), rel=1e-6)
    torch.testing.assert_close(tv_logits.grad[:, [*range(1, C + 1), 0]], z.grad, rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(tv_logits.grad[:, 0]) == 0  # the background column is not trained


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_seesaw_head_in_the_detector_equals_the_standalone_loss(arch: str) -> None:
    torch.manual_seed(1)
    det = build_detector(spec(arch, "seesaw", seesaw_form="objectness"))
    heads = det.model.roi_heads
    assert isinstance(heads.term, SeesawObjectnessTerm)
    assert isinstance(heads.box_predictor.predictor.cls_score, NormedLinear)
    assert heads.box_predictor.predictor.cls_score.out_features == C + 2
    _warm(det)
    before = copy.deepcopy(heads.term.loss)
    assert float(before.cum_samples.sum()) > 0
    seen = _capture(det)
    images, targets = batch([9, 10])
    losses = det(images, targets)
    seen["undo"]()
    losses["loss_classifier"].backward(retain_graph=True)
    logits, tv_labels = seen["logits"], seen["labels"]
    y = torch.tensor([C if int(v) == 0 else int(v) - 1 for v in tv_labels])
    want, grad, counts = np_seesaw_objectness(
        logits.detach().double().numpy(), y.numpy(), before.cum_samples.numpy()
    )
    assert losses["loss_classifier"].item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(logits.grad.numpy(), grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(heads.term.loss.cum_samples.numpy(), counts)


def test_seesaw_form_auto_is_the_objectness_head_in_mask_rcnn_only() -> None:
    assert DetectorSpec(arch="mask_rcnn", loss="seesaw").seesaw_objectness
    assert not DetectorSpec(arch="faster_rcnn", loss="seesaw").seesaw_objectness
    assert not DetectorSpec(arch="mask_rcnn", loss="seesaw", seesaw_form="softmax").seesaw_objectness
    with pytest.raises(ConfigError, match="seesaw_form objectness is a two-stage head"):
        DetectorSpec(arch="retinanet", loss="efl", seesaw_form="objectness").check()
    with pytest.raises(ConfigError, match="resnet50_fpn_v2 is Mask R-CNN's"):
        DetectorSpec(arch="faster_rcnn", backbone="resnet50_fpn_v2").check()


@pytest.mark.parametrize("loss", ["ce", "sigmoid_eql", "seesaw", "federated", "softmax_eql"])
def test_mask_rcnn_trains_its_mask_branch_and_predicts_a_mask_per_detection(loss: str, monkeypatch) -> None:
    import torchvision.models.detection.roi_heads as roi_heads

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torchvision's classification loss was computed")

    monkeypatch.setattr(roi_heads, "fastrcnn_loss", forbidden)
    torch.manual_seed(2)
    det = build_detector(spec("mask_rcnn", loss))
    det.train()
    images, targets = batch([1, 2])
    losses = det(images, targets)
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    sum(losses.values()).backward()
    mask_grad = det.model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert mask_grad is not None and torch.count_nonzero(mask_grad) > 0
    det.eval()
    with torch.no_grad():
        out = det(images)
    for o in out:
        n = len(o["boxes"])
        assert o["masks"].shape == (n, 1, 64, 64) and n > 0
        assert o["labels"].min() >= 0 and o["labels"].max() < C  # labels 0..C-1 outside the detector
        assert float(o["masks"].min()) >= 0.0 and float(o["masks"].max()) <= 1.0


@pytest.mark.parametrize("backbone", ["resnet50_fpn", "resnet50_fpn_v2"])
def test_resnet50_mask_rcnn_is_torchvisions_layer_for_layer(backbone: str) -> None:
    from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

    anchors = (32, 64, 128, 256, 512)
    ours = build_detector(DetectorSpec(arch="mask_rcnn", num_classes=C, loss="sigmoid_eql", backbone=backbone,
                                       anchor_sizes=anchors, representation=1024))  # fmt: skip
    builder = maskrcnn_resnet50_fpn if backbone == "resnet50_fpn" else maskrcnn_resnet50_fpn_v2
    theirs = builder(weights=None, weights_backbone=None, num_classes=C + 1)
    wrapped = "roi_heads.box_predictor.predictor."

    def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        out = {k.replace(wrapped, "roi_heads.box_predictor."): tuple(v.shape) for k, v in sd.items()}
        return {k: v for k, v in out.items() if not k.startswith("roi_heads.term.")}  # the loss's statistics

    assert shapes(ours.model.state_dict()) == shapes(theirs.state_dict())
    types = lambda m: [type(x).__name__ for x in m.modules() if "Norm" in type(x).__name__]  # noqa: E731
    assert types(ours.model.backbone) == types(theirs.backbone)
    assert types(ours.model.roi_heads.mask_head) == types(theirs.roi_heads.mask_head)


def test_checkpoints_load_and_bad_ones_are_one_line_errors(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_detector(
        DetectorSpec(arch="mask_rcnn", num_classes=7, loss="ce", width=16, representation=64)
    )
    wrapped, plain = "roi_heads.box_predictor.predictor.", "roi_heads.box_predictor."
    state = {
        k.replace(wrapped, plain): v for k, v in source.model.state_dict().items()
    }  # torchvision's names
    path = tmp_path / "mask_rcnn.pth"
    torch.save(state, path)
    det = build_detector(DetectorSpec(arch="mask_rcnn", num_classes=C, loss="sigmoid_eql", width=16,
                                      representation=64, checkpoint=str(path)))  # fmt: skip
    own = det.model.state_dict()
    for key, value in source.model.state_dict().items():
        if value.shape == own[key].shape:
            assert torch.equal(own[key], value), key
    skipped = load_detector_checkpoint(det.model, str(path), "mask_rcnn (tiny)")
    assert (
        sorted(skipped) == sorted(k for k, v in source.model.state_dict().items() if v.shape != own[k].shape)
        and any("mask_fcn_logits" in k for k in skipped)
        and any("cls_score" in k for k in skipped)
    )
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"backbone.foo": torch.zeros(1)}, other)
    for file, fragment in [(bad, "cannot read the checkpoint"), (other, "not a state dict of mask_rcnn")]:
        with pytest.raises(DataError) as info:
            load_detector_checkpoint(det.model, str(file), "mask_rcnn (tiny)")
        assert str(file) in str(info.value) and fragment in str(info.value) and "\n" not in str(info.value)
    missing = DetectorSpec(arch="mask_rcnn", checkpoint=str(tmp_path / "missing.pth"))
    assert missing.missing_weights() == [f"checkpoint: {tmp_path / 'missing.pth'}"]
    with pytest.raises(DataError, match=r"missing\.pth: checkpoint not found"):
        build_detector(missing)


def test_a_backbone_checkpoint_gives_torchvisions_trained_build(tmp_path: Path) -> None:
    """With local weights: the ResNet-50 weights loaded, FrozenBatchNorm, 3 trainable stages (as torchvision
    builds ``maskrcnn_resnet50_fpn`` with weights)."""
    from torchvision.models import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(4)
    net = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    anchors = (32, 64, 128, 256, 512)
    det = build_detector(DetectorSpec(arch="mask_rcnn", num_classes=C, loss="ce", backbone="resnet50_fpn",
                                      anchor_sizes=anchors, backbone_checkpoint=str(path)))  # fmt: skip
    body = det.model.backbone.body
    assert torch.equal(body.conv1.weight, net.conv1.weight) and isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(DataError, match="not a ResNet-50 state dict"):
        build_detector(DetectorSpec(arch="mask_rcnn", num_classes=C, backbone="resnet50_fpn",
                                    backbone_checkpoint=str(path)))  # fmt: skip
