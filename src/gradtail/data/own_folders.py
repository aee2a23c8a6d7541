"""Own data in class folders (torchvision's ImageFolder layout): ``dataset: image_folder``.

``data.data_dir`` holds either

- **one tree**, ``root/<class>/**/<image>``: the test split (``data.split_fractions.test``, required) and
  the validation split (``data.split_fractions.val``, default 0.1) are stratified shares of it; or
- **a pre-split tree**, ``root/train/<class>/...``, ``root/test/<class>/...`` and optionally
  ``root/val/<class>/...`` (a tree with a ``train/`` folder is read this way; nothing else may sit next
  to ``train/``, ``val/`` and ``test/``). Without ``test/``, ``data.split_fractions.test`` carves one.

Images are the files with a suffix of :data:`~gradtail.data.own_data.IMAGE_SUFFIXES` (any case) inside a
class folder, recursively, in sorted order (ImageFolder's order), class by class in label order; hidden
files and folders (``.name``) and other files are skipped. Classes are the training class folders,
sorted by name (ImageFolder's label order), or the names of ``data.class_list`` (relative to
``data.data_dir``) in its order, which must match the folders exactly. An empty class folder, a
validation / test class folder that is not a training class, a missing folder: one-line
:class:`~gradtail.errors.DataError` naming it. The rest (splits, long-tailed subset, images) is
:func:`gradtail.data.own_data.build_own_data`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gradtail.config import DataConfig
from gradtail.data.base import IMAGE_SUFFIXES
from gradtail.data.own_data import OwnSource, SplitSource, data_location, read_class_list
from gradtail.errors import DataError

SPLIT_FOLDERS = ("train", "val", "test")
_EXPECTS = "a folder of class folders, root/<class>/<image>.png, or root/train/ and root/test/ trees"


def _hidden(name: str) -> bool:
    return name.startswith(".")


def class_folders(folder: Path) -> list[Path]:
    """The class folders of ``folder``: its sub-folders (not hidden), sorted by name."""
    return sorted((d for d in folder.iterdir() if d.is_dir() and not _hidden(d.name)), key=lambda d: d.name)


def images_in(folder: Path) -> tuple[list[Path], int]:
    """(image files inside ``folder``, recursively in ImageFolder's sorted order; how many other files
    were skipped). Hidden files and folders are skipped."""
    images: list[Path] = []
    others = 0
    for current, dirs, files in sorted(os.walk(folder, followlinks=True)):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        if any(_hidden(part) for part in Path(current).relative_to(folder).parts):
            continue
        for name in sorted(files):
            if _hidden(name):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                images.append(Path(current) / name)
            else:
                others += 1
    return images, others


def _class_names(train_dir: Path, class_list: tuple[list[str], Path] | None) -> list[str]:
    folders = [d.name for d in class_folders(train_dir)]
    if not folders:
        raise DataError(f"{train_dir} has no class folders (image_folder reads {_EXPECTS})")
    if class_list is None:
        return folders
    names, list_path = class_list
    listed = set(names)
    for folder in folders:
        if folder not in listed:
            raise DataError(f"class folder {train_dir / folder} is not in the class list {list_path}")
    present = set(folders)
    for name in names:
        if name not in present:
            raise DataError(f"class {name!r} of the class list {list_path} has no folder {train_dir / name}")
    return list(names)


def _read_split(folder: Path, names: list[str], split: str, train_dir: Path) -> SplitSource:
    """The images of one split, class by class in label order."""
    folders = {d.name: d for d in class_folders(folder)}
    known = set(names)
    for name, class_dir in folders.items():
        if name not in known:
            raise DataError(
                f"{split} class folder {class_dir} is not a training class (there is no {train_dir / name})"
            )
    paths: list[Path] = []
    labels: list[int] = []
    for j, name in enumerate(names):
        class_dir = folders.get(name)
        if class_dir is None:
            continue
        images, others = images_in(class_dir)
        if not images:
            skipped = f"; it holds {others} other file(s)" if others else ""
            raise DataError(f"empty class folder {class_dir}: no {', '.join(IMAGE_SUFFIXES)} images{skipped}")
        paths += images
        labels += [j] * len(images)
    if not paths:
        raise DataError(f"{folder} has no class folders with images ({split} split)")
    return SplitSource(labels=np.asarray(labels, dtype=np.int64), origin=str(folder), paths=paths)


def read_image_folders(cfg: DataConfig) -> OwnSource:
    """The class folders under ``data.data_dir`` (see the module docstring).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> layout = [("train", "cat", 3), ("train", "dog", 2), ("test", "cat", 1), ("test", "dog", 1)]
        >>> for split, cls, n in layout:
        ...     (root / split / cls).mkdir(parents=True, exist_ok=True)
        ...     for i in range(n):
        ...         Image.new("L", (4, 4)).save(root / split / cls / f"{i}.png")
        >>> source = read_image_folders(DataConfig(dataset="image_folder", data_dir=str(root)))
        >>> source.class_names, source.train.labels.tolist(), source.test.labels.tolist(), source.val
        (['cat', 'dog'], [0, 0, 0, 1, 1], [0, 1], None)
    """
    root = data_location(cfg, _EXPECTS)
    if not root.is_dir():
        raise DataError(f"data.data_dir {root} is not a folder (image_folder reads {_EXPECTS})")
    class_list = read_class_list(cfg, root)
    train_dir = root / "train"
    if train_dir.is_dir():
        extra = [d.name for d in class_folders(root) if d.name not in SPLIT_FOLDERS]
        if extra:
            raise DataError(
                f"{root} has train/ and also {extra[0]}/: a pre-split tree holds only train/, val/ and test/ "
                "(each with one folder per class)"
            )
        names = _class_names(train_dir, class_list)
        splits = {s: _read_split(root / s, names, s, train_dir) for s in SPLIT_FOLDERS if (root / s).is_dir()}
    else:
        names = _class_names(root, class_list)
        splits = {"train": _read_split(root, names, "train", root)}
    return OwnSource(
        name="image_folder",
        location=root,
        root=root,
        class_names=names,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        test_hint=f"no {root / 'test'} folder" if train_dir.is_dir() else "one tree of class folders",
    )


__all__ = ["SPLIT_FOLDERS", "class_folders", "images_in", "read_image_folders"]
