"""Long-tailed semantic segmentation (issue 16): per-pixel losses, metrics against NumPy, the ADE20K and
folder readers on generated trees, the joint transform, training through the trainer, and 2 processes
equal 1 process."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from gradtail.config import config_from_dict
from gradtail.data.segmentation import SegAugment, SegmentationOptions, build_file_segmentation, make_canvases
from gradtail.errors import ConfigError, DataError, InputError
from gradtail.losses import create_loss
from gradtail.losses.dense import PixelLoss
from gradtail.metrics.segmentation import ConfusionState, pixel_frequency_groups, segmentation_metrics
from gradtail.tasks.segmentation import slide_inference

# --------------------------------------------------------------------------- losses


def _dense_batch(seed: int = 0, n: int = 2, c: int = 5, h: int = 6, w: int = 7, ignore: int = 255):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.3] = ignore
    return logits, labels


def _flat_valid(logits: torch.Tensor, labels: torch.Tensor, ignore: int = 255):
    c = logits.shape[1]
    z = logits.permute(0, 2, 3, 1).reshape(-1, c)
    y = labels.reshape(-1)
    keep = y != ignore
    return z[keep], y[keep]


@pytest.mark.parametrize("wrapped", [False, True])
def test_pixel_softmax_eql_equals_classification_on_flattened_pixels(wrapped):
    """Value, gradient and statistics over three steps: per-pixel Softmax-EQL (native 4-D with
    ignore_index, or through PixelLoss) = the classification loss on the non-ignored pixels."""
    c = 5
    dense = (
        PixelLoss(create_loss("softmax_eql", c), 255)
        if wrapped
        else create_loss("softmax_eql", c, ignore_index=255)
    )
    flat = create_loss("softmax_eql", c)
    for step in range(3):
        logits, labels = _dense_batch(step, c=c)
        a = logits.clone().requires_grad_(True)
        va = dense(a, labels)
        va.backward()
        z, y = _flat_valid(logits, labels)
        b = z.clone().requires_grad_(True)
        vb = flat(b, y)
        vb.backward()
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)
        grad_a, _ = _flat_valid(a.grad, labels)
        torch.testing.assert_close(grad_a, b.grad, rtol=1e-12, atol=1e-12)
        assert (a.grad.permute(0, 2, 3, 1)[labels == 255] == 0).all()  # ignored pixels: no gradient
    stats_a = dense.inner.stats if wrapped else dense.stats
    for name in ("pos", "neg", "steps"):
        torch.testing.assert_close(getattr(stats_a, name), getattr(flat.stats, name), rtol=1e-12, atol=0)
    assert int(flat.stats.steps) == 3 and float(flat.stats.pos.min()) > 0


def test_softmax_eql_statistics_from_a_numpy_loop():
    """Statistics after one step equal |softmax(z) - onehot(y)| / #valid summed per class (NumPy)."""
    logits, labels = _dense_batch(3, c=4)
    loss = PixelLoss(create_loss("softmax_eql", 4), 255)
    loss(logits, labels)
    z, y = (t.numpy() for t in _flat_valid(logits, labels))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(4)[y]
    g = np.abs(p - onehot) / len(y)
    np.testing.assert_allclose(loss.inner.stats.pos.numpy(), (g * onehot).sum(0), rtol=1e-10)
    np.testing.assert_allclose(loss.inner.stats.neg.numpy(), (g * (1 - onehot)).sum(0), rtol=1e-10)


@pytest.mark.parametrize("name", ["ce", "focal", "seesaw", "balanced_softmax", "logit_adjust", "softmax_eql"])
def test_every_pixel_loss_is_its_classification_loss_on_valid_pixels(name):
    c = 4
    counts = [5000, 800, 90, 10]  # pixel-frequency priors
    dense = PixelLoss(create_loss(name, c, class_counts=counts), 255)
    flat = create_loss(name, c, class_counts=counts)
    logits, labels = _dense_batch(1, c=c)
    a = logits.clone().requires_grad_(True)
    dense(a, labels).backward()
    z, y = _flat_valid(logits, labels)
    b = z.clone().requires_grad_(True)
    flat(b, y).backward()
    torch.testing.assert_close(_flat_valid(a.grad, labels)[0], b.grad)


