"""Semantic-segmentation data: image + label-map pairs, joint transforms, the run's data bundle.

Datasets (``data.dataset``, :data:`SEGMENTATION_DATASETS`; settings in the config's ``segmentation``
section, :class:`SegmentationOptions`, docs/segmentation.md):

- ``fashion_mnist_seg``: canvases composed from real Fashion-MNIST images (:func:`make_canvases`): train
  canvases from training images, validation canvases from training images held out first, test canvases
  from test images; every object's pixels above a threshold on the glyph get its class, the rest is the
  ``background`` class; object classes long-tailed in training (``data.imbalance_factor``, LDAM's
  exponential profile), uniform in validation and test; deterministic from ``data.subset_seed``.
- ``ade20k``: ADE20K SceneParsing, the ``ADEChallengeData2016`` layout (``images/training``,
  ``images/validation``, ``annotations/training``, ``annotations/validation``): 150 classes, annotation
  label 0 ("other") is ignored (255) and labels 1..150 become 0..149; training = the official training
  split, test = the official validation split.
- ``seg_folders``: an image folder + a mask folder + a class list (COCO-Stuff-, Cityscapes-style data
  converted to label-index PNGs): ``<data_dir>/images/<split>/<name>.<ext>`` with
  ``<data_dir>/masks/<split>/<name>.png`` for split in train / val / test (val optional, test falls back
  to val), mask values = indices into ``data.class_list`` (one name a line), 255 ignored.

Images and masks of one size that fit ``data.memory_budget_mb`` are decoded once into uint8 tensors and
augmented on whole batches on the device (:class:`SegBatchLoader`); otherwise workers decode and
transform each pair (:class:`SegFileDataset`). The joint transform: random rescale (bilinear for the
image, nearest for the mask), random crop (padding with 0 / ignore), horizontal flip.

Errors are one line (:class:`DataError`): a mask of another size than its image, a label outside the
class list, a missing or unreadable file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradtail.data.base import IMAGE_SUFFIXES
from gradtail.data.loader import epoch_seed
from gradtail.data.samplers import sampler_from_config
from gradtail.distributed import rank as process_rank
from gradtail.distributed import world_size as process_world
from gradtail.errors import ConfigError, DataError
from gradtail.registry import Registry

IGNORE_INDEX = 255

@dataclass
class SegmentationOptions:
    """The ``segmentation:`` section of a segmentation run's config (the task's own typed keys)."""

    ignore_index: int = IGNORE_INDEX
    crop: int | list[int] | None = None  # [H, W] training crop; None = the stored size (memory) / 512 (files)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random rescale of training images
    resize: int | None = None  # files: shorter side resized to this (train and test) before the scale
    frequent_threshold: float = 0.01  # frequency groups by training pixel share (metrics.segmentation)
    rare_threshold: float = 0.001
    inference: str = "whole"  # whole | slide
    window: int | list[int] | None = None  # [H, W] sliding window (inference: slide); None = crop
    stride: int | list[int] | None = None  # [H, W] window stride; None = 2/3 of the window
    val_images: int = 0  # files: training images held out for validation (seeded by data.subset_seed)
    # fashion_mnist_seg canvases
    canvas_size: int = 64
    objects: list[int] = field(default_factory=lambda: [1, 3])  # objects per canvas, inclusive range
    threshold: int = 60  # a glyph pixel above this is the object's class, else background
    train_canvases: int = 1500
    val_canvases: int = 200
    test_canvases: int = 500
    val_images_per_class: int = 100  # training images per class reserved for validation canvases


def segmentation_settings(options: SegmentationOptions | None) -> dict[str, Any]:
    """The ``segmentation`` section as a checked mapping (defaults where ``options`` is None)."""
    out = asdict(options if options is not None else SegmentationOptions())
    if out["inference"] not in ("whole", "slide"):
        raise ConfigError(f"segmentation.inference must be 'whole' or 'slide', got {out['inference']!r}")
    lo, hi = (float(v) for v in out["scale_range"])
    if not 0 < lo <= hi:
        raise ConfigError(f"segmentation.scale_range must be [lo, hi] with 0 < lo <= hi, got {[lo, hi]}")
    for key in ("crop", "window", "stride"):
        _pair(out[key], key)
    if out["inference"] == "slide" and out["window"] is None and out["crop"] is None:
        raise ConfigError("segmentation.inference: slide needs segmentation.window (or crop)")
    return out


def _pair(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"segmentation.{what} must be an int or [H, W], got {value!r}")


# --------------------------------------------------------------------------- canvases


def make_canvases(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    class_probs: np.ndarray,
    rng: np.random.Generator,
    size: int = 64,
    objects: Sequence[int] = (1, 3),
    threshold: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` canvases (uint8 (count, 1, size, size)) and label maps (uint8 (count, size, size)).

    Each canvas holds ``objects[0]..objects[1]`` Fashion-MNIST images at random positions; an object's
    class is drawn from ``class_probs`` (over the 10 classes), its image uniformly among ``images`` of that
    class. The canvas takes the pixel-wise maximum of the glyphs; a pixel where a glyph exceeds
    ``threshold`` is labelled with that object's class + 1 (later objects on top), every other pixel is
    class 0 (background).

    Example:
        >>> import numpy as np
        >>> imgs = np.zeros((2, 28, 28), np.uint8); imgs[:, 10:20, 10:20] = 200
        >>> x, y = make_canvases(imgs, np.array([0, 3]), 2, np.array([0.5, 0, 0, 0.5] + [0] * 6),
        ...                      np.random.default_rng(0), size=32, objects=(1, 1))
        >>> x.shape, y.shape, sorted(set(np.unique(y).tolist()) - {0}) in ([1], [4], [1, 4])
        ((2, 1, 32, 32), (2, 32, 32), True)
    """
    k = len(class_probs)
    pools = [np.flatnonzero(labels == c) for c in range(k)]
    lo, hi = int(objects[0]), int(objects[1])
    if not 1 <= lo <= hi:
        raise ConfigError(
            f"data.segmentation.objects must be [lo, hi] with 1 <= lo <= hi, got {list(objects)}"
        )
    glyph = images.shape[-1]
    if size < glyph:
        raise ConfigError(f"data.segmentation.canvas_size must be >= {glyph}, got {size}")
    canvas = np.zeros((count, 1, size, size), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for i in range(count):
        for _ in range(int(rng.integers(lo, hi + 1))):
            c = int(rng.choice(k, p=class_probs))
            img = images[pools[c][int(rng.integers(len(pools[c])))]]
            top, left = (int(v) for v in rng.integers(0, size - glyph + 1, size=2))
            region = canvas[i, 0, top : top + glyph, left : left + glyph]
            np.maximum(region, img, out=region)
            masks[i, top : top + glyph, left : left + glyph][img > threshold] = c + 1
    return canvas, masks


def longtail_probs(num_classes: int, imbalance_factor: float, profile: str = "exp") -> np.ndarray:
    """Class probabilities n_c / sum n with n_c = IF^(-c / (K - 1)) (exp) or a half/half step (step)."""
    if imbalance_factor < 1:
        raise ConfigError(f"data.imbalance_factor must be >= 1, got {imbalance_factor}")
    c = np.arange(num_classes, dtype=np.float64)
    if profile == "step":
        n = np.where(c < num_classes // 2, 1.0, 1.0 / imbalance_factor)
    else:
        n = imbalance_factor ** (-c / max(num_classes - 1, 1))
    return n / n.sum()


# --------------------------------------------------------------------------- arrays and files


@dataclass
class SegArrays:
    """A split in memory: uint8 images (N, C, H, W), uint8 masks (N, H, W) (``ignore_index`` ignored)."""

    images: torch.Tensor
    masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class SegFiles:
    """A split as files: (image path, mask path) pairs, decoded on demand."""

    pairs: list[tuple[Path, Path]]

    def __len__(self) -> int:
        return len(self.pairs)


def decode_image(path: Path, channels: int) -> np.ndarray:
    """(C, H, W) uint8 from an image file; :class:`DataError` when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image file {path} is missing")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image file {path} cannot be decoded ({type(exc).__name__})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_mask(
    path: Path, image_size: tuple[int, int], num_classes: int, label_offset: int, ignore_index: int
) -> np.ndarray:
    """(H, W) uint8 labels from a label-index PNG: value - ``label_offset`` (values below the offset
    become ``ignore_index``: ADE20K's 0), checked against the image size and the class list."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"mask file {path} is missing")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"mask {path} must be a single-channel label image, got mode {im.mode}")
            raw = np.asarray(im).astype(np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"mask file {path} cannot be decoded ({type(exc).__name__})") from None
    if raw.shape != image_size:
        raise DataError(f"mask {path} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                        f"{image_size[1]}x{image_size[0]} (W x H)")  # fmt: skip
    labels = raw - label_offset
    ignored = (raw == ignore_index) | (labels < 0)
    bad = (~ignored) & (labels >= num_classes)
    if bad.any():
        value = int(raw[bad][0])
        raise DataError(
            f"mask {path} has label value {value}, outside the class list ({num_classes} classes: values "
            f"{label_offset}..{num_classes - 1 + label_offset}, {ignore_index} = ignore)"
        )
    return np.where(ignored, ignore_index, labels).astype(np.uint8)


def _pairs(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} is missing")
    if not mask_dir.is_dir():
        raise DataError(f"mask folder {mask_dir} is missing")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"image folder {image_dir} holds no image")
    pairs = []
    for img in images:
        mask = mask_dir / f"{img.stem}.png"
        if not mask.is_file():
            raise DataError(f"image {img} has no mask {mask}")
        pairs.append((img, mask))
    return pairs


def read_class_list(path: Path) -> list[str]:
    """Class names, one a line (blank lines skipped); :class:`DataError` when missing or empty."""
    if not path.is_file():
        raise DataError(f"class list {path} is missing")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"class list {path} names {len(names)} class(es); at least 2 are needed")
    if len(set(names)) != len(names):
        raise DataError(f"class list {path} names a class twice")
    return names


ADE20K_NUM_CLASSES = 150


def ade20k_class_names() -> list[str]:
    """ADE20K's 150 SceneParsing classes as ``class_<k>`` when no ``objectInfo150`` list is at hand."""
    return [f"class_{k}" for k in range(1, ADE20K_NUM_CLASSES + 1)]


def read_ade20k(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """The (image, annotation) pairs of ``ADEChallengeData2016``: ``{"train": ..., "test": ...}`` (the
    official validation split is the test set)."""
    if not root.is_dir():
        raise DataError(f"ADE20K folder {root} is missing")
    return {
        "train": _pairs(root / "images" / "training", root / "annotations" / "training"),
        "test": _pairs(root / "images" / "validation", root / "annotations" / "validation"),
    }


def read_mask_folders(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """``images/<split>`` + ``masks/<split>`` pairs for train, val (optional), test (or val)."""
    if not root.is_dir():
        raise DataError(f"segmentation folder {root} is missing")
    out = {"train": _pairs(root / "images" / "train", root / "masks" / "train")}
    for split in ("val", "test"):
        if (root / "images" / split).is_dir():
            out[split] = _pairs(root / "images" / split, root / "masks" / split)
    if "test" not in out:
        if "val" not in out:
            raise DataError(f"{root} has neither images/test nor images/val")
        out["test"] = out.pop("val")
    return out


# --------------------------------------------------------------------------- joint transform


@dataclass
class SegAugment:
    """Joint image / mask transform of whole batches (uint8 in, normalised float + long labels out).

    Random rescale by one factor per batch in ``scale_range`` (bilinear for the images, nearest for the
    masks), random crop to ``crop`` per image (padding with 0 / ``ignore_index`` where the rescaled image
    is smaller), horizontal flip per image with probability 1/2, then normalisation.
    """

    mean: Sequence[float]
    std: Sequence[float]
    crop: tuple[int, int] | None = None
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    ignore_index: int = IGNORE_INDEX
    _stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> (x / 255 - mean) / std per channel."""
        if x.device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            self._stats[x.device] = (1.0 / (255.0 * std), mean / std)
        scale, shift = self._stats[x.device]
        return torch.addcmul(-shift, x.float(), scale)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, ch, h, w = x.shape
        lo, hi = self.scale_range
        if (lo, hi) != (1.0, 1.0):
            s = lo + (hi - lo) * float(torch.rand((), device=x.device, generator=gen))
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = (
                F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
                .round()
                .to(torch.uint8)
            )
            y = F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].to(y.dtype)
            h, w = size
        ch_, cw = self.crop if self.crop is not None else (h, w)
        if h < ch_ or w < cw:
            ph, pw = max(ch_ - h, 0), max(cw - w, 0)
            x = F.pad(x, (0, pw, 0, ph))
            y = F.pad(y, (0, pw, 0, ph), value=self.ignore_index)
            h, w = x.shape[-2:]
        if (h, w) != (ch_, cw):
            top = torch.randint(0, h - ch_ + 1, (b,), device=x.device, generator=gen)
            left = torch.randint(0, w - cw + 1, (b,), device=x.device, generator=gen)
            rows = (top.view(b, 1) + torch.arange(ch_, device=x.device)).view(b, 1, ch_, 1)
            cols = (left.view(b, 1) + torch.arange(cw, device=x.device)).view(b, 1, 1, cw)
            x = x.gather(2, rows.expand(b, ch, ch_, w)).gather(3, cols.expand(b, ch, ch_, cw))
            y = y[:, None].gather(2, rows.expand(b, 1, ch_, w)).gather(3, cols.expand(b, 1, ch_, cw))[:, 0]
        if self.hflip:
            flip = torch.rand(b, device=x.device, generator=gen) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
            y = torch.where(flip.view(b, 1, 1), y.flip(2), y)
        return self.normalize(x), y.long()


class SegBatchLoader:
    """Batches ``(images, label maps)`` of an in-memory split of one size, transformed on the device.

    The order comes from the sampler (training; its rank slice) or is sequential (evaluation: this
    process's strided share of the split, so the confusion matrices of the processes add up to the
    split's). Randomness: a generator seeded by ``(seed, epoch, rank)``, resumable like
    :class:`gradtail.data.loader.BatchLoader`.
    """

    num_views = 0

    def __init__(
        self,
        arrays: SegArrays,
        labels: torch.Tensor,
        batch_size: int,
        augment: SegAugment,
        sampler: Any = None,
        train: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = arrays.images.to(self.device)
        self.masks = arrays.masks.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.augment, self.sampler = batch_size, augment, sampler
        self.train, self.drop_last, self.seed = train, drop_last, seed
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(self.images.shape[0], device=self.device)[self.rank :: self.world_size]
        return self.sampler.indices(self.epoch, rank=self.rank, world_size=self.world_size).to(self.device)

    def __len__(self) -> int:
        if self.sampler is None:
            n = len(range(self.rank, self.images.shape[0], self.world_size))
        else:
            n = int(self.sampler.num_samples_per_rank(self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        gen = None
        if self.train:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(epoch_seed(self.seed, self.epoch, stream=1 + self.rank))
        n = order.numel()
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            raw, mask = self.images.index_select(0, idx), self.masks.index_select(0, idx)
            if self.train:
                x, y = self.augment(raw, mask, gen)
            else:
                x, y = self.augment.normalize(raw), mask.long()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


class SegFileDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Decodes one (image, mask) pair and applies the joint transform of one sample (workers)."""

    def __init__(
        self, files: SegFiles, reader: dict[str, Any], augment: SegAugment | None, seed: int
    ) -> None:
        self.files, self.reader, self.augment, self.seed = files, reader, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.files.pairs[i]
        image = decode_image(img_path, self.reader["channels"])
        r = self.reader
        mask = decode_mask(mask_path, image.shape[1:], r["num_classes"], r["label_offset"], r["ignore_index"])
        x, y = torch.from_numpy(image)[None], torch.from_numpy(mask)[None]
        resize = self.reader["resize"]
        if resize is not None:
            h, w = x.shape[-2:]
            s = resize / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = (
                F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
                .round()
                .to(torch.uint8)
            )
            if self.augment is not None:  # training: the mask follows; test: scored at its own size
                y = F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.uint8)
        if self.augment is None:
            return x[0], y[0]
        gen = torch.Generator()
        gen.manual_seed(epoch_seed(self.seed, self.epoch, stream=1_000_003 + i))
        xa, ya = self.augment(x, y, gen)
        return xa[0], ya[0]


class SegFileLoader:
    """Training batches decoded and transformed by ``num_workers`` processes (data too large or of mixed
    sizes for memory); the sampler's rank slice gives the order."""

    num_views = 0
    images = None

    def __init__(self, dataset: SegFileDataset, labels: torch.Tensor, batch_size: int, sampler: Any,
                 drop_last: bool, device: torch.device, channels_last: bool, rank: int, world_size: int,
                 num_workers: int) -> None:  # fmt: skip
        self.dataset, self.labels, self.batch_size, self.sampler = dataset, labels, batch_size, sampler
        self.drop_last, self.device, self.channels_last = drop_last, device, channels_last
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.epoch = int(epoch)

    def __len__(self) -> int:
        n = int(self.sampler.num_samples_per_rank(self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.indices(self.epoch, rank=self.rank, world_size=self.world_size).tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, drop_last=self.drop_last,
            num_workers=self.num_workers, persistent_workers=False,
        )  # fmt: skip
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


# --------------------------------------------------------------------------- the bundle


@dataclass
class SegmentationData:
    """The data of a segmentation run (:class:`gradtail.contracts.RunData`), in memory or as files.

    ``class_counts`` are training *pixels* per class (the priors of ``balanced_softmax`` /
    ``logit_adjust`` and the frequency groups); ``train_labels`` gives each training image the class
    of its rarest present class (image-level class-aware samplers).
    """

    name: str
    class_names: list[str]
    train: SegArrays | SegFiles
    val: SegArrays | SegFiles | None
    test: SegArrays | SegFiles
    pixel_counts: list[int]
    image_labels: torch.Tensor
    digest: str
    mean: list[float]
    std: list[float]
    channels: int
    settings: dict[str, Any]
    hflip: bool = True
    reader: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 4

    @property
    def class_counts(self) -> list[int]:
        return list(self.pixel_counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def sha256(self) -> str:
        return self.digest

    @property
    def train_labels(self) -> torch.Tensor:
        return self.image_labels

    @property
    def ignore_index(self) -> int:
        return int(self.settings["ignore_index"])

    def preprocessing(self) -> dict[str, Any]:
        return {
            "transform": "segmentation",
            "mode": "L" if self.channels == 1 else "RGB",
            "resize": self.settings["resize"],
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def has_split(self, split: str) -> bool:
        return (self.val if split == "val" else self.test) is not None

    def augment(self) -> SegAugment:
        s = self.settings
        crop = _pair(s["crop"], "crop")
        if crop is None and isinstance(self.train, SegFiles):
            crop = (512, 512)
        lo, hi = (float(v) for v in s["scale_range"])
        return SegAugment(self.mean, self.std, crop=crop, scale_range=(lo, hi), hflip=self.hflip,
                          ignore_index=self.ignore_index)  # fmt: skip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment().normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> images in [0, 1] (for drawing predictions)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)

    def train_loader(self, cfg: Any, device: torch.device, rank: int, world: int) -> Any:
        sampler = sampler_from_config(cfg, self.image_labels, self.num_classes)
        if isinstance(self.train, SegArrays):
            return SegBatchLoader(
                self.train, self.image_labels, cfg.optim.batch_size, self.augment(), sampler=sampler,
                train=True, drop_last=cfg.optim.drop_last, seed=cfg.train.seed, device=device,
                channels_last=cfg.train.channels_last, rank=rank, world_size=world,
            )  # fmt: skip
        dataset = SegFileDataset(self.train, self.reader, self.augment(), cfg.train.seed + 7919 * rank)
        return SegFileLoader(dataset, self.image_labels, cfg.optim.batch_size, sampler, cfg.optim.drop_last,
                             device, cfg.train.channels_last, rank, world, self.num_workers)  # fmt: skip

    def eval_loader(
        self, split: str, cfg: Any, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share of the split (every ``world``-th image from its rank): in-memory splits
        in batches of ``eval.batch_size``, files one image at a time at their own size."""
        data = self.val if split == "val" else self.test
        if data is None:
            raise ConfigError(f"this run has no {split} split")
        r, w = process_rank(), process_world()
        if isinstance(data, SegArrays):
            labels = torch.zeros(len(data), dtype=torch.long)
            yield from SegBatchLoader(data, labels, cfg.eval.batch_size, self.augment(), train=False,
                                      device=device, channels_last=cfg.train.channels_last, rank=r,
                                      world_size=w)  # fmt: skip
            return
        dataset = SegFileDataset(data, self.reader, None, 0)
        aug = self.augment()
        for i in range(r, len(dataset), w):
            x, y = dataset[i]
            xn = aug.normalize(x[None].to(device))
            if cfg.train.channels_last:
                xn = xn.contiguous(memory_format=torch.channels_last)
            yield xn, y[None].to(device).long()

    def describe(self) -> dict[str, Any]:
        return {
            "counts": self.class_counts,
            "count_unit": "training pixels",
            "train_images": len(self.train),
            "val_images": 0 if self.val is None else len(self.val),
            "test_images": len(self.test),
            "sha256": self.sha256,
            "class_names": self.class_names,
            **self.source,
        }


def _pixel_counts(masks: torch.Tensor, num_classes: int) -> list[int]:
    flat = masks.reshape(-1).long()
    flat = flat[flat < num_classes]
    return torch.bincount(flat, minlength=num_classes).tolist()


def _image_labels(masks: torch.Tensor, pixel_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Each image's rarest present class (by training pixels); an image without labelled pixels: 0."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1).long()
    present = torch.zeros(n, num_classes + 1, dtype=torch.bool)
    present.scatter_(1, flat.clamp(max=num_classes), True)
    present = present[:, :num_classes]
    rank_key = torch.tensor(pixel_counts, dtype=torch.float64).expand(n, -1).clone()
    rank_key[~present] = math.inf
    return rank_key.argmin(1)


def _digest(*arrays: torch.Tensor) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.contiguous().numpy().tobytes())
    return h.hexdigest()


def build_fashion_canvases(cfg: Any, options: SegmentationOptions | None = None) -> SegmentationData:
    """``fashion_mnist_seg``: the canvas benchmark (module docstring), deterministic from
    ``data.subset_seed``; the subset hash is the SHA-256 of the training canvases and label maps."""
    from gradtail.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist

    s = segmentation_settings(options)
    train_src = load_fashion_mnist(train=True, data_dir=cfg.data_dir, download=cfg.download)
    test_src = load_fashion_mnist(train=False, data_dir=cfg.data_dir, download=cfg.download)
    rng = np.random.default_rng(cfg.subset_seed)
    tr_img, tr_lab = train_src.images[:, 0].numpy(), train_src.labels.numpy()
    # validation images: the first val_images_per_class of each class in a seeded permutation
    perm = rng.permutation(len(tr_lab))
    k = len(CLASS_NAMES)
    held = np.concatenate([perm[tr_lab[perm] == c][: int(s["val_images_per_class"])] for c in range(k)])
    keep = np.setdiff1d(np.arange(len(tr_lab)), held)
    kw = {"size": int(s["canvas_size"]), "objects": s["objects"], "threshold": int(s["threshold"])}
    uniform = np.full(k, 1.0 / k)
    lt = longtail_probs(k, cfg.imbalance_factor, cfg.profile)
    train = make_canvases(tr_img[keep], tr_lab[keep], int(s["train_canvases"]), lt, rng, **kw)
    val = None
    if int(s["val_canvases"]) > 0 and len(held):
        val = make_canvases(tr_img[held], tr_lab[held], int(s["val_canvases"]), uniform, rng, **kw)
    test = make_canvases(test_src.images[:, 0].numpy(), test_src.labels.numpy(), int(s["test_canvases"]),
                         uniform, rng, **kw)  # fmt: skip
    names = ["background", *CLASS_NAMES]

    def arrays(pair: tuple[np.ndarray, np.ndarray]) -> SegArrays:
        return SegArrays(torch.from_numpy(pair[0]), torch.from_numpy(pair[1]))

    tr = arrays(train)
    counts = _pixel_counts(tr.masks, len(names))
    mean, std = cfg.augment.mean or [0.1], cfg.augment.std or [0.25]
    return SegmentationData(
        name="fashion_mnist_seg", class_names=names, train=tr, val=None if val is None else arrays(val),
        test=arrays(test), pixel_counts=counts, image_labels=_image_labels(tr.masks, counts, len(names)),
        digest=_digest(tr.images, tr.masks), mean=list(mean), std=list(std), channels=1, settings=s,
        hflip=cfg.augment.hflip,
        source={"canvas_size": kw["size"], "objects": list(s["objects"]), "threshold": kw["threshold"],
                "object_class_probs": [round(float(p), 6) for p in lt]},
    )  # fmt: skip


def _load_pairs(pairs: list[tuple[Path, Path]], reader: dict[str, Any]) -> SegArrays:
    images, masks = [], []
    for img_path, mask_path in pairs:
        image = decode_image(img_path, reader["channels"])
        mask = decode_mask(mask_path, image.shape[1:], reader["num_classes"], reader["label_offset"],
                           reader["ignore_index"])  # fmt: skip
        images.append(image)
        masks.append(mask)
    return SegArrays(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)))


def _files_fit(pairs: dict[str, list[tuple[Path, Path]]], channels: int, budget_mb: float) -> bool:
    """Whether every image has one size and all splits fit the budget (headers only)."""
    from PIL import Image

    sizes = set()
    total = 0
    for split in pairs.values():
        for img, _ in split:
            try:
                with Image.open(img) as im:
                    sizes.add(im.size)
                    total += im.size[0] * im.size[1] * (channels + 1)
            except (OSError, ValueError) as exc:
                raise DataError(f"image file {img} cannot be read ({type(exc).__name__})") from None
            if len(sizes) > 1:
                return False
    return total <= budget_mb * 2**20


def build_file_segmentation(
    cfg: Any, dataset: str, options: SegmentationOptions | None = None
) -> SegmentationData:
    """``ade20k`` / ``seg_folders``: read the pairs, decode into memory when they fit (one size, within
    ``data.memory_budget_mb``), else keep files for workers."""
    s = segmentation_settings(options)
    if cfg.data_dir is None:
        raise ConfigError(f"dataset {dataset!r} needs data.data_dir")
    root = Path(cfg.data_dir).expanduser()
    if dataset == "ade20k":
        pairs = read_ade20k(root)
        names = read_class_list(root / cfg.class_list) if cfg.class_list else ade20k_class_names()
        if len(names) != ADE20K_NUM_CLASSES:
            raise DataError(f"ADE20K has {ADE20K_NUM_CLASSES} classes; the class list names {len(names)}")
        offset = 1
    else:
        pairs = read_mask_folders(root)
        if cfg.class_list is None:
            raise ConfigError("dataset 'seg_folders' needs data.class_list (class names, one a line)")
        names = read_class_list(root / cfg.class_list)
        offset = 0
    channels = cfg.channels or 3
    reader = {"channels": channels, "num_classes": len(names), "label_offset": offset,
              "ignore_index": int(s["ignore_index"]), "resize": s["resize"]}  # fmt: skip
    n_val = int(s["val_images"])
    if n_val > 0 and "val" not in pairs:
        rng = np.random.default_rng(cfg.subset_seed)
        order = rng.permutation(len(pairs["train"]))
        pairs["val"] = [pairs["train"][i] for i in sorted(order[:n_val])]
        pairs["train"] = [pairs["train"][i] for i in sorted(order[n_val:])]
    budget = 2048.0 if cfg.memory_budget_mb is None else float(cfg.memory_budget_mb)
    in_memory = s["resize"] is None and _files_fit(pairs, channels, budget)
    if in_memory:
        splits: dict[str, SegArrays | SegFiles] = {k: _load_pairs(v, reader) for k, v in pairs.items()}
        tr = splits["train"]
        assert isinstance(tr, SegArrays)
        counts = _pixel_counts(tr.masks, len(names))
        image_labels = _image_labels(tr.masks, counts, len(names))
        digest = _digest(tr.images, tr.masks)
    else:
        splits = {k: SegFiles(v) for k, v in pairs.items()}
        counts = [0] * len(names)
        labels = []
        h = hashlib.sha256()
        for img, mask_path in pairs["train"]:  # one pass over the training masks: counts, labels, hash
            image_size = _image_size(img)
            m = torch.from_numpy(
                decode_mask(mask_path, image_size, len(names), offset, reader["ignore_index"])
            )
            c = _pixel_counts(m, len(names))
            counts = [a + b for a, b in zip(counts, c, strict=True)]
            labels.append(c)
            h.update(f"{img.name}:{mask_path.name}:".encode() + m.numpy().tobytes())
        present = torch.tensor(labels, dtype=torch.float64)
        key = torch.tensor(counts, dtype=torch.float64).expand_as(present).clone()
        key[present == 0] = math.inf
        image_labels = key.argmin(1)
        digest = h.hexdigest()
    mean = cfg.augment.mean or ([0.485, 0.456, 0.406] if channels == 3 else [0.5])
    std = cfg.augment.std or ([0.229, 0.224, 0.225] if channels == 3 else [0.25])
    return SegmentationData(
        name=dataset, class_names=names, train=splits["train"], val=splits.get("val"), test=splits["test"],
        pixel_counts=counts, image_labels=image_labels, digest=digest, mean=list(mean), std=list(std),
        channels=channels, settings=s, hflip=cfg.augment.hflip, reader=reader,
        source={"root": str(root), "in_memory": in_memory}, num_workers=cfg.num_workers,
    )  # fmt: skip


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"image file {path} is missing")
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError) as exc:
        raise DataError(f"image file {path} cannot be read ({type(exc).__name__})") from None


def _ade20k(cfg: Any, options: SegmentationOptions | None) -> SegmentationData:
    return build_file_segmentation(cfg, "ade20k", options)


def _seg_folders(cfg: Any, options: SegmentationOptions | None) -> SegmentationData:
    return build_file_segmentation(cfg, "seg_folders", options)


#: The segmentation datasets (``data.dataset`` of a segmentation run): ``build(data_cfg, options)``.
SEGMENTATION_DATASETS: Registry[SegmentationData] = Registry("segmentation dataset")
SEGMENTATION_DATASETS.register("fashion_mnist_seg")(build_fashion_canvases)
SEGMENTATION_DATASETS.register("ade20k")(_ade20k)
SEGMENTATION_DATASETS.register("seg_folders")(_seg_folders)
