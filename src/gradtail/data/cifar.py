"""CIFAR-10 / CIFAR-100 from the official "python version" pickles (docs/methods/protocol.md §2).

Resolution order for the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``): an
explicit ``data_dir`` is the only root looked in (a mistyped path is an error, not a silent fallback);
without one, ``$GRADTAIL_DATA`` then the cache (``~/.cache/gradtail``); a root that
*is* the folder also works. Failing that, an official tarball found in one of those roots is checked
against its MD5 and extracted next to itself; failing that (with ``download=True``) the tarball is
downloaded into the first root, MD5-checked and extracted.

The pickles are read with a restricted unpickler that only builds the objects the official files
contain (dicts, lists, strings, numbers, NumPy arrays), so a hostile file cannot run code.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.data.base import ImageArrays
from gradtail.data.download import ENV_VAR, cache_root, download_file, extract_tar, verify_checksum
from gradtail.errors import ConfigError, DataError

IMAGE_SHAPE = (3, 32, 32)
_ROW = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR variant comes from and how its files are laid out (docs/methods/protocol.md §2)."""

    name: str
    folder: str
    tarball: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def required_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        name="CIFAR-10",
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSource(
        name="CIFAR-100",
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}

# The only globals an official CIFAR pickle (Python 2 cPickle, protocol 2) or a Python 3 protocol-2
# re-pickle of one may name. The NumPy callables are taken from live objects so both the NumPy 1
# ("numpy.core") and NumPy 2 ("numpy._core") spellings map to the same function.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.int64(0).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}

_CORRUPT_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only :data:`_SAFE_GLOBALS`; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def read_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one CIFAR pickle into a dict with ``str`` keys (bytes keys are decoded as latin-1).

    Python 2 strings are decoded as latin-1 (like torchvision), which NumPy needs to rebuild arrays;
    Python 3 bytes stay bytes. Any failure is a :class:`DataError` naming the file.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DataError(f"{p}: refusing to unpickle: the file references {e}, not CIFAR data") from None
    except _CORRUPT_ERRORS as e:
        raise DataError(f"{p}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{p}: expected a pickled dict, got {type(obj).__name__}")
    return {_as_str(k): v for k, v in obj.items()}


def _as_str(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _read_batch(path: Path, src: CifarSource) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one batch file, shapes checked."""
    d = read_pickle(path)
    for key in ("data", src.label_key):
        if key not in d:
            raise DataError(f"{path}: missing key {key!r} (has {sorted(map(str, d))})")
    data, labels = d["data"], d[src.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 N x {_ROW} array, got {desc}")
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {src.label_key!r} is not a list of labels ({e})") from None
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{path}: {src.label_key!r} must be a list of ints, got {y.dtype} {y.shape}")
    if y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= src.num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{path}: label {bad} is outside [0, {src.num_classes})")
    return data.reshape(-1, *IMAGE_SHAPE), y.astype(np.int64)


def _read_names(path: Path, src: CifarSource) -> list[str]:
    d = read_pickle(path)
    names = d.get(src.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != src.num_classes:
        got = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: {src.names_key!r} must list {src.num_classes} class names, got {got}")
    return [str(_as_str(n)) for n in names]


def _source(name: str) -> CifarSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown CIFAR variant {name!r}; valid: {', '.join(sorted(SOURCES))}") from None


def _missing(folder: Path, src: CifarSource) -> list[str]:
    return [f for f in src.required_files if not (folder / f).is_file()]


def _roots(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is not None:  # an explicit folder is the only place looked in (a typo must not pass)
        return [Path(data_dir)]
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env))
    roots.append(cache_root())
    return roots


def _extracted(archive: Path, root: Path, src: CifarSource) -> Path:
    extract_tar(archive, root)
    folder = root / src.folder
    missing = _missing(folder, src)
    if missing:
        raise DataError(f"{archive}: extracted, but {folder} lacks {', '.join(missing)}")
    return folder


def resolve_cifar_dir(
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> Path:
    """The extracted CIFAR folder, extracting or downloading the tarball if needed (module doc)."""
    src = _source(name)
    roots = _roots(data_dir)
    looked: list[str] = []
    partial: list[str] = []
    for root in roots:
        for folder in (root / src.folder, root):
            missing = _missing(folder, src)
            if not missing:
                return folder
            looked.append(str(folder))
            if folder.name == src.folder and folder.is_dir():
                partial.append(f"{folder} lacks {', '.join(missing)}")
    for root in roots:
        archive = root / src.tarball
        if archive.is_file():
            verify_checksum(archive, md5=src.md5)
            return _extracted(archive, root, src)
        looked.append(str(archive))
    where = "; ".join(partial) + ("; " if partial else "")
    hint = (
        f"pass data_dir or set {ENV_VAR} to a folder holding {src.folder}/ or {src.tarball} (from {src.url})"
    )
    if not download:
        raise DataError(
            f"{src.name} not found: looked in {', '.join(looked)}; {where}download disabled; {hint}"
        )
    target = roots[0]
    try:
        archive = download_file(src.url, target / src.tarball, md5=src.md5)
    except DataError as e:
        looked_in = ", ".join(looked)
        raise DataError(
            f"{src.name} not found locally (looked in {looked_in}); {where}download failed: {e}; {hint}"
        ) from None
    return _extracted(archive, target, src)


def load_cifar(
    name: str, train: bool, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageArrays:
    """CIFAR-10 (``"cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) as uint8 (N, 3, 32, 32)."""
    src = _source(name)
    folder = resolve_cifar_dir(name, data_dir, download)
    files = src.train_files if train else src.test_files
    batches = [_read_batch(folder / f, src) for f in files]
    class_names = _read_names(folder / src.meta_file, src)
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
    return ImageArrays(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        num_classes=src.num_classes,
        class_names=class_names,
        name=f"{name}-{'train' if train else 'test'}",
    )
