"""The data of a classification run, whatever its storage: :class:`ClassificationData` (the one bundle
type of the classification task), and the loaders it hands out.

Three storages, one bundle:

- ``memory``: uint8 :class:`~gradtail.data.base.ImageArrays` of train / val / test (Fashion-MNIST, CIFAR,
  synthetic, own data that fits ``data.memory_budget_mb``): batches from
  :class:`~gradtail.data.loader.BatchLoader`, augmented as whole batches on the device;
- ``files``: own data kept in its image files, decoded by worker processes
  (:class:`~gradtail.data.image_list.ImageListLoader`) and augmented on the device as in memory
  (:class:`FileBatchLoader`): the same batches for the same sampler order;
- ``lists``: the community's split files (ImageNet-LT, Places-LT, iNaturalist 2018), decoded and
  transformed by workers (torchvision's ImageNet transforms).

Counts and the subset hash come from the run's :class:`~gradtail.data.longtail.LongTailSplit` (for lists:
the split files as given, hashed by the training list file). The dataset builders
(:mod:`gradtail.data.builder`, :mod:`gradtail.data.own_data`) make the bundles; this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gradtail.config import RunConfig
from gradtail.data.base import ImageArrays
from gradtail.data.loader import BatchAugment, BatchLoader, epoch_seed
from gradtail.data.longtail import LongTailSplit
from gradtail.data.samplers import sampler_from_config
from gradtail.distributed import rank, world_size
from gradtail.errors import ConfigError, DataError

STORAGES = ("memory", "files", "lists")


@dataclass
class ClassificationData:
    """The data of a classification run (:class:`gradtail.contracts.RunData`; module docstring).

    ``train`` / ``val`` / ``test``: :class:`ImageArrays` (``memory``), own image-file datasets
    (``files``) or image-list datasets (``lists``); ``split``: counts, validation counts and the hash;
    ``mean`` / ``std``: the normalisation (``memory`` / ``files``; lists normalise in their transform);
    ``stored_size``: (C, H, W) of the stored images before padding; ``source``: what ``subset.json``
    records besides counts and hash (how the subset was made, where the data came from).
    """

    name: str
    class_names: list[str]
    train: Any
    val: Any | None
    test: Any
    split: LongTailSplit
    storage: str = "memory"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augment_cfg: Any = None
    stored_size: tuple[int, int, int] = (1, 28, 28)
    pad_to: int | None = None
    resize_to_size: bool = False  # own data: images of another size are resized (data.resize)
    num_workers: int = 0
    image_size: int = 224  # lists: the test-time centre crop
    source: dict[str, Any] = field(default_factory=dict)
    _augment: BatchAugment | None = field(default=None, repr=False)
    _eval: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")

    # ------------------------------------------------------------------ what the run reads
    @property
    def class_counts(self) -> list[int]:
        return list(self.split.counts)

    @property
    def sha256(self) -> str:
        return self.split.sha256

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.stored_size[0])

    @property
    def train_labels(self) -> torch.Tensor:
        labels = self.train.labels
        return labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, dtype=torch.long)

    def has_split(self, split: str) -> bool:
        return (self.val if split == "val" else self.test) is not None

    def preprocessing(self) -> dict[str, Any]:
        """The test-time input pipeline (:meth:`gradtail.contracts.RunData.preprocessing`)."""
        if self.storage == "lists":
            from gradtail.data.image_list import IMAGENET_MEAN, IMAGENET_STD

            return {
                "transform": "imagenet",
                "mode": "RGB",
                "image_size": self.image_size,
                "resize": round(self.image_size * 256 / 224),
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            }
        return in_memory_preprocessing(
            self.stored_size, self.resize_to_size, self.pad_to, self.mean, self.std
        )

    @property
    def augment(self) -> BatchAugment:
        """The whole-batch training transform (device-augmented storages)."""
        if self.storage == "lists":
            raise ConfigError(f"{self.name} is transformed by its loader's workers, not on the device")
        if self._augment is None:
            self._augment = build_batch_augment(self.augment_cfg, self.mean, self.std)
        return self._augment

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Stored uint8 images -> model input without augmentation (GBG's grouping pass)."""
        if self.storage == "lists":
            raise ConfigError(
                f"{self.name} is decoded from files by workers: methods that re-read the raw training images "
                "(GBG's grouping pass) need an in-memory dataset"
            )
        return self.augment.normalize(x)

    def view_augment(self) -> tuple[Any, int]:
        """(view transform, views per image) for contrastive terms; (None, 0) when ``augment.views`` is 0."""
        return build_view_augment(self.augment_cfg)

    # ------------------------------------------------------------------ loaders
    def train_loader(self, cfg: RunConfig, device: torch.device, rank: int, world: int) -> Any:
        """This process's training batches; the sampler is the config's (:func:`sampler_from_config`)."""
        from gradtail.data.image_list import ImageListLoader

        sampler = sampler_from_config(cfg, self.train_labels, self.num_classes)
        o, t = cfg.optim, cfg.train
        if self.storage == "memory":
            views, num_views = self.view_augment()
            return BatchLoader(
                self.train.images, self.train.labels, o.batch_size, self.augment, sampler=sampler, train=True,
                drop_last=o.drop_last, seed=t.seed, device=device, channels_last=t.channels_last, rank=rank,
                world_size=world, views=views, num_views=num_views,
            )  # fmt: skip
        if cfg.data.augment.views and self.storage == "lists":
            raise ConfigError(
                "data.augment.views (contrastive views, e.g. for the BCL term) needs an in-memory dataset "
                f"(fashion_mnist, cifar10/100, synthetic); {self.name} streams images from list files"
            )
        files = ImageListLoader(
            self.train, o.batch_size, sampler=sampler, train=self.storage == "lists", drop_last=o.drop_last,
            seed=t.seed, device=device, num_workers=self.num_workers,
            channels_last=t.channels_last and self.storage == "lists", rank=rank, world_size=world,
        )  # fmt: skip  (files: the workers only decode; augmentation runs on the device)
        if self.storage == "lists":
            return files
        views, num_views = self.view_augment()
        return FileBatchLoader(files, self.augment, train=True, seed=t.seed, rank=rank,
                               channels_last=t.channels_last, views=views, num_views=num_views)  # fmt: skip

    def eval_loader(self, split: str, cfg: RunConfig, device: torch.device) -> Any:
        """This process's shard of a split (:func:`gradtail.distributed.shard`: every ``world``-th image
        from its rank; the whole split in one process), in batches of ``eval.batch_size``, in order;
        file-backed loaders are built once and reused (their workers persist across evaluations)."""
        from gradtail.data.image_list import ImageListLoader

        data = self.val if split == "val" else self.test
        if data is None:
            raise ConfigError(f"this run has no {split} split")
        r, w = rank(), world_size()
        if self.storage == "memory":
            return BatchLoader(
                data.images[r::w], data.labels[r::w], cfg.eval.batch_size, self.augment, sampler=None,
                train=False, device=device, channels_last=cfg.train.channels_last,
            )  # fmt: skip
        if split not in self._eval:
            lists = self.storage == "lists"
            files = ImageListLoader(data, cfg.eval.batch_size, train=False, device=device,
                                    num_workers=self.num_workers, rank=r, world_size=w,
                                    channels_last=cfg.train.channels_last and lists)  # fmt: skip
            self._eval[split] = files if lists else FileBatchLoader(
                files, self.augment, train=False, channels_last=cfg.train.channels_last
            )
        return self._eval[split]

    def close(self) -> None:
        """Stop the decoding workers of the evaluation loaders now (the next evaluation starts new ones)."""
        for loader in self._eval.values():
            loader.close()
        self._eval.clear()

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


