"""Your own data as the data of a run: image folders, CSV lists and ``.npz`` arrays.

Three registered datasets read a practitioner's data; the class count, class names, training counts,
image size and channels all come from the data:

============  =======================================================  ======================================
dataset       ``data.data_dir``                                        classes (label order)
============  =======================================================  ======================================
image_folder  ``root/<class>/*.png`` (one tree), or ``root/train/``,   folder names, sorted (torchvision's
              ``root/test/`` [``root/val/``] each with class folders   ImageFolder), or ``data.class_list``
image_csv     a folder with ``train.csv``, ``test.csv`` [``val.csv``]  the labels: integers ``0..C-1``, or
              or one ``.csv`` file; columns ``path,label`` (header)    names (sorted), or ``data.class_list``
npz           an ``.npz`` file (or a folder holding exactly one)       integer ``y``: ``0..max``; its
              with ``x_train, y_train, x_test, y_test`` [``x_val``...] ``class_names`` array or the class list
============  =======================================================  ======================================

The readers (:mod:`gradtail.data.own_folders`, :mod:`gradtail.data.own_csv`, :mod:`gradtail.data.own_npz`)
return an :class:`OwnSource`; :func:`build_own_data` turns it into the data of a run by these rules:

1. **Classes.** Every class needs training images (an empty class folder, or a class of the class list
   without images, is an error naming it); a validation or test class absent from training is an error
   naming it; a class without test images is a warning (its accuracy is not measured).
2. **Test split.** The data's own (``test/``, ``test.csv``, ``x_test``), or, when it has none, a
   stratified share ``data.split_fractions.test`` of each class (required then; setting it while the data
   has a test split is an error).
3. **Long-tailed subset** (``data.longtail: {imbalance_factor, profile}``, optional): from the remaining
   training images by :func:`~gradtail.data.longtail.build_longtail_split`, the hashed LDAM rule of the
   built-in datasets, with ``data.subset_seed``, ``data.val_per_class`` (a balanced validation carved
   *before* subsampling; 0 when the data has its own validation split), ``data.n_max`` and
   ``data.class_order``. Label 0 is the head. Without it the data is used as it is (no subsampling).
   The built-in datasets' ``data.imbalance_factor`` / ``data.profile`` must stay at their defaults for
   own data, and ``data.val_per_class`` / ``n_max`` / ``class_order`` apply with ``data.longtail`` only
   (errors otherwise, so nothing is ignored silently).
4. **Validation split** (model selection, post-hoc tuning): the data's own; else, with
   ``data.longtail``, ``data.val_per_class`` per class; else a stratified share
   ``data.split_fractions.val`` (default 0.1; 0 = none) of each class.

   Stratified shares (test and validation) give each class ``round(fraction * n)`` of its ``n`` images,
   at least one and at most ``n - 1`` (a class always keeps a training image); a class of a single
   image gives none, with a warning (``warnings.warn``) naming it. Which images: the last ones of a
   permutation of the class, drawn from a generator seeded with ``(data.subset_seed, split)``.
5. **Images.** Image files are decoded with PIL to mode ``L`` (every image grayscale) or ``RGB``
   (``data.channels`` forces 1 or 3); alpha is dropped; 16-bit and float images are an error. All images
   must have one size unless ``data.resize`` ([H, W], or an int for square) is set, which resizes every
   image (converted first) with PIL's bilinear filter, as ``gradtail predict`` does (two files of
   different sizes are named otherwise). ``data.pad_to`` zero-pads after that.
   ``npz`` arrays: ``x`` is ``N,H,W`` (grayscale), ``N,H,W,C`` or ``N,C,H,W`` with C in {1, 3} (a shape
   that reads both ways is an error), ``uint8`` (any integer type with values in 0..255 is taken too) or
   float in **[0, 1]** (scaled by 255 and rounded; floats outside [0, 1] are an error: store 0..255 values
   as uint8).
6. **Storage.** Arrays, and image files whose decoded images (uint8, train + val + test, after padding)
   fit ``data.memory_budget_mb`` (default 2048 MiB), are held in memory: a
   :class:`~gradtail.data.bundle.ClassificationData` batched by :class:`~gradtail.data.loader.BatchLoader`.
   Larger data stays in its files (storage ``files``): ``data.num_workers`` processes decode
   the images and whose batches are augmented on the device by the same transform, so both paths give
   the same batches for the same seed. ``data.check_files`` (default true) reads every image header up
   front (unreadable files, mixed sizes and the channels are known before training); without it only the
   first training image is read and a bad file is reported when it is decoded.
7. **Augmentation and normalisation**: ``data.augment`` as configured (crop, flip, AutoAugment,
   Cutout, views); ``augment.mean`` / ``augment.std`` when given, else the per-channel mean and standard
   deviation of the training set (the training subset, before padding; the image-files path uses an
   evenly spaced sample of at most 5000 training images).
8. **Records.** The subset hash is a SHA-256 of the training data itself (class names, then the
   training images' paths relative to the data root and their labels; arrays: their bytes), so a resume
   on other data is refused; ``subset.json`` also records the origin of every split, the storage, the
   image size and ``index_sha256`` (:func:`~gradtail.data.longtail.split_hash` of the kept positions in
   the training pool).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gradtail.config import DataConfig
from gradtail.data.base import ImageArrays
from gradtail.data.bundle import ClassificationData, pad_images
from gradtail.data.longtail import PROFILES, LongTailSplit, build_longtail_split, split_hash
from gradtail.errors import ConfigError, DataError

OWN_DATASETS: tuple[str, ...] = ("image_folder", "image_csv", "npz")
from gradtail.data.base import IMAGE_SUFFIXES  # noqa: E402  (re-exported: the one list of image suffixes)

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_MEMORY_BUDGET_MB = 2048.0
NORMALIZATION_SAMPLE = 5000  # image-files path: training images the mean / std are computed from

_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_SPLITS = ("train", "val", "test")
# Generators of the stratified shares, seeded with (data.subset_seed, tag): b"test", b"valf" as ints.
_TEST_TAG = 0x74657374
_VAL_TAG = 0x76616C66
_INTEGER = re.compile(r"[+-]?[0-9]+")
_CLASS_INDEX = re.compile(r"\bclass (\d+)\b")


# ---------------------------------------------------------------------------------------------- sources
@dataclass
class SplitSource:
    """One split as the data gives it: image files (``paths``) or uint8 arrays (``images``), with labels.

    ``labels``: int64 (N,); ``paths``: one image file per label; ``images``: uint8 (N, C, H, W);
    ``origin``: where the split was read, for messages (``/data/pets/test``, ``x_test``).
    """

    labels: np.ndarray
    origin: str
    paths: list[Path] | None = None
    images: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray | Sequence[int]) -> SplitSource:
        """The entries at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return SplitSource(
            labels=self.labels[idx],
            origin=self.origin,
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
            images=None if self.images is None else self.images[torch.from_numpy(idx)],
        )


