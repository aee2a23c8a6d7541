"""From a :class:`~gradtail.config.DataConfig` to the train / validation / test arrays of a run.

The training set is the long-tailed subset of the dataset's training split (protocol.md §1, LDAM rule);
the validation set is carved from the training split before subsampling (balanced, disjoint); the test
set is the untouched balanced test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F

from gradtail.config import DataConfig
from gradtail.data.base import ImageArrays
from gradtail.data.longtail import LongTailSplit, build_longtail_split
from gradtail.errors import ConfigError
from gradtail.registry import Registry

# name -> loader(train: bool, cfg: DataConfig) -> ImageArrays
DATASETS: Registry[ImageArrays] = Registry("dataset")

# Standard per-channel statistics (of the full training splits).
NORMALIZATION: dict[str, tuple[list[float], list[float]]] = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


@DATASETS.register("fashion_mnist")
def _fashion(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(train=train, data_dir=cfg.data_dir, download=cfg.download)


@DATASETS.register("cifar10")
def _cifar10(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.cifar import load_cifar

    return load_cifar("cifar10", train=train, data_dir=cfg.data_dir, download=cfg.download)


@DATASETS.register("cifar100")
def _cifar100(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.cifar import load_cifar

    return load_cifar("cifar100", train=train, data_dir=cfg.data_dir, download=cfg.download)


_SYNTHETIC_KEYS = ("num_classes", "per_class", "test_per_class", "image_size", "channels", "noise", "seed")


@DATASETS.register("synthetic")
def _synthetic(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.synthetic import make_synthetic

    opts: dict[str, Any] = dict(cfg.synthetic)
    unknown = set(opts) - set(_SYNTHETIC_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) data.synthetic.{sorted(unknown)}; valid: {', '.join(_SYNTHETIC_KEYS)}"
        )
    test_per_class = opts.pop("test_per_class", 50)
    if not train:
        opts["per_class"] = test_per_class
    return make_synthetic(train=train, **opts)


@dataclass
class DataBundle:
    """Everything a run needs from the data side."""

    train: ImageArrays
    val: ImageArrays | None
    test: ImageArrays
    split: LongTailSplit
    mean: list[float]
    std: list[float]

    @property
    def class_counts(self) -> list[int]:
        return list(self.split.counts)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def _pad(arrays: ImageArrays, size: int | None) -> ImageArrays:
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


def build_data(
    cfg: DataConfig, loader: Callable[[bool, DataConfig], ImageArrays] | None = None
) -> DataBundle:
    """Load the dataset named in ``cfg`` and build the long-tailed training subset, validation and test."""
    load = loader or DATASETS.get(cfg.dataset)
    full_train = load(True, cfg)
    test = load(False, cfg)
    split = build_longtail_split(
        full_train.labels.numpy(),
        full_train.num_classes,
        imbalance_factor=cfg.imbalance_factor,
        profile=cfg.profile,
        seed=cfg.subset_seed,
        val_per_class=cfg.val_per_class,
        n_max=cfg.n_max,
        class_order=cfg.class_order,
    )
    train = full_train.subset(split.train_indices)
    val = full_train.subset(split.val_indices) if len(split.val_indices) else None
    channels = full_train.images.shape[1]
    mean, std = cfg.augment.mean, cfg.augment.std
    if mean is None or std is None:
        default = NORMALIZATION.get(cfg.dataset)
        if default is None:
            default = ([0.5] * channels, [0.25] * channels)
        mean = mean or default[0]
        std = std or default[1]
    return DataBundle(
        train=_pad(train, cfg.pad_to),
        val=None if val is None else _pad(val, cfg.pad_to),
        test=_pad(test, cfg.pad_to),
        split=split,
        mean=list(mean),
        std=list(std),
    )
