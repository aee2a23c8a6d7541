"""Missing or broken dataset files (issue 13, fault 6): one-line errors that name exactly what is
missing where, and no folder left on disk unless a download actually wrote a file into it.

There is no network here; a failing download is simulated by making ``download._open_url`` raise the
``URLError`` that ``urllib`` raises when the host cannot be resolved.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import socket
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import yaml

from gradtail.cli.main import main
from gradtail.data import download, fashion_mnist
from gradtail.data.cifar import load_cifar
from gradtail.data.download import download_file
from gradtail.data.fashion_mnist import load_fashion_mnist
from gradtail.errors import DataError

NAMES = [name for name, _ in fashion_mnist.FILES.values()]


@pytest.fixture(autouse=True)
def isolated_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GRADTAIL_DATA, a cache dir that does not exist yet, no system Fashion-MNIST, no network."""
    monkeypatch.delenv("GRADTAIL_DATA", raising=False)
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (tmp_path / "no-system-dir",))
    monkeypatch.setattr(download, "_open_url", _unresolvable)
    return cache


def _unresolvable(url: str, timeout: float):
    """What ``urllib.request.urlopen`` raises without a network (DNS lookup fails)."""
    raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


def _idx(arr: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _contents(n_train: int = 30, n_test: int = 10) -> dict[str, bytes]:
    """The four gzipped IDX files of a tiny Fashion-MNIST, by official file name."""
    labels = {"train": np.arange(n_train) % 10, "t10k": np.arange(n_test) % 10}
    out = {}
    for split, y in labels.items():
        out[f"{split}-images-idx3-ubyte.gz"] = gzip.compress(_idx(np.zeros((len(y), 28, 28))))
        out[f"{split}-labels-idx1-ubyte.gz"] = gzip.compress(_idx(y))
    return out


def _write_fashion(folder: Path, skip: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _contents().items():
        if name not in skip:
            (folder / name).write_bytes(data)


def _one_line(e: DataError) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("missing", NAMES)
def test_one_missing_file_is_named_and_the_others_are_not(tmp_path: Path, missing: str) -> None:
    folder = tmp_path / "fm"
    _write_fashion(folder, skip=(missing,))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=folder, download=False)
    msg = _one_line(info.value)
    assert f"{folder} lacks {missing}" in msg, msg
    for present in set(NAMES) - {missing}:
        assert present not in msg, msg
    assert "download disabled" in msg
    assert sorted(p.name for p in folder.iterdir()) == sorted(set(NAMES) - {missing})  # nothing added


def test_two_missing_files_are_both_named(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    _write_fashion(folder, skip=(NAMES[0], NAMES[3]))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=False, data_dir=folder, download=False)
    msg = _one_line(info.value)
    assert f"{folder} lacks {NAMES[0]}, {NAMES[3]} (has the other 2)" in msg, msg
    assert NAMES[1] not in msg and NAMES[2] not in msg


def test_missing_data_dir_without_download_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "there"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=data_dir, download=False)
    msg = _one_line(info.value)
    assert f"{data_dir} does not exist" in msg and "download disabled" in msg
    assert all(name in msg for name in NAMES)  # nothing found: say what is needed
    assert not (tmp_path / "not").exists()


def test_failed_download_into_missing_data_dir_leaves_no_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "there"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=data_dir, download=True)
    msg = _one_line(info.value)
    assert f"{data_dir} does not exist" in msg
    assert f"download into {data_dir / 'fashion-mnist'} failed" in msg
    assert f"could not download {NAMES[0]}" in msg and "Name or service not known" in msg
    assert not (tmp_path / "not").exists()


def test_failed_download_with_one_file_missing(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    _write_fashion(folder, skip=(NAMES[3],))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=folder, download=True)
    msg = _one_line(info.value)
    assert f"{folder} lacks {NAMES[3]} (has the other 3)" in msg, msg
    assert f"download into {folder / 'fashion-mnist'} failed: could not download" in msg
    assert not (folder / "fashion-mnist").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(NAMES[:3])


