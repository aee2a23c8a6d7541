"""BCL (gbg.md §3): the balanced contrastive loss against a plain-loop NumPy reference (value and
gradient), the regularizer's heads and weights, the SimCLR-style views, and the trainer plumbing."""

from __future__ import annotations

import colorsys
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtail.config import config_from_dict
from gradtail.data.contrastive_views import SimCLRViews, hsv_to_rgb, luma, rgb_to_hsv
from gradtail.data.loader import BatchAugment, BatchLoader
from gradtail.engine.trainer import Trainer
from gradtail.errors import ConfigError, InputError
from gradtail.models import create_model
from gradtail.optim.gbg import GBGRule
from gradtail.regularizers import create_regularizer
from gradtail.regularizers.bcl import BalancedContrastiveLoss, BCLRegularizer


# ------------------------------------------------------------------ the loss, by plain loops
def reference_bcl(views: np.ndarray, centres: np.ndarray, targets: np.ndarray, temp: float) -> float:
    """The formula of gbg.md §3 / BCL's BalSCL, one anchor and one candidate at a time (float64)."""
    b, v, _ = views.shape
    c = centres.shape[0]
    anchors = [views[i, k] for k in range(v) for i in range(b)]  # view-major
    anchor_labels = [int(targets[i]) for k in range(v) for i in range(b)]
    cands = anchors + [centres[j] for j in range(c)]
    cand_labels = anchor_labels + list(range(c))
    count = {cls: cand_labels.count(cls) for cls in range(c)}
    total = 0.0
    for i, a in enumerate(anchors):
        denom = 0.0
        for j, q in enumerate(cands):
            if j == i:
                continue
            weight = count[cand_labels[j]] - (1 if cand_labels[j] == anchor_labels[i] else 0)
            denom += np.exp(float(a @ q) / temp) / weight
        pos = [j for j in range(len(cands)) if j != i and cand_labels[j] == anchor_labels[i]]
        total += -sum(float(a @ cands[j]) / temp - np.log(denom) for j in pos) / len(pos)
    return total / len(anchors)


