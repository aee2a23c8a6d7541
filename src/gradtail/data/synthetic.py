"""A small synthetic image dataset whose classes are learnable: for tests and smoke runs, no files needed.

Each class c has a fixed random prototype image; a sample is its class prototype plus Gaussian noise,
quantised to uint8. Deterministic given ``seed``.
"""

from __future__ import annotations

import torch

from gradtail.data.base import ImageArrays


def make_synthetic(
    num_classes: int = 10,
    per_class: int = 100,
    image_size: int = 16,
    channels: int = 1,
    noise: float = 0.35,
    seed: int = 0,
    train: bool = True,
) -> ImageArrays:
    """Balanced synthetic set with ``per_class`` images per class; the test split uses other noise draws."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, channels, image_size, image_size, generator=gen)
    sample_gen = torch.Generator().manual_seed(seed * 2 + (0 if train else 1) + 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = prototypes[labels] + noise * torch.randn(
        labels.numel(), channels, image_size, image_size, generator=sample_gen
    )
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageArrays(
        images=images.contiguous(),
        labels=labels.long(),
        num_classes=num_classes,
        class_names=[f"class_{c}" for c in range(num_classes)],
        name="synthetic",
    )
