"""Image files -> model input at test time, from the ``preprocessing`` mapping a checkpoint carries.

A checkpoint stores how its run turned images into model input
(:meth:`gradtail.contracts.RunData.preprocessing`); this module applies it to image files without the
training data (``gradtail predict``):

- ``"in_memory"`` (Fashion-MNIST, CIFAR, synthetic, own data): decode to ``mode`` (``"L"`` or ``"RGB"``);
  the image must be ``size`` = [H, W], or is resized to it (bilinear, PIL) when ``resize_to_size``; it is
  zero-padded to ``pad_to`` x ``pad_to`` (centred, the extra row / column at the bottom / right, as the
  run's stored images were) and normalised as the run's evaluation batches,
  ``(x / 255 - mean) / std`` per channel (:meth:`gradtail.data.loader.BatchAugment.normalize`);
- ``"imagenet"`` (ImageNet-LT, Places-LT, iNaturalist): decode RGB, then the test transform of
  :func:`gradtail.data.image_list.imagenet_transform` (resize the shorter side to ``resize``, centre-crop
  ``image_size``, normalise).

:func:`collect_image_paths` expands the inputs of a command line: image files, folders (every image
inside, recursively, sorted) and list files (``.txt`` / ``.csv``). Every problem is a one-line
:class:`~gradtail.errors.DataError` naming the file (unreadable, wrong size, nothing found).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: file suffixes (lower case) taken from folders as images
from gradtail.data.base import IMAGE_SUFFIXES
from gradtail.errors import DataError

#: file suffixes read as lists of image paths
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".csv")

_TRANSFORMS = ("in_memory", "imagenet")
_MODE_CHANNELS = {"L": 1, "RGB": 3}


# ---------------------------------------------------------------------------------------------- inputs
def collect_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The image files named by ``inputs``, in the order given (duplicates kept).

    - an image file is taken as is (any suffix but ``.txt`` / ``.csv``);
    - a folder: every file with an image suffix (:data:`IMAGE_SUFFIXES`, any case) inside it,
      recursively, sorted by path; a folder without images is an error;
    - a list file (``.txt`` / ``.csv``): one path per line (blank lines and ``#`` comments skipped), or a
      CSV with a header row holding a ``path`` column; relative paths are relative to the list file's
      folder; a listed file that does not exist is an error naming the list file and line.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("b.png", "sub/a.PNG", "notes.md"):
        ...     (root / name).parent.mkdir(exist_ok=True)
        ...     _ = (root / name).write_bytes(b"")
        >>> _ = (root / "list.txt").write_text("b.png\\n# a comment\\nsub/a.PNG\\n")
        >>> [p.relative_to(root).as_posix() for p in collect_image_paths([root])]
        ['b.png', 'sub/a.PNG']
        >>> [p.relative_to(root).as_posix() for p in collect_image_paths([root / "list.txt"])]
        ['b.png', 'sub/a.PNG']
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not found:
                raise DataError(
                    f"no images found in folder {path} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
                )
            paths += found
        elif path.is_file():
            paths += read_path_list(path) if path.suffix.lower() in LIST_SUFFIXES else [path]
        else:
            raise DataError(f"input {path} does not exist (give image files, folders or .txt/.csv lists)")
    return paths


def read_path_list(list_file: Path) -> list[Path]:
    """The image paths of a ``.txt`` / ``.csv`` list (see :func:`collect_image_paths`)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"list file {list_file} is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read list file {list_file}: {e.strerror or e}") from None
    entries: list[tuple[int, str]] = []
    if list_file.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        numbered = [(i + 1, row) for i, row in enumerate(rows) if any(cell.strip() for cell in row)]
        column = 0
        if numbered and "path" in [cell.strip() for cell in numbered[0][1]]:
            column = [cell.strip() for cell in numbered[0][1]].index("path")
            numbered = numbered[1:]
        elif any(len(row) > 1 for _, row in numbered):
            line = next(n for n, row in numbered if len(row) > 1)
            raise DataError(
                f"{list_file}:{line}: several columns but no header with a 'path' column "
                "(give one path per line, or a header row naming the 'path' column)"
            )
        for line, row in numbered:
            cell = row[column].strip() if column < len(row) else ""
            if not cell:
                raise DataError(f"{list_file}:{line}: empty path")
            entries.append((line, cell))
    else:
        for i, raw in enumerate(text.splitlines()):
            entry = raw.strip()
            if entry and not entry.startswith("#"):
                entries.append((i + 1, entry))
    if not entries:
        raise DataError(f"no image paths listed in {list_file}")
    paths = []
    for line, entry in entries:
        path = Path(entry)
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            raise DataError(f"{list_file}:{line}: image {path} does not exist")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- checks
def check_preprocessing(preprocessing: Any) -> dict[str, Any]:
    """The mapping itself when it describes a known pipeline; a :class:`DataError` naming what is wrong
    (a checkpoint written before checkpoints carried it, or damaged)."""
    if not isinstance(preprocessing, dict):
        raise DataError("the checkpoint carries no test-time preprocessing (written by an older gradtail?)")
    kind = preprocessing.get("transform")
    if kind not in _TRANSFORMS:
        raise DataError(f"unknown preprocessing transform {kind!r} (known: {', '.join(_TRANSFORMS)})")
    required = ("mode", "size", "mean", "std") if kind == "in_memory" else ("image_size", "mean", "std")
    missing = [k for k in required if preprocessing.get(k) is None]
    if missing:
        raise DataError(f"the checkpoint's preprocessing lacks {', '.join(missing)}")
    mode = preprocessing.get("mode", "RGB")
    if mode not in _MODE_CHANNELS:
        raise DataError(f"unknown preprocessing mode {mode!r} (known: {', '.join(_MODE_CHANNELS)})")
    mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
    if len(mean) != _MODE_CHANNELS[mode] or len(std) != len(mean) or any(s <= 0 for s in std):
        raise DataError(f"preprocessing mean {mean} / std {std} do not fit mode {mode} (std > 0)")
    return preprocessing


