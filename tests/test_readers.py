"""Dataset readers, downloads and the in-memory dataset (protocol.md §2).

CIFAR cannot be downloaded here, so the tests generate tiny datasets in the official on-disk format:
Python-2-style protocol-2 pickles (dict keys and strings as py2 ``str``, NumPy arrays rebuilt through
``numpy.core.multiarray._reconstruct``, labels as Python lists) inside a ``.tar.gz`` with the official
top-level folder, and serve them from ``file://`` URLs.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import http.client
import http.server
import io
import pickle
import re
import struct
import tarfile
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from gradtail.data import cifar, download, fashion_mnist
from gradtail.data.base import ImageArrays
from gradtail.data.cifar import load_cifar, read_pickle
from gradtail.data.download import download_file, extract_tar, verify_checksum
from gradtail.data.fashion_mnist import load_fashion_mnist, read_idx, resolve_fashion_mnist_dir
from gradtail.errors import ConfigError, DataError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GRADTAIL_DATA, a private cache dir, no system Fashion-MNIST, no network fetches by accident."""
    monkeypatch.delenv("GRADTAIL_DATA", raising=False)
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (tmp_path / "no-system-dir",))
    monkeypatch.setattr(fashion_mnist, "MIRRORS", ("http://127.0.0.1:9/",))
    return cache


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- ImageArrays -----------------------------------------------------------------------------------


def make_arrays(n: int = 6, num_classes: int = 3) -> ImageArrays:
    images = torch.arange(n * 2 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 2, 4, 4)
    labels = torch.arange(n) % num_classes
    return ImageArrays(images, labels, num_classes, [f"c{i}" for i in range(num_classes)], "toy")


def test_image_arrays_basics() -> None:
    ds = make_arrays()
    assert len(ds) == 6 and ds.class_counts() == [2, 2, 2]
    sub = ds.subset(np.array([5, 0, 3]))
    assert sub.labels.tolist() == [2, 0, 0] and torch.equal(sub.images[0], ds.images[5])
    assert sub.class_counts() == [2, 0, 1] and sub.name == "toy"
    assert len(ds.subset([])) == 0
    strided = ImageArrays(ds.images.permute(0, 1, 3, 2), ds.labels, 3, ["a", "b", "c"], "t")
    assert strided.images.is_contiguous()
    with pytest.raises(ConfigError):
        ds.subset([0, 6])
    with pytest.raises(ConfigError):
        ds.subset(np.array([0.5]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"images": torch.zeros(6, 2, 4, 4)}, "uint8"),
        ({"images": torch.zeros(6, 4, 4, dtype=torch.uint8)}, r"\(N, C, H, W\)"),
        ({"labels": torch.zeros(6, dtype=torch.int32)}, "int64"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, "6 images but 5 labels"),
        ({"labels": torch.tensor([0, 1, 2, 3, 0, 1])}, "label 3 is outside"),
        ({"labels": torch.tensor([0, -1, 2, 0, 0, 1])}, "label -1 is outside"),
        ({"class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"num_classes": 0, "class_names": []}, "num_classes"),
    ],
)
def test_image_arrays_validation(change: dict[str, Any], match: str) -> None:
    ds = make_arrays()
    fields = {"images": ds.images, "labels": ds.labels, "num_classes": 3, "class_names": ["a", "b", "c"]}
    fields.update(change)
    with pytest.raises(DataError, match=match):
        ImageArrays(name="bad", **fields)


# --- download.py -----------------------------------------------------------------------------------


def test_download_file_url_and_checksums(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"gradtail" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert download_file(src.as_uri(), dest, md5=md5, sha256=sha.upper()) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]
    verify_checksum(dest, md5=md5, sha256=sha)