def test_failed_download_into_the_cache_leaves_no_folder(isolated_sources: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, download=True)
    msg = _one_line(info.value)
    assert f"download into {isolated_sources / 'gradtail' / 'fashion-mnist'} failed" in msg
    assert not isolated_sources.exists()


def test_download_that_wrote_a_file_keeps_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = _contents()
    files = {
        k: (name, hashlib.md5(contents[name]).hexdigest()) for k, (name, _) in fashion_mnist.FILES.items()
    }
    monkeypatch.setattr(fashion_mnist, "FILES", files)

    def first_file_only(url: str, timeout: float):
        if url.endswith(NAMES[0]):
            return io.BytesIO(contents[NAMES[0]])
        _unresolvable(url, timeout)

    monkeypatch.setattr(download, "_open_url", first_file_only)
    data_dir = tmp_path / "new"
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=True, data_dir=data_dir, download=True)
    msg = _one_line(info.value)
    target = data_dir / "fashion-mnist"
    assert f"{target} lacks {', '.join(NAMES[1:])} (has the other 1)" in msg, msg
    assert f"could not download {NAMES[1]}" in msg
    assert [p.name for p in target.iterdir()] == [NAMES[0]]  # no leftover .part files


def test_download_file_removes_only_the_folders_it_created(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataError, match=r"could not download f\.bin from http://example\.invalid/f"):
        download_file("http://example.invalid/f", existing / "a" / "b" / "f.bin")
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "fm"
    _write_fashion(folder)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-3]))
    with pytest.raises(DataError) as info:
        load_fashion_mnist(train=False, data_dir=folder, download=False)
    assert _one_line(info.value).startswith(f"{labels}: IDX file truncated")
    labels.write_bytes(labels.read_bytes()[:-8])  # cut the gzip stream itself
    with pytest.raises(DataError, match=rf"^{labels}: corrupt or truncated gzip data"):
        load_fashion_mnist(train=False, data_dir=folder, download=False)


def test_cifar_failed_download_leaves_no_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "there"
    with pytest.raises(DataError) as info:
        load_cifar("cifar10", train=True, data_dir=data_dir, download=True)
    msg = _one_line(info.value)
    assert "download failed: could not download cifar-10-python.tar.gz" in msg, msg
    assert not (tmp_path / "not").exists()
    with pytest.raises(DataError, match="download disabled"):
        load_cifar("cifar100", train=True, data_dir=data_dir, download=False)
    assert not (tmp_path / "not").exists()


def test_cifar_failed_download_names_what_a_partial_folder_lacks(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_cifar("cifar10", train=True, data_dir=tmp_path / "data", download=True)
    msg = _one_line(info.value)
    assert f"{folder} lacks data_batch_1" in msg and "download failed" in msg, msg
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py"]


# --- the CLI ---------------------------------------------------------------------------------------

TINY = {
    "name": "data_errors",
    "data": {"dataset": "fashion_mnist", "imbalance_factor": 10, "val_per_class": 1},
    "model": {"name": "small_cnn", "params": {"width": 4}},
    "optim": {"batch_size": 16, "epochs": 1, "warmup_epochs": 0},
    "train": {"progress": False},
}


def _config(tmp_path: Path, data_dir: Path, download_: bool) -> str:
    cfg = dict(TINY, data=dict(TINY["data"], data_dir=str(data_dir), download=download_))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("download_", [False, True])
def test_cli_missing_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], download_: bool
) -> None:
    folder = tmp_path / "fm"
    _write_fashion(folder, skip=(NAMES[1],))
    cfg = _config(tmp_path, folder, download_)
    assert main(["train", cfg, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtail: error: ") and err.strip().count("\n") == 0, err
    assert f"{folder} lacks {NAMES[1]}" in err and "Traceback" not in err
    assert ("could not download" in err) == download_
    assert not (folder / "fashion-mnist").exists()


def test_cli_missing_data_dir_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "nowhere" / "fm"
    cfg = _config(tmp_path, data_dir, True)
    assert main(["train", cfg, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtail: error: ") and err.strip().count("\n") == 0, err
    assert f"{data_dir} does not exist" in err and "failed: could not download" in err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "run").exists()
