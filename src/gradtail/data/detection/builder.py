"""The data of a detection run: the task's config section (:class:`DetectionOptions`), the datasets
(:data:`DETECTION_DATASETS`), the run's bundle (:class:`DetectionData`, a :class:`gradtail.contracts.RunData`)
and its training loader (:class:`DetectionLoader`).

Datasets (``data.dataset``):

- ``fm_detection``: the Fashion-MNIST detection benchmark (:mod:`gradtail.data.detection.fm_benchmark`),
  built (or reused, when its manifest matches) under ``detection.benchmark_root`` from the Fashion-MNIST
  files in ``data.data_dir``; train / val / test annotation files of its own;
- ``coco_files``: LVIS v1 or COCO annotation files (``detection.train_annotations``,
  ``val_annotations``, ``test_annotations``; val optional) and the image folder ``detection.image_root``
  (default ``data.data_dir``). LVIS v1 publishes no test annotations: its recipes name the val file as
  the test split and have no validation split (docs/detection.md).

Class indices are 0..C-1 in the order of the training file's categories (sorted by id); every split's
file must have the same categories. ``class_counts`` are the training *images* that contain each class
(LVIS's ``image_count``, which also sets the rare / common / frequent groups).

Training batches: each epoch's image order comes from the run's sampler (``data.sampler``: ``instance``,
a seeded permutation; ``repeat_factor``, LVIS's repeat-factor sampling; or any class-aware sampler on
each image's rarest class), strided over the processes; images are read and transformed (flip, multi-scale
resize) in the main process, drawing from the checkpointed global RNG, so a resumed run continues
exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from gradtail.data.detection.fm_benchmark import FMDetectionSpec, build_fm_detection
from gradtail.data.detection.lvis import (
    DetectionAnnotations,
    DetectionDataset,
    collate_detection,
    detection_transforms,
    read_detection_json,
)
from gradtail.data.samplers import sampler_from_config
from gradtail.distributed import barrier, is_distributed, is_main_process
from gradtail.errors import ConfigError, DataError
from gradtail.registry import Registry

PROTOCOLS = ("auto", "lvis", "coco")
EVALUATORS = ("auto", "lvis", "faster_coco_eval")  # gradtail.metrics.detection.EVALUATORS


_Built = TypeVar("_Built")
_Annotations = TypeVar("_Annotations", bound=DetectionAnnotations)


@dataclass
class DetectionOptions:
    """The ``detection:`` section of a detection run's config (the task's own typed keys)."""

    # coco_files: the annotation files (LVIS v1 or COCO JSON) and the image folder (default data.data_dir)
    train_annotations: str | None = None
    val_annotations: str | None = None
    test_annotations: str | None = None
    image_root: str | None = None
    # fm_detection: where the benchmark's files are written, and what it is made of
    benchmark_root: str = "data/fm_detection"
    benchmark: FMDetectionSpec = field(default_factory=FMDetectionSpec)
    # training transforms: horizontal flip, multi-scale shortest side (the LVIS recipes' 640-800), cap
    flip: bool = True
    min_size: list[int] | None = None
    max_size: int | None = None
    # evaluation: lvis | coco | auto (lvis when the categories carry LVIS frequencies), detections per image,
    # the LVIS protocol's program: auto (faster_coco_eval where installed) | lvis | faster_coco_eval
    protocol: str = "auto"
    max_dets: int | None = None
    evaluator: str = "auto"
    draw: bool = True  # the run draws a few test images with their boxes at its end (predictions.png)

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"detection.protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.evaluator not in EVALUATORS:
            raise ConfigError(
                f"detection.evaluator must be one of {', '.join(EVALUATORS)}, got {self.evaluator!r}"
            )
        if self.min_size is not None and (not self.min_size or min(self.min_size) < 1):
            raise ConfigError(f"detection.min_size must be positive sizes, got {self.min_size}")


@dataclass
class DetectionEvalSplit:
    """One evaluation split: the dataset (test-time transforms) and its parsed annotations."""

    dataset: DetectionDataset
    annotations: DetectionAnnotations

    def __len__(self) -> int:
        return len(self.dataset)


class DetectionLoader:
    """Training batches ``(images, targets)`` of a detection run (lists, on the device): the sampler's
    order of the epoch for this process (``indices(epoch, rank, world)``), ``batch_size`` images a batch
    (the last one may be smaller), each read and transformed as it is batched (module docstring)."""

    num_views = 0
    images = None

    def __init__(
        self,
        dataset: DetectionDataset,
        sampler: Any,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device,
        rank: int,
        world: int,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.labels = labels
        self.batch_size = int(batch_size)
        self.device = device
        self.rank, self.world = rank, world
        self.epoch = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """This process's image indices of the current epoch (cached per epoch)."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.sampler.indices(self.epoch, self.rank, self.world))
        return self._order[1]

    def __len__(self) -> int:
        return math.ceil(len(self.order()) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        order = self.order().tolist()
        for b in range(0, len(order), self.batch_size):
            images, targets = collate_detection([self.dataset[i] for i in order[b : b + self.batch_size]])
            if self.device.type != "cpu":
                images = [im.to(self.device, non_blocking=True) for im in images]
                targets = [
                    {
                        k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                        for k, v in t.items()
                    }
                    for t in targets
                ]
            yield images, targets


@dataclass
class DetectionData:
    """The data of a detection run (:class:`gradtail.contracts.RunData`; module docstring)."""

    name: str
    train: DetectionAnnotations
    splits: dict[str, DetectionAnnotations]  # val (optional) and test
    image_root: Path
    digest: str
    options: DetectionOptions
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def class_counts(self) -> list[int]:
        return [int(v) for v in self.train.image_counts()]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def sha256(self) -> str:
        return self.digest

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.train.categories]

    @property
    def category_ids(self) -> list[int]:
        return self.train.category_ids

    @property
    def train_labels(self) -> torch.Tensor:
        """Each training image's rarest class (by ``class_counts``; 0 for an image without objects): the
        labels of the class-aware samplers."""
        counts = np.asarray(self.class_counts, dtype=np.float64)
        labels = [min(c, key=lambda k: (counts[k], k)) if c else 0 for c in self.train.image_categories()]
        return torch.tensor(labels, dtype=torch.long)

    def frequencies(self) -> list[str]:
        """Each class's LVIS group (r / c / f) from the training file."""
        return self.train.frequencies()

    def preprocessing(self) -> dict[str, Any]:
        """What ``gradtail predict`` needs to read new images and name the results: RGB images as they are
        (the detector resizes and normalises inside), the dataset's category ids and names."""
        return {
            "transform": "detection",
            "mode": "RGB",
            "category_ids": self.category_ids,
            "class_names": self.class_names,
            "frequencies": self.frequencies(),
        }

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError("detection images are read from files per batch; no stored images to normalise")

    def _dataset(self, ann: DetectionAnnotations, transforms: Callable[..., Any]) -> DetectionDataset:
        """The (image, target) pairs of one split's annotations (images under ``image_root``)."""
        return DetectionDataset(ann, self.image_root, transforms)

    def train_loader(self, cfg: Any, device: torch.device, rank: int, world: int) -> DetectionLoader:
        o = self.options
        flip = 0.5 if o.flip else 0.0
        dataset = self._dataset(self.train, detection_transforms(True, o.min_size, o.max_size, flip))
        labels = self.train_labels
        by_images = self.train.image_categories() if cfg.data.sampler == "repeat_factor" else labels
        sampler = sampler_from_config(cfg, by_images, self.num_classes)
        return DetectionLoader(dataset, sampler, labels, cfg.optim.batch_size, device, rank, world)

    def eval_loader(self, split: str, cfg: Any, device: torch.device) -> DetectionEvalSplit:
        if split not in self.splits:
            raise ConfigError(f"this run has no {split} split")
        ann = self.splits[split]
        return DetectionEvalSplit(self._dataset(ann, detection_transforms(False)), ann)

    def describe(self) -> dict[str, Any]:
        """What ``subset.json`` records: the annotation files, the images of each split, the training
        images per class and each class's frequency group, the data hash."""
        return {
            "dataset": self.name,
            "counts": self.class_counts,
            "count_unit": "training images that contain the class",
            "instances": [int(v) for v in self.train.instance_counts()],
            "frequencies": self.frequencies(),
            "class_names": self.class_names,
            "train_images": len(self.train.images),
            **{f"{s}_images": len(a.images) for s, a in self.splits.items()},
            "annotation_files": {
                "train": str(self.train.path),
                **{s: str(a.path) for s, a in self.splits.items()},
            },
            "image_root": str(self.image_root),
            "sha256": self.sha256,
            **self.source,
        }


