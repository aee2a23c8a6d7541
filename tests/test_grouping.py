"""GBG stage 1 (gbg.md §1, tests §6): prototypes, sketch, spectral / frequency / random groupings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradtail.errors import InputError
from gradtail.models.base import LongTailClassifier
from gradtail.optim.grouping import (
    GaussianSketch,
    class_gradient_prototypes,
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
    sk = class_gradient_prototypes(
        model, None, images, labels, 6, batch_size=5, sketch_dim=16, seed=3, transform=to_float, class_block=4
    )
    assert sk.shape == (6, 16)
    expected = GaussianSketch(full.shape[1], 16, seed=3)(full)
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
