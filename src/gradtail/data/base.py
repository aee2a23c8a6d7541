"""In-memory image datasets: uint8 images plus int64 labels (docs/methods/design.md, "Pieces and their
interfaces").

Every reader (Fashion-MNIST, CIFAR) returns an :class:`ImageArrays`; long-tailed subsets are made with
:meth:`ImageArrays.subset` from the indices of :func:`gradtail.data.longtail.build_longtail_split`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gradtail.errors import ConfigError, DataError

#: The file suffixes gradtail reads as images (any case), everywhere: own data, segmentation folders,
#: ``gradtail predict`` inputs.
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


@dataclass
class ImageArrays:
    """A whole split in memory.

    ``images``: uint8 ``(N, C, H, W)``, made contiguous; ``labels``: int64 ``(N,)`` in
    ``[0, num_classes)``; ``class_names``: one name per class; ``name``: e.g. ``"cifar10-train"``.
    Invalid contents raise :class:`DataError` (labels are checked where data enters,
    docs/methods/baselines.md).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    name: str

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r}"
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise DataError(f"{where}: images and labels must be torch tensors")
        if self.images.dtype != torch.uint8:
            raise DataError(f"{where}: images must be uint8, got {self.images.dtype}")
        if self.images.dim() != 4:
            raise DataError(f"{where}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64:
            raise DataError(f"{where}: labels must be int64, got {self.labels.dtype}")
        if self.labels.dim() != 1:
            raise DataError(f"{where}: labels must be 1-D, got shape {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"{where}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        nc = self.num_classes
        if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
            raise DataError(f"{where}: num_classes must be a positive int, got {self.num_classes!r}")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{where}: {len(self.class_names)} class names for {self.num_classes} classes")
        if self.labels.numel() > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise DataError(f"{where}: label {bad} is outside [0, {self.num_classes})")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()
        self.class_names = [str(n) for n in self.class_names]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, name: str | None = None
    ) -> ImageArrays:
        """The images at ``indices`` (in that order), same classes; ``name`` defaults to this one's."""
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        integer = not (idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool)
        if idx.dim() != 1 or (idx.numel() > 0 and not integer):
            raise ConfigError(
                f"subset indices must be a 1-D integer sequence, got {idx.dtype} {tuple(idx.shape)}"
            )
        idx = idx.to(torch.int64)
        if idx.numel() > 0 and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ConfigError(f"subset indices must lie in [0, {len(self)}) for dataset {self.name!r}")
        return ImageArrays(
            images=self.images[idx],
            labels=self.labels[idx],
            num_classes=self.num_classes,
            class_names=list(self.class_names),
            name=self.name if name is None else name,
        )

    def class_counts(self) -> list[int]:
        """Images per class, indexed by label (length ``num_classes``)."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()