@dataclass
class OwnSource:
    """What a reader found: the class names in label order and the splits the data has.

    ``location``: ``data.data_dir`` as resolved; ``root``: the folder image paths are recorded relative
    to (the subset hash does not change when the data moves); ``test_hint``: how this format gives a
    test split (for the message when it has none).
    """

    name: str
    location: Path
    root: Path
    class_names: list[str]
    train: SplitSource
    val: SplitSource | None = None
    test: SplitSource | None = None
    test_hint: str = ""


# ---------------------------------------------------------------------------------------------- helpers
def data_location(cfg: DataConfig, expects: str) -> Path:
    """``data.data_dir`` as a path that exists; ``expects`` says what the dataset reads there."""
    if not cfg.data_dir:
        raise ConfigError(
            f"dataset {cfg.dataset!r} needs data.data_dir: {expects} (set it with --set data.data_dir=PATH)"
        )
    path = Path(cfg.data_dir).expanduser()
    if not path.exists():
        raise DataError(
            f"data.data_dir {path} does not exist ({cfg.dataset} reads {expects}; "
            "set it with --set data.data_dir=PATH)"
        )
    return path


def read_class_list(cfg: DataConfig, base: Path) -> tuple[list[str], Path] | None:
    """``data.class_list`` (relative to ``base``): one class name a line in label order, blank lines
    skipped; None when it is not set."""
    if cfg.class_list is None:
        return None
    path = Path(cfg.class_list).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"class list file {path} (data.class_list) does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class list {path}: {e}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"class list {path} names no classes")
    seen: set[str] = set()
    for lineno, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(f"class list {path} names class {name!r} twice (entry {lineno})")
        seen.add(name)
    return names, path


