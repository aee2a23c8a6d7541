"""Batched AutoAugment and Cutout: every op equals torchvision's per-image kernel; per-image draws replay."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import AutoAugment, AutoAugmentPolicy
from torchvision.transforms.v2 import functional as TF

from gradtail.data.augment_policies import (
    CIFAR10_POLICY,
    OPS,
    AutoAugmentDraw,
    BatchAutoAugment,
    BatchCutout,
    apply_op,
    build_policy_transforms,
    compose_batch_transforms,
    magnitude_bins,
)
from gradtail.errors import ConfigError

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
SIGNED = (*GEOMETRIC, "Brightness", "Color", "Contrast", "Sharpness")


def _images(n=4, c=3, h=32, w=32, seed=0):
    """Noise, smooth and low-contrast images plus a constant and a two-level one (Equalize edge cases)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    smooth = F.avg_pool2d(noise.float(), 5, 1, 2).to(torch.uint8)
    const = torch.full((1, c, h, w), 77, dtype=torch.uint8)
    two = torch.where(noise[:1] > 128, 200, 30).to(torch.uint8)
    return torch.cat([noise, smooth, smooth // 4 + 60, const, two])


def _reference(img, op, m, fill=None):
    """One image (C, H, W) through torchvision.transforms.v2.functional, AutoAugment's conventions."""
    if op == "ShearX":
        return TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[math.degrees(math.atan(m)), 0.0],
            center=[0, 0],
            fill=fill,
        )
    if op == "ShearY":
        return TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[0.0, math.degrees(math.atan(m))],
            center=[0, 0],
            fill=fill,
        )
    if op == "TranslateX":
        return TF.affine(img, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], fill=fill)
    if op == "TranslateY":
        return TF.affine(img, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], fill=fill)
    if op == "Rotate":
        return TF.rotate(img, m, fill=fill)
    enhance = {
        "Brightness": TF.adjust_brightness,
        "Color": TF.adjust_saturation,
        "Contrast": TF.adjust_contrast,
        "Sharpness": TF.adjust_sharpness,
    }
    if op in enhance:
        return enhance[op](img, 1.0 + m)
    if op == "Posterize":
        return TF.posterize(img, int(m))
    if op == "Solarize":
        return TF.solarize(img, m)
    return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize, "Invert": TF.invert}[op](img)


def _signed_magnitudes(op, h, w, bins=(1, 2, 3, 7, 9)):
    mags = [magnitude_bins(op, h, w)[b] for b in bins]
    return mags + [-m for m in mags] if op in SIGNED else mags


@pytest.mark.parametrize("op", OPS)
def test_each_op_on_a_batch_equals_torchvision_per_image(op):
    x = _images()
    for m in _signed_magnitudes(op, 32, 32):
        out = apply_op(x, op, m)
        ref = torch.stack([_reference(img, op, m) for img in x])
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert torch.equal(out, ref), (op, m, (out.int() - ref.int()).abs().max().item())


@pytest.mark.parametrize("op", OPS)
def test_ops_on_single_channel_and_non_square_images(op):
    for h, w in ((28, 28), (24, 20)):
        x = _images(n=3, c=1, h=h, w=w, seed=1)
        for m in _signed_magnitudes(op, h, w, bins=(3, 9)):
            ref = torch.stack([_reference(img, op, m) for img in x])
            assert torch.equal(apply_op(x, op, m), ref), (op, h, w, m)


@pytest.mark.parametrize("fill", [128, [10, 20, 250]])
@pytest.mark.parametrize("op", GEOMETRIC)
def test_geometric_fill_matches_torchvision(op, fill):
    x = _images(n=3, seed=2)
    tv_fill = [float(fill)] * 3 if isinstance(fill, int) else [float(f) for f in fill]
    for m in _signed_magnitudes(op, 32, 32, bins=(4, 9)):
        ref = torch.stack([_reference(img, op, m, fill=tv_fill) for img in x])
        assert torch.equal(apply_op(x, op, m, fill=fill), ref), (op, m, fill)


