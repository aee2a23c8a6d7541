"""GBG stage 1 (gbg.md §1, tests §6): prototypes, sketch, spectral / frequency / random groupings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtail.errors import InputError
from gradtail.models.base import LongTailClassifier
from gradtail.optim.grouping import (
    CountSketch,
    GaussianSketch,
    PrototypeAccumulator,
    class_gradient_prototypes,
    create_sketch,
    frequency_groups,
    random_groups,
    spectral_groups,
)


class TinyNet(LongTailClassifier):
    """Flatten + Linear backbone; the head's rows are +a for the first half of the classes, -a for the rest.

    With CE, dL/dh is along -a for a sample of the first half and along +a for the second half, so (with
    positive inputs) the backbone gradients of the two halves point in opposite directions.
    """

    def __init__(self, num_classes: int = 6, in_dim: int = 12, feat: int = 5, opposite: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, feat))
        self.feature_dim = feat
        self._make_head(num_classes, "linear", 1.0)
        if opposite:
            a = torch.linspace(-1.0, 1.0, feat)
            sign = torch.ones(num_classes)
            sign[num_classes // 2 :] = -1.0
            with torch.no_grad():
                self.classifier.weight.copy_(sign[:, None] * a[None, :])
                self.classifier.bias.zero_()


def two_direction_data(
    num_classes: int = 6, per_class: int = 7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_classes * per_class, 1, 3, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    perm = torch.randperm(labels.numel(), generator=gen)
    return images[perm], labels[perm]


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def reference_prototypes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-sample gradients averaged per class, the slow obvious way."""
    model.eval()
    params = list(model.backbone_parameters())
    protos = torch.zeros(num_classes, sum(p.numel() for p in params))
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten()
        for i in rows.tolist():
            loss = F.cross_entropy(model(to_float(images[i : i + 1])), labels[i : i + 1])
            grads = torch.autograd.grad(loss, params)
            protos[c] += torch.cat([g.reshape(-1) for g in grads])
        protos[c] /= max(len(rows), 1)
    return protos


# ------------------------------------------------------------------ spectral clustering
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_opposite_directions_give_two_groups(seed: int) -> None:
    torch.manual_seed(seed)
    u = torch.randn(40)
    signs = torch.tensor([1, -1, -1, 1, 1, -1, 1, -1, -1])
    protos = signs[:, None] * u[None, :] * torch.rand(9, 1).add(0.5) + 0.4 * torch.randn(9, 40)
    groups = spectral_groups(protos, 2, seed=0)
    assert groups.dtype == torch.long
    assert set(groups.tolist()) == {0, 1}
    # same group iff same sign
    same = groups[:, None] == groups[None, :]
    assert torch.equal(same, signs[:, None] == signs[None, :])


def test_spectral_deterministic_and_contiguous() -> None:
    torch.manual_seed(0)
    protos = torch.randn(30, 16)
    a = spectral_groups(protos, 4, seed=3)
    b = spectral_groups(protos.clone(), 4, seed=3)
    assert torch.equal(a, b)
    ids = sorted(set(a.tolist()))
    assert ids == list(range(len(ids))) and 1 <= len(ids) <= 4
    assert a[0] == 0  # ids in order of first appearance


def test_spectral_edge_cases() -> None:
    protos = torch.randn(3, 5)
    assert torch.equal(spectral_groups(protos, 5), torch.arange(3))
    assert torch.equal(spectral_groups(protos, 1), torch.zeros(3, dtype=torch.long))
    # Two exactly opposite classes: zero affinity between them, must not crash.
    u = torch.randn(5)
    assert torch.equal(spectral_groups(torch.stack([u, -u, u]), 2), torch.tensor([0, 1, 0]))
    with pytest.raises(InputError):
        spectral_groups(torch.randn(4), 2)


# ------------------------------------------------------------------ sketch
def test_sketch_preserves_cosines_and_is_deterministic() -> None:
    torch.manual_seed(0)
    base = torch.randn(4000)
    x = torch.stack([base + s * torch.randn(4000) for s in (0.0, 0.5, 1.0, 3.0)] + [torch.randn(4000)])
    sketch = GaussianSketch(4000, 512, seed=7, chunk_elems=512 * 300)  # several chunks
    assert sketch.chunk_rows < 4000
    y = sketch(x)
    assert y.shape == (5, 512)
    assert torch.equal(y, sketch(x))
    assert torch.equal(y, GaussianSketch(4000, 512, seed=7, chunk_elems=512 * 300)(x))
    assert not torch.equal(y, GaussianSketch(4000, 512, seed=8, chunk_elems=512 * 300)(x))
    cos_x = F.cosine_similarity(x[:, None], x[None], dim=2)
    cos_y = F.cosine_similarity(y[:, None], y[None], dim=2)
    assert (cos_x - cos_y).abs().max() < 0.15
    assert torch.allclose(sketch(x[1]), y[1], atol=1e-4)


