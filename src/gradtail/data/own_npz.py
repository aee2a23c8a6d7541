"""Own data as arrays in an ``.npz`` file: ``dataset: npz``.

``data.data_dir`` is the ``.npz`` file (or a folder holding exactly one). Arrays:

- ``x_train``, ``y_train`` (required); ``x_test``, ``y_test`` (without them ``data.split_fractions.test``
  carves a test split); ``x_val``, ``y_val`` (optional); ``class_names`` (optional, strings in label order);
- ``x``: ``N,H,W`` (grayscale), ``N,H,W,C`` or ``N,C,H,W`` with C in {1, 3}; a shape that reads both
  ways (e.g. ``N,3,8,3``) is an error: store ``N,H,W,C``. ``uint8``, or another integer type with values
  in 0..255, or float in **[0, 1]** (scaled by 255, rounded); floats outside [0, 1] (e.g. 0..255) are an
  error: store such values as ``uint8``. Non-finite values are an error.
- ``y``: 1-D, one label per image: integers (the labels, ``0..C-1``, C = the largest training label + 1,
  or the number of class names when given) or strings (class names; see
  :func:`gradtail.data.own_data.resolve_labels`). Names come from the ``class_names`` array or from
  ``data.class_list`` (not both).

Arrays are always held in memory. Every problem is a one-line :class:`~gradtail.errors.DataError`; a file
without the needed arrays names the arrays it has.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from gradtail.config import DataConfig
from gradtail.data.own_data import OwnSource, SplitSource, data_location, read_class_list, resolve_labels
from gradtail.errors import ConfigError, DataError

_EXPECTS = "an .npz file with x_train, y_train, x_test, y_test (x_val, y_val, class_names optional)"
_CHANNELS = (1, 3)


def find_npz(location: Path) -> Path:
    """``location`` itself, or the one ``.npz`` file in the folder ``location``."""
    if location.is_file():
        return location
    found = sorted(p for p in location.iterdir() if p.suffix.lower() == ".npz" and p.is_file())
    if len(found) != 1:
        what = (
            "no .npz file" if not found else f"{len(found)} .npz files ({', '.join(p.name for p in found)})"
        )
        raise DataError(f"{location} holds {what}; set data.data_dir to the .npz file")
    return found[0]


def images_from_array(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    """``x`` as uint8 (N, C, H, W) (see the module docstring for the layouts and value ranges taken)."""
    where = f"{path}: {key}"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in _CHANNELS, x.shape[3] in _CHANNELS
        if first and last:
            raise DataError(
                f"{where} has shape {x.shape}: its layout is ambiguous (channels first or last); "
                "store it as N,H,W,C"
            )
        if last:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise DataError(f"{where} has shape {x.shape}: images need 1 or 3 channels (N,H,W,C or N,C,H,W)")
    else:
        raise DataError(f"{where} has shape {x.shape}: expected N,H,W or N,H,W,C or N,C,H,W images")
    if x.shape[0] == 0:
        raise DataError(f"{where} holds no images")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(
            f"{where} has dtype {x.dtype}: images must be uint8, integers in 0..255 or floats in [0, 1]"
        )
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{where} holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{where} holds floats in [{lo:g}, {hi:g}]: float images must be in [0, 1] "
                "(store 0..255 values as uint8)"
            )
        x = np.rint(x.astype(np.float64) * 255.0)
    else:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where} holds integers in [{lo}, {hi}]: images must be in 0..255")
    return torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8)))


def _label_strings(y: np.ndarray, key: str, path: Path, n: int) -> list[str]:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{path}: {key} has shape {y.shape}, expected ({n},) (one label per image)")
    if np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_:
        return [str(int(v)) for v in y.tolist()]
    if y.dtype.kind == "U":
        return [str(v) for v in y.tolist()]
    if y.dtype.kind == "S":
        return [v.decode("utf-8") for v in y.tolist()]
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and np.all(y == np.round(y)):
        return [str(int(v)) for v in y.tolist()]
    raise DataError(f"{path}: {key} has dtype {y.dtype}: labels must be integers or strings")


def read_npz(cfg: DataConfig) -> OwnSource:
    """The arrays of the ``.npz`` file at ``data.data_dir`` (see the module docstring).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "toy.npz"
        >>> np.savez(path, x_train=np.zeros((3, 4, 4, 3), np.uint8), y_train=np.array([0, 1, 1]),
        ...          x_test=np.zeros((2, 4, 4, 3), np.uint8), y_test=np.array([1, 0]))
        >>> source = read_npz(DataConfig(dataset="npz", data_dir=str(path)))
        >>> source.class_names, tuple(source.train.images.shape), source.test.labels.tolist()
        (['0', '1'], (3, 3, 4, 4), [1, 0])
    """
    path = find_npz(data_location(cfg, _EXPECTS))
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(
            f"cannot read {path} as an .npz archive: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive of x_train, y_train, x_test, y_test"
        )
    with archive:
        keys = sorted(archive.files)

        def missing(what: str) -> DataError:
            return DataError(
                f"{path} has no {what} (its arrays: {', '.join(keys) or 'none'}); an npz dataset needs "
                "x_train, y_train, x_test, y_test (x_val, y_val, class_names optional)"
            )

        def load(key: str) -> np.ndarray:
            try:
                return np.asarray(archive[key])
            except ValueError:
                raise DataError(
                    f"{path}: array {key} holds Python objects; store numbers (and class names as strings)"
                ) from None
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise DataError(f"{path}: cannot read array {key} ({e})") from None

        for needed in ("x_train", "y_train"):
            if needed not in keys:
                raise missing(needed)
        for split in ("val", "test"):
            x_key, y_key = f"x_{split}", f"y_{split}"
            if (x_key in keys) != (y_key in keys):
                raise missing(y_key if x_key in keys else x_key)
        present = ["train"] + [s for s in ("val", "test") if f"x_{s}" in keys]
        images = {s: images_from_array(load(f"x_{s}"), f"x_{s}", path) for s in present}
        raw = {s: _label_strings(load(f"y_{s}"), f"y_{s}", path, images[s].shape[0]) for s in present}
        names_array = load("class_names") if "class_names" in keys else None
    class_list = read_class_list(cfg, path.parent)
    if names_array is not None:
        if class_list is not None:
            raise ConfigError(f"{path} has a class_names array and data.class_list is set: give one of them")
        if names_array.ndim != 1 or names_array.dtype.kind not in "US":
            raise DataError(
                f"{path}: class_names must be a 1-D array of strings, "
                f"got {names_array.dtype} {names_array.shape}"
            )
        listed = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in names_array.tolist()]
        if len(set(listed)) != len(listed):
            raise DataError(f"{path}: class_names names a class twice")
        class_list = (listed, f"{path} (class_names)")
    names, labels = resolve_labels(raw, class_list, lambda split, i: f"{path}: y_{split}[{i}]")
    splits = {
        s: SplitSource(labels=labels[s], origin=f"{path.name}: x_{s}", images=images[s]) for s in present
    }
    return OwnSource(
        name="npz",
        location=path,
        root=path.parent,
        class_names=names,
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        test_hint="no x_test / y_test arrays",
    )


__all__ = ["find_npz", "images_from_array", "read_npz"]