@pytest.mark.parametrize("op", OPS)
def test_per_image_magnitudes_equal_separate_calls(op):
    x = _images(n=4, seed=3)
    mags = _signed_magnitudes(op, 32, 32, bins=(0, 2, 4, 6, 8, 9))
    m = torch.tensor([mags[i % len(mags)] for i in range(x.shape[0])], dtype=torch.float64)
    out = apply_op(x, op, m)
    for i in range(x.shape[0]):
        assert torch.equal(out[i : i + 1], apply_op(x[i : i + 1], op, float(m[i]))), (op, i)


def test_policy_table_and_magnitudes_match_torchvision():
    tv = AutoAugment(AutoAugmentPolicy.CIFAR10)
    assert [tuple(tuple(step) for step in sub) for sub in tv.policies] == list(CIFAR10_POLICY)
    space = tv._augmentation_space(10, (24, 40))
    for op in OPS:
        mags, _ = space[op]
        if mags.dim() == 1:
            assert magnitude_bins(op, 24, 40) == [float(v) for v in mags.tolist()], op


def _per_image_autoaugment(x, d, fill=0):
    """Independent loop: each image runs its drawn sub-policy through torchvision's per-image kernels."""
    _, _, h, w = x.shape
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        for s, (op, p, b) in enumerate(CIFAR10_POLICY[int(d.policy[i])]):
            if float(d.coin[i, s]) < p:
                m = 0.0 if b is None else magnitude_bins(op, h, w)[b]
                if op in SIGNED and bool(d.negate[i, s]):
                    m = -m
                img = _reference(img, op, m, fill=[float(fill)] * x.shape[1] if fill else None)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("fill", [0, 128])
def test_batch_policy_replays_draws_and_equals_per_image_loop(fill):
    x = _images(n=40, seed=4)
    aug = BatchAutoAugment("cifar10", fill=fill)
    out = aug(x, torch.Generator().manual_seed(11))
    d = aug.draw(x.shape[0], "cpu", torch.Generator().manual_seed(11))
    assert d.policy.shape == (x.shape[0],) and d.coin.shape == d.negate.shape == (x.shape[0], 2)
    assert len(set(d.policy.tolist())) > 10  # the images really drew different sub-policies
    assert torch.equal(out, aug.apply(x, d))
    assert torch.equal(out, _per_image_autoaugment(x, d, fill))


def test_determinism_dtype_shape_and_input_untouched():
    x = _images(n=20, seed=5)
    before = x.clone()
    aug = BatchAutoAugment()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(x, before)


def test_single_image_empty_groups_and_no_op_draws():
    x = _images(n=1, seed=6)[:1]
    aug = BatchAutoAugment()
    for seed in range(30):  # B = 1: at most one group per step, all others empty
        d = aug.draw(1, "cpu", torch.Generator().manual_seed(seed))
        assert torch.equal(aug.apply(x, d), _per_image_autoaugment(x, d))
    batch = _images(n=8, seed=7)
    n = batch.shape[0]
    no_sign = torch.zeros(n, 2, dtype=torch.bool)
    skip = AutoAugmentDraw(torch.arange(n) % 25, torch.full((n, 2), 0.999), no_sign)
    assert torch.equal(aug.apply(batch, skip), batch)  # every coin fails (max probability is 0.9)
    same = AutoAugmentDraw(torch.full((n,), 4), torch.zeros(n, 2), no_sign)
    assert torch.equal(aug.apply(batch, same), _per_image_autoaugment(batch, same))
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    assert aug(empty, torch.Generator()).shape == empty.shape


def test_steps_follow_probabilities_and_signs():
    aug = BatchAutoAugment()
    d = aug.draw(20000, "cpu", torch.Generator().manual_seed(0))
    op, mag = aug.steps(d, 32, 32)
    ran = (op < len(OPS)).float().mean(0)
    expected = torch.tensor([[s[1] for s in sub] for sub in CIFAR10_POLICY]).mean(0)
    assert torch.allclose(ran, expected, atol=0.02)
    rot = op[:, 0] == OPS.index("Rotate")
    assert set(mag[rot, 0].abs().tolist()) == {magnitude_bins("Rotate", 32, 32)[2]}
    assert 0.4 < (mag[rot, 0] < 0).float().mean() < 0.6