def test_sketch_single_chunk_is_cached_and_linear() -> None:
    sketch = GaussianSketch(50, 8, seed=1)
    a, b = torch.randn(50), torch.randn(50)
    assert torch.allclose(sketch(a + 2 * b), sketch(a) + 2 * sketch(b), atol=1e-5)
    with pytest.raises(InputError):
        sketch(torch.randn(49))


def count_sketch_matrix(sketch: CountSketch) -> torch.Tensor:
    """S (k, D) materialised by sketching the identity's rows."""
    return sketch(torch.eye(sketch.dim)).T


@pytest.mark.parametrize("nnz", [1, 3])
def test_count_sketch_matrix_has_nnz_signed_entries_per_column(nnz: int) -> None:
    sketch = CountSketch(300, 20, seed=4, nnz=nnz, chunk_elems=70)  # five chunks, cached
    s_mat = count_sketch_matrix(sketch)
    assert s_mat.shape == (20, 300)
    # Each column: nnz entries of +-1/sqrt(nnz) (two hashes may share a bucket: then 0 or +-2/sqrt(nnz)).
    col_abs_sum = s_mat.abs().sum(dim=0) * np.sqrt(nnz)
    assert torch.all(col_abs_sum <= nnz + 1e-5)
    values = set(np.round(s_mat[s_mat != 0].abs().numpy() * np.sqrt(nnz), 5).tolist())
    assert values <= {1.0, 2.0}
    if nnz == 1:
        assert torch.allclose(col_abs_sum, torch.ones(300))
    x = torch.randn(4, 300)
    assert torch.allclose(sketch(x), x @ s_mat.T, atol=1e-5)  # y = S x
    uncached = CountSketch(300, 20, seed=4, nnz=nnz, chunk_elems=70, cache_elems=0)
    assert torch.equal(uncached(x), sketch(x))  # regenerated chunks are the same map
    assert not torch.equal(CountSketch(300, 20, seed=5, nnz=nnz, chunk_elems=70)(x), sketch(x))


def test_count_sketch_is_unbiased_for_inner_products() -> None:
    """E[<Sx, Sy>] = <x, y>: averaged over 400 seeds, within 4 standard errors."""
    torch.manual_seed(0)
    x, y = torch.randn(200), torch.randn(200)
    y = y + 0.5 * x
    est = torch.tensor(
        [float(CountSketch(200, 16, seed=s)(x) @ CountSketch(200, 16, seed=s)(y)) for s in range(400)]
    )
    sem = est.std() / np.sqrt(est.numel())
    assert abs(float(est.mean()) - float(x @ y)) < 4 * float(sem)


def test_count_sketch_preserves_cosines() -> None:
    torch.manual_seed(0)
    base = torch.randn(20000)
    x = torch.stack([base + s * torch.randn(20000) for s in (0.0, 0.5, 1.0, 3.0)] + [torch.randn(20000)])
    y = CountSketch(20000, 1024, seed=7, nnz=2, chunk_elems=6000)(x)
    cos_x = F.cosine_similarity(x[:, None], x[None], dim=2)
    cos_y = F.cosine_similarity(y[:, None], y[None], dim=2)
    assert (cos_x - cos_y).abs().max() < 0.1
    with pytest.raises(InputError):
        create_sketch("dense", 10, 2)
    with pytest.raises(InputError):
        CountSketch(10, 2)(torch.randn(9))


