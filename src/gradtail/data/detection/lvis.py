"""LVIS v1 / COCO-format detection data: annotation JSON + an image folder (docs/detection.md §Data).

:func:`read_detection_json` parses and validates an annotation file (COCO: ``images``, ``annotations``,
``categories``; LVIS adds the categories' ``frequency`` r / c / f and the images' ``neg_category_ids`` /
``not_exhaustive_category_ids``), with one-line :class:`~gradtail.errors.DataError` messages that name the
file and the entry (``annotations[12] (id 40)``) for a missing field, a box outside its image, an unknown
category or image id, a duplicate id. :class:`DetectionDataset` serves (image, target) pairs for
torchvision's detectors, through :func:`detection_transforms` (torchvision.transforms.v2 with
``tv_tensors.BoundingBoxes``: resize and horizontal flip move the boxes with the image).

Conventions:

- Class indices are contiguous 0..C-1 in the order of the categories sorted by id; torchvision's two-stage
  detectors reserve label 0 for the background, so the detector adapters add 1 (``gradtail.detection``).
- Crowd boxes (``iscrowd: 1``, COCO only) are not training targets (torchvision's detectors have no
  ignore regions); they stay in the evaluation ground truth, where pycocotools treats them as ignore
  regions. LVIS has no crowd boxes.
- Empty images (no annotation) are kept: they train the background and count in the repeat-factor
  sampler's denominator.
- A box may touch the image border; it may exceed it by at most ``box_tolerance`` pixels (1 by default:
  COCO's and LVIS's rounding); w and h must be > 0.
- LVIS v1 images carry ``coco_url`` instead of ``file_name``: the file is the URL's last component.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.errors import DataError

FREQUENCIES = ("r", "c", "f")
# LVIS's groups by the number of training images that contain the category (docs/methods/eql.md §9)
RARE_MAX_IMAGES, COMMON_MAX_IMAGES = 10, 100


def frequency_from_image_count(count: int) -> str:
    """LVIS's group of a category seen in ``count`` training images: r (1-10), c (11-100), f (> 100).

    Example:
        >>> from gradtail.data.detection.lvis import frequency_from_image_count
        >>> [frequency_from_image_count(n) for n in (1, 10, 11, 100, 101)]
        ['r', 'r', 'c', 'c', 'f']
    """
    if count <= RARE_MAX_IMAGES:
        return "r"
    return "c" if count <= COMMON_MAX_IMAGES else "f"


@dataclass(frozen=True)
class DetectionCategory:
    """One category: its dataset id, name, LVIS frequency group (``None`` when the file has none)."""

    id: int
    name: str
    frequency: str | None


@dataclass
class DetectionImage:
    """One image and its training targets (crowd boxes excluded; see the module docstring)."""

    id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (k, 4) float32, x1 y1 x2 y2 in pixels
    labels: np.ndarray  # (k,) int64 contiguous class indices
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    neg_category_ids: tuple[int, ...] = ()
    not_exhaustive_category_ids: tuple[int, ...] = ()


@dataclass
class DetectionAnnotations:
    """A parsed annotation file: categories (sorted by id), images, and the raw dict (for evaluators)."""

    path: Path
    categories: list[DetectionCategory]
    images: list[DetectionImage]
    raw: dict[str, Any]
    is_lvis: bool

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def category_ids(self) -> list[int]:
        """Dataset category id of each contiguous class index."""
        return [c.id for c in self.categories]

    def image_categories(self) -> list[list[int]]:
        """Per image, the class indices it contains (for the repeat-factor sampler)."""
        return [sorted({int(v) for v in img.labels}) for img in self.images]

    def image_counts(self) -> np.ndarray:
        """(C,) number of images that contain each class (LVIS's ``image_count``)."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for cats in self.image_categories():
            counts[cats] += 1
        return counts

    def instance_counts(self) -> np.ndarray:
        """(C,) number of (non-crowd) boxes of each class."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for img in self.images:
            np.add.at(counts, img.labels, 1)
        return counts

    def frequencies(self) -> list[str]:
        """Each class's group r / c / f: the file's ``frequency``, else from this file's image counts."""
        counts = self.image_counts()
        return [
            c.frequency or frequency_from_image_count(int(n))
            for c, n in zip(self.categories, counts, strict=True)
        ]


def _fail(path: Path, where: str, problem: str) -> DataError:
    return DataError(f"{path}: {where}: {problem}")


def _field(entry: Mapping[str, Any], key: str, path: Path, where: str) -> Any:
    if key not in entry:
        raise _fail(path, where, f"missing field {key!r}")
    return entry[key]


def _int(value: Any, path: Path, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, where, f"{key!r} must be an integer, got {value!r}")
    return value


def _id_list(entry: Mapping[str, Any], key: str, known: set[int], path: Path, where: str) -> tuple[int, ...]:
    values = entry.get(key, [])
    if not isinstance(values, list):
        raise _fail(path, where, f"{key!r} must be a list of category ids, got {type(values).__name__}")
    for v in values:
        if _int(v, path, where, key) not in known:
            raise _fail(path, where, f"{key!r} names unknown category id {v}")
    return tuple(values)


def _entries(
    data: dict[str, Any], key: str, noun: str, path: Path
) -> Iterator[tuple[str, dict[str, Any], int]]:
    """``(where, entry, id)`` of every entry of the top-level list ``key`` (``where``: ``key[i] (id n)``,
    how errors name it), in file order; an entry that is no object, lacks an integer ``id`` or repeats
    one is a one-line error naming it (a duplicate as a duplicate ``noun`` id)."""
    seen: set[int] = set()
    for i, entry in enumerate(data[key]):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, "must be an object")
        eid = _int(_field(entry, "id", path, where), path, where, "id")
        where = f"{key}[{i}] (id {eid})"
        if eid in seen:
            raise _fail(path, where, f"duplicate {noun} id")
        seen.add(eid)
        yield where, entry, eid


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the annotation file ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list top-level field {key!r}")
    return data