def same_categories(split: DetectionAnnotations, train: DetectionAnnotations) -> None:
    """A split's annotation file has the training file's categories (one line naming both otherwise)."""
    if split.category_ids != train.category_ids:
        raise DataError(f"{split.path}: its categories differ from those of {train.path}")


def rank_zero_first(build: Callable[[], _Built]) -> _Built:
    """``build()`` (a benchmark built or reused), on rank 0 first under ``torchrun``: the others wait for it,
    then find its files intact and read them."""
    if is_distributed() and not is_main_process():
        barrier()
    built = build()
    if is_distributed() and is_main_process():
        barrier()
    return built


def read_splits(
    options: DetectionOptions, read: Callable[[str], _Annotations]
) -> tuple[_Annotations, dict[str, _Annotations]]:
    """The training annotations and the val (when given) and test annotations of ``options``' files, each
    read by ``read`` and checked to have the training file's categories."""
    assert options.train_annotations is not None  # the builders require it first, naming the section
    train = read(options.train_annotations)
    splits = {}
    for split, path in (("val", options.val_annotations), ("test", options.test_annotations)):
        if path is not None:
            splits[split] = read(path)
            same_categories(splits[split], train)
    return train, splits


def file_digest(path: str) -> str:
    """The SHA-256 of a file (the data hash of ``coco_files``: the training annotation file's)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_fm_benchmark(cfg: Any, options: DetectionOptions) -> DetectionData:
    """``fm_detection``: the benchmark under ``detection.benchmark_root`` (rank 0 builds it first under
    ``torchrun``, the others then read it)."""
    options.check()
    fm = rank_zero_first(lambda: build_fm_detection(options.benchmark_root, options.benchmark, cfg.data_dir))
    train = read_detection_json(fm.annotation_file("train"))
    splits = {s: read_detection_json(fm.annotation_file(s)) for s in ("val", "test")}
    return DetectionData("fm_detection", train, splits, fm.image_root, fm.sha256, options,
                         {"benchmark_root": str(fm.root)})  # fmt: skip


def build_coco_files(cfg: Any, options: DetectionOptions) -> DetectionData:
    """``coco_files``: LVIS / COCO annotation files and an image folder (module docstring); the data hash
    is the SHA-256 of the training annotation file."""
    options.check()
    root = options.image_root or cfg.data_dir
    if options.train_annotations is None or options.test_annotations is None or root is None:
        raise ConfigError(
            "dataset 'coco_files' needs detection.train_annotations, detection.test_annotations and "
            "detection.image_root (or data.data_dir)"
        )
    train, splits = read_splits(options, read_detection_json)
    digest = file_digest(options.train_annotations)
    return DetectionData("coco_files", train, splits, Path(root), digest, options)


#: The detection datasets (``data.dataset`` of a detection run): ``build(data_cfg, options)``.
DETECTION_DATASETS: Registry[DetectionData] = Registry("detection dataset")
DETECTION_DATASETS.register("fm_detection")(build_fm_benchmark)
DETECTION_DATASETS.register("coco_files")(build_coco_files)


__all__ = [
    "DETECTION_DATASETS",
    "DetectionData",
    "DetectionEvalSplit",
    "DetectionLoader",
    "DetectionOptions",
    "build_coco_files",
    "build_fm_benchmark",
    "file_digest",
    "rank_zero_first",
    "read_splits",
    "same_categories",
]
