"""The in-memory bundle of a classification run (:class:`DataBundle`) and what every bundle augmented on
the device shares (:class:`DeviceAugmentedData`): counts and hash of the long-tailed split, the whole-batch
augmentation, the test-time preprocessing record. The dataset builders (:mod:`gradtail.data.builder`,
:mod:`gradtail.data.own_data`) make them; this module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gradtail.config import RunConfig
from gradtail.data.base import ImageArrays
from gradtail.data.loader import BatchAugment, BatchLoader
from gradtail.data.longtail import LongTailSplit
from gradtail.data.samplers import sampler_from_config
from gradtail.errors import ConfigError


class DeviceAugmentedData:
    """What every bundle augmented on the device shares (:class:`DataBundle`, and own data kept in its
    files): counts and hash from the split, the batch augmentation built once from ``augment_cfg``, the
    test-time preprocessing. Subclasses are dataclasses with the fields annotated here."""

    split: LongTailSplit
    val: Any
    test: Any
    mean: list[float]
    std: list[float]
    augment_cfg: Any
    stored_size: tuple[int, int, int]
    pad_to: int | None
    resize_to_size: bool
    _augment: BatchAugment | None

    @property
    def class_counts(self) -> list[int]:
        return list(self.split.counts)

    @property
    def sha256(self) -> str:
        return self.split.sha256

    def preprocessing(self) -> dict[str, Any]:
        """The test-time input pipeline (:meth:`gradtail.contracts.RunData.preprocessing`)."""
        return in_memory_preprocessing(
            self.stored_size, self.resize_to_size, self.pad_to, self.mean, self.std
        )

    def has_split(self, split: str) -> bool:
        return (self.val if split == "val" else self.test) is not None

    @property
    def augment(self) -> BatchAugment:
        if self._augment is None:
            self._augment = build_batch_augment(self.augment_cfg, self.mean, self.std)
        return self._augment

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Stored uint8 images -> model input without augmentation (GBG's grouping pass)."""
        return self.augment.normalize(x)


@dataclass
class DataBundle(DeviceAugmentedData):
    """In-memory data of a run: uint8 arrays of the long-tailed training subset, validation and test."""

    train: ImageArrays
    val: ImageArrays | None
    test: ImageArrays
    split: LongTailSplit
    mean: list[float]
    std: list[float]
    augment_cfg: Any = None
    stored_size: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the images as loaded, before padding
    pad_to: int | None = None
    resize_to_size: bool = False  # own data: images of another size are resized (data.resize)
    # what subset.json records besides counts and hash (own data: where the data came from, its splits)
    source: dict[str, Any] = field(default_factory=dict)
    _augment: BatchAugment | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train.labels

    @property
    def class_names(self) -> list[str]:
        return list(self.train.class_names)

    def view_augment(self) -> tuple[Any, int]:
        """(view transform, views per image) for contrastive terms; (None, 0) when ``augment.views`` is 0."""
        return build_view_augment(self.augment_cfg)

    def train_loader(self, cfg: RunConfig, device: torch.device, rank: int, world: int) -> BatchLoader:
        """This process's training batches; the sampler is the config's (:func:`sampler_from_config`)."""
        sampler = sampler_from_config(cfg, self.train_labels, self.num_classes)
        views, num_views = self.view_augment()
        return BatchLoader(
            self.train.images, self.train.labels, cfg.optim.batch_size, self.augment, sampler=sampler,
            train=True, drop_last=cfg.optim.drop_last, seed=cfg.train.seed, device=device,
            channels_last=cfg.train.channels_last, rank=rank, world_size=world, views=views,
            num_views=num_views,
        )  # fmt: skip

    def eval_loader(self, split: str, cfg: RunConfig, device: torch.device) -> Any:
        arrays = self.val if split == "val" else self.test
        if arrays is None:
            raise ConfigError(f"this run has no {split} split")
        return BatchLoader(
            arrays.images, arrays.labels, cfg.eval.batch_size, self.augment, sampler=None, train=False,
            device=device, channels_last=cfg.train.channels_last,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What ``subset.json`` records (docs/methods/protocol.md §1: counts and hash make the subset
        auditable), plus :attr:`source`."""
        return {
            "counts": self.class_counts,
            "train_images": int(sum(self.class_counts)),
            "val_counts": list(self.split.val_counts),
            "sha256": self.split.sha256,
            "test_images": len(self.test),
            **self.source,
        }


def in_memory_preprocessing(
    stored_size: tuple[int, int, int],
    resize_to_size: bool,
    pad_to: int | None,
    mean: list[float],
    std: list[float],
) -> dict[str, Any]:
    """The ``"in_memory"`` test-time pipeline (:meth:`gradtail.contracts.RunData.preprocessing`) of images
    stored as ``stored_size`` = (C, H, W) before padding."""
    channels, h, w = (int(v) for v in stored_size)
    return {
        "transform": "in_memory",
        "mode": "L" if channels == 1 else "RGB",
        "size": [h, w],
        "resize_to_size": bool(resize_to_size),
        "pad_to": pad_to,
        "mean": list(mean),
        "std": list(std),
    }


def build_batch_augment(augment_cfg: Any, mean: list[float], std: list[float]) -> BatchAugment:
    """The whole-batch training transform of ``data.augment`` (crop, flip, AutoAugment / Cutout, then
    normalisation with ``mean`` / ``std``); normalisation only when ``augment_cfg`` is None."""
    from gradtail.data.augment_policies import build_policy_transforms

    a = augment_cfg
    return BatchAugment(
        mean=mean,
        std=std,
        crop_padding=a.crop_padding if a is not None else 0,
        hflip=a.hflip if a is not None else False,
        policy=None
        if a is None
        else build_policy_transforms(a.autoaugment, a.cutout, fill=a.autoaugment_fill),
    )


def build_view_augment(augment_cfg: Any) -> tuple[Any, int]:
    """(view transform, views per image) of ``data.augment`` for contrastive terms; (None, 0) when
    ``augment.views`` is 0."""
    a = augment_cfg
    if a is None or a.views == 0:
        return None, 0
    if a.views < 0:
        raise ConfigError(f"data.augment.views must be >= 0, got {a.views}")
    from gradtail.data.contrastive_views import SimCLRViews

    views = SimCLRViews(
        scale=a.view_crop_scale, jitter=a.view_jitter, jitter_p=a.view_jitter_p,
        grayscale_p=a.view_grayscale_p, hflip=a.hflip,
    )  # fmt: skip
    return views, int(a.views)


def pad_images(arrays: ImageArrays, size: int | None) -> ImageArrays:
    """``arrays`` zero-padded to ``size`` x ``size`` (centred; the extra row / column at the bottom /
    right); unchanged when ``size`` is None."""
    if size is None:
        return arrays
    h, w = arrays.images.shape[-2:]
    if h > size or w > size:
        raise ConfigError(f"data.pad_to={size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    images = F.pad(arrays.images, (left, size - w - left, top, size - h - top))
    return ImageArrays(
        images.contiguous(), arrays.labels, arrays.num_classes, arrays.class_names, arrays.name
    )
