"""The data of an instance segmentation run (docs/instance.md §3; the spec: ``instance.md`` §3): LVIS v1 /
COCO annotation files with masks, the task's config section (:class:`InstanceOptions`), the datasets
(:data:`INSTANCE_DATASETS`) and the run's bundle (:class:`InstanceData`).

- :func:`read_instance_json`: :func:`~gradtail.data.detection.lvis.read_detection_json` (boxes, categories,
  LVIS's federated lists, one-line errors) plus every annotation's ``segmentation`` (polygons, uncompressed
  or compressed RLE; :mod:`gradtail.data.detection.masks`), checked when the file is read; an annotation
  without one is an error naming the file and the entry.
- :class:`InstanceDataset`: the detection dataset whose targets add ``masks``, a
  ``tv_tensors.Mask`` (k, H, W) uint8 decoded with pycocotools when the image is loaded, in the order of
  the boxes (crowd regions excluded from the targets, as their boxes are), so torchvision's v2 transforms
  (resize, flip, ``SanitizeBoundingBoxes``) move and drop them with the boxes.
- Datasets (``data.dataset``): ``fm_instance``, the Fashion-MNIST instance benchmark
  (:mod:`gradtail.data.detection.fm_instance`, built or reused under
  ``instance_segmentation.benchmark_root``), and ``coco_files``: LVIS v1 / COCO instance files
  (``train_annotations``, ``val_annotations``, ``test_annotations``, ``image_root``). Every image file a
  split names is checked to exist when the data is built (a missing one is one line naming it; an
  unreadable one is named when it is read).
- ``class_counts`` are the training images that contain each class (LVIS's ``image_count``);
  :meth:`InstanceData.federated_counts` gives the federated loss the file's own ``image_count`` when every
  category declares one, else these counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.data.detection.builder import (
    DetectionData,
    DetectionOptions,
    file_digest,
    rank_zero_first,
    read_splits,
)
from gradtail.data.detection.fm_instance import FMInstanceSpec, build_fm_instance
from gradtail.data.detection.lvis import (
    DetectionAnnotations,
    DetectionDataset,
    read_detection_json,
)
from gradtail.data.detection.masks import SEGMENTATION_FIELD, check_segmentation, decode_segmentation
from gradtail.errors import ConfigError, DataError
from gradtail.registry import Registry


@dataclass
class InstanceAnnotations(DetectionAnnotations):
    """A parsed instance annotation file: the detection annotations plus, per image id, the
    ``(annotation id, segmentation)`` of each training target, in the order of its boxes."""

    segmentations: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)

    def declared_image_counts(self) -> list[int] | None:
        """The categories' ``image_count`` (LVIS v1 files carry it), in class order; None when a category
        lacks it."""
        by_id = {c["id"]: c for c in self.raw["categories"] if isinstance(c, dict)}
        counts = [by_id[cid].get("image_count") for cid in self.category_ids]
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts):
            return None
        return [int(n) for n in counts]


def read_instance_json(path: str | Path, box_tolerance: float = 1.0) -> InstanceAnnotations:
    """Parse and validate an LVIS- / COCO-format instance segmentation file (module docstring).

    Example:
        >>> import json, tempfile, pathlib
        >>> doc = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
        ...        "categories": [{"id": 7, "name": "shirt", "frequency": "r"}],
        ...        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 1, 5, 4],
        ...                         "segmentation": [[2, 1, 7, 1, 7, 5, 2, 5]]}]}
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ann.json"
        >>> _ = p.write_text(json.dumps(doc))
        >>> ann = read_instance_json(p)
        >>> [aid for aid, _ in ann.segmentations[1]]
        [1]
        >>> del doc["annotations"][0]["segmentation"]
        >>> _ = p.write_text(json.dumps(doc))
        >>> read_instance_json(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        gradtail.errors.DataError: ...ann.json: annotations[0] (id 1): missing field 'segmentation' (...)
    """
    det = read_detection_json(path, box_tolerance)
    sizes = {im.id: (im.height, im.width) for im in det.images}
    segs: dict[int, list[tuple[int, Any]]] = {im.id: [] for im in det.images}
    for i, a in enumerate(det.raw["annotations"]):
        where = f"annotations[{i}] (id {a['id']})"
        if SEGMENTATION_FIELD not in a:
            raise DataError(f"{det.path}: {where}: missing field 'segmentation' (instance segmentation needs "
                            "a mask for every object)")  # fmt: skip
        h, w = sizes[a["image_id"]]
        problem = check_segmentation(a[SEGMENTATION_FIELD], h, w)
        if problem is not None:
            raise DataError(f"{det.path}: {where}: {problem}")
        if not a.get("iscrowd", 0):
            segs[a["image_id"]].append((int(a["id"]), a[SEGMENTATION_FIELD]))
    values = {f.name: getattr(det, f.name) for f in fields(DetectionAnnotations)}
    return InstanceAnnotations(**values, segmentations=segs)


class InstanceDataset(DetectionDataset):
    """(image, target) pairs whose targets add ``masks`` (module docstring)."""

    annotations: InstanceAnnotations

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        image, target = super().load(index)
        img = self.annotations.images[index]
        masks = np.zeros((len(img.labels), img.height, img.width), dtype=np.uint8)
        for k, (aid, seg) in enumerate(self.annotations.segmentations.get(img.id, [])):
            try:
                masks[k] = decode_segmentation(seg, img.height, img.width)
            except ValueError as e:
                where = f"annotation id {aid} (image {img.id})"
                raise DataError(f"{self.annotations.path}: {where}: {e}") from None
        target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return image, target


@dataclass
class InstanceOptions(DetectionOptions):
    """The ``instance_segmentation:`` section of a run's config: the detection task's keys
    (:class:`~gradtail.data.detection.builder.DetectionOptions`: annotation files, transforms, protocol,
    ``draw``) with the instance benchmark, and the threshold that binarises predicted masks."""

    benchmark_root: str = "data/fm_instance"
    benchmark: FMInstanceSpec = field(default_factory=FMInstanceSpec)  # type: ignore[assignment]
    mask_threshold: float = 0.5  # predicted mask probability -> binary mask (instance.md §1)

    def check(self) -> None:
        super().check()
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(
                f"instance_segmentation.mask_threshold must be in (0, 1), got {self.mask_threshold}"
            )


@dataclass
class InstanceData(DetectionData):
    """The data of an instance segmentation run: :class:`~gradtail.data.detection.builder.DetectionData`
    whose datasets carry masks (module docstring)."""

    train: InstanceAnnotations
    splits: dict[str, InstanceAnnotations]  # type: ignore[assignment]

    def federated_counts(self) -> list[int]:
        """The federated loss's class counts: the training file's ``image_count`` when every category
        declares one (LVIS v1), else the counted training images per class."""
        declared = self.train.declared_image_counts()
        return declared if declared is not None else self.class_counts

    def _dataset(self, ann: InstanceAnnotations, transforms: Callable[..., Any]) -> InstanceDataset:
        return InstanceDataset(ann, self.image_root, transforms)


def _check_images(ann: DetectionAnnotations, root: Path) -> None:
    """Every image file of ``ann`` exists under ``root`` (one line naming the first missing one)."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (annotations {ann.path})")
    missing = [im.file_name for im in ann.images if not (root / im.file_name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{root / missing[0]}: image file not found (named in {ann.path}){more}")


def build_fm_instance_data(cfg: Any, options: InstanceOptions) -> InstanceData:
    """``fm_instance``: the benchmark under ``instance_segmentation.benchmark_root`` (rank 0 builds it first
    under ``torchrun``, the others then read it)."""
    options.check()
    fm = rank_zero_first(lambda: build_fm_instance(options.benchmark_root, options.benchmark, cfg.data_dir))
    train = read_instance_json(fm.annotation_file("train"))
    splits = {s: read_instance_json(fm.annotation_file(s)) for s in ("val", "test")}
    for ann in (train, *splits.values()):
        _check_images(ann, fm.image_root)
    return InstanceData("fm_instance", train, splits, fm.image_root, fm.sha256, options,  # type: ignore[arg-type]
                        {"benchmark_root": str(fm.root)})  # fmt: skip


def build_instance_files(cfg: Any, options: InstanceOptions) -> InstanceData:
    """``coco_files``: LVIS / COCO instance annotation files and an image folder (module docstring); the
    data hash is the SHA-256 of the training annotation file."""
    options.check()
    root = options.image_root or cfg.data_dir
    if options.train_annotations is None or options.test_annotations is None or root is None:
        raise ConfigError(
            "dataset 'coco_files' needs instance_segmentation.train_annotations, test_annotations and "
            "image_root (or data.data_dir)"
        )
    train, splits = read_splits(options, read_instance_json)
    for ann in (train, *splits.values()):
        _check_images(ann, Path(root))
    digest = file_digest(options.train_annotations)
    return InstanceData("coco_files", train, splits, Path(root), digest, options)  # type: ignore[arg-type]


#: The instance segmentation datasets (``data.dataset`` of an instance run): ``build(data_cfg, options)``.
INSTANCE_DATASETS: Registry[InstanceData] = Registry("instance segmentation dataset")
INSTANCE_DATASETS.register("fm_instance")(build_fm_instance_data)
INSTANCE_DATASETS.register("coco_files")(build_instance_files)


__all__ = [
    "INSTANCE_DATASETS",
    "InstanceAnnotations",
    "InstanceData",
    "InstanceDataset",
    "InstanceOptions",
    "build_fm_instance_data",
    "build_instance_files",
    "read_instance_json",
]