def normalised(shape: tuple[int, ...], seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_balanced_contrastive_loss_value_matches_loops(num_views: int) -> None:
    views = normalised((5, num_views, 4), seed=num_views)
    centres = normalised((3, 4), seed=10)
    targets = np.array([0, 2, 0, 0, 1])
    got = BalancedContrastiveLoss(0.1)(
        torch.tensor(views), torch.tensor(centres), torch.tensor(targets)
    )  # fmt: skip
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(reference_bcl(views, centres, targets, 0.1), rel=1e-10)


def test_balanced_contrastive_loss_gradient_matches_finite_differences() -> None:
    views = normalised((4, 2, 3), seed=1) * 0.9  # any vectors: the loss is defined on raw inner products
    centres = normalised((3, 3), seed=2)
    targets = np.array([1, 1, 0, 2])
    v_t = torch.tensor(views, requires_grad=True)
    c_t = torch.tensor(centres, requires_grad=True)
    BalancedContrastiveLoss(0.5)(v_t, c_t, torch.tensor(targets)).backward()
    eps = 1e-6
    for tensor, array, grad in ((v_t, views, v_t.grad), (c_t, centres, c_t.grad)):
        numeric = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = (plus, centres) if tensor is v_t else (views, plus)
            args_m = (minus, centres) if tensor is v_t else (views, minus)
            numeric[idx] = (reference_bcl(*args, targets, 0.5) - reference_bcl(*args_m, targets, 0.5)) / (
                2 * eps
            )
        assert np.allclose(grad.numpy(), numeric, atol=1e-6)


def test_balanced_contrastive_loss_known_cases_and_errors() -> None:
    loss = BalancedContrastiveLoss(0.1)
    # Every view of class c sits on its centre, classes orthogonal: positives score 1/T, negatives 0.
    centres = torch.eye(3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0])
    views = centres[targets][:, None, :].expand(4, 2, 3).clone()
    value = float(loss(views, centres, targets))
    assert value == pytest.approx(reference_bcl(views.numpy(), centres.numpy(), targets.numpy(), 0.1))
    # Perfectly separated classes: the loss is small but positive (it is a log of averaged terms).
    assert 0 < value < float(loss(views, centres.flip(0), targets))
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\); found \[3\]"):
        loss(views, centres, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(InputError, match="views must be"):
        loss(views[:, 0], centres, targets)
    with pytest.raises(ConfigError):
        BalancedContrastiveLoss(0.0)


# ------------------------------------------------------------------ the regularizer
def test_regularizer_heads_and_total_weights() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, in_channels=1, head="cosine", head_scale=30.0, width=8)
    reg = create_regularizer("bcl", ce_weight=2.0, scl_weight=1.6)
    assert isinstance(reg, BCLRegularizer) and reg.num_views == 2
    reg.setup(model, 4)
    shapes = [tuple(p.shape) for p in reg.head.parameters()]  # type: ignore[union-attr]
    assert shapes == [(512, model.feature_dim), (512,), (512,), (512,), (128, 512), (128,)]
    x, views = torch.randn(6, 1, 16, 16), torch.randn(12, 1, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    h = model.features(x)
    hv = model.features(views)
    loss = F.cross_entropy(model.classifier(h), y)
    term = reg(h, model.classifier(h), y, loss, model, view_features=hv)
    emb = reg.embed_views(hv, 6)
    assert emb.shape == (6, 2, 128) and torch.allclose(emb.norm(dim=2), torch.ones(6, 2), atol=1e-5)
    reg.eval()  # BatchNorm on running statistics: a view's rows can be embedded alone
    assert torch.allclose(reg.embed_views(hv, 6)[:, 1], F.normalize(reg.head(hv[6:]), dim=1), atol=1e-6)
    reg.train()  # view-major: rows 6..11 are the second view
    centres = reg.centres(model)
    scl = BalancedContrastiveLoss(0.1)(emb, centres, y)
    assert torch.allclose(loss + term, 2.0 * loss + 1.6 * scl, atol=1e-6)
    (loss + term).backward()
    assert model.classifier.weight.grad is not None  # the centres reach the classifier
    assert all(p.grad is not None for p in reg.parameters())
    with pytest.raises(InputError, match=r"data\.augment\.views: 2"):
        reg(h, model.classifier(h), y, loss, model, view_features=hv[:6])
    with pytest.raises(ConfigError):
        BCLRegularizer().setup(torch.nn.Linear(2, 2), 2)


# ------------------------------------------------------------------ the views
def test_colour_space_round_trip_matches_colorsys() -> None:
    rgb = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hsv = rgb_to_hsv(rgb)
    for n, i, j in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
        expected = colorsys.rgb_to_hsv(*rgb[n, :, i, j].tolist())
        assert np.allclose(hsv[n, :, i, j].numpy(), expected, atol=1e-9)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-9)
    gray = torch.full((1, 3, 2, 2), 0.5, dtype=torch.float64)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(gray)), gray)
    assert torch.allclose(luma(rgb), 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:])


