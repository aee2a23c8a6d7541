"""gradtail losses inside torchvision's detectors (docs/detection.md): the in-detector classification term
equals the standalone loss on the same classifier outputs and targets (value, gradient, statistics),
background and ignored samples included; inference scores; 2 gloo processes == 1 process."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads

from gradtail.errors import ConfigError
from gradtail.losses.equalization import EqualizedFocalLoss, SigmoidEQL, sigmoid_eql_scores
from gradtail.models.detection import DetectorSpec, build_detector
from gradtail.models.detection.heads import TwoStageTerm

C = 4


def scene(seed: int, n_boxes: int = 2, size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g) * 0.2
    boxes = []
    for _ in range(n_boxes):
        w, h = (torch.randint(14, 30, (2,), generator=g)).tolist()
        x, y = (
            torch.randint(0, size - w, (1,), generator=g).item(),
            torch.randint(0, size - h, (1,), generator=g).item(),
        )
        image[:, y : y + h, x : x + w] += 0.7
        boxes.append([x, y, x + w, y + h])
    labels = torch.randint(0, C, (n_boxes,), generator=g)
    return image.clamp(0, 1), {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels}


def batch(seeds: list[int]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    pairs = [scene(s) for s in seeds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def spec(arch: str, loss: str | None, **kw: Any) -> DetectorSpec:
    width = 32 if arch == "fcos" else 16  # FCOS's head has GroupNorm(32)
    return DetectorSpec(arch=arch, num_classes=C, loss=loss, width=width, representation=64, **kw)


def warm(det: Any, steps: int = 2) -> None:
    """A few steps, so the statistics (and the class weights) are not at their initial values."""
    opt = torch.optim.SGD(det.parameters(), lr=0.005)
    det.train()
    for s in range(steps):
        images, targets = batch([100 + 2 * s, 101 + 2 * s])
        total = sum(det(images, targets).values())
        opt.zero_grad()
        total.backward()
        opt.step()


# ------------------------------------------------------------------ two-stage: EQLv2 == standalone
def _capture_roi(det: Any) -> dict[str, Any]:
    """Keep the RoI class logits (retaining their gradient) and the sampled labels of the next forward."""
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


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["sigmoid_eql", "softmax_eql", "ce"])
def test_two_stage_term_equals_the_standalone_loss(loss_name: str) -> None:
    torch.manual_seed(0)
    det = build_detector(spec("faster_rcnn", loss_name))
    warm(det)
    term = det.model.roi_heads.term
    before = copy.deepcopy(term.loss)  # the standalone loss, with the same statistics
    seen = _capture_roi(det)
    images, targets = batch([7, 8])
    losses = det(images, targets)
    seen["undo"]()
    losses["loss_classifier"].backward(retain_graph=True)
    tv_logits, tv_labels = seen["logits"], seen["labels"]
    assert (tv_labels == 0).any() and (tv_labels > 0).any()  # background and object RoIs sampled
    # independent mapping: torchvision [bg, 1..C] -> gradtail [1..C, bg]; label 0 -> C, l -> l - 1
    z = tv_logits.detach()[:, [*range(1, C + 1), 0]].clone().requires_grad_()
    y = torch.tensor([C if int(v) == 0 else int(v) - 1 for v in tv_labels])
    if loss_name == "sigmoid_eql":
        assert isinstance(before, SigmoidEQL) and before.objectness and before.accumulation == "official"
        assert int(before.stats.steps) == 2 and float(before.stats.neg.sum()) > 0
    value = before(z, y)
    value.backward()
    assert losses["loss_classifier"].item() == pytest.approx(value.item(), rel=1e-6)
    torch.testing.assert_close(tv_logits.grad[:, [*range(1, C + 1), 0]], z.grad, rtol=1e-5, atol=1e-8)
    for key, buf in before.state_dict().items():
        torch.testing.assert_close(term.loss.state_dict()[key], buf, rtol=1e-6, atol=1e-9, msg=key)
    if loss_name == "ce":  # the stock term is torchvision's own cross-entropy
        assert value.item() == pytest.approx(F.cross_entropy(tv_logits.detach(), tv_labels).item(), rel=1e-6)


@pytest.mark.parametrize("loss_name", ["ce", "sigmoid_eql"])
def test_two_stage_inference_scores(loss_name: str) -> None:
    torch.manual_seed(1)
    det = build_detector(spec("faster_rcnn", loss_name, score_thresh=0.0))
    heads = det.model.roi_heads
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(30, C + 1, generator=g)
    reg = torch.randn(30, 4 * (C + 1), generator=g) * 0.1
    props = [torch.tensor([[5.0, 5.0, 30.0, 30.0]]).repeat(15, 1) + torch.rand(15, 4, generator=g) * 10] * 2
    shapes = [(64, 64), (64, 64)]
    boxes, scores, labels = heads.postprocess_detections(logits, reg, props, shapes)
    if loss_name == "ce":  # the same pipeline as torchvision's own postprocess_detections
        ref = RoIHeads.postprocess_detections(heads, logits, reg, props, shapes)
        for ours, theirs in zip((boxes, scores, labels), ref, strict=True):
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b)
    else:  # sigmoid(z_j) (1 - sigmoid(z_bg)) of the RoI the detection came from
        expected = sigmoid_eql_scores(logits[:, [*range(1, C + 1), 0]])
        for k, (s, lab) in enumerate(zip(scores, labels, strict=True)):
            rows = expected[k * 15 : (k + 1) * 15, :]
            for sc, la in zip(s.tolist(), lab.tolist(), strict=True):
                assert torch.isclose(rows[:, la - 1], torch.tensor(sc)).any()
    det.eval()
    out = det([scene(5)[0]])
    assert out[0]["labels"].min() >= 0 and out[0]["labels"].max() < C  # 0..C-1 outside the detector


# ------------------------------------------------------------------ one-stage: EFL == standalone
def _capture_one_stage(det: Any, arch: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    head = det.model.head
    target = head.classification_head if arch == "retinanet" else head

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        out.retain_grad()
        seen["logits"] = out

    handle = head.classification_head.register_forward_hook(hook)
    original = head.compute_loss

    def compute_loss(targets: Any, head_outputs: Any, anchors: Any, matched_idxs: Any) -> Any:
        seen["matched"] = [m.clone() for m in matched_idxs]
        seen["targets"] = targets
        return original(targets, head_outputs, anchors, matched_idxs)

    head.compute_loss = compute_loss  # type: ignore[method-assign]
    seen["undo"] = lambda: (handle.remove(), delattr(head, "compute_loss"))
    seen["term"] = target.term
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_one_stage_efl_equals_the_standalone_loss(arch: str) -> None:
    torch.manual_seed(2)
    det = build_detector(spec(arch, "efl"))
    warm(det)
    seen = _capture_one_stage(det, arch)
    before = copy.deepcopy(seen["term"].loss)
    assert isinstance(before, EqualizedFocalLoss) and int(before.stats.steps) == 2
    images, targets = batch([11, 12])
    losses = det(images, targets)
    seen["undo"]()
    losses["classification"].backward(retain_graph=True)
    logits = seen["logits"]
    # labels written out independently: matched box's class, background C (-1), ignored -1 (-2)
    ys = []
    for t, m in zip(seen["targets"], seen["matched"], strict=True):
        for v in m.tolist():
            ys.append(int(t["labels"][v]) if v >= 0 else (C if v == -1 else -1))
    y = torch.tensor(ys)
    assert (y == C).any() and (y < C).any() and (y >= 0).any()
    if arch == "retinanet":
        assert (y == -1).any()  # anchors between the IoU thresholds are ignored
    num_pos = max(int(((y >= 0) & (y < C)).sum()), 1)
    z = logits.detach().reshape(-1, C).clone().requires_grad_()
    value = before(z, y, normalizer=float(num_pos))
    value.backward()
    assert losses["classification"].item() == pytest.approx(value.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad.reshape(-1, C), z.grad, rtol=1e-5, atol=1e-9)
    after = seen["term"].loss
    for key, buf in before.state_dict().items():
        torch.testing.assert_close(after.state_dict()[key], buf, rtol=1e-6, atol=1e-12, msg=key)


def _efl_by_autograd(z: torch.Tensor, y: torch.Tensor, loss: EqualizedFocalLoss, norm: float) -> torch.Tensor:
    """EFL written out with autograd-differentiated torch ops (eql.md §3): the reference for the fused
    closed-form backward of ``EqualizedFocalLoss`` (statistics through t-1 taken from ``loss``)."""
    gamma, omega = (v.to(z.dtype) for v in loss.focusing())
    valid = (y != -1).view(-1, 1)
    t = F.one_hot(torch.where(valid.view(-1), y, C), C + 1)[:, :C].to(z.dtype)
    p = torch.sigmoid(z)
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = 0.25 * t + 0.75 * (1 - t)
    elem = -alpha_t * omega * (1 - p_t) ** gamma * torch.log(p_t)
    return torch.where(valid, elem, torch.zeros((), dtype=z.dtype)).sum() / norm


def test_efl_fused_backward_equals_autograd_and_supports_double_backward() -> None:
    """The speed-up of docs/detection.md §Step cost (one closed-form pass for value, gradient and
    statistics) changes no value: loss, gradient and second derivatives equal autograd through the
    formula, with background, ignored rows and non-empty statistics."""
    g = torch.Generator().manual_seed(0)
    loss = EqualizedFocalLoss(C, background_label=True, ignore_index=-1, s=4.0)
    y = torch.tensor([0, 1, C, C, -1, 3, C, 2, -1, C])
    for _ in range(2):  # statistics away from their initial values (g_hat != 1)
        z0 = (torch.randn(10, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
        loss(z0, y[torch.randperm(10, generator=g)])
    assert int(loss.stats.steps) == 2 and float(loss.effective_ratio().min()) < 0.9
    z = (torch.randn(10, C, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = _efl_by_autograd(z, y, loss, norm=2.5)  # the weights of the statistics through t-1
    loss32 = copy.deepcopy(loss)  # the same statistics for the float32 check below
    value = loss(z, y, normalizer=2.5)
    assert value.item() == pytest.approx(ref.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(value, z, create_graph=True)
    (ref_grad,) = torch.autograd.grad(ref, z, create_graph=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(grad[4], torch.zeros(C, dtype=torch.float64))  # ignored row
    v = torch.randn(10, C, generator=g, dtype=torch.float64)
    (hv,) = torch.autograd.grad((grad * v).sum(), z)
    (ref_hv,) = torch.autograd.grad((ref_grad * v).sum(), z)
    torch.testing.assert_close(hv, ref_hv, rtol=1e-8, atol=1e-12)
    z32 = z.detach().float().requires_grad_()
    loss32(z32, y, normalizer=2.5).backward()  # float32: the same gradient to float32 precision
    torch.testing.assert_close(z32.grad, ref_grad.detach().float(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_eqfl_and_stock_heads_train() -> None:
    torch.manual_seed(3)
    for arch, loss in [
        ("retinanet", "eqfl"),
        ("fcos", "eqfl"),
        ("retinanet", None),
        ("faster_rcnn", "seesaw"),
    ]:
        det = build_detector(spec(arch, loss))
        images, targets = batch([21, 22])
        losses = det(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), (arch, loss)
        sum(losses.values()).backward()
        if loss in ("eqfl",):
            assert int(det.loss_module.stats.steps) == 1 and float(det.loss_module.stats.pos.sum()) > 0


def test_bad_combinations() -> None:
    with pytest.raises(ConfigError, match="faster_rcnn takes the losses"):
        build_detector(spec("faster_rcnn", "efl"))
    with pytest.raises(ConfigError, match="retinanet takes the losses"):
        build_detector(spec("retinanet", "sigmoid_eql"))
    with pytest.raises(ConfigError, match="two-stage detectors take"):
        TwoStageTerm("focal", C)
    with pytest.raises(ConfigError, match="box_loss must be one of"):
        build_detector(spec("retinanet", "efl", box_loss="iou"))
    with pytest.raises(ConfigError, match="anchor_scales must be >= 1"):
        build_detector(spec("retinanet", "efl", anchor_scales=0))


@pytest.mark.parametrize("loss", [None, "efl"])
def test_retinanet_anchor_scales_and_box_loss(loss: str | None) -> None:
    """The one-stage recipe's knobs (docs/detection.md §One-stage recipe): anchor_scales sizes per level
    s 2^(k / scales) with 3 aspect ratios each; box_loss reaches torchvision's regression head."""
    det = build_detector(spec("retinanet", loss, anchor_sizes=(12, 24, 48), anchor_scales=3, box_loss="giou"))
    gen = det.model.anchor_generator
    assert gen.sizes == ((12, 15, 19), (24, 30, 38), (48, 60, 76))
    assert gen.num_anchors_per_location() == [9, 9, 9]
    assert det.model.head.regression_head._loss_type == "giou"
    det.train()
    losses = det(*batch([31, 32]))
    assert all(torch.isfinite(v) for v in losses.values()) and losses["bbox_regression"].item() > 0