def resolve_labels(
    raw: dict[str, Sequence[str]],
    class_list: tuple[list[str], Path | str] | None,
    locate: Callable[[str, int], str],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and int64 labels of every split from labels as written (strings).

    - with a class list (names in label order, and where it came from): a label is a name of the list,
      or an integer index into it; anything else is an error at ``locate(split, i)``;
    - otherwise, labels that are all integers are the labels themselves (``C`` = the largest training
      label + 1, names ``"0"``, ``"1"``, ...); any other labels are class names, sorted;
    - a validation or test label that is not a training class is an error naming it.
    """
    if class_list is not None:
        names, list_path = class_list
        index = {name: j for j, name in enumerate(names)}
        labels: dict[str, np.ndarray] = {}
        for split, values in raw.items():
            out = np.empty(len(values), dtype=np.int64)
            for i, value in enumerate(values):
                j = index.get(value)
                if j is None and _INTEGER.fullmatch(value) and 0 <= int(value) < len(names):
                    j = int(value)
                if j is None:
                    raise DataError(
                        f"{locate(split, i)}: label {value!r} is not in the class list {list_path}"
                    )
                out[i] = j
            labels[split] = out
        return list(names), labels
    if all(_INTEGER.fullmatch(v) for values in raw.values() for v in values):
        ints = {split: np.asarray([int(v) for v in values], dtype=np.int64) for split, values in raw.items()}
        for split, values in ints.items():
            negative = np.flatnonzero(values < 0)
            if negative.size:
                i = int(negative[0])
                raise DataError(f"{locate(split, i)}: label {int(values[i])} is negative")
        num_classes = int(ints["train"].max()) + 1
        for split, values in ints.items():
            beyond = np.flatnonzero(values >= num_classes)
            if beyond.size:
                i = int(beyond[0])
                raise DataError(
                    f"{locate(split, i)}: {split} class {int(values[i])} has no training images "
                    f"(the training labels are 0..{num_classes - 1})"
                )
        return [str(j) for j in range(num_classes)], ints
    names = sorted(set(raw["train"]))
    index = {name: j for j, name in enumerate(names)}
    labels = {}
    for split, values in raw.items():
        out = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            j = index.get(value)
            if j is None:
                raise DataError(f"{locate(split, i)}: {split} class {value!r} has no training images")
            out[i] = j
        labels[split] = out
    return names, labels


def stratified_holdout(
    labels: np.ndarray, num_classes: int, fraction: float, seed: int, tag: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(kept, held out, classes too small to give one): sorted positions into ``labels``.

    Each class of ``n`` images gives ``round(fraction * n)``, at least 1 and at most ``n - 1``; a class
    of one image gives none and is listed. The held-out images of a class are the last ones of a
    permutation of its positions, drawn for every class in label order from a generator seeded with
    ``(seed, tag)``.

    Example:
        >>> import numpy as np
        >>> labels = np.array([0] * 10 + [1] * 3 + [2])
        >>> kept, held, small = stratified_holdout(labels, 3, 0.2, seed=0, tag=1)
        >>> np.bincount(labels[held], minlength=3).tolist(), small
        ([2, 1, 0], [2])
    """
    rng = np.random.default_rng([seed, tag])
    held_parts: list[np.ndarray] = []
    too_small: list[int] = []
    for j in range(num_classes):
        pool = np.flatnonzero(labels == j)
        n = pool.size
        if n == 0 or fraction <= 0:
            continue
        perm = rng.permutation(n)
        k = min(max(1, math.floor(fraction * n + 0.5)), n - 1)
        if k < 1:
            too_small.append(j)
            continue
        held_parts.append(pool[perm[n - k :]])
    held = np.sort(np.concatenate(held_parts)) if held_parts else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(labels.shape[0], dtype=np.int64), held, assume_unique=True)
    return kept.astype(np.int64), held.astype(np.int64), too_small


def _warn_too_small(too_small: list[int], names: list[str], split: str, where: str) -> None:
    if too_small:
        shown = ", ".join(repr(names[j]) for j in too_small[:10])
        more = f" and {len(too_small) - 10} more" if len(too_small) > 10 else ""
        warnings.warn(
            f"{where}: class(es) {shown}{more} have a single training image, too few to give one to the "
            f"{split} split and keep one for training: they have no {split} images",
            stacklevel=3,
        )