def test_download_checksum_mismatch_deletes(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    dest = tmp_path / "out" / "copy.bin"
    with pytest.raises(DataError, match=r"checksum mismatch for copy\.bin .*md5"):
        download_file(src.as_uri(), dest, md5="0" * 32)
    assert not dest.parent.exists()  # no partial file, and the folder created for it is gone


def test_download_network_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = (tmp_path / "nope.bin").as_uri()
    with pytest.raises(DataError, match=r"could not download x\.bin from file://"):
        download_file(missing, tmp_path / "x.bin")
    with pytest.raises(DataError, match=r"could not download x\.bin from http://127\.0\.0\.1:9/x"):
        download_file("http://127.0.0.1:9/x", tmp_path / "x.bin", timeout=5)

    class Short(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {"Content-Length": "100"}

    monkeypatch.setattr(download, "_open_url", lambda url, timeout: Short(b"only ten b"))
    with pytest.raises(DataError, match="stopped after 10 of 100 bytes"):
        download_file("http://example.invalid/a", tmp_path / "a.bin")

    class Broken(io.BytesIO):
        headers: ClassVar[dict[str, str]] = {}

        def read(self, *args: Any) -> bytes:
            raise http.client.IncompleteRead(b"partial")

    monkeypatch.setattr(download, "_open_url", lambda url, timeout: Broken())
    with pytest.raises(DataError, match=r"could not download b\.bin"):
        download_file("http://example.invalid/b", tmp_path / "b.bin")
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".*part"))
    with pytest.raises(ConfigError):
        download_file("http://example.invalid/b", tmp_path / "b.bin", timeout=0)


