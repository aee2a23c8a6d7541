"""Downloads with checksums and safe archive extraction (docs/methods/protocol.md §2).

A download streams into a temporary file next to its destination, is verified, and only then renamed
into place, so a partial or corrupt file never sits under the final name. A checksum mismatch is
always an error (docs/methods/protocol.md §2: "a checksum mismatch never passes silently").
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import IO, Any

from gradtail.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
ENV_VAR = "GRADTAIL_DATA"
_CHUNK = 1 << 20


def cache_root() -> Path:
    """Where downloads go when no data dir is given: ``$XDG_CACHE_HOME/gradtail`` (``~/.cache/gradtail``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradtail"


def _open_url(url: str, timeout: float) -> IO[bytes]:
    """Open ``url`` for reading (the one network call; tests may monkeypatch it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "gradtail"})
    return urllib.request.urlopen(request, timeout=timeout)


def _hashers(md5: str | None, sha256: str | None) -> dict[str, tuple[str, Any]]:
    """``{algorithm: (expected hex digest, running hash)}`` for the checksums given."""
    out: dict[str, tuple[str, Any]] = {}
    if md5 is not None:
        out["md5"] = (md5.lower(), hashlib.md5(usedforsecurity=False))
    if sha256 is not None:
        out["sha256"] = (sha256.lower(), hashlib.sha256())
    return out


def _mismatch(hashers: dict[str, tuple[str, Any]]) -> str | None:
    for algo, (expected, h) in hashers.items():
        got = h.hexdigest()
        if got != expected:
            return f"{algo} is {got}, expected {expected}"
    return None


def verify_checksum(path: str | os.PathLike[str], md5: str | None = None, sha256: str | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` exists and matches every checksum given."""
    if md5 is None and sha256 is None:
        raise ConfigError("verify_checksum needs md5 or sha256")
    p = Path(path)
    hashers = _hashers(md5, sha256)
    try:
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                for _, h in hashers.values():
                    h.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    problem = _mismatch(hashers)
    if problem is not None:
        raise DataError(f"{p}: checksum mismatch: {problem} (corrupt or incomplete; delete it and retry)")


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` (a file path), verifying ``md5`` / ``sha256`` when given.

    Network failures, truncated transfers and checksum mismatches raise :class:`DataError`; the bad
    data is deleted, ``dest`` is left untouched and the folders created for it are removed again (a
    failed download leaves nothing on disk). ``timeout`` (seconds) applies to each socket
    operation. Returns ``dest``.
    """
    if timeout <= 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
    dest = Path(dest)
    created = _missing_dirs(dest.parent)  # removed again unless the download succeeds
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        _remove_empty_dirs(created)
        reason = e.strerror or e
        raise DataError(f"could not download {dest.name}: cannot write to {dest.parent} ({reason})") from None
    tmp = Path(tmp_name)
    hashers = _hashers(md5, sha256)
    log.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            received, expected_len = _copy_response(url, dest.name, out, hashers, timeout)
        if expected_len is not None and received != expected_len:
            raise DataError(
                f"could not download {dest.name} from {url}: transfer stopped after {received} of "
                f"{expected_len} bytes"
            )
        problem = _mismatch(hashers)
        if problem is not None:
            raise DataError(f"checksum mismatch for {dest.name} downloaded from {url}: {problem}; deleted it")
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        _remove_empty_dirs(created)
        raise
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _remove_empty_dirs(created)
        reason = e.strerror or e
        raise DataError(f"could not download {dest.name}: writing {dest} failed ({reason})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty_dirs(created)
        raise
    return dest


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove the folders a failed download created (deepest first), stopping at one not empty."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break


def _copy_response(
    url: str, name: str, out: IO[bytes], hashers: dict[str, tuple[str, Any]], timeout: float
) -> tuple[int, int | None]:
    """Stream ``url`` into ``out``; network errors become DataError, write errors stay OSError."""
    network_errors = (OSError, http.client.HTTPException, ValueError)
    try:
        response = _open_url(url, timeout)
    except network_errors as e:
        # HTTPError's str() keeps the status code; URLError's reason is the socket error
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise DataError(f"could not download {name} from {url}: {reason}") from None
    received = 0
    with response:
        expected_len = _content_length(response)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except network_errors as e:
                reason = f"{e!r} after {received} bytes"
                raise DataError(f"could not download {name} from {url}: {reason}") from None
            if not chunk:
                break
            received += len(chunk)
            out.write(chunk)
            for _, h in hashers.values():
                h.update(chunk)
    return received, expected_len


def _content_length(response: IO[bytes]) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that would land outside the destination (path traversal) or are not plain."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or member.name.startswith("\\"):
        raise DataError(f"{archive}: unsafe member path {member.name!r} (absolute or '..'); not extracting")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or ".." in target.parts:
            raise DataError(f"{archive}: member {member.name!r} links outside the archive; not extracting")
    elif not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: member {member.name!r} is not a plain file or directory; not extracting")


def extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract a (possibly compressed) tar archive into ``dest``; return the top-level paths created.

    Every member is checked first (no absolute paths, no ``..``, no links out, no devices). The archive
    is extracted into a temporary directory inside ``dest`` and its top-level entries are then moved
    into place, replacing same-named entries, so a failed extraction leaves no half-written folder.
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    except OSError as e:
        raise DataError(f"{archive}: cannot extract into {dest} ({e.strerror or e})") from None
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m, archive)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(staging, members=members)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"{archive}: corrupt or truncated archive ({e})") from None
        created = []
        for entry in sorted(staging.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
            created.append(target)
        return created
    finally:
        shutil.rmtree(staging, ignore_errors=True)
