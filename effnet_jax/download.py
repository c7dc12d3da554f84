"""Verified downloads: one file from a URL into a cache folder, checked before it is kept.

`download(url, path, sha256=..., size=...)` streams `url` into a temporary file beside `path` (with a tqdm
progress bar), checks the byte count and the SHA-256, and only then renames it to `path`: a cache never holds a
partial or unverified file, whatever stops the transfer (a closed connection, a wrong file, Ctrl-C). The weight
files (`effnet_jax.weights.published`) and the CIFAR archives (`effnet_jax.data`) are fetched through it; each caller
turns the two errors below into its own message saying what to do.

This module does not import torch or TensorFlow.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

from effnet_jax.errors import UserError

__all__ = ["DOWNLOAD_TIMEOUT_S", "DownloadError", "ChecksumError", "download", "file_sha256", "check_digest"]

# Seconds without an answer (connect, or any read) before a download is given up: offline, the commands that
# download stop well inside half a minute with their message.
DOWNLOAD_TIMEOUT_S = 20.0
_CHUNK = 1 << 20
# some servers refuse Python's default agent string; torchvision sets its own too
USER_AGENT = "effnet-jax (python urllib)"


class DownloadError(UserError, RuntimeError):
    """The URL could not be fetched (no network, host unreachable, HTTP error, connection lost)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not download {url} ({reason})")
        self.url, self.reason = url, reason


class ChecksumError(UserError, RuntimeError):
    """What arrived (or what is cached) is not the expected file: its size or SHA-256 differ."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source} is not the expected file: {problem}")
        self.source, self.problem = source, problem


def file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_digest(actual: str, expected: str) -> str | None:
    """None when `actual` (a full hex SHA-256) matches `expected` (the full digest, or a prefix of it, as in torch
    hub file names); else the sentence that says how it differs."""
    if actual.startswith(expected.lower()):
        return None
    kind = "SHA-256" if len(expected) == 64 else "SHA-256 prefix"
    return f"its SHA-256 is {actual}, expected the {kind} {expected}"


def download(url: str, path: pathlib.Path, *, sha256: str, size: int | None = None, progress: bool = True,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` to `path`: through a temporary file in `path`'s folder, renamed to `path` only after its size
    (when `size` is given) and SHA-256 (`sha256`, full or a prefix) were checked. Raises `DownloadError` when the
    URL cannot be fetched and `ChecksumError` when the content is not the expected file (a server announcing
    another size is refused before the transfer); nothing is left behind in either case."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            received, actual = _stream(url, out, size, progress, timeout, desc=path.name)
        if size is not None and received != size:
            raise ChecksumError(f"the file downloaded from {url}",
                                f"{received:,} bytes arrived, expected {size:,} (the transfer was cut short or the "
                                "server sent another file); it was not kept")
        if (problem := check_digest(actual, sha256)) is not None:
            raise ChecksumError(f"the file downloaded from {url}", f"{problem}; it was not kept")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream(url: str, out, size: int | None, progress: bool, timeout: float, desc: str) -> tuple[int, str]:
    """Write the body of `url` to `out`; (bytes written, their SHA-256)."""
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": USER_AGENT}),
                                          timeout=timeout)
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, refused connections
        raise DownloadError(url, _reason(error)) from error
    sha256, received = hashlib.sha256(), 0
    with response:
        if size is not None and response.length is not None and response.length != size:
            raise ChecksumError(f"the file at {url}", f"the server announces {response.length:,} bytes, expected "
                                f"{size:,}; nothing was downloaded")
        with tqdm(total=response.length, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as error:  # connection lost mid-transfer
                    raise DownloadError(url, f"{_reason(error)} after {received:,} bytes") from error
                if not chunk:
                    break
                out.write(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return received, sha256.hexdigest()


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)  # URLError wraps the socket error
    return str(reason if reason is not None and not isinstance(error, urllib.error.HTTPError) else error) or \
        type(error).__name__
