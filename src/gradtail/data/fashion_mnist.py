"""Fashion-MNIST from its IDX files (docs/methods/protocol.md §2).

Where the files are looked for: an explicit ``data_dir`` (and its ``fashion-mnist`` sub-folder) and
nowhere else, so a mistyped path is an error rather than a silent fallback; without one, in order:
``$GRADTAIL_DATA/fashion-mnist`` and ``$GRADTAIL_DATA``, Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), the download cache; failing
all of those (and with ``download=True``) the files are fetched from the official mirror and checked
against their MD5s. Local files are not checksummed (Debian recompresses them) but every file's size is
checked exactly against its IDX header.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from gradtail.data.base import ImageArrays
from gradtail.data.download import ENV_VAR, cache_root, download_file
from gradtail.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# (file name, MD5 of the official .gz), as published with the dataset (and listed by torchvision).
FILES = {
    "train-images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test-images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test-labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}

SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
SUBDIR = "fashion-mnist"

# IDX type byte -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a NumPy array of its header's shape and type.

    The magic number is ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    data. The file must hold exactly the bytes the header announces: a truncated file (or one with
    trailing bytes) is a :class:`DataError` that gives expected and actual sizes.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DataError(f"{p}: truncated IDX file: {len(data)} bytes, too short for the magic number")
    (magic,) = struct.unpack(">I", data[:4])
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{p}: not an IDX file (magic number {magic})")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{p}: magic number is {magic}, expected {expected_magic}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{p}: truncated IDX header: {len(data)} bytes, expected at least {header_len}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing data"
        raise DataError(
            f"{p}: IDX file {what}: header {tuple(dims)} needs {expected} bytes"
            f"{' (uncompressed)' if _is_gzip(p) else ''}, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _find_file(folder: Path, gz_name: str) -> Path | None:
    """``name.gz`` or the uncompressed ``name`` inside ``folder``, if either exists."""
    for candidate in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(folder: Path) -> list[str]:
    """The names of the files (``.gz`` spelling) that ``folder`` holds in neither form."""
    return [name for name, _ in FILES.values() if _find_file(folder, name) is None]


def _has_all_files(folder: Path) -> bool:
    return not _missing_files(folder)


def _describe(folders: list[Path]) -> tuple[str, bool]:
    """What each folder searched lacks, in one line; and whether any holds some (not all) files."""
    parts, partial = [], False
    for folder in folders:
        if not folder.is_dir():
            parts.append(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}")
            continue
        missing = _missing_files(folder)
        if len(missing) == len(FILES):
            parts.append(f"{folder} holds none of the files")
        else:
            partial = True
            present = len(FILES) - len(missing)
            parts.append(f"{folder} lacks {', '.join(missing)} (has the other {present})")
    return "; ".join(parts), partial


def _candidates(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    out: list[Path] = []
    if data_dir is not None:  # an explicit folder is the only place looked in (a typo must not pass)
        return [Path(data_dir), Path(data_dir) / SUBDIR]
    env = os.environ.get(ENV_VAR)
    if env:
        out += [Path(env) / SUBDIR, Path(env)]
    out += list(SYSTEM_DIRS)
    out.append(cache_root() / SUBDIR)
    return out


def _download_target(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir) / SUBDIR
    env = os.environ.get(ENV_VAR)
    return Path(env) / SUBDIR if env else cache_root() / SUBDIR


def _download_all(target: Path) -> None:
    """Fetch the missing files into ``target`` from the first mirror that works (MD5-checked)."""
    for name, md5 in FILES.values():
        if _find_file(target, name) is not None:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                download_file(mirror + name, target / name, md5=md5)
                break
            except DataError as e:
                errors.append(str(e))
        else:
            raise DataError("; ".join(errors))


def resolve_fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """The folder holding all four Fashion-MNIST IDX files (docs/methods/protocol.md §2; order in the module
    doc)."""
    looked = _candidates(data_dir)
    for folder in looked:
        if _has_all_files(folder):
            return folder
    reason = "download disabled"
    if download:
        target = _download_target(data_dir)
        try:
            _download_all(target)
            return target
        except DataError as e:
            reason = f"download into {target} failed: {e}"
    where, partial = _describe(looked)
    if partial:  # name only what is missing, where
        what = "Fashion-MNIST incomplete"
    else:
        what = f"Fashion-MNIST not found (need {', '.join(name for name, _ in FILES.values())})"
    raise DataError(
        f"{what}: {where}; {reason}. "
        f"Install Debian's package (apt-get install dataset-fashion-mnist), or set {ENV_VAR} to a "
        f"folder holding the files (or its '{SUBDIR}' sub-folder)."
    )


def load_fashion_mnist(
    train: bool, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> ImageArrays:
    """The training (60,000) or test (10,000) split: uint8 images (N, 1, 28, 28), the 10 class names."""
    folder = resolve_fashion_mnist_dir(data_dir, download)
    split = "train" if train else "test"
    img_path = _find_file(folder, FILES[f"{split}-images"][0])
    lbl_path = _find_file(folder, FILES[f"{split}-labels"][0])
    if img_path is None or lbl_path is None:  # removed since resolution
        raise DataError(f"{folder}: Fashion-MNIST {split} files disappeared while loading")
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{lbl_path}: label {int(labels.max())} is outside [0, {len(CLASS_NAMES)})")
    return ImageArrays(
        images=torch.from_numpy(images).unsqueeze(1).contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(CLASS_NAMES),
        class_names=list(CLASS_NAMES),
        name=f"fashion_mnist-{split}",
    )