def test_pixel_loss_errors_and_all_ignored_batch():
    loss = PixelLoss(create_loss("softmax_eql", 3), 255)
    with pytest.raises(InputError, match="dense logits must be"):
        loss(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(InputError, match="label maps must have shape"):
        loss(torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\)"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 7], [1, 2]]]))
    z = torch.zeros(1, 3, 2, 2, requires_grad=True)
    value = loss(z, torch.full((1, 2, 2), 255))
    value.backward()
    assert value.item() == 0.0 and int(loss.inner.stats.steps) == 0 and (z.grad == 0).all()


# --------------------------------------------------------------------------- metrics


def _numpy_metrics(pred: np.ndarray, gt: np.ndarray, c: int, ignore: int):
    keep = gt != ignore
    cm = np.zeros((c, c), np.int64)
    for t, p in zip(gt[keep].ravel(), pred[keep].ravel(), strict=True):
        cm[t, p] += 1
    iou = []
    for k in range(c):
        inter = cm[k, k]
        union = cm[k, :].sum() + cm[:, k].sum() - inter
        iou.append(inter / union if union else None)
    acc = [cm[k, k] / cm[k].sum() if cm[k].sum() else None for k in range(c)]
    return cm, iou, acc


def test_metrics_equal_an_independent_numpy_confusion_matrix():
    rng = np.random.default_rng(0)
    c, ignore = 6, 255
    gt = rng.choice(c, size=(5, 9, 11), p=[0.5, 0.25, 0.12, 0.08, 0.05, 0.0])
    gt[rng.random(gt.shape) < 0.1] = ignore
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, c - 1, gt.shape)) % c
    pred[gt == ignore] = rng.integers(0, c, (gt == ignore).sum())
    state = ConfusionState(c, ignore)
    for i in range(0, 5, 2):  # batches
        state.update(torch.from_numpy(pred[i : i + 2]), torch.from_numpy(gt[i : i + 2]))
    cm, iou, acc = _numpy_metrics(pred, gt, c, ignore)
    np.testing.assert_array_equal(state.matrix.numpy(), cm)
    train_pixels = [9000, 500, 300, 40, 10, 5]
    r = segmentation_metrics(state.matrix, train_pixels, frequent_threshold=0.05, rare_threshold=0.003)
    for k in range(c):
        assert (r.per_class_iou[k] is None) == (iou[k] is None)
        if iou[k] is not None:
            assert r.per_class_iou[k] == pytest.approx(iou[k], rel=1e-12)
    valid_iou = [v for v in iou if v is not None]
    assert r.miou == pytest.approx(np.mean(valid_iou), rel=1e-12)
    assert r.macc == pytest.approx(np.mean([a for a in acc if a is not None]), rel=1e-12)
    assert r.aacc == pytest.approx(np.trace(cm) / cm.sum(), rel=1e-12)
    share = np.array(train_pixels) / sum(train_pixels)
    for group, members in {
        "frequent": np.flatnonzero(share >= 0.05),
        "rare": np.flatnonzero(share < 0.003),
        "common": np.flatnonzero((share < 0.05) & (share >= 0.003)),
    }.items():
        assert r.groups[group] == members.tolist()
        kept = [iou[k] for k in members if iou[k] is not None]
        want = np.mean(kept) if kept else None
        assert r.group_miou[group] == (pytest.approx(want, rel=1e-12) if want is not None else None)
    assert r.summary()["miou_rare"] == r.group_miou["rare"]