def _resize_hw(resize: int | list[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    values = [resize, resize] if isinstance(resize, int) else list(resize)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"data.resize must be a positive int or [H, W] of positive ints, got {resize!r}")
    return int(values[0]), int(values[1])


def check_own_settings(cfg: DataConfig) -> None:
    """The keys of ``cfg`` that own data reads, and the built-in keys it does not (see the module
    docstring, rule 3): a :class:`ConfigError` naming the key, before any file is read."""
    name = cfg.dataset
    defaults = DataConfig()
    if cfg.imbalance_factor != defaults.imbalance_factor or cfg.profile != defaults.profile:
        raise ConfigError(
            f"data.imbalance_factor / data.profile are settings of the built-in datasets; {name} makes a "
            "long-tailed subset with data.longtail: {imbalance_factor: ..., profile: ...}"
        )
    lt, fractions = cfg.longtail, cfg.split_fractions
    if lt.imbalance_factor is None:
        if lt.profile is not None:
            raise ConfigError("data.longtail.profile needs data.longtail.imbalance_factor")
        if cfg.val_per_class != defaults.val_per_class:
            raise ConfigError(
                "data.val_per_class applies with data.longtail (a balanced validation carved before "
                f"subsampling); without it {name}'s validation split is data.split_fractions.val "
                "(a stratified share of each class)"
            )
        for key in ("n_max", "class_order"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"data.{key} applies with data.longtail (the long-tailed subset)")
    else:
        if lt.imbalance_factor < 1:
            raise ConfigError(f"data.longtail.imbalance_factor must be >= 1, got {lt.imbalance_factor}")
        if lt.profile is not None and lt.profile not in PROFILES:
            raise ConfigError(
                f"data.longtail.profile must be one of {', '.join(PROFILES)}, got {lt.profile!r}"
            )
        if fractions.val is not None:
            raise ConfigError(
                "with data.longtail the validation split is data.val_per_class images per class, carved "
                "before subsampling (as for the built-in datasets); remove data.split_fractions.val"
            )
    if fractions.val is not None and not 0 <= fractions.val < 1:
        raise ConfigError(f"data.split_fractions.val must be in [0, 1), got {fractions.val}")
    if fractions.test is not None and not 0 < fractions.test < 1:
        raise ConfigError(f"data.split_fractions.test must be in (0, 1), got {fractions.test}")
    if (fractions.val or 0) + (fractions.test or 0) >= 1:
        raise ConfigError("data.split_fractions.val + data.split_fractions.test must be < 1")
    _resize_hw(cfg.resize)
    if cfg.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {cfg.channels!r}")
    if cfg.memory_budget_mb is not None and cfg.memory_budget_mb < 0:
        raise ConfigError(f"data.memory_budget_mb must be >= 0, got {cfg.memory_budget_mb}")
    if cfg.pad_to is not None and cfg.pad_to < 1:
        raise ConfigError(f"data.pad_to must be a positive int, got {cfg.pad_to}")


# ---------------------------------------------------------------------------------------------- images
def _image_error(path: Path, error: BaseException) -> DataError:
    from PIL import UnidentifiedImageError

    if isinstance(error, FileNotFoundError):
        return DataError(f"image file {path} does not exist")
    if isinstance(error, UnidentifiedImageError):
        reason = "not an image PIL can read (unknown format or corrupt)"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = str(error).split("\n")[0] or error.__class__.__name__
    return DataError(f"cannot read image {path}: {reason}")


def _check_mode(path: Path, mode: str) -> None:
    if mode.startswith("I") or mode.startswith("F"):
        raise DataError(
            f"image {path} has mode {mode} (16-bit or float pixels): gradtail reads 8-bit images; "
            "convert it to 8-bit"
        )


def read_image_header(path: Path) -> tuple[int, int, str]:
    """(height, width, PIL mode) of an image file, reading its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            h, w, mode = im.height, im.width, im.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _image_error(path, e) from None
    _check_mode(path, mode)
    return h, w, mode


@dataclass(frozen=True)
class ImageDecoder:
    """Image file -> uint8 (C, H, W) tensor, as the run stores its images.

    Decoded with PIL and converted to ``mode`` (``"L"`` or ``"RGB"``); resized to ``size`` = (H, W) with
    PIL's bilinear filter when ``resize``, else an image of another size is an error naming it and
    ``reference`` (a file of the expected size); zero-padded to ``pad_to`` (centred) when set. The
    same steps as the ``"in_memory"`` test-time pipeline of ``gradtail predict``.
    """

    mode: str
    size: tuple[int, int]
    resize: bool = False
    pad_to: int | None = None
    reference: str = ""

    def __call__(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as im:
                _check_mode(path, im.mode)
                image = im.convert(self.mode)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _image_error(path, e) from None
        h, w = self.size
        if (image.height, image.width) != (h, w):
            if not self.resize:
                raise DataError(
                    f"images differ in size: {path} is {image.height}x{image.width} (HxW), "
                    f"{self.reference} is {h}x{w}; set data.resize: [H, W] to resize them"
                )
            image = image.resize((w, h), Image.BILINEAR)
        array = np.array(image, dtype=np.uint8)  # a copy: PIL's buffer is read-only
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        x = torch.from_numpy(np.ascontiguousarray(array))
        if self.pad_to is not None:
            x = _pad_one(x, self.pad_to)
        return x


def _pad_one(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ConfigError(f"data.pad_to={size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))


def convert_arrays(
    images: torch.Tensor, mode: str, size: tuple[int, int], resize: bool, what: str
) -> torch.Tensor:
    """uint8 (N, C, H, W) arrays converted to ``mode`` and, with ``resize``, to ``size``, image by image
    with PIL (the same conversion and bilinear filter as image files); unchanged when they already fit."""
    from PIL import Image

    channels = 1 if mode == "L" else 3
    n, c, h, w = images.shape
    if c == channels and (h, w) == tuple(size):
        return images
    if (h, w) != tuple(size) and not resize:
        raise DataError(f"{what} images are {h}x{w} (HxW), expected {size[0]}x{size[1]}; set data.resize")
    out = torch.empty((n, channels, *size), dtype=torch.uint8)
    source_mode = "L" if c == 1 else "RGB"
    for i in range(n):
        array = images[i].numpy()
        image = Image.fromarray(array[0] if c == 1 else array.transpose(1, 2, 0), mode=source_mode)
        image = image.convert(mode)
        if (image.height, image.width) != tuple(size):
            image = image.resize((size[1], size[0]), Image.BILINEAR)
        converted = np.array(image, dtype=np.uint8)
        out[i] = torch.from_numpy(converted[None] if converted.ndim == 2 else converted.transpose(2, 0, 1))
    return out


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images in [0, 1] units, over every
    pixel (float64 sums, in chunks); a channel that is constant gets std 1.

    Example:
        >>> import torch
        >>> mean, std = channel_statistics(torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8))
        >>> [round(v, 4) for v in mean], [round(v, 4) for v in std]
        ([0.75], [0.433])
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise DataError("no training images to compute the normalisation from")
    mean = total / count
    var = (squares / count - mean * mean).clamp(min=0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [float(v) for v in mean], [float(v) for v in std]


@dataclass
class _ImagePlan:
    """How the image files of a run are decoded: mode, stored size (before padding), whether resized."""

    mode: str
    size: tuple[int, int]
    resize: bool
    reference: str


def _plan_images(splits: list[SplitSource], cfg: DataConfig) -> _ImagePlan:
    """Mode and size of the image files (module docstring, rule 5); with ``data.check_files`` every header
    is read (unreadable files and mixed sizes are errors now), else only the first training image's."""
    paths = [p for s in splits for p in (s.paths or [])]
    target = _resize_hw(cfg.resize)
    headers = (read_image_header(p) for p in (paths if cfg.check_files else paths[:1]))
    first: tuple[Path, int, int] | None = None
    gray = True
    for path, (h, w, mode) in zip(paths, headers, strict=False):
        gray = gray and mode in _GRAY_MODES
        if first is None:
            first = (path, h, w)
        elif target is None and (h, w) != first[1:]:
            raise DataError(
                f"images differ in size: {first[0]} is {first[1]}x{first[2]} (HxW), {path} is {h}x{w}; "
                "set data.resize: [H, W] to resize them"
            )
    assert first is not None  # readers never return an empty training split
    mode = {1: "L", 3: "RGB"}.get(cfg.channels or 0, "L" if gray else "RGB")
    size = target if target is not None else (first[1], first[2])
    return _ImagePlan(mode=mode, size=size, resize=target is not None, reference=str(first[0]))


def _decode_all(source: SplitSource, decoder: ImageDecoder) -> torch.Tensor:
    assert source.paths is not None
    c = 1 if decoder.mode == "L" else 3
    out = torch.empty((len(source), c, *decoder.size), dtype=torch.uint8)
    for i, path in enumerate(source.paths):
        out[i] = decoder(path)
    return out


# ---------------------------------------------------------------------------------------------- file path
class ImageFileDataset(Dataset):
    """Image files and labels decoded by an :class:`ImageDecoder`: ``dataset[i]`` is (uint8 (C, H, W),
    label). Paths are one byte buffer plus offsets (forked loader workers do not copy them page by page)."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, decoder: ImageDecoder, name: str) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.decoder = decoder
        self.name = name

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, index: int) -> Path:
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return Path(os.fsdecode(self._blob[lo:hi].tobytes()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self.decoder(self.path(index)), int(self.labels[index])


# ---------------------------------------------------------------------------------------------- building
def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def content_sha256(train: SplitSource, class_names: list[str], root: Path) -> str:
    """SHA-256 of the training data itself: the class names, then each training image's path relative to
    ``root`` and its label (image files), or the labels' and images' bytes (arrays)."""
    h = hashlib.sha256(json.dumps(class_names).encode())
    if train.paths is not None:
        for path, label in zip(train.paths, train.labels.tolist(), strict=True):
            h.update(f"{_relative(path, root)}\t{label}\n".encode())
    else:
        assert train.images is not None
        h.update(train.labels.astype("<i8").tobytes())
        h.update(train.images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_classes(source: OwnSource) -> None:
    names = source.class_names
    c = len(names)
    counts = np.bincount(source.train.labels, minlength=c)
    held = {s: getattr(source, s) for s in ("val", "test") if getattr(source, s) is not None}
    for j in np.flatnonzero(counts == 0).tolist():
        elsewhere = ", ".join(
            f"{int((split.labels == j).sum())} {name}"
            for name, split in held.items()
            if (split.labels == j).any()
        )
        also = f" (it has {elsewhere} images)" if elsewhere else ""
        raise DataError(f"class {names[j]!r} has no training images in {source.train.origin}{also}")
    test = source.test
    if test is not None:
        absent = np.flatnonzero(np.bincount(test.labels, minlength=c) == 0).tolist()
        if absent:
            shown = ", ".join(repr(names[j]) for j in absent[:10])
            warnings.warn(
                f"{test.origin}: class(es) {shown} have no test images: their accuracy is not measured",
                stacklevel=3,
            )


def _longtail_split(
    labels: np.ndarray, cfg: DataConfig, names: list[str], val_per_class: int
) -> LongTailSplit:
    lt = cfg.longtail
    assert lt.imbalance_factor is not None
    try:
        return build_longtail_split(
            labels,
            len(names),
            imbalance_factor=lt.imbalance_factor,
            profile=lt.profile or "exp",
            seed=cfg.subset_seed,
            val_per_class=val_per_class,
            n_max=cfg.n_max,
            class_order=cfg.class_order,
        )
    except DataError as e:  # name the classes build_longtail_split reports by label
        message = _CLASS_INDEX.sub(
            lambda m: f"class {names[int(m.group(1))]!r}" if int(m.group(1)) < len(names) else m.group(0),
            str(e),
        )
        raise DataError(f"data.longtail: {message}") from None


def build_own_data(cfg: DataConfig, read: Callable[[DataConfig], OwnSource]) -> ClassificationData:
    """The data of a run from a practitioner's own data (the rules are in the module docstring).

    ``read`` is a reader (:func:`gradtail.data.own_folders.read_image_folders`,
    :func:`gradtail.data.own_csv.read_image_csv`, :func:`gradtail.data.own_npz.read_npz`); the registered
    datasets ``image_folder``, ``image_csv`` and ``npz`` call this with theirs.

    Example:
        >>> import tempfile, warnings
        >>> import numpy as np
        >>> from gradtail.config import DataConfig
        >>> from gradtail.data.builder import build_data
        >>> path = Path(tempfile.mkdtemp()) / "toy.npz"
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1, 2], [30, 20, 10])
        >>> np.savez(path, x_train=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), y_train=y,
        ...          x_test=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8), y_test=np.repeat([0, 1, 2], 3),
        ...          class_names=np.array(["cat", "dog", "owl"]))
        >>> data = build_data(DataConfig(dataset="npz", data_dir=str(path)))
        >>> data.class_names, data.class_counts, data.val.class_counts(), data.in_channels
        (['cat', 'dog', 'owl'], [27, 18, 9], [3, 2, 1], 1)
    """
    check_own_settings(cfg)
    source = read(cfg)
    names = source.class_names
    c = len(names)
    _check_classes(source)
    seed, fractions, lt = cfg.subset_seed, cfg.split_fractions, cfg.longtail

    # 2. test split
    if source.test is not None:
        if fractions.test is not None:
            raise ConfigError(
                f"{source.location} has its own test split ({source.test.origin}); remove "
                "data.split_fractions.test (it carves a test split from data that has none)"
            )
        test, pool, test_from = source.test, source.train, "data"
    else:
        if fractions.test is None:
            raise ConfigError(
                f"{source.location} has no test split ({source.test_hint}): set data.split_fractions.test "
                "(e.g. 0.2) to hold out a stratified share of each class"
            )
        kept, held, small = stratified_holdout(source.train.labels, c, fractions.test, seed, _TEST_TAG)
        _warn_too_small(small, names, "test", source.train.origin)
        test, pool = source.train.take(held), source.train.take(kept)
        test.origin = f"{source.train.origin} (split_fractions.test={fractions.test})"
        test_from = f"split_fractions.test={fractions.test}"

    # 3. + 4. training subset and validation
    val: SplitSource | None = source.val
    if lt.imbalance_factor is not None:
        val_per_class = 0 if source.val is not None else cfg.val_per_class
        split = _longtail_split(pool.labels, cfg, names, val_per_class)
        train_idx = split.train_indices
        if source.val is None and split.val_indices.size:
            val = pool.take(split.val_indices)
        val_from = (
            "data"
            if source.val is not None
            else (f"val_per_class={val_per_class}" if val_per_class else None)
        )
        sampled = {"imbalance_factor": float(lt.imbalance_factor), "profile": lt.profile or "exp"}
    else:
        val_idx = np.empty(0, dtype=np.int64)
        if source.val is not None:
            if fractions.val is not None:
                raise ConfigError(
                    f"{source.location} has its own validation split ({source.val.origin}); remove "
                    "data.split_fractions.val"
                )
            train_idx, val_from = np.arange(len(pool), dtype=np.int64), "data"
        else:
            fraction = DEFAULT_VAL_FRACTION if fractions.val is None else fractions.val
            if fraction > 0:
                train_idx, val_idx, small = stratified_holdout(pool.labels, c, fraction, seed, _VAL_TAG)
                _warn_too_small(small, names, "validation", pool.origin)
                val = pool.take(val_idx) if val_idx.size else None
                val_from = f"split_fractions.val={fraction}"
            else:
                train_idx, val_from = np.arange(len(pool), dtype=np.int64), None
        counts = np.bincount(pool.labels[train_idx], minlength=c).tolist()
        split = LongTailSplit(
            train_indices=train_idx,
            val_indices=val_idx,
            counts=counts,
            val_counts=[],
            sha256="",
            imbalance_factor=max(counts) / max(min(counts), 1),
            profile="as_given",
            seed=seed,
            n_max=max(counts),
        )
        sampled = {"imbalance_factor": None, "profile": None}
    train = pool.take(train_idx)
    split.val_counts = np.bincount(val.labels, minlength=c).tolist() if val is not None else [0] * c
    split.sha256 = content_sha256(train, names, source.root)
    info: dict[str, Any] = {
        **sampled,
        "index_sha256": split_hash(train_idx),
        "source": {
            "dataset": cfg.dataset,
            "data_dir": str(source.location.resolve()),
            "class_names": list(names),
            "test_from": test_from,
            "val_from": val_from,
        },
    }
    splits = {"train": train, "test": test} | ({"val": val} if val is not None else {})
    if train.images is not None:
        return _arrays_bundle(cfg, source, splits, split, info)
    return _files_bundle(cfg, source, splits, split, info)


def _normalisation(
    cfg: DataConfig, channels: int, computed: Callable[[], tuple[list[float], list[float]]]
) -> tuple[list[float], list[float], str]:
    mean, std = cfg.augment.mean, cfg.augment.std
    if mean is not None and std is not None:
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"data.augment.mean / std have {len(mean)} / {len(std)} values for {channels}-channel images"
            )
        return list(mean), list(std), "data.augment"
    if mean is not None or std is not None:
        raise ConfigError(
            "set both data.augment.mean and data.augment.std, or neither (computed from the data)"
        )
    m, s = computed()
    return m, s, "training set"


def _arrays(split: SplitSource, images: torch.Tensor, names: list[str], tag: str) -> ImageArrays:
    return ImageArrays(images, torch.from_numpy(split.labels.astype(np.int64)), len(names), list(names), tag)


def _memory_bundle(
    cfg: DataConfig,
    source: OwnSource,
    images: dict[str, torch.Tensor],
    splits: dict[str, SplitSource],
    split: LongTailSplit,
    info: dict[str, Any],
) -> ClassificationData:
    names = source.class_names
    channels, h, w = (int(v) for v in images["train"].shape[1:])
    mean, std, norm_from = _normalisation(cfg, channels, lambda: channel_statistics(images["train"]))
    arrays = {s: _arrays(splits[s], images[s], names, f"{cfg.dataset}-{s}") for s in images}
    info["source"] |= {"storage": "memory", "image_size": [channels, h, w], "normalisation_from": norm_from}
    val = arrays.get("val")
    return ClassificationData(
        name=cfg.dataset,
        class_names=list(names),
        train=pad_images(arrays["train"], cfg.pad_to),
        val=None if val is None else pad_images(val, cfg.pad_to),
        test=pad_images(arrays["test"], cfg.pad_to),
        split=split,
        mean=mean,
        std=std,
        augment_cfg=cfg.augment,
        stored_size=(channels, h, w),
        pad_to=cfg.pad_to,
        resize_to_size=cfg.resize is not None,
        source=info,
    )


def _arrays_bundle(
    cfg: DataConfig,
    source: OwnSource,
    splits: dict[str, SplitSource],
    split: LongTailSplit,
    info: dict[str, Any],
) -> ClassificationData:
    """The bundle of array data (npz): held in memory. ``splits``: train, test and optionally val."""
    train = splits["train"]
    first = {s: v.images for s, v in splits.items() if v.images is not None}
    target = _resize_hw(cfg.resize)
    if target is None:
        sizes = {s: tuple(x.shape[-2:]) for s, x in first.items()}
        ref = sizes["train"]
        for s, size in sizes.items():
            if size != ref:
                raise DataError(
                    f"images differ in size: {train.origin} images are {ref[0]}x{ref[1]} (HxW), "
                    f"{splits[s].origin} images are {size[0]}x{size[1]}; "
                    "set data.resize: [H, W] to resize them"
                )
    size = target if target is not None else tuple(first["train"].shape[-2:])
    gray = all(x.shape[1] == 1 for x in first.values())
    mode = {1: "L", 3: "RGB"}.get(cfg.channels or 0, "L" if gray else "RGB")
    images = {
        s: convert_arrays(x, mode, size, target is not None, splits[s].origin) for s, x in first.items()
    }
    return _memory_bundle(cfg, source, images, splits, split, info)


def _files_bundle(
    cfg: DataConfig,
    source: OwnSource,
    splits: dict[str, SplitSource],
    split: LongTailSplit,
    info: dict[str, Any],
) -> ClassificationData:
    """The bundle of image files: decoded into memory within ``data.memory_budget_mb``, else kept in the
    files and decoded by workers. ``splits``: train, test and optionally val."""
    train = splits["train"]
    every = [source.train] + [s for s in (source.val, source.test) if s is not None]
    plan = _plan_images(every, cfg)
    channels = 1 if plan.mode == "L" else 3
    h, w = plan.size
    side_h, side_w = (cfg.pad_to, cfg.pad_to) if cfg.pad_to is not None else (h, w)
    budget = DEFAULT_MEMORY_BUDGET_MB if cfg.memory_budget_mb is None else cfg.memory_budget_mb
    needed = sum(len(s) for s in splits.values()) * channels * side_h * side_w
    decoder = ImageDecoder(plan.mode, plan.size, plan.resize, None, plan.reference)
    if needed <= budget * 2**20:
        images = {s: _decode_all(v, decoder) for s, v in splits.items()}
        return _memory_bundle(cfg, source, images, splits, split, info)

    def sample_statistics() -> tuple[list[float], list[float]]:
        n = len(train)
        picks = np.unique(np.linspace(0, n - 1, min(n, NORMALIZATION_SAMPLE)).round().astype(np.int64))
        return channel_statistics(_decode_all(train.take(picks), decoder))

    mean, std, norm_from = _normalisation(cfg, channels, sample_statistics)
    padded = ImageDecoder(plan.mode, plan.size, plan.resize, cfg.pad_to, plan.reference)
    datasets = {
        s: ImageFileDataset(v.paths or [], v.labels, padded, f"{cfg.dataset}-{s}") for s, v in splits.items()
    }
    info["source"] |= {
        "storage": "files",
        "image_size": [channels, h, w],
        "normalisation_from": norm_from
        if norm_from != "training set"
        else f"training set (<= {NORMALIZATION_SAMPLE} images)",
    }
    return ClassificationData(
        name=cfg.dataset,
        class_names=list(source.class_names),
        storage="files",
        train=datasets["train"],
        val=datasets.get("val"),
        test=datasets["test"],
        split=split,
        mean=mean,
        std=std,
        augment_cfg=cfg.augment,
        stored_size=(channels, h, w),
        pad_to=cfg.pad_to,
        resize_to_size=plan.resize,
        num_workers=cfg.num_workers,
        source=info,
    )


__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "DEFAULT_VAL_FRACTION",
    "IMAGE_SUFFIXES",
    "OWN_DATASETS",
    "ImageDecoder",
    "ImageFileDataset",
    "OwnSource",
    "SplitSource",
    "build_own_data",
    "channel_statistics",
    "check_own_settings",
    "content_sha256",
    "convert_arrays",
    "data_location",
    "read_class_list",
    "read_image_header",
    "resolve_labels",
    "stratified_holdout",
]