def read_detection_json(path: str | Path, box_tolerance: float = 1.0) -> DetectionAnnotations:
    """Parse and validate a COCO- or LVIS-format annotation file (module docstring for the conventions).

    Example:
        >>> import json, tempfile, pathlib
        >>> from gradtail.data.detection.lvis import read_detection_json
        >>> doc = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
        ...        "categories": [{"id": 7, "name": "shirt", "frequency": "r"}],
        ...        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 1, 5, 4]}]}
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "ann.json"
        >>> _ = p.write_text(json.dumps(doc))
        >>> ann = read_detection_json(p)
        >>> ann.images[0].boxes.tolist(), ann.images[0].labels.tolist(), ann.frequencies()
        ([[2.0, 1.0, 7.0, 5.0]], [0], ['r'])
        >>> doc["annotations"][0]["bbox"] = [2, 1, 50, 4]
        >>> _ = p.write_text(json.dumps(doc))
        >>> read_detection_json(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        gradtail.errors.DataError: ...ann.json: annotations[0] (id 1): box [2, 1, 50, 4] (x, y, w, h) lies...
    """
    path = Path(path)
    data = _load_json(path)
    # categories
    cats: list[DetectionCategory] = []
    for where, c, cid in _entries(data, "categories", "category", path):
        freq = c.get("frequency")
        if freq is not None and freq not in FREQUENCIES:
            raise _fail(path, where, f"frequency must be one of r, c, f, got {freq!r}")
        cats.append(DetectionCategory(cid, str(c.get("name", cid)), freq))
    if not cats:
        raise DataError(f"{path}: no categories")
    cats.sort(key=lambda c: c.id)
    index = {c.id: k for k, c in enumerate(cats)}
    known = set(index)  # the category ids the images' federated lists may name
    # images
    images: dict[int, DetectionImage] = {}
    for where, im, iid in _entries(data, "images", "image", path):
        w = _int(_field(im, "width", path, where), path, where, "width")
        h = _int(_field(im, "height", path, where), path, where, "height")
        if w < 1 or h < 1:
            raise _fail(path, where, f"width and height must be >= 1, got {w} x {h}")
        name = im.get("file_name")
        if name is None:
            url = im.get("coco_url")
            if not isinstance(url, str):
                raise _fail(path, where, "missing field 'file_name' (or LVIS's 'coco_url')")
            name = url.rsplit("/", 1)[-1]
        images[iid] = DetectionImage(
            id=iid,
            file_name=str(name),
            width=w,
            height=h,
            boxes=np.zeros((0, 4), np.float32),
            labels=np.zeros(0, np.int64),
            neg_category_ids=_id_list(im, "neg_category_ids", known, path, where),
            not_exhaustive_category_ids=_id_list(im, "not_exhaustive_category_ids", known, path, where),
        )
    # annotations
    boxes: dict[int, list[list[float]]] = {k: [] for k in images}
    labels: dict[int, list[int]] = {k: [] for k in images}
    crowd: dict[int, list[list[float]]] = {k: [] for k in images}
    for where, a, _ in _entries(data, "annotations", "annotation", path):
        iid = _int(_field(a, "image_id", path, where), path, where, "image_id")
        if iid not in images:
            raise _fail(path, where, f"unknown image id {iid}")
        cid = _int(_field(a, "category_id", path, where), path, where, "category_id")
        if cid not in index:
            raise _fail(path, where, f"unknown category id {cid}")
        bbox = _field(a, "bbox", path, where)
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)
        ):
            raise _fail(path, where, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, bw, bh = (float(v) for v in bbox)
        img = images[iid]
        if bw <= 0 or bh <= 0:
            raise _fail(path, where, f"box {bbox} has a non-positive width or height")
        tol = box_tolerance
        if x < -tol or y < -tol or x + bw > img.width + tol or y + bh > img.height + tol:
            raise _fail(
                path, where, f"box {bbox} (x, y, w, h) lies outside image {iid} ({img.width} x {img.height})"
            )
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + bw, float(img.width)), min(y + bh, float(img.height))
        if a.get("iscrowd", 0):
            crowd[iid].append([x1, y1, x2, y2])
        else:
            boxes[iid].append([x1, y1, x2, y2])
            labels[iid].append(index[cid])
    for iid, img in images.items():
        if boxes[iid]:
            img.boxes = np.asarray(boxes[iid], np.float32)
            img.labels = np.asarray(labels[iid], np.int64)
        if crowd[iid]:
            img.crowd_boxes = np.asarray(crowd[iid], np.float32)
    is_lvis = all(c.frequency is not None for c in cats)
    return DetectionAnnotations(path, cats, list(images.values()), data, is_lvis)