def _one_line(error: DataError) -> str:
    """The message of a :class:`DataError` raised in a loader worker (PyTorch re-raises it with the
    worker's traceback in the message): its last line, without the exception's name."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(error)
    last = lines[-1]
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return last.split(prefix, 1)[1] if prefix in last else last


class FileBatchLoader:
    """Batches of image files decoded by worker processes
    (:class:`~gradtail.data.image_list.ImageListLoader`) and augmented on the device as
    :class:`~gradtail.data.loader.BatchLoader` augments in-memory images: the same generator (seeded by
    ``(seed, epoch, rank)``), the same transform, so the same batches for the same sampler order.
    ``images`` is None (nothing is held in memory)."""

    images: None = None

    def __init__(
        self,
        files: Any,
        augment: BatchAugment,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        channels_last: bool = False,
        views: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        num_views: int = 0,
    ) -> None:
        self.files = files
        self.augment = augment
        self.train = train
        self.seed = seed
        self.rank = rank
        self.channels_last = channels_last
        self.views = views
        self.num_views = int(num_views) if train else 0
        self.epoch = 0

    @property
    def labels(self) -> torch.Tensor:
        return self.files.labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.files.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def close(self) -> None:
        """Stop the decoding workers now."""
        self.files.close()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = None
        if self.train:
            gen = torch.Generator(device=self.files.device)
            gen.manual_seed(epoch_seed(self.seed, self.epoch, stream=1 + self.rank))
        try:
            for raw, y in self.files:
                x = self._layout(self.augment(raw, gen) if self.train else self.augment.normalize(raw))
                if self.num_views == 0:
                    yield x, y
                    continue
                assert self.views is not None
                v = torch.cat([self.augment.normalize(self.views(raw, gen)) for _ in range(self.num_views)])
                yield x, y, self._layout(v)
        except DataError as e:
            raise DataError(_one_line(e)) from None


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
