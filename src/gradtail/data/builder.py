"""From a :class:`~gradtail.config.DataConfig` to the data of a run: a *bundle* the trainer uses through a
small surface (counts, subset hash, loaders), whatever the storage.

- In-memory datasets (Fashion-MNIST, CIFAR, synthetic): the training set is the long-tailed subset of the
  training split (docs/methods/protocol.md §1, LDAM rule); validation is carved from the training split before
  subsampling (balanced, disjoint); the test set is the untouched balanced test split. Batches come from
  :class:`~gradtail.data.loader.BatchLoader` (whole-batch augmentation on the device).
- Image-list datasets (ImageNet-LT, Places-LT, iNaturalist 2018): the community's split files are already
  long-tailed; images are decoded by workers (:class:`~gradtail.data.image_list.ImageListLoader`). The
  "subset hash" is the SHA-256 of the training list file.
- Own data (``image_folder``, ``image_csv``, ``npz``; :mod:`gradtail.data.own_data`): classes, counts, image
  size and channels come from the data; held in memory when the decoded images fit
  ``data.memory_budget_mb``, else kept in the files, decoded by workers and augmented on the device as in
  memory.

Every builder returns a :class:`~gradtail.data.bundle.ClassificationData` (the task's one bundle type).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.config import DataConfig
from gradtail.data.base import ImageArrays
from gradtail.data.bundle import ClassificationData, pad_images
from gradtail.data.longtail import LongTailSplit, build_longtail_split
from gradtail.data.own_csv import read_image_csv
from gradtail.data.own_data import build_own_data
from gradtail.data.own_folders import read_image_folders
from gradtail.data.own_npz import read_npz
from gradtail.errors import ConfigError
from gradtail.registry import Registry

# name -> build(cfg: DataConfig) -> ClassificationData
DATASETS: Registry[Any] = Registry("dataset")

# Standard per-channel statistics (of the full training splits).
NORMALIZATION: dict[str, tuple[list[float], list[float]]] = {
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


def _fashion(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(train=train, data_dir=cfg.data_dir, download=cfg.download)


def _cifar10(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.cifar import load_cifar

    return load_cifar("cifar10", train=train, data_dir=cfg.data_dir, download=cfg.download)


def _cifar100(train: bool, cfg: DataConfig) -> ImageArrays:
    from gradtail.data.cifar import load_cifar

    return load_cifar("cifar100", train=train, data_dir=cfg.data_dir, download=cfg.download)


_SYNTHETIC_KEYS = ("num_classes", "per_class", "test_per_class", "image_size", "channels", "noise", "seed")


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


def build_data(cfg: DataConfig) -> Any:
    """The data bundle of the dataset named in ``cfg`` (see the module docstring)."""
    return DATASETS.get(cfg.dataset)(cfg)


# Settings of own data (gradtail.data.own_data) that a built-in dataset would silently ignore.
_OWN_DATA_SETTINGS: dict[str, Callable[[DataConfig], bool]] = {
    "data.longtail": lambda c: c.longtail.imbalance_factor is not None or c.longtail.profile is not None,
    "data.split_fractions": lambda c: c.split_fractions.val is not None or c.split_fractions.test is not None,
    "data.class_list": lambda c: c.class_list is not None,
    "data.resize": lambda c: c.resize is not None,
    "data.channels": lambda c: c.channels is not None,
    "data.memory_budget_mb": lambda c: c.memory_budget_mb is not None,
}


def reject_own_data_settings(cfg: DataConfig) -> None:
    """A :class:`ConfigError` when a built-in dataset's config sets a key of own data (it would be
    ignored); the built-in datasets are long-tailed by ``data.imbalance_factor`` / ``data.profile``."""
    for key, is_set in _OWN_DATA_SETTINGS.items():
        if is_set(cfg):
            raise ConfigError(
                f"{key} is a setting of own data (image_folder, image_csv, npz), not of {cfg.dataset!r}"
                + (
                    " (its long-tailed subset is data.imbalance_factor / data.profile)"
                    if "longtail" in key
                    else ""
                )
            )


def build_in_memory_data(
    cfg: DataConfig, load: Callable[[bool, DataConfig], ImageArrays]
) -> ClassificationData:
    """Load an in-memory dataset and build the long-tailed training subset, validation and test."""
    reject_own_data_settings(cfg)
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
    return ClassificationData(
        name=cfg.dataset,
        class_names=list(train.class_names),
        train=pad_images(train, cfg.pad_to),
        val=None if val is None else pad_images(val, cfg.pad_to),
        test=pad_images(test, cfg.pad_to),
        split=split,
        mean=list(mean),
        std=list(std),
        augment_cfg=cfg.augment,
        stored_size=(channels, *(int(v) for v in full_train.images.shape[-2:])),
        pad_to=cfg.pad_to,
        # the LDAM-rule subset this bundle holds (subset.json, the report's protocol paragraph)
        source={"imbalance_factor": cfg.imbalance_factor, "profile": cfg.profile,
                "subset_seed": cfg.subset_seed},
    )


def _in_memory(name: str, load: Callable[[bool, DataConfig], ImageArrays]) -> None:
    DATASETS.register(name)(lambda cfg: build_in_memory_data(cfg, load))


def build_image_list_data(cfg: DataConfig) -> ClassificationData:
    """The community split files of ``cfg.dataset`` under ``data.image_root`` / ``data.list_dir``."""
    from gradtail.data.image_list import imagenet_transform, known_splits, load_image_list_split

    reject_own_data_settings(cfg)
    spec = known_splits()[cfg.dataset]
    root = cfg.image_root or cfg.data_dir
    if root is None:
        raise ConfigError(f"dataset {cfg.dataset!r} needs data.image_root (where the list paths start)")

    def split(name: str, train: bool) -> Any:
        tf = imagenet_transform(train, cfg.image_size, color_jitter=cfg.color_jitter if train else 0.0)
        return load_image_list_split(cfg.dataset, name, root, cfg.list_dir, tf, cfg.check_files)

    has_test = "test" in spec.files
    train = split("train", True)
    val = split("val", False) if has_test else None
    counts = [int(n) for n in train.class_counts()]
    if len(counts) < spec.num_classes:
        counts += [0] * (spec.num_classes - len(counts))
    given = LongTailSplit(  # the split files as given: nothing is subsampled here
        train_indices=np.arange(len(train), dtype=np.int64),
        val_indices=np.zeros(0, dtype=np.int64),
        counts=counts,
        val_counts=[] if val is None else [int(n) for n in val.class_counts()],
        sha256=hashlib.sha256(Path(train.list_file).read_bytes()).hexdigest(),  # the training list file
        imbalance_factor=max(counts) / max(min(counts), 1),
        profile="as given by the split files",
        seed=0,
        n_max=max(counts),
    )
    return ClassificationData(
        name=cfg.dataset,
        class_names=[f"class_{i}" for i in range(spec.num_classes)],  # the split files give integers only
        train=train,
        val=val,
        test=split("test" if has_test else "val", False),  # iNaturalist 2018: val is the test set
        split=given,
        storage="lists",
        stored_size=(3, cfg.image_size, cfg.image_size),
        num_workers=cfg.num_workers,
        image_size=cfg.image_size,
        source={"imbalance_factor": given.imbalance_factor, "profile": given.profile,
                "list_files": {"train": str(train.list_file)}},
    )


for _name in ("imagenet_lt", "places_lt", "inat2018"):
    DATASETS.register(_name)(build_image_list_data)

_in_memory("fashion_mnist", _fashion)
_in_memory("cifar10", _cifar10)
_in_memory("cifar100", _cifar100)
_in_memory("synthetic", _synthetic)


DATASETS.register("image_folder")(lambda cfg: build_own_data(cfg, read_image_folders))
DATASETS.register("image_csv")(lambda cfg: build_own_data(cfg, read_image_csv))
DATASETS.register("npz")(lambda cfg: build_own_data(cfg, read_npz))