def test_prototype_accumulator_means_blocks_and_order_check() -> None:
    torch.manual_seed(0)
    grads = {c: [torch.randn(7) for _ in range(c + 1)] for c in range(5)}
    sketch = GaussianSketch(7, 3, seed=0)
    for proj in (None, sketch):
        acc = PrototypeAccumulator(6, 7, proj, class_block=2)
        for c in (0, 1, 2, 4, 3):  # class 5 never added: zero row
            for g in grads[c]:
                acc.add(c, [g[:3], g[3:]])  # per-parameter pieces
            acc.end_class(c, len(grads[c]))
        means = torch.stack([torch.stack(grads[c]).mean(0) for c in range(5)] + [torch.zeros(7)])
        expected = means if proj is None else proj(means)
        assert torch.allclose(acc.result(), expected, atol=1e-5)
    acc = PrototypeAccumulator(3, 7, sketch, class_block=3)
    acc.add(0, torch.ones(7))
    acc.end_class(0, 1)
    with pytest.raises(InputError, match="already finished"):
        acc.add(0, torch.ones(7))
    with pytest.raises(InputError, match="expected 7"):
        acc.add(1, torch.ones(6))


# ------------------------------------------------------------------ prototypes
def test_prototypes_match_per_sample_reference_and_restore_state() -> None:
    torch.manual_seed(0)
    model = TinyNet(opposite=False).train()
    images, labels = two_direction_data(per_class=5)
    labels = labels.clone()
    labels[labels == 4] = 3  # class 4 has no samples: zero row
    before = [p.detach().clone() for p in model.parameters()]
    protos = class_gradient_prototypes(model, None, images, labels, 6, batch_size=3, transform=to_float)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ref = reference_prototypes(model, images, labels, 6)
    assert protos.shape == ref.shape == (6, 12 * 5 + 5)
    assert torch.allclose(protos, ref, atol=1e-5)
    assert torch.equal(protos[4], torch.zeros_like(protos[4]))


def test_sketched_prototypes_equal_sketch_of_full() -> None:
    torch.manual_seed(1)
    model = TinyNet(opposite=False)
    images, labels = two_direction_data(per_class=4)
    full = class_gradient_prototypes(model, None, images, labels, 6, batch_size=5, transform=to_float)
    for kind in ("gaussian", "count"):
        sk = class_gradient_prototypes(
            model, None, images, labels, 6, batch_size=5, sketch_dim=16, seed=3, transform=to_float,
            class_block=4, sketch=kind,
        )  # fmt: skip
        assert sk.shape == (6, 16)
        expected = create_sketch(kind, full.shape[1], 16, seed=3)(full)
        assert torch.allclose(sk, expected, atol=1e-5)


def test_prototypes_use_given_loss_and_check_labels() -> None:
    model = TinyNet(opposite=False)
    images, labels = two_direction_data(per_class=3)
    doubled = class_gradient_prototypes(
        model, lambda z, y: 2 * F.cross_entropy(z, y), images, labels, 6, transform=to_float
    )
    plain = class_gradient_prototypes(model, None, images, labels, 6, transform=to_float)
    assert torch.allclose(doubled, 2 * plain, atol=1e-6)
    with pytest.raises(InputError):
        class_gradient_prototypes(model, None, images, labels, 5, transform=to_float)


@pytest.mark.parametrize("sketch_dim", [None, 32])
def test_end_to_end_opposite_gradient_classes_land_in_two_groups(sketch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = TinyNet(num_classes=6, opposite=True)
    images, labels = two_direction_data(num_classes=6, per_class=6)
    protos = class_gradient_prototypes(
        model, None, images, labels, 6, batch_size=4, sketch_dim=sketch_dim, seed=0, transform=to_float
    )
    groups = spectral_groups(protos, 2, seed=0)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------ ablation groupings
def test_frequency_groups() -> None:
    counts = [5, 100, 50, 1, 7, 30, 30]
    # sorted (desc, ties by index): 1, 2, 5 | 6, 4 | 0, 3
    assert frequency_groups(counts, 3).tolist() == [2, 0, 0, 2, 1, 0, 1]
    assert frequency_groups(torch.tensor([3, 2, 1]), 1).tolist() == [0, 0, 0]
    assert frequency_groups([3, 2, 1], 5).tolist() == [0, 1, 2]
    assert frequency_groups([10] * 8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_random_groups() -> None:
    a = random_groups(10, 3, seed=0)
    assert torch.equal(a, random_groups(10, 3, seed=0))
    assert sorted(torch.bincount(a).tolist()) == [3, 3, 4]
    assert not all(torch.equal(a, random_groups(10, 3, seed=s)) for s in range(1, 5))
    assert random_groups(2, 4, seed=0).sort().values.tolist() == [0, 1]
