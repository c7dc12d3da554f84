"""The CIFAR-10 / CIFAR-100 python versions (`cifar-10-python.tar.gz`, 163 MiB; `cifar-100-python.tar.gz`, 161
MiB, fine labels): `CifarSource` reads the tarball, the folder extracted from it (`cifar-10-batches-py`,
`cifar-100-python`) or a folder holding that folder. The batches are pickles; they are read with an unpickler that
only admits numpy arrays. They are read whole (the dataset fits in memory): not streamed.

Without a local copy, `cifar_archive` downloads the official file once from the CIFAR site (`cifar_url`; size and
SHA-256 checked before the file is kept, `EFFNET_JAX_DATA_URL` for a mirror) into `downloads_dir()`. No
TensorFlow involved.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import pickle
import tarfile
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
from PIL import Image

from effnet_jax.data import cache
from effnet_jax.data.dataset import CacheDir, Contents, DatasetError, DatasetUnavailableError, Split
from effnet_jax.data.image import resize_center_crop
from effnet_jax.download import ChecksumError, DownloadError, check_digest, download, file_sha256

log = logging.getLogger(__name__)

__all__ = ["Archive", "CIFAR_ARCHIVES", "CIFAR_BASE_URL", "DATA_URL_ENV_VAR", "CifarSource", "cifar_archive",
           "cifar_kind", "cifar_url", "downloads_dir"]

DATA_URL_ENV_VAR = "EFFNET_JAX_DATA_URL"  # replaces CIFAR_BASE_URL: a mirror serving the same file names
CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz"
_CIFAR_PYTHON = {  # spec -> (folder in the official tarball, train files, test file, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}


@dataclasses.dataclass(frozen=True)
class Archive:
    """A dataset file published at `CIFAR_BASE_URL/file_name`, with the size and SHA-256 it is checked against."""
    file_name: str
    size: int
    sha256: str


# The official python versions (the same files torchvision and Keras download; size and SHA-256 as Keras'
# `cifar10.load_data` / `cifar100.load_data` pin them, MD5 as on the CIFAR page).
CIFAR_ARCHIVES = {
    "cifar10": Archive("cifar-10-python.tar.gz", 170_498_071,  # md5 c58f30108f718f92721af3b95e74349a
                       "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    "cifar100": Archive("cifar-100-python.tar.gz", 169_001_437,  # md5 eb9058c3a382ffc7106e4002c42a8d85
                        "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
}


def downloads_dir() -> pathlib.Path:
    """Where downloaded dataset archives are kept: `downloads` beside `default_cache_dir()`."""
    return cache.cache_root() / "downloads"


def cifar_url(name: str) -> str:
    """The download URL of a `CIFAR_ARCHIVES` entry, with the `EFFNET_JAX_DATA_URL` override applied."""
    base = os.getenv(DATA_URL_ENV_VAR) or CIFAR_BASE_URL
    return f"{base.rstrip('/')}/{CIFAR_ARCHIVES[name].file_name}"


def cifar_archive(name: str, progress: bool = True) -> pathlib.Path:
    """The verified official python version of 'cifar10' / 'cifar100' in `downloads_dir()`, downloaded there first
    when missing (`cifar_url`; size and SHA-256 checked before the file is kept). Raises
    `DatasetUnavailableError` when it cannot be fetched or is not the expected file."""
    archive = CIFAR_ARCHIVES[name]
    path = downloads_dir() / archive.file_name
    if path.is_file():
        problem = (f"{path.stat().st_size:,} bytes, expected {archive.size:,}" if path.stat().st_size != archive.size
                   else check_digest(file_sha256(path), archive.sha256))
        if problem is not None:
            raise DatasetUnavailableError(f"{path} is not the expected {name} archive ({problem}): delete it and "
                                          "run again to download it anew")
        return path
    url = cifar_url(name)
    log.info("downloading %s (%.0f MiB) into %s", url, archive.size / 2**20, path.parent)
    try:
        download(url, path, sha256=archive.sha256, size=archive.size, progress=progress)
    except DownloadError as e:
        raise DatasetUnavailableError(
            f"{e}; {name} ({archive.size / 2**20:.0f} MiB) is kept at {path} once downloaded. Without internet: fetch "
            f"{CIFAR_BASE_URL}/{archive.file_name} elsewhere and put it at {path}, or pass --data-dir "
            f"PATH/{archive.file_name} (or the folder extracted from it); {DATA_URL_ENV_VAR}=URL downloads from a "
            f"mirror that serves {archive.file_name}; any image folder works with --dataset folder:PATH.") from e
    except ChecksumError as e:
        mirror = os.getenv(DATA_URL_ENV_VAR)
        raise DatasetUnavailableError(f"{e}. " + (f"Check the mirror {DATA_URL_ENV_VAR}={mirror!r}, or retry."
                                                  if mirror else "Retry.")) from e
    return path


def cifar_kind(path: pathlib.Path) -> str | None:
    """'cifar10' / 'cifar100' when `path` is the CIFAR python version (tarball, its folder, or a folder holding
    that folder); None otherwise (an image folder, or not a local dataset at all)."""
    if path.is_dir():
        for name, (folder, train_files, _, meta, *_) in _CIFAR_PYTHON.items():
            if (path / folder / meta).is_file() or all((path / f).is_file() for f in (meta, *train_files)):
                return name
        return None
    if not tarfile.is_tarfile(path):
        raise DatasetError(f"{path} is not a .tar / .tar.gz archive (expected an image folder or the CIFAR python "
                           "tarball)")
    with tarfile.open(path, "r|*") as archive:
        for _, member in zip(range(8), archive):
            parts = pathlib.PurePosixPath(member.name).parts
            for name, (folder, *_) in _CIFAR_PYTHON.items():
                if folder in parts:
                    return name
    return None


@dataclasses.dataclass(frozen=True)
class CifarSource:
    """The `kind` ('cifar10' / 'cifar100') python version at `path`; `download`: fetched there first
    (`cifar_archive`) when it is decoded."""
    path: pathlib.Path
    kind: str
    download: bool = False

    def decode(self, image_size: int | None, on_corrupt: str, cache_dir: CacheDir, progress: bool) -> Contents:
        path = cifar_archive(self.kind, progress) if self.download else self.path
        at = cache.entry(cache_dir, f"{path.name.split('.')[0]}-{self.kind}", kind=self.kind, path=path,
                         image_size=image_size)
        return cache.cached(at, lambda: _read_batches(path, self.kind, image_size))

    def open(self, sizes: bool) -> Contents:
        raise DatasetError(f"{self.path}: the CIFAR python batches are read whole ({self.kind} fits in memory); load "
                           "it without streaming")

    def decoded_bytes(self) -> int | None:
        return None  # read whole whatever its size


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing that runs other code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_batches(path: pathlib.Path, kind: str, image_size: int | None) -> Contents:
    folder, train_files, test_file, meta_file, label_key, names_key = _CIFAR_PYTHON[kind]
    wanted = {*train_files, test_file, meta_file}
    found: dict[str, dict[bytes, Any]] = {}

    def unpickle(name: str, f: IO[bytes]) -> None:
        try:
            found[name] = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DatasetError(f"{path}: cannot read the CIFAR batch {name}: {e}") from e

    if path.is_dir():
        base = path / folder if (path / folder).is_dir() else path
        for name in wanted:
            if (base / name).is_file():
                with open(base / name, "rb") as f:
                    unpickle(name, f)
    else:
        try:
            with tarfile.open(path, "r|*") as archive:
                for member in archive:
                    parts = pathlib.PurePosixPath(member.name).parts
                    if member.isfile() and len(parts) >= 2 and parts[-2] == folder and parts[-1] in wanted:
                        unpickle(parts[-1], archive.extractfile(member))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"cannot read the archive {path}: {e}") from e
    if missing := sorted(wanted - set(found)):
        raise DatasetError(f"{path}: not the complete {kind} python version, missing {missing}")

    def split(names: Sequence[str]) -> Split:
        try:
            data = np.concatenate([np.asarray(found[n][b"data"], np.uint8) for n in names])
            labels = np.concatenate([np.asarray(found[n][label_key], np.int32) for n in names])
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        except (KeyError, ValueError) as e:
            raise DatasetError(f"{path}: unexpected content in the {kind} batches {list(names)}: {e!r}") from e
        if image_size is not None and image_size != 32:
            images = np.stack([resize_center_crop(Image.fromarray(x), image_size) for x in images])
        return Split(np.ascontiguousarray(images), labels)

    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in found[meta_file][names_key])
    return Contents(split(train_files), split([test_file]), class_names, f"{kind} python version {path}")