def test_download_over_http(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob").write_bytes(bytes(range(256)) * 50)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        md5 = md5_of(served / "blob")
        out = download_file(f"{base}/blob", tmp_path / "got" / "blob", md5=md5, timeout=10)
        assert out.read_bytes() == (served / "blob").read_bytes()
        with pytest.raises(DataError, match=r"could not download gone from http://.*/gone: HTTP Error 404"):
            download_file(f"{base}/gone", tmp_path / "got" / "gone", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_verify_checksum_errors(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksum(f, md5="1" * 32)
    with pytest.raises(DataError, match="not found"):
        verify_checksum(tmp_path / "g", md5="1" * 32)
    with pytest.raises(ConfigError):
        verify_checksum(f)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file_info(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extract_tar_and_traversal(tmp_path: Path) -> None:
    good = _tar_with(tmp_path / "good.tar.gz", [_file_info("top/a.txt", b"A"), _file_info("top/b/c", b"C")])
    dest = tmp_path / "dest"
    (dest / "top").mkdir(parents=True)
    (dest / "top" / "stale").write_text("old")
    assert extract_tar(good, dest) == [dest / "top"]
    assert (dest / "top" / "a.txt").read_bytes() == b"A" and not (dest / "top" / "stale").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["top"]

    link = tarfile.TarInfo("top/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    fifo = tarfile.TarInfo("top/fifo")
    fifo.type = tarfile.FIFOTYPE
    for name, members in [
        ("dots", [_file_info("../evil.txt", b"x")]),
        ("nested-dots", [_file_info("top/../../evil.txt", b"x")]),
        ("absolute", [_file_info(str(tmp_path / "abs-evil.txt"), b"x")]),
        ("symlink", [(link, None)]),
        ("fifo", [(fifo, None)]),
    ]:
        bad = _tar_with(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(DataError, match=f"{name}.tar.gz"):
            extract_tar(bad, tmp_path / f"out-{name}")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "abs-evil.txt").exists()

    truncated = tmp_path / "trunc.tar.gz"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match=r"trunc\.tar\.gz: corrupt or truncated"):
        extract_tar(truncated, tmp_path / "out-trunc")
    assert [p.name for p in (tmp_path / "out-trunc").iterdir()] == []


# --- Fashion-MNIST ---------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2051 if arr.ndim == 3 else 2049
    header = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fmnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, dims in (("images", images, 3), ("labels", labels, 1)):
            name = f"{split}-{kind}-idx{dims}-ubyte"
            data = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_dir(tmp_path: Path, gz: bool) -> None:
    arrays = write_fmnist(tmp_path / "fm", gz=gz)
    train = load_fashion_mnist(train=True, data_dir=tmp_path / "fm")
    test = load_fashion_mnist(train=False, data_dir=tmp_path / "fm")
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == arrays["train"][1].tolist()
    assert len(test) == 10 and test.name == "fashion_mnist-test"
    assert train.class_names[0] == "T-shirt/top" and train.num_classes == 10


def test_read_idx_errors(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "fm", gz=False)
    images = tmp_path / "fm" / "train-images-idx3-ubyte"
    full = images.read_bytes()
    images.write_bytes(full[:-100])
    sizes = rf"needs {len(full)} bytes, got {len(full) - 100}"
    expected = rf"{re.escape(str(images))}: IDX file truncated: .* {sizes}"
    with pytest.raises(DataError, match=expected):
        load_fashion_mnist(train=True, data_dir=tmp_path / "fm")
    images.write_bytes(full + b"xx")
    with pytest.raises(DataError, match="trailing data"):
        read_idx(images, 2051)
    gz = tmp_path / "t.gz"
    gz.write_bytes(gzip.compress(full[:-5]))
    with pytest.raises(DataError, match=r"t\.gz: IDX file truncated.*\(uncompressed\)"):
        read_idx(gz)
    gz.write_bytes(gzip.compress(full)[:-30])
    with pytest.raises(DataError, match=r"t\.gz: corrupt or truncated gzip"):
        read_idx(gz)
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte"
    with pytest.raises(DataError, match="magic number is 2049, expected 2051"):
        read_idx(labels, 2051)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" * 4)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "tiny")


def test_fashion_mnist_inconsistent_files(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(DataError, match=r"10 images but .* has 9 labels"):
        load_fashion_mnist(train=False, data_dir=tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 10, np.uint8)))
    with pytest.raises(DataError, match="label 10 is outside"):
        load_fashion_mnist(train=False, data_dir=tmp_path / "fm")


def test_fashion_mnist_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fmnist(tmp_path / "explicit", n_train=5)
    write_fmnist(tmp_path / "env" / "fashion-mnist", n_train=7)
    write_fmnist(tmp_path / "system", n_train=9)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setenv("GRADTAIL_DATA", str(tmp_path / "env"))
    assert len(load_fashion_mnist(train=True, data_dir=tmp_path / "explicit", download=False)) == 5
    assert resolve_fashion_mnist_dir(download=False) == tmp_path / "env" / "fashion-mnist"
    monkeypatch.setenv("GRADTAIL_DATA", str(tmp_path / "env" / "fashion-mnist"))  # the folder itself
    assert len(load_fashion_mnist(train=True, download=False)) == 7
    monkeypatch.delenv("GRADTAIL_DATA")
    assert len(load_fashion_mnist(train=True, download=False)) == 9


def test_fashion_mnist_not_found_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=tmp_path / "empty", download=False)
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "GRADTAIL_DATA" in msg
    assert str(tmp_path / "empty") in msg and "download disabled" in msg
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte\.gz from http://127"):
        load_fashion_mnist(train=True, data_dir=tmp_path / "empty", download=True)


def test_fashion_mnist_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_sources: Path
) -> None:
    mirror = tmp_path / "mirror"
    arrays = write_fmnist(mirror, n_train=12)
    files = {key: (name, md5_of(mirror / name)) for key, (name, _) in fashion_mnist.FILES.items()}
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    monkeypatch.setattr(fashion_mnist, "MIRRORS", ("http://127.0.0.1:9/", mirror.as_uri() + "/"))
    train = load_fashion_mnist(train=True)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    cached = isolated_sources / "gradtail" / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(name for name, _ in files.values())
    # a wrong published checksum never passes silently
    bad = dict(files, **{"test-labels": (files["test-labels"][0], "0" * 32)})
    monkeypatch.setattr(fashion_mnist, "FILES", bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # the first cache would be found
    with pytest.raises(DataError, match="checksum mismatch for t10k-labels"):
        load_fashion_mnist(train=False, data_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_fashion_mnist_official_checksums_match_torchvision_list() -> None:
    md5s = {name: md5 for name, md5 in fashion_mnist.FILES.values()}
    assert md5s["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert md5s["t10k-labels-idx1-ubyte.gz"] == "bb300cfdad3c16e7a12a480ee83cd310"


@pytest.mark.skipif(
    not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Debian's Fashion-MNIST not installed"
)
def test_real_fashion_mnist() -> None:
    train = load_fashion_mnist(train=True, data_dir=REAL_FMNIST, download=False)
    test = load_fashion_mnist(train=False, data_dir=REAL_FMNIST, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    assert int(train.images.max()) == 255


# --- CIFAR -----------------------------------------------------------------------------------------


def _save_py2_str(pickler: Any, obj: str | bytes) -> None:
    """Write a string the way Python 2's cPickle writes a ``str`` (SHORT_BINSTRING / BINSTRING)."""
    data = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(data) < 256:
        pickler.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
        pickler.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    pickler.memoize(obj)


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us swap how strings are written
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)
    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def py2_pickle(obj: Any) -> bytes:
    """Protocol 2 as Python 2 + NumPy 1 wrote CIFAR: py2 strings, ``numpy.core.multiarray`` globals."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def py3_pickle(obj: Any) -> bytes:
    """Protocol 2 from Python 3 with bytes keys (a common re-pickle of the official files)."""

    def enc(v: Any) -> Any:
        if isinstance(v, dict):
            return {k.encode(): enc(x) for k, x in v.items()}
        if isinstance(v, list) and v and isinstance(v[0], str):
            return [s.encode() for s in v]
        return v.encode() if isinstance(v, str) else v

    return pickle.dumps(enc(obj), protocol=2)


def _batch(rng: np.random.Generator, n: int, num_classes: int, label_key: str, name: str) -> dict:
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    d = {
        "batch_label": f"{name} of tiny",
        label_key: labels,
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }
    if label_key == "fine_labels":
        d["coarse_labels"] = [v // 5 for v in labels]
    return d


def write_cifar(root: Path, variant: str, fmt: str = "py2", seed: int = 0) -> dict[str, dict]:
    """The official folder layout under ``root`` with tiny batches; returns the dicts written."""
    src = cifar.SOURCES[variant]
    dump = py2_pickle if fmt == "py2" else py3_pickle
    rng = np.random.default_rng(seed)
    folder = root / src.folder
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    for f in (*src.train_files, *src.test_files):
        written[f] = _batch(rng, 4 if f in src.train_files else 6, src.num_classes, src.label_key, f)
    names = [f"class_{i}" for i in range(src.num_classes)]
    if variant == "cifar10":
        written[src.meta_file] = {"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072}
    else:
        coarse = [f"s{i}" for i in range(20)]
        written[src.meta_file] = {"fine_label_names": names, "coarse_label_names": coarse}
    for f, d in written.items():
        (folder / f).write_bytes(dump(d))
    return written


def make_tarball(root: Path, variant: str, dest_dir: Path, fmt: str = "py2") -> tuple[Path, dict]:
    written = write_cifar(root, variant, fmt)
    src = cifar.SOURCES[variant]
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / src.tarball
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / src.folder, arcname=src.folder)
    return archive, written


def _check_loaded(ds: ImageArrays, written: dict, variant: str, train: bool) -> None:
    src = cifar.SOURCES[variant]
    files = src.train_files if train else src.test_files
    data = np.concatenate([written[f]["data"] for f in files])
    labels = [v for f in files for v in written[f][src.label_key]]
    assert ds.images.shape == (len(labels), 3, 32, 32) and ds.images.dtype == torch.uint8
    assert np.array_equal(ds.images.numpy(), data.reshape(-1, 3, 32, 32))
    # CHW: the first 1024 bytes of a row are the red plane
    assert np.array_equal(ds.images[0, 0].numpy().ravel(), data[0, :1024])
    assert ds.labels.tolist() == labels and ds.num_classes == src.num_classes
    assert ds.class_names == [f"class_{i}" for i in range(src.num_classes)]


def test_py2_fixture_is_the_official_format() -> None:
    raw = py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [1]})
    assert raw[:2] == b"\x80\x02" and b"U\x04data" in raw and b"numpy.core.multiarray\n_reconstruct" in raw
    assert b"_codecs" not in raw


@pytest.mark.parametrize(("variant", "fmt"), [("cifar10", "py2"), ("cifar100", "py2"), ("cifar10", "py3")])
def test_cifar_from_directory(tmp_path: Path, variant: str, fmt: str) -> None:
    written = write_cifar(tmp_path / "data", variant, fmt)
    train = load_cifar(variant, train=True, data_dir=tmp_path / "data", download=False)
    _check_loaded(train, written, variant, True)
    test = load_cifar(variant, train=False, data_dir=tmp_path / "data" / cifar.SOURCES[variant].folder)
    _check_loaded(test, written, variant, False)
    assert test.name == f"{variant}-test"


def test_cifar100_py3_bytes_keys(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar100", "py3")
    raw = read_pickle(tmp_path / "cifar-100-python" / "train")
    assert isinstance(next(iter(raw)), str)
    _check_loaded(load_cifar("cifar100", train=True, data_dir=tmp_path), written, "cifar100", True)


def test_cifar_from_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, written = make_tarball(tmp_path / "build", "cifar10", tmp_path / "data")
    src = cifar.SOURCES["cifar10"]
    with pytest.raises(DataError, match=rf"{re.escape(str(archive))}: checksum mismatch"):
        load_cifar("cifar10", train=True, data_dir=tmp_path / "data", download=False)
    assert not (tmp_path / "data" / src.folder).exists()
    fixed = cifar.CifarSource(**{**src.__dict__, "md5": md5_of(archive)})
    monkeypatch.setitem(cifar.SOURCES, "cifar10", fixed)
    ds = load_cifar("cifar10", train=True, data_dir=tmp_path / "data", download=False)
    _check_loaded(ds, written, "cifar10", True)
    assert (tmp_path / "data" / src.folder / "data_batch_5").is_file()


def test_cifar_via_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar(tmp_path / "shared", "cifar100")
    monkeypatch.setenv("GRADTAIL_DATA", str(tmp_path / "shared"))
    _check_loaded(load_cifar("cifar100", train=False, download=False), written, "cifar100", False)


def test_cifar_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_sources: Path) -> None:
    archive, written = make_tarball(tmp_path / "build", "cifar100", tmp_path / "server", fmt="py3")
    src = cifar.SOURCES["cifar100"]
    fake = cifar.CifarSource(**{**src.__dict__, "url": archive.as_uri(), "md5": md5_of(archive)})
    monkeypatch.setitem(cifar.SOURCES, "cifar100", fake)
    with pytest.raises(DataError, match="download disabled"):
        load_cifar("cifar100", train=True, download=False)
    ds = load_cifar("cifar100", train=True)  # no data_dir, no env: into the cache
    _check_loaded(ds, written, "cifar100", True)
    assert (isolated_sources / "gradtail" / src.tarball).is_file()
    assert (isolated_sources / "gradtail" / src.folder / "meta").is_file()
    # into an explicit data dir, with a bad checksum: error, nothing left behind
    bad = cifar.CifarSource(**{**fake.__dict__, "md5": "f" * 32})
    monkeypatch.setitem(cifar.SOURCES, "cifar100", bad)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh-cache"))  # the first cache would be found
    with pytest.raises(DataError, match=r"checksum mismatch for cifar-100-python\.tar\.gz"):
        load_cifar("cifar100", train=True, data_dir=tmp_path / "mine")
    assert not (tmp_path / "mine").exists()
    broken = cifar.CifarSource(**{**fake.__dict__, "url": (tmp_path / "absent.tgz").as_uri()})
    monkeypatch.setitem(cifar.SOURCES, "cifar100", broken)
    with pytest.raises(DataError, match=r"could not download cifar-100-python\.tar\.gz from file://"):
        load_cifar("cifar100", train=True, data_dir=tmp_path / "mine2")


def test_cifar_truncated_and_malformed(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    batch3 = folder / "data_batch_3"
    good = batch3.read_bytes()
    batch3.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(batch3))}: truncated or corrupt pickle"):
        load_cifar("cifar10", train=True, data_dir=tmp_path)
    load_cifar("cifar10", train=False, data_dir=tmp_path)  # the test split is unaffected

    rng = np.random.default_rng(1)
    for change, match in [
        ({"data": rng.integers(0, 256, size=(4, 3071), dtype=np.uint8)}, "'data' must be a uint8 N x 3072"),
        ({"data": np.zeros((4, 3072), np.float32)}, "'data' must be a uint8"),
        ({"labels": [0, 1, 2]}, "4 images but 3 labels"),
        ({"labels": [0, 1, 2, 10]}, "label 10 is outside"),
        ({"labels": ["a", "b", "c", "d"]}, "list of ints"),
    ]:
        d = _batch(rng, 4, 10, "labels", "x")
        d.update(change)
        batch3.write_bytes(py2_pickle(d))
        with pytest.raises(DataError, match=rf"{re.escape(str(batch3))}: .*{match}"):
            load_cifar("cifar10", train=True, data_dir=tmp_path)
    batch3.write_bytes(pickle.dumps({"data": collections.OrderedDict()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle.*collections\.OrderedDict"):
        load_cifar("cifar10", train=True, data_dir=tmp_path)
    batch3.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataError, match="expected a pickled dict"):
        load_cifar("cifar10", train=True, data_dir=tmp_path)
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": ["a"] * 9}))
    with pytest.raises(DataError, match=r"batches\.meta: 'label_names' must list 10 class names, got 9"):
        load_cifar("cifar10", train=False, data_dir=tmp_path)


def test_cifar_missing_and_bad_name(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_4.*download disabled"):
        load_cifar("cifar10", train=True, data_dir=tmp_path, download=False)
    with pytest.raises(ConfigError, match="unknown CIFAR variant"):
        load_cifar("cifar1000", train=True, data_dir=tmp_path)