def input_channels(preprocessing: dict[str, Any]) -> int:
    """Channels of the model input the pipeline makes (1 for mode ``L``, 3 for ``RGB``)."""
    return _MODE_CHANNELS[check_preprocessing(preprocessing).get("mode", "RGB")]


# ---------------------------------------------------------------------------------------------- decoding
def open_image(path: Path, mode: str) -> Any:
    """The image file as a PIL image in ``mode``; a one-line :class:`DataError` when missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
        reason = reason or e.__class__.__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def decode_image(path: str | Path, preprocessing: dict[str, Any]) -> torch.Tensor:
    """One image file of an ``in_memory`` pipeline as stored by the run: uint8 (C, H, W) of ``size``
    (resized to it when ``resize_to_size``), before padding and normalisation."""
    from PIL import Image

    path = Path(path)
    p = check_preprocessing(preprocessing)
    if p["transform"] != "in_memory":
        raise DataError(f"decode_image is for 'in_memory' pipelines, not {p['transform']!r}")
    im = open_image(path, p["mode"])
    h, w = (int(v) for v in p["size"])
    if (im.height, im.width) != (h, w):
        if not p.get("resize_to_size"):
            raise DataError(
                f"image {path} is {im.height}x{im.width} (HxW) but the model takes {h}x{w} images "
                "(its run did not resize images of another size)"
            )
        im = im.resize((w, h), Image.BILINEAR)
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def pad_images(images: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """Zero-pad (N, C, H, W) to ``pad_to`` x ``pad_to``, centred as the run's stored images were."""
    if pad_to is None:
        return images
    h, w = images.shape[-2:]
    if h > pad_to or w > pad_to:
        raise DataError(f"preprocessing pad_to={pad_to} is smaller than the images ({h}x{w})")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))


def load_images(paths: Sequence[str | Path], preprocessing: dict[str, Any]) -> torch.Tensor:
    """Model input (float32 (N, C, H, W), on the CPU) for the image files ``paths``.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = Path(tempfile.mkdtemp()) / "gray.png"
        >>> Image.new("L", (3, 2), color=51).save(path)  # 2 x 3 pixels of value 51 = 0.2 * 255
        >>> prep = {"transform": "in_memory", "mode": "L", "size": [2, 3], "resize_to_size": False,
        ...         "pad_to": 4, "mean": [0.5], "std": [0.25]}
        >>> x = load_images([path], prep)
        >>> tuple(x.shape), round(float(x[0, 0, 1, 0]), 4), round(float(x[0, 0, 0, 0]), 4)  # image, padding
        ((1, 1, 4, 4), -1.2, -2.0)
    """
    from gradtail.data.loader import BatchAugment

    p = check_preprocessing(preprocessing)
    if not paths:
        raise DataError("no images to load")
    if p["transform"] == "imagenet":
        from gradtail.data.image_list import imagenet_transform

        size = int(p["image_size"])
        transform = imagenet_transform(
            train=False, size=size, resize=p.get("resize"), mean=list(p["mean"]), std=list(p["std"])
        )
        return torch.stack([transform(open_image(Path(path), "RGB")) for path in paths]).float()
    images = pad_images(torch.stack([decode_image(path, p) for path in paths]), p.get("pad_to"))
    return BatchAugment(mean=list(p["mean"]), std=list(p["std"])).normalize(images)


__all__ = [
    "IMAGE_SUFFIXES",
    "LIST_SUFFIXES",
    "check_preprocessing",
    "collect_image_paths",
    "decode_image",
    "input_channels",
    "load_images",
    "pad_images",
    "read_path_list",
]