def detection_transforms(
    train: bool,
    min_size: int | Sequence[int] | None = None,
    max_size: int | None = None,
    flip_prob: float = 0.5,
) -> Callable[..., Any]:
    """torchvision.transforms.v2 pipeline on (image, target) with ``tv_tensors.BoundingBoxes``.

    ``min_size``: shortest side after resizing (a sequence: one picked at random per training image, the
    LVIS recipes' 640-800 multi-scale); ``None``: keep the size. ``max_size`` caps the longest side.
    Training adds a horizontal flip with probability ``flip_prob``. Boxes follow the image; boxes that
    become degenerate are removed (``SanitizeBoundingBoxes``). Output: a float image in [0, 1].
    """
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage()]
    if min_size is not None:
        sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        if train and len(sizes) > 1:
            steps.append(v2.RandomShortestSize(min_size=sizes, max_size=max_size))
        else:
            steps.append(v2.Resize(sizes[0], max_size=max_size))
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


class DetectionDataset(torch.utils.data.Dataset):
    """(image, target) pairs of an annotation file and its image folder, for torchvision's detectors.

    ``target`` = ``{"boxes": BoundingBoxes (k, 4) XYXY, "labels": int64 (k,) contiguous class indices,
    "image_id": int}``. Images are read with Pillow (PNG / JPEG / ...), as RGB.
    """

    def __init__(
        self, annotations: DetectionAnnotations, image_root: str | Path, transforms: Callable[..., Any] | None
    ) -> None:
        self.annotations = annotations
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image folder not found (annotations {annotations.path})")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.annotations.images)

    def load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The untransformed image (uint8 3 x H x W) and target of image ``index``."""
        from PIL import Image, UnidentifiedImageError
        from torchvision import tv_tensors
        from torchvision.transforms.v2.functional import pil_to_tensor

        img = self.annotations.images[index]
        file = self.image_root / img.file_name
        try:
            with Image.open(file) as pil:
                image = pil_to_tensor(pil.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{file}: cannot read image {img.id} ({str(e).splitlines()[0]})") from None
        if tuple(image.shape[1:]) != (img.height, img.width):
            raise DataError(
                f"{file}: image {img.id} is {image.shape[2]} x {image.shape[1]}, the annotations say "
                f"{img.width} x {img.height}"
            )
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(img.boxes), format="XYXY", canvas_size=(img.height, img.width)
            ),
            "labels": torch.from_numpy(img.labels),
            "image_id": img.id,
        }
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Lists of images and targets (torchvision's detectors take lists of different sizes)."""
    return [b[0] for b in batch], [b[1] for b in batch]