def test_frequency_group_thresholds_are_checked():
    with pytest.raises(ConfigError, match="rare_threshold <= frequent_threshold"):
        pixel_frequency_groups([1, 2], frequent_threshold=0.01, rare_threshold=0.1)


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    """A 1x1-convolution model gives the same logits whole or by overlapping windows."""

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return self.conv(x)

    net = Pointwise()
    x = torch.randn(2, 2, 23, 17)
    torch.testing.assert_close(slide_inference(net, x, 3, (10, 8), (6, 5)), net(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- data


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _ade_tree(root, sizes=((12, 16), (12, 16), (12, 16)), val_sizes=((12, 16),)):
    rng = np.random.default_rng(0)
    for split, sz in (("training", sizes), ("validation", val_sizes)):
        for i, (h, w) in enumerate(sz):
            name = f"ADE_{split[:5]}_{i:08d}"
            _png(root / "images" / split / f"{name}.jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            ann = rng.integers(0, 151, (h, w)).astype(np.uint8)
            ann[0, 0], ann[0, 1], ann[0, 2] = 0, 1, 150
            _png(root / "annotations" / split / f"{name}.png", ann)
    return root


def _data_cfg(root, dataset="ade20k", **extra):
    return config_from_dict(
        {"task": "segmentation", "data": {"dataset": dataset, "data_dir": str(root), **extra}}
    ).data


def _options(**settings):
    return SegmentationOptions(**settings)


def test_ade20k_reader_on_a_generated_tree(tmp_path):
    root = _ade_tree(tmp_path / "ADEChallengeData2016")
    data = build_file_segmentation(_data_cfg(root), "ade20k")
    assert data.num_classes == 150 and data.source["in_memory"]
    assert len(data.train) == 3 and len(data.test) == 1 and data.val is None
    raw = np.asarray(Image.open(sorted((root / "annotations" / "training").iterdir())[0])).astype(int)
    got = data.train.masks[0].numpy().astype(int)
    np.testing.assert_array_equal(got, np.where(raw == 0, 255, raw - 1))  # 0 -> ignore, 1..150 -> 0..149
    assert got[0, 0] == 255 and got[0, 1] == 0 and got[0, 2] == 149
    total = np.zeros(150, np.int64)
    for m in data.train.masks.numpy():
        total += np.bincount(m[m != 255].ravel(), minlength=150)
    assert data.class_counts == total.tolist()
    assert len(data.sha256) == 64
    held = build_file_segmentation(_data_cfg(root), "ade20k", _options(val_images=1))
    assert len(held.train) == 2 and len(held.val) == 1


def test_ade20k_images_of_several_sizes_stay_files(tmp_path):
    root = _ade_tree(tmp_path / "ade", sizes=((12, 16), (10, 14)), val_sizes=((9, 13),))
    cfg = _data_cfg(root, num_workers=0)
    data = build_file_segmentation(cfg, "ade20k", _options(crop=[8, 8]))
    assert not data.source["in_memory"]
    run = config_from_dict(
        {
            "task": "segmentation",
            "data": {"dataset": "ade20k", "data_dir": str(root)},
            "optim": {"batch_size": 2},
        }
    )
    loader = data.train_loader(run, torch.device("cpu"), 0, 1)
    loader.dataset.reader["ignore_index"] = 255
    x, y = next(iter(loader))
    assert tuple(x.shape) == (2, 3, 8, 8) and tuple(y.shape) == (2, 8, 8)
    ((xt, yt),) = list(data.eval_loader("test", run, torch.device("cpu")))
    assert tuple(xt.shape) == (1, 3, 9, 13) and tuple(yt.shape) == (1, 9, 13)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("mask_size", "is 15x12 but its image is 16x12"),
        ("label", "has label value 201, outside the class list"),
        ("missing_mask", "has no mask"),
        ("corrupt_image", "cannot be"),
        ("rgb_mask", "must be a single-channel label image"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, damage, message):
    root = _ade_tree(tmp_path / "ade")
    train = sorted((root / "annotations" / "training").iterdir())
    if damage == "mask_size":
        _png(train[1], np.ones((12, 15), np.uint8))
    elif damage == "label":
        bad = np.ones((12, 16), np.uint8)
        bad[3, 3] = 201
        _png(train[1], bad)
    elif damage == "missing_mask":
        train[1].unlink()
    elif damage == "corrupt_image":
        img = sorted((root / "images" / "training").iterdir())[1]
        img.write_bytes(b"not an image")
    elif damage == "rgb_mask":
        _png(train[1], np.ones((12, 16, 3), np.uint8))
    with pytest.raises(DataError, match=message) as info:
        build_file_segmentation(_data_cfg(root), "ade20k")
    assert "\n" not in str(info.value)


def test_folder_reader_with_a_class_list(tmp_path):
    root = tmp_path / "folders"
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            _png(root / "images" / split / f"im{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
            mask = rng.integers(0, 3, (8, 8)).astype(np.uint8)
            mask[0, 0] = 255
            _png(root / "masks" / split / f"im{i}.png", mask)
    (root / "classes.txt").write_text("road\ncar\nperson\n")
    cfg = _data_cfg(root, dataset="seg_folders", class_list="classes.txt")
    data = build_file_segmentation(cfg, "seg_folders")
    assert data.class_names == ["road", "car", "person"] and len(data.test) == 2  # val serves as test
    assert int(data.train.masks[0, 0, 0]) == 255
    with pytest.raises(ConfigError, match=r"needs data\.class_list"):
        build_file_segmentation(_data_cfg(root, dataset="seg_folders"), "seg_folders")
    (root / "classes.txt").write_text("road\ncar\n")
    with pytest.raises(DataError, match="outside the class list"):
        build_file_segmentation(cfg, "seg_folders")


def test_canvases_label_glyph_pixels_with_their_class():
    imgs = np.zeros((4, 28, 28), np.uint8)
    imgs[:, 5:15, 5:15] = 200
    imgs[:, 15:20, 5:15] = 30  # below the threshold: background
    labels = np.array([0, 1, 2, 3])
    probs = np.array([0.0, 0.0, 1.0] + [0.0] * 7)
    x, y = make_canvases(imgs, labels, 3, probs, np.random.default_rng(0), size=40, objects=(1, 1))
    for i in range(3):
        assert set(np.unique(y[i]).tolist()) == {0, 3}  # class 2 -> label 3 (0 is background)
        assert (y[i] == 3).sum() == 100 and (x[i, 0][y[i] == 3] == 200).all()
    x2, y2 = make_canvases(imgs, labels, 3, probs, np.random.default_rng(0), size=40, objects=(1, 1))
    assert (x == x2).all() and (y == y2).all()  # deterministic from the seed


def test_joint_transform_keeps_masks_aligned_and_nearest():
    img = torch.arange(2 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 1, 16, 16)
    mask = (img[:, 0] % 5).to(torch.uint8)  # the mask is a function of the pixel value
    aug = SegAugment([0.0], [1.0 / 255], crop=(10, 12), scale_range=(0.7, 1.6), hflip=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = aug(img, mask, gen)
        assert tuple(x.shape) == (2, 1, 10, 12) and tuple(y.shape) == (2, 10, 12) and y.dtype == torch.long
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, 4, 255}  # nearest: no interpolated labels
    plain = SegAugment([0.0], [1.0 / 255], crop=(10, 12), hflip=True)
    x, y = plain(img, mask, torch.Generator().manual_seed(1))
    torch.testing.assert_close((x.round().long() % 5)[:, 0], y)  # crop and flip moved both alike


# --------------------------------------------------------------------------- training

TINY = {
    "name": "seg_tiny",
    "task": "segmentation",
    "data": {"dataset": "fashion_mnist_seg", "imbalance_factor": 10, "augment": {"hflip": False}},
    "segmentation": {"canvas_size": 32, "train_canvases": 32, "val_canvases": 8, "test_canvases": 8,
                     "objects": [1, 2], "val_images_per_class": 5, "frequent_threshold": 0.05,
                     "rare_threshold": 0.01},
    "model": {"name": "seg_small", "params": {"width": 4, "norm": "none"}},
    "optim": {"lr": 0.05, "batch_size": 8, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine",
              "drop_last": True, "weight_decay": 0.0},
    "train": {"progress": False, "seed": 3, "amp": "none", "diagnostics": False},
    "eval": {"batch_size": 8},
}  # fmt: skip


def _cfg(loss="softmax_eql", batch_size=8, **data):
    cfg = copy.deepcopy(TINY)
    cfg["loss"] = {"name": loss}
    cfg["optim"]["batch_size"] = batch_size
    cfg["segmentation"].update(data)
    return config_from_dict(cfg)


@pytest.mark.slow
def test_segmentation_run_writes_miou_and_groups(tmp_path):
    from gradtail.engine.trainer import Trainer

    trainer = Trainer(_cfg(), output_dir=tmp_path / "run", verbose=False)
    final = trainer.fit()
    last = final["last_epoch"]
    assert 0 <= last["miou"] <= 1 and len(last["per_class_iou"]) == 11
    assert (
        set(last["groups"]) == {"frequent", "common", "rare"} and final["groups"]["rule"] == "pixel_frequency"
    )
    assert final["val_selected"]["val_miou"] >= 0
    assert int(trainer.loss_fn.inner.stats.steps) == 2 * 4  # one accumulated step per training step
    subset = json.loads((tmp_path / "run" / "subset.json").read_text())
    assert subset["task"] == "segmentation" and len(subset["sha256"]) == 64
    assert (tmp_path / "run" / "predictions.png").is_file()  # test images, truth, prediction
    slide = Trainer(_cfg(inference="slide", window=[20, 20], stride=[12, 12]), output_dir=tmp_path / "s",
                    verbose=False)  # fmt: skip
    slide.model.load_state_dict(trainer.model.state_dict())
    assert 0 <= slide.evaluate_split("test").miou <= 1


def test_segmentation_refuses_classification_only_settings(tmp_path):
    from gradtail.engine.trainer import Trainer

    cfg = _cfg()
    cfg.eval.posthoc = ["tau_norm"]
    with pytest.raises(
        ConfigError, match="task 'segmentation' does not take the post-hoc adjuster 'tau_norm'"
    ):
        Trainer(cfg, output_dir=tmp_path / "b", verbose=False)
    cfg = _cfg()
    cfg.update_rule.name = "gbg"
    with pytest.raises(ConfigError, match="does not take the update rule 'gbg'; it takes: plain"):
        Trainer(cfg, output_dir=tmp_path / "c", verbose=False)


def test_diagnostics_observe_every_pixel(tmp_path):
    """The gradient-ratio observer in a segmentation run: per-pixel P and N of the per-pixel loss, the
    ignored pixels left out (the same numbers the loss's own statistics accumulate)."""
    from gradtail.engine.trainer import Trainer

    cfg = _cfg("softmax_eql")
    cfg.train.diagnostics = True
    cfg.optim.epochs = 1
    trainer = Trainer(cfg, output_dir=tmp_path / "diag", verbose=False)
    trainer.fit()
    snap = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["history"][-1]
    stats = trainer.loss_fn.inner.stats
    assert snap["steps"] == int(stats.steps) == 4
    assert len(snap["P"]) == 11
    torch.testing.assert_close(
        torch.tensor(snap["P"], dtype=torch.float64), stats.pos.cpu(), rtol=1e-4, atol=1e-8
    )


def _ddp_worker(rank: int, tmp: str, loss: str) -> None:
    from gradtail.engine.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        trainer = Trainer(_cfg(loss, 4), output_dir=f"{tmp}/two", verbose=False)
        trainer.fit()
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        stats = {k: v.clone() for k, v in trainer.loss_fn.state_dict().items()}
        final = json.loads((trainer.out / "final.json").read_text()) if rank == 0 else None
        torch.save({"params": state, "loss": stats, "final": final}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["softmax_eql"])
def test_two_processes_equal_one_process_for_segmentation(tmp_path, loss):
    """Canvases without ignored pixels: every rank has the same number of pixels, so per-rank means
    averaged by DDP equal the global mean; statistics and the test confusion matrix are summed."""
    from gradtail.engine.trainer import Trainer

    mp.spawn(_ddp_worker, args=(str(tmp_path), loss), nprocs=2, join=True)
    one = Trainer(_cfg(loss, 8), output_dir=tmp_path / "one", verbose=False)
    final = one.fit()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(got[0]["params"][k], got[1]["params"][k], rtol=0, atol=0)
        torch.testing.assert_close(got[0]["params"][k], v, rtol=1e-4, atol=1e-5)
    for k, v in one.loss_fn.state_dict().items():
        torch.testing.assert_close(got[0]["loss"][k], got[1]["loss"][k], rtol=0, atol=0)
        torch.testing.assert_close(got[0]["loss"][k], v, rtol=1e-5, atol=1e-9)
    assert int(one.loss_fn.inner.stats.steps) == 8
    two = got[0]["final"]["last_epoch"]
    assert two["num_pixels"] == final["last_epoch"]["num_pixels"]  # every test pixel counted once
    assert two["confusion"] == final["last_epoch"]["confusion"]


@pytest.mark.slow
def test_bench_and_report_of_a_segmentation_suite(tmp_path):
    """gradtail bench's path: a two-method, two-seed suite runs, aggregates and renders its report."""
    import yaml

    from gradtail.bench import load_suite, run_suite
    from gradtail.report.segmentation import build_results, write_report

    base = copy.deepcopy(TINY)
    base["optim"]["epochs"] = 1
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "suite.yaml").write_text(
        "name: seg_tiny\nbase: base.yaml\nseeds: [0, 1]\n"
        "methods:\n  ce: {loss: {name: ce}}\n  softmax_eql: {loss: {name: softmax_eql}}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml")
    out = tmp_path / "bench"
    finals = run_suite(suite, out, progress=False, log=lambda line: None)
    results = build_results(suite, finals, out, 1.0)
    assert [r["label"] for r in results["table"]][:2] == ["ce", "softmax_eql"]
    assert results["table"][0]["miou"]["std"] is not None  # two seeds
    paths = write_report(results, out)
    page = paths["html"].read_text()
    assert "mIoU rare" in page and "IoU per class against training pixel frequency" in page
    assert "ground truth and prediction" in page and page.count("data:image/png;base64") == 3


def _folder_tree(root, n_train=4, size=(32, 32), classes=("road", "car", "person")):
    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("test", 2)):
        for i in range(n):
            _png(root / "images" / split / f"im{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            _png(root / "masks" / split / f"im{i}.png", rng.integers(0, len(classes), size).astype(np.uint8))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.mark.slow
def test_a_torchvision_model_trains_with_amp_and_channels_last(tmp_path):
    """LR-ASPP MobileNetV3 (weights=None) on a seg_folders tree through the trainer, bf16 autocast where
    native, channels-last, per-pixel balanced softmax (pixel-frequency priors)."""
    from gradtail.engine.trainer import Trainer

    root = _folder_tree(tmp_path / "data")
    cfg = config_from_dict({
        "name": "tv", "task": "segmentation",
        "data": {"dataset": "seg_folders", "data_dir": str(root), "class_list": "classes.txt"},
        "model": {"name": "lraspp_mobilenet_v3_large"}, "loss": {"name": "balanced_softmax"},
        "optim": {"epochs": 1, "batch_size": 2, "warmup_epochs": 0, "lr": 0.01},
        "train": {"progress": False, "amp": "auto", "channels_last": True, "diagnostics": False},
        "eval": {"batch_size": 2},
    })  # fmt: skip
    trainer = Trainer(cfg, output_dir=tmp_path / "run", verbose=False)
    final = trainer.fit()
    assert len(final["last_epoch"]["per_class_iou"]) == 3


def test_torchvision_checkpoint_loads_and_bad_checkpoints_are_one_line(tmp_path):
    from torchvision.models import segmentation as tvseg

    from gradtail.models import create_model

    torch.manual_seed(0)
    ref = tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    torch.save(ref.state_dict(), tmp_path / "lraspp.pth")
    net = create_model("lraspp_mobilenet_v3_large", 5, checkpoint=str(tmp_path / "lraspp.pth")).eval()
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(net(x), ref.eval()(x)["out"])
    with pytest.raises(ConfigError, match=r"missing\.pth: no such file"):
        create_model("lraspp_mobilenet_v3_large", 5, checkpoint=str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"bad\.pth cannot be read as a state dict"):
        create_model("lraspp_mobilenet_v3_large", 5, checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(ConfigError, match="RGB"):
        create_model("fcn_resnet50", 5, in_channels=1)


def test_segmentation_settings_are_the_tasks_typed_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'segmentation' for task 'classification'"):
        config_from_dict({"data": {"dataset": "synthetic"}, "segmentation": {"crop": 8}})
    typo = r"unknown config key 'segmentation.crpo' \(did you mean 'crop'\?\); valid keys in segmentation"
    with pytest.raises(ConfigError, match=typo):
        config_from_dict({"task": "segmentation", "segmentation": {"crpo": 8}})
    with pytest.raises(ConfigError, match=r"config key 'segmentation.canvas_size': expected an integer"):
        config_from_dict({"task": "segmentation", "segmentation": {"canvas_size": "big"}})
    with pytest.raises(ConfigError, match=r"'data.pad_to' is not read by task 'segmentation'"):
        config_from_dict({"task": "segmentation", "data": {"pad_to": 32}})