def test_unknown_policy_and_op():
    with pytest.raises(ConfigError):
        BatchAutoAugment("imagenet-but-misspelt")
    with pytest.raises(ConfigError):
        apply_op(_images(n=1), "Blur", 1.0)


# --------------------------------------------------------------------------- Cutout


def _cutout_reference(x, centres, size):
    """DeVries & Taylor's per-image hole: rows/cols [c - size//2, c + size//2) clipped (even size)."""
    out = x.clone()
    _, _, h, w = x.shape
    for i, (cy, cx) in enumerate(centres.tolist()):
        y1, y2 = min(max(cy - size // 2, 0), h), min(max(cy + size // 2, 0), h)
        x1, x2 = min(max(cx - size // 2, 0), w), min(max(cx + size // 2, 0), w)
        out[i, :, y1:y2, x1:x2] = 0
    return out


def test_cutout_equals_per_image_reference_and_replays():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cut = BatchCutout(16)
    out = cut(x, torch.Generator().manual_seed(9))
    centres = cut.draw(64, 32, 32, "cpu", torch.Generator().manual_seed(9))
    assert centres.shape == (64, 2) and int(centres.min()) >= 0 and int(centres.max()) < 32
    assert torch.equal(out, _cutout_reference(x, centres, 16))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, cut(x, torch.Generator().manual_seed(9)))


def test_cutout_clipping_and_exact_zero_counts():
    x = torch.full((5, 3, 32, 32), 200, dtype=torch.uint8)
    cut = BatchCutout(16)
    centres = torch.tensor([[0, 0], [31, 31], [16, 16], [5, 20], [31, 0]])
    out = cut.apply(x, centres)
    zeros = (out == 0).sum(dim=(1, 2, 3)).tolist()
    # rows/cols kept: [c - 8, c + 8) within [0, 32)
    assert zeros == [3 * 8 * 8, 3 * 9 * 9, 3 * 16 * 16, 3 * 13 * 16, 3 * 9 * 8]
    assert torch.equal(out[2, :, 8:24, 8:24], torch.zeros(3, 16, 16, dtype=torch.uint8))
    assert int(out[2, :, 7].min()) == 200 and int(out[2, :, 24].min()) == 200
    assert torch.equal(out[1, :, 23:, 23:], torch.zeros(3, 9, 9, dtype=torch.uint8))


def test_cutout_odd_size_non_square_b1_and_identity():
    x = torch.full((1, 1, 20, 28), 9, dtype=torch.uint8)
    out = BatchCutout(5).apply(x, torch.tensor([[10, 27]]))
    assert (out == 0).sum() == 5 * 3  # rows 8..12, columns 25..27
    assert torch.equal(out[0, 0, 8:13, 25:], torch.zeros(5, 3, dtype=torch.uint8))
    g = torch.Generator().manual_seed(0)
    assert BatchCutout(0)(x, g) is x
    one = BatchCutout(7)(x, g)
    assert one.shape == x.shape and 0 < int((one == 0).sum()) <= 49
    with pytest.raises(ConfigError):
        BatchCutout(-1)


# --------------------------------------------------------------------------- composition


def test_compose_draws_from_one_generator_in_order():
    x = _images(n=10, seed=8)
    aug, cut = BatchAutoAugment(), BatchCutout(16)
    composed = compose_batch_transforms(aug, None, cut)
    out = composed(x, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    assert torch.equal(out, cut(aug(x, g), g))
    built = build_policy_transforms("cifar10", 16)
    assert built is not None and torch.equal(built(x, torch.Generator().manual_seed(2)), out)
    assert build_policy_transforms(None, 0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_within_one_level():
    x = _images(n=30, seed=9)
    aug = BatchAutoAugment()
    d = aug.draw(x.shape[0], "cpu", torch.Generator().manual_seed(1))
    d_cuda = AutoAugmentDraw(d.policy.cuda(), d.coin.cuda(), d.negate.cuda())
    out = aug.apply(x.cuda(), d_cuda).cpu()
    assert (out.int() - aug.apply(x, d).int()).abs().max() <= 1
    g = torch.Generator(device="cuda").manual_seed(0)
    y = compose_batch_transforms(aug, BatchCutout(16))(x.cuda(), g)
    assert y.device.type == "cuda" and y.dtype == torch.uint8