# ------------------------------------------------------------------ 2 gloo processes == 1 process
STEPS = 3
DIST_SPECS = {
    # all proposals / anchors kept (no random subsampling), so both runs see the same samples
    "faster_rcnn": {
        "rpn_post_nms_top_n_train": 40,
        "rpn_batch_size_per_image": 10**6,
        "box_batch_size_per_image": 10**6,
    },
    "retinanet": {},
}


def _dist_train(arch: str, loss: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    det = build_detector(spec(arch, loss, **DIST_SPECS[arch]))
    model: Any = det
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(det)
    opt = torch.optim.SGD(det.parameters(), lr=0.01)
    det.train()
    for step in range(STEPS):
        seeds = [10 * step, 10 * step + 1]  # the global batch: 2 scenes with 2 boxes each
        images, targets = batch(seeds if world == 1 else seeds[rank : rank + 1])
        total = sum(model(images, targets).values())
        opt.zero_grad()
        total.backward()
        opt.step()
    return {k: v.clone() for k, v in det.loss_module.state_dict().items()}


def _worker(rank: int, world: int, init: str, out: str, arch: str, loss: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.save(_dist_train(arch, loss, rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("arch", "loss"), [("faster_rcnn", "sigmoid_eql"), ("retinanet", "efl")])
def test_two_processes_equal_one_process(tmp_path: Path, arch: str, loss: str) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), arch, loss), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.set_num_threads(1)
    single = _dist_train(arch, loss, 0, 1)
    assert int(single["stats.steps"]) == STEPS
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-7, msg=key)