def images(n: int = 8, c: int = 3, size: int = 12) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def test_views_identity_and_flip_settings_are_exact() -> None:
    x = images()
    identity = SimCLRViews(scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0), grayscale_p=0, hflip=False)
    assert torch.equal(identity(x, torch.Generator().manual_seed(0)), x)
    flip = SimCLRViews(scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0), grayscale_p=0, hflip=True)
    out = flip(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, xi.flip(2))) for o, xi in zip(out, x, strict=True)]
    same = [bool(torch.equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)
    gray = SimCLRViews(scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0), grayscale_p=1.0, hflip=False)(x)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_views_are_random_reproducible_and_keep_shape() -> None:
    x = images(16)
    views = SimCLRViews()
    a = views(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, views(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, views(x, torch.Generator().manual_seed(4)))
    boxes = views.crop_boxes(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    area = boxes[:, 2] * boxes[:, 3]
    assert torch.all(boxes[:, 2:] <= 1) and area.min() >= 0.2 - 1e-6
    assert torch.all(boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6) and torch.all(
        boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6
    )
    wide = views.crop_boxes(1000, torch.device("cpu"), torch.Generator().manual_seed(0), aspect=2.0)
    pixel_ratio = wide[:, 2] * 2.0 / wide[:, 3]  # width / height in pixels of a 2:1 image
    kept = (wide[:, 2] < 1) & (wide[:, 3] < 1)
    assert pixel_ratio[kept].min() >= 3 / 4 - 1e-5 and pixel_ratio[kept].max() <= 4 / 3 + 1e-5
    gray_views = views(images(16, c=1))  # 1 channel: brightness and contrast only
    assert gray_views.shape == (16, 1, 12, 12)
    with pytest.raises(ConfigError):
        SimCLRViews(scale=(0.5, 0.2))
    with pytest.raises(ConfigError):
        views(x.float())


def test_loader_yields_normalised_views_view_major() -> None:
    x = images(10, c=1)
    labels = torch.arange(10) % 3
    aug = BatchAugment(mean=[0.5], std=[0.25])
    identity = SimCLRViews(scale=(1, 1), ratio=(1, 1), jitter=(0, 0, 0, 0), grayscale_p=0, hflip=False)
    loader = BatchLoader(x, labels, 4, aug, views=identity, num_views=2)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 3]
    xb, _, vb = batches[0]
    assert vb.shape == (8, 1, 12, 12)
    assert torch.equal(vb[:4], xb) and torch.equal(vb[4:], xb)  # identity views = the normalised batch
    eval_loader = BatchLoader(x, labels, 4, aug, train=False, views=identity, num_views=2)
    assert all(len(b) == 2 for b in eval_loader)
    with pytest.raises(ConfigError):
        BatchLoader(x, labels, 4, aug, num_views=2)


# ------------------------------------------------------------------ the trainer
def bcl_config(tmp_path, **over: dict) -> dict:
    cfg = {
        "name": "bcl_tiny",
        "data": {
            "dataset": "synthetic", "imbalance_factor": 4, "val_per_class": 0,
            "synthetic": {"num_classes": 4, "per_class": 24, "test_per_class": 6, "image_size": 12},
            "augment": {"crop_padding": 1, "hflip": True, "views": 2},
        },
        "model": {"name": "small_cnn", "head": "cosine", "head_scale": 30.0, "params": {"width": 8}},
        "loss": {"name": "logit_adjust"},
        "regularizer": {"name": "bcl", "params": {"hidden_dim": 16, "out_dim": 8}},
        "optim": {"lr": 0.05, "batch_size": 16, "epochs": 2, "warmup_epochs": 0},
        "train": {"seed": 0, "progress": False, "output_dir": str(tmp_path / "{name}"), "amp": "none"},
    }  # fmt: skip
    cfg.update(over)
    return cfg


def test_trainer_trains_heads_and_resumes_bit_identically(tmp_path) -> None:
    cfg = config_from_dict(bcl_config(tmp_path))
    t = Trainer(cfg, output_dir=tmp_path / "full", verbose=False)
    heads = [p for p in t.regularizer.parameters()]  # type: ignore[union-attr]
    assert {id(p) for p in heads} <= {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    before = [p.detach().clone() for p in heads]
    t.fit()
    assert all(not torch.equal(a, p) for a, p in zip(before, heads, strict=True) if a.dim() == 2)
    full_state = copy.deepcopy(t.regularizer.state_dict())  # type: ignore[union-attr]

    part = Trainer(cfg, output_dir=tmp_path / "split", verbose=False)
    part.fit(stop_after=1)
    resumed = Trainer(cfg, output_dir=tmp_path / "split", verbose=False)
    resumed.fit(resume=True)
    for k, v in full_state.items():
        assert torch.equal(v, resumed.regularizer.state_dict()[k]), k  # type: ignore[union-attr]
    for a, b in zip(t.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_views_and_regularizer_must_agree(tmp_path) -> None:
    no_views = bcl_config(tmp_path)
    no_views["data"]["augment"]["views"] = 0
    with pytest.raises(ConfigError, match=r"data\.augment\.views: 2"):
        Trainer(config_from_dict(no_views), verbose=False)
    from gradtail.data.builder import build_data

    shared = build_data(config_from_dict(no_views).data)  # a bundle built for a run without views
    with pytest.raises(ConfigError, match=r"data\.augment\.views is 0 but regularizer 'bcl'"):
        Trainer(config_from_dict(bcl_config(tmp_path)), data=shared, verbose=False)
    views_only = bcl_config(tmp_path, regularizer={})
    with pytest.raises(ConfigError, match=r"data\.augment\.views: 0"):
        Trainer(config_from_dict(views_only), verbose=False)


def test_gbg_one_group_with_bcl_equals_plain_bcl_step(tmp_path) -> None:
    """GBG (sum combiner, one group present) + BCL is the plain BCL step, parameter for parameter."""
    cfg = config_from_dict(bcl_config(tmp_path))
    plain = Trainer(cfg, output_dir=tmp_path / "a", verbose=False)
    gbg = Trainer(cfg, output_dir=tmp_path / "b", verbose=False)
    gbg.update_rule = GBGRule(num_groups=1, combiner="sum")
    gbg.update_rule.set_groups(torch.zeros(4, dtype=torch.long))
    gbg.model.load_state_dict(plain.model.state_dict())
    gbg.regularizer.load_state_dict(plain.regularizer.state_dict())  # type: ignore[union-attr]
    x, y, v = next(iter(plain.train_loader))
    for t in (plain, gbg):
        t._set_train_mode()
        t.train_step(x, y, 0, views=v)
    for a, b in zip(plain.model.parameters(), gbg.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(plain.regularizer.parameters(), gbg.regularizer.parameters(), strict=True):  # type: ignore[union-attr]
        assert torch.allclose(a, b, atol=1e-6)


def test_gbg_mgda_with_bcl_adds_the_term_outside_the_balancing(tmp_path) -> None:
    """With two groups the total is ce_weight * sum_g alpha_g L_g + scl_weight * L_BCL."""
    cfg = config_from_dict(bcl_config(tmp_path))
    t = Trainer(cfg, output_dir=tmp_path / "c", verbose=False)
    rule = GBGRule(num_groups=2)
    rule.set_groups(torch.tensor([0, 0, 1, 1]))
    t.update_rule = rule
    x, y, v = next(iter(t.train_loader))
    t._set_train_mode()
    state = copy.deepcopy((t.model.state_dict(), t.regularizer.state_dict()))  # type: ignore[union-attr]
    out = t.train_step(x, y, 0, views=v)
    alpha = rule.last_alpha
    t.model.load_state_dict(state[0])
    t.regularizer.load_state_dict(state[1])  # type: ignore[union-attr]
    with torch.no_grad():
        h_all = t.model.features(torch.cat([x, v]))
        h, hv = h_all[:16], h_all[16:]
        z = t.model.classifier(h)
        groups = torch.tensor([0, 0, 1, 1])[y]
        losses = torch.stack([t.loss_fn(z[groups == g], y[groups == g]) for g in (0, 1)])
        reg = t.regularizer
        scl = reg.contrastive(reg.embed_views(hv, 16), reg.centres(t.model), y)  # type: ignore[union-attr]
    expected = 2.0 * (alpha * losses).sum() + 1.6 * scl
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def _ddp_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        cfg = bcl_config(Path(tmp))
        cfg["optim"]["epochs"] = 1
        trainer = Trainer(config_from_dict(cfg), output_dir=f"{tmp}/ddp", verbose=False)
        init = {k: v.clone() for k, v in trainer.regularizer.state_dict().items()}  # type: ignore[union-attr]
        trainer.fit()
        state = {k: v.clone() for k, v in trainer.regularizer.state_dict().items()}  # type: ignore[union-attr]
        torch.save({"init": init, "final": state}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_keeps_the_heads_equal_across_ranks(tmp_path) -> None:
    """The projection heads live outside the DDP model: their gradients are averaged by the trainer,
    so both ranks hold the same (trained) head parameters after an epoch."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in r0["final"].items():
        if "running" in name or "num_batches" in name:
            continue  # BatchNorm statistics are per rank (no SyncBatchNorm on CPU)
        torch.testing.assert_close(value, r1["final"][name], rtol=0, atol=0, msg=name)
        if value.dim() == 2:
            assert not torch.equal(value, r0["init"][name]), name


def test_cifar_gbg_bcl_recipe_trains_on_cifar_shaped_data(repo_root, tmp_path) -> None:
    """The shipped CIFAR-100-LT GBG + BCL config (ResNet-32, cosine head, AutoAugment + Cutout, two
    SimCLR views, GBG over 4 spectral groups) runs end to end on CIFAR-shaped (3 x 32 x 32) data."""
    from gradtail.config import load_config

    cfg = load_config(
        repo_root / "configs/cifar100_lt_if100/gbg_bcl.yaml",
        [
            "data.dataset=synthetic", "data.imbalance_factor=4",
            "data.synthetic={num_classes: 6, per_class: 12, test_per_class: 2, image_size: 32, channels: 3}",
            "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=0", "optim.milestones=[]",
            "optim.milestone_factors=[]", "train.progress=false", "train.eval_every=1",
            "regularizer.params.hidden_dim=32", "regularizer.params.out_dim=16",
        ],
    )  # fmt: skip
    t = Trainer(cfg, output_dir=tmp_path / "cifar", verbose=False)
    assert t.data.augment.policy is not None  # AutoAugment + Cutout on the classification view
    final = t.fit()
    assert t.update_rule.num_groups_used == 4  # type: ignore[attr-defined]
    assert 0.0 <= final["last_epoch"]["top1"] <= 1.0
    assert t.history[0]["groups_present"] >= 2
    weights = [t.history[0][f"alpha_group{g}"] for g in range(4)]  # GBG's epoch summary in the record
    assert all(w >= 0 for w in weights) and 0.99 <= sum(weights) <= 1.01
