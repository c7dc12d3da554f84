"""Datasets for fine-tuning: loading into memory, on-device augmentation, deterministic batching.

Loading — `load_dataset(spec, data_dir)` returns a `Dataset` of uint8 NHWC arrays and int32 labels:

* `spec` 'cifar10' / 'cifar100' without `data_dir`: the official python version (`cifar-10-python.tar.gz`,
  163 MiB; `cifar-100-python.tar.gz`, 161 MiB), downloaded once from the CIFAR site (`cifar_archive`; size and
  SHA-256 checked before the file is kept, `EFFNET_JAX_DATA_URL` for a mirror) into `downloads_dir()`, then read
  as below. No TensorFlow involved.
* `spec` a TensorFlow Datasets name ('svhn_cropped', 'tf_flowers', ..., or 'tfds:NAME' to go through tfds for
  CIFAR too): read through `tfds.data_source` (random access). A prepared dataset is read without TensorFlow;
  preparing it (tfds downloads and converts it) needs TensorFlow (`pip install -e '.[tfds]'`), so without it an
  unprepared dataset is refused before anything is downloaded. The 'train' split, and 'test' when the dataset
  has one; class names from the label feature. `data_dir` is then the tfds data folder, unless it is a local
  dataset (below).
* `spec` 'cifar10' / 'cifar100' with `data_dir` the official python version (`cifar-10-python.tar.gz`, or the
  folder `cifar-10-batches-py` extracted from it; `cifar-100-python.tar.gz` / `cifar-100-python`, fine labels).
  The batches are pickles; they are read with an unpickler that only admits numpy arrays.
* `spec` 'folder:PATH', or any `spec` with `data_dir` an image folder: a tree `train/<class>/*.jpg` with an
  optional `test/<class>/...`, or, without a `train/` level, `<class>/*.jpg`, or only `test/<class>/...` (a test
  set, to score a run on with `evaluate --split test`: its train split, and so validation, are empty); or a
  `.tar`/`.tar.gz` of such a tree (read as a stream). A single folder wrapping the whole tree (`mydata/train/...`)
  is stepped into; hidden files and folders are skipped; image files are those with torchvision's `ImageFolder`
  extensions, searched recursively inside each class folder. Class index = position in the sorted class names of
  `train/` (of `test/` when it is the only folder).
  Images are decoded with PIL in RGB, one after another: on 2 cores neither a thread pool nor a process pool
  made the 50,000 CIFAR-10 JPEGs (~70 µs each, mostly Python overhead) load faster.
  Corrupt images raise `DatasetError` naming the file (`on_corrupt='error'`), or are left out with a warning
  (`on_corrupt='skip'`).

Image size: with `image_size=None` images keep their size when all have the same; otherwise (tf_flowers, most
photo folders) every image is resized so that its shorter side is 256 (PIL bilinear) and center-cropped to
256 x 256. With `image_size=S` every image is resized and center-cropped that way to S x S.

Validation: always carved from train, a stratified split seeded by `seed` (`stratified_split`), computed from the
labels alone, so every host and process gets the same split. A dataset's own test split is kept apart as `test`.

Cache: every decoded dataset is stored as an uncompressed `.npz` in `cache_dir` (default
`$EFFNET_JAX_CACHE/datasets`, else `$XDG_CACHE_HOME/effnet_jax/datasets`, else `~/.cache/effnet_jax/datasets`;
`cache_dir=False` disables it), keyed by the source (path, and the size and mtime of every file in it; for tfds
the prepared files) and `image_size`. Written to a temp file and renamed, so readers never see a partial file.

Augmentation — `augment_batch(key, images, indices, cfg)`: jitted, pure; each example draws its randomness from
`jax.random.fold_in(key, index)` with its global example index, so the result does not depend on how a batch is
split over devices or processes. Order: random crop after zero padding (torchvision `RandomCrop(size,
padding)`), horizontal flip, one affine resampling for rotation/zoom/translation (Keras `RandomRotation`,
`RandomZoom`, `RandomTranslation` ranges, bilinear, `fill_mode`), contrast (Keras `RandomContrast`), resize to
`resolution` (bilinear), normalize. `eval_batch(images, cfg)`: resize and normalize only.

Batching — `epoch_permutation`, `batch_indices`, `eval_batches`: plain numpy, identical on every host.

Streaming — `open_stream(spec, data_dir, ...)`, for datasets that do not fit in memory: the same splits (same
examples, labels, class names, validation split) as sources that decode an image when it is asked for (a tfds
name, or an image folder that is a directory), and `stream_batches(split, batches)`, a grain pipeline whose
threads decode the next batches while the device trains on this one. `decoded_bytes` estimates what loading
would take, for choosing between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import pickle
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import IO, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates
from PIL import Image

from effnet_jax.download import ChecksumError, DownloadError, check_digest, download, file_sha256
from effnet_jax.errors import ConfigError, UserError
from effnet_jax.weights import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

__all__ = [
    "Split", "Dataset", "DatasetError", "DatasetUnavailableError", "load_dataset", "stratified_split",
    "StreamSplit", "StreamDataset", "open_stream", "stream_batches", "decoded_bytes",
    "default_cache_dir", "downloads_dir", "CACHE_ENV_VAR", "DATA_URL_ENV_VAR", "CIFAR_BASE_URL", "CIFAR_ARCHIVES",
    "Archive", "cifar_archive", "cifar_url", "DEFAULT_RESIZE", "IMAGE_EXTENSIONS",
    "AugmentConfig", "augment_batch", "eval_batch",
    "epoch_permutation", "batch_indices", "eval_batches",
]

CACHE_ENV_VAR = "EFFNET_JAX_CACHE"
DEFAULT_RESIZE = 256  # shorter side and center crop for datasets whose images differ in size
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
_CACHE_VERSION = 1
_CIFAR_PYTHON = {  # spec -> (folder in the official tarball, train files, test file, meta file, label key, names key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}
DATA_URL_ENV_VAR = "EFFNET_JAX_DATA_URL"  # replaces CIFAR_BASE_URL: a mirror serving the same file names
CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz"


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


class DatasetError(UserError, ValueError):
    """The data given is not a usable dataset (bad layout, corrupt image, unknown name)."""


class DatasetUnavailableError(UserError, RuntimeError):
    """The dataset cannot be obtained here (not prepared and no download possible)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images (N, H, W, 3) uint8 and labels (N,) int32."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, n: int, seed: int) -> Split:
        """`n` examples drawn at random (`np.random.default_rng(seed)`), kept in their stored order; all of them
        when n >= len. (Not the first n: the stored splits are grouped by class.)"""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return Split(self.images[idx], self.labels[idx])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset in memory. `val` is carved from the source's train split; `test` is the source's
    own test split, None when it has none. `source` says where it came from, for logs and checkpoint metadata."""
    train: Split
    val: Split
    test: Split | None
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True, eq=False)
class _Decoded:
    """A source read in full, before the validation split: what the cache holds."""
    train: Split
    test: Split | None
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[str, ...] = ()  # corrupt images left out (on_corrupt='skip')


# ----------------------------------------------------------------------------------------------------- loading


def load_dataset(spec: str, data_dir: str | os.PathLike[str] | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None,
                 cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
                 on_corrupt: Literal["error", "skip"] = "error", progress: bool = True) -> Dataset:
    """Load a dataset into memory (see the module docstring for the sources and rules).

    spec: a tfds name ('cifar10', 'tf_flowers', ...) or 'folder:PATH'. data_dir: the tfds data folder, or a local
    dataset (CIFAR python tarball or folder for 'cifar10'/'cifar100'; an image folder or its .tar/.tar.gz for any
    name). val_fraction, seed: the stratified validation split of train. image_size: None keeps a uniform size
    (else 256 crops); S resizes the shorter side to S and center-crops S x S. cache_dir: None for the default
    cache, False for none. on_corrupt: 'error' or 'skip' for undecodable images in a folder. progress: a progress
    bar while a CIFAR archive downloads.
    """
    if on_corrupt not in ("error", "skip"):
        raise ConfigError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")

    decoded = _cached(spec, data_dir, image_size, on_corrupt, cache_dir, progress)
    if decoded.skipped:
        if on_corrupt == "error":
            raise DatasetError(f"{decoded.source}: cannot decode image {decoded.skipped[0]} "
                               f"(and {len(decoded.skipped) - 1} more); pass on_corrupt='skip' (train.py --on-corrupt skip) to leave them out")
        warnings.warn(f"{decoded.source}: skipped {len(decoded.skipped)} corrupt image(s): "
                      f"{', '.join(decoded.skipped[:5])}{', ...' if len(decoded.skipped) > 5 else ''}",
                      stacklevel=2)
    train_idx, val_idx = stratified_split(decoded.train.labels, val_fraction, seed)
    images, labels = decoded.train.images, decoded.train.labels
    return Dataset(train=Split(images[train_idx], labels[train_idx]), val=Split(images[val_idx], labels[val_idx]),
                   test=decoded.test, class_names=decoded.class_names, source=decoded.source)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each sorted. `round(val_fraction * N)` examples go to val, each class
    contributing its share rounded down plus one for the classes with the largest remainders (ties: lower class
    first); which examples of a class is drawn with `np.random.default_rng(seed)`."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    shares = val_fraction * counts
    quota = np.floor(shares).astype(np.int64)
    extra = int(round(val_fraction * len(labels))) - int(quota.sum())
    quota[np.argsort(-(shares - quota), kind="stable")[:max(extra, 0)]] += 1
    rng = np.random.default_rng(seed)
    val = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def _cache_root() -> pathlib.Path:
    root = os.getenv(CACHE_ENV_VAR) or os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")),
                                                     "effnet_jax")
    return pathlib.Path(root).expanduser()


def default_cache_dir() -> pathlib.Path:
    """`$EFFNET_JAX_CACHE/datasets`, else `$XDG_CACHE_HOME/effnet_jax/datasets`, else `~/.cache/...`."""
    return _cache_root() / "datasets"


def downloads_dir() -> pathlib.Path:
    """Where downloaded dataset archives are kept: `downloads` beside `default_cache_dir()`."""
    return _cache_root() / "downloads"


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


def _cached(spec: str, data_dir: str | os.PathLike[str] | None, image_size: int | None, on_corrupt: str,
            cache_dir: str | os.PathLike[str] | Literal[False] | None, progress: bool = True) -> _Decoded:
    """Resolve the source, then read the cache entry for it or decode it and store the entry."""
    kind, location = _resolve(spec, data_dir)
    if kind == "tfds":
        return _load_tfds(location, data_dir, image_size, cache_dir)
    path = pathlib.Path(location)
    if data_dir is None and kind in CIFAR_ARCHIVES and not spec.startswith("folder:"):
        path = cifar_archive(kind, progress)
    entry = _cache_entry(cache_dir, f"{path.name.split('.')[0]}-{kind}", kind=kind, path=path, image_size=image_size)
    if entry is not None and (hit := _read_cache(entry)) is not None:
        return hit
    if kind == "folder":
        decoded = _load_image_folder(path, image_size, on_corrupt)
    else:
        decoded = _load_cifar_python(path, kind, image_size)
    if entry is not None:
        _write_cache(entry, decoded)
    return decoded


def _resolve(spec: str, data_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(kind, location): ('folder' | 'cifar10' | 'cifar100', local path) or ('tfds', dataset name)."""
    if spec.startswith("folder:"):
        if data_dir is not None:
            raise ConfigError(f"spec {spec!r} names its folder; data_dir must be None, got {data_dir!r}")
        path = pathlib.Path(spec[len("folder:"):]).expanduser()
        if not path.exists():
            raise DatasetError(f"image folder {path} does not exist")
        return _local_kind(path) or "folder", str(path)
    if spec.startswith("tfds:"):
        return "tfds", spec[len("tfds:"):]
    if data_dir is None:
        if spec in CIFAR_ARCHIVES:  # downloaded by us (`cifar_archive`), read as the python version
            return spec, str(downloads_dir() / CIFAR_ARCHIVES[spec].file_name)
        return "tfds", spec
    path = pathlib.Path(data_dir).expanduser()
    if path.is_dir():
        kind = _local_kind(path)
        if kind is None:
            base = spec.split("/")[0].split(":")[0]
            if not any(path.iterdir()) or (path / base).is_dir() or (path / "downloads").is_dir():
                return "tfds", spec  # a tfds data folder (empty: tfds downloads into it)
            kind = "folder"
    elif path.exists():
        kind = _local_kind(path) or "folder"
    elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
        raise DatasetError(f"{path} does not exist")
    else:
        return "tfds", spec  # a new tfds data folder: tfds downloads into it
    if kind in _CIFAR_PYTHON and kind != spec:
        raise DatasetError(f"{path} holds the {kind} python batches; load it with spec {kind!r}, not {spec!r}")
    return kind, str(path)


def _local_kind(path: pathlib.Path) -> str | None:
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


def _file_signature(path: pathlib.Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of `path` or of every file under it: changes when the data changes."""
    if path.is_file():
        st = path.stat()
        return [("", st.st_size, st.st_mtime_ns)]
    out = []
    for dirpath, _, files in os.walk(path, followlinks=True):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out.append((os.path.relpath(os.path.join(dirpath, f), path), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _cache_entry(cache_dir: str | os.PathLike[str] | Literal[False] | None, stem: str, kind: str,
                 path: pathlib.Path, image_size: int | None) -> pathlib.Path | None:
    """The cache file for the data at `path` (None when caching is off): its name hashes the path, the size and
    mtime of every file, `image_size` and the cache format version."""
    if cache_dir is False:
        return None
    key = {"v": _CACHE_VERSION, "kind": kind, "path": str(path.resolve()), "files": _file_signature(path),
           "image_size": image_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{stem}-{digest}.npz"


def _read_cache(entry: pathlib.Path) -> _Decoded | None:
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as z:
            test = Split(z["test_images"], z["test_labels"]) if bool(z["has_test"]) else None
            return _Decoded(train=Split(z["train_images"], z["train_labels"]), test=test,
                            class_names=tuple(str(n) for n in z["class_names"]), source=str(z["source"]),
                            skipped=tuple(str(n) for n in z["skipped"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring unreadable dataset cache {entry}: {e}", stacklevel=4)
        return None


def _write_cache(entry: pathlib.Path, d: _Decoded) -> None:
    """Store `d` at `entry` atomically (temp file in the same folder, then rename); a failure only warns. The temp
    file goes whatever stops the write, a signal too (`train.StoppedBeforeTraining`, KeyboardInterrupt)."""
    empty_images = np.zeros((0, *d.train.images.shape[1:]), np.uint8)
    arrays = {
        "train_images": d.train.images, "train_labels": d.train.labels,
        "test_images": d.test.images if d.test else empty_images,
        "test_labels": d.test.labels if d.test else np.zeros(0, np.int32),
        "has_test": np.array(d.test is not None), "class_names": np.array(d.class_names, dtype=str),
        "source": np.array(d.source), "skipped": np.array(d.skipped, dtype=str),
    }
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, entry)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write the dataset cache {entry}: {e}", stacklevel=4)
    finally:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)


class _Images:
    """Decoded RGB images at one size, keyed: `image_size` x `image_size` when given (shorter side resized, center
    crop); else their own size while all are alike, switching every image (past and coming) to the
    `DEFAULT_RESIZE` crop at the first one that differs."""

    def __init__(self, image_size: int | None) -> None:
        self._size = image_size
        self._shape: tuple[int, ...] | None = None
        self.arrays: dict[Any, np.ndarray] = {}

    def add(self, key: Any, image: Image.Image) -> None:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self._size is None:
            array = np.asarray(image)
            if self._shape is None:
                self._shape = array.shape
            if array.shape == self._shape:
                self.arrays[key] = array
                return
            self._size = DEFAULT_RESIZE
            self.arrays = {k: _resize_center_crop(Image.fromarray(a), self._size) for k, a in self.arrays.items()}
        self.arrays[key] = _resize_center_crop(image, self._size)

    def stack(self, keys: Sequence[Any]) -> np.ndarray:
        if not keys:
            shape = (self._size, self._size, 3) if self._size else (self._shape or (0, 0, 3))
            return np.zeros((0, *shape), np.uint8)
        return np.stack([self.arrays[k] for k in keys])


def _resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (PIL bilinear), center crop `size` x `size`, as torchvision's
    `Resize(size)` + `CenterCrop(size)`."""
    w, h = image.size
    if min(w, h) != size:
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    if (w, h) != (size, size):
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image)


def _decode_image(data: bytes) -> Image.Image:
    """Decode one image file fully (so that a corrupt file fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ------------------------------------------------------------------------------------------------ image folders


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _walk(path: pathlib.Path, read: bool = True) -> Iterator[tuple[tuple[str, ...], bytes | pathlib.Path | None]]:
    """(relative parts, file bytes) for every image file and (parts, None) for every folder under `path` (a folder
    or a tar archive, read as a stream), hidden ones skipped. `read=False` (folders only): the file's path instead
    of its bytes."""
    if path.is_dir():
        def fail(error: OSError) -> None:
            raise DatasetError(f"cannot read {error.filename}: {error.strerror}") from error

        for dirpath, dirnames, filenames in os.walk(path, onerror=fail, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            rel = pathlib.Path(dirpath).relative_to(path).parts
            if rel:
                yield rel, None
            for name in sorted(filenames):
                if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                    if not read:
                        yield (*rel, name), pathlib.Path(dirpath) / name
                        continue
                    try:
                        yield (*rel, name), (pathlib.Path(dirpath) / name).read_bytes()
                    except OSError as e:
                        fail(e)
        return
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if not parts or any(_is_hidden(p) for p in parts):
                    continue
                if member.isdir():
                    yield parts, None
                elif member.isfile() and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                    yield parts, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot read the archive {path}: {e}") from e


def _load_image_folder(path: pathlib.Path, image_size: int | None, on_corrupt: str) -> _Decoded:
    images = _Images(image_size)
    folders: set[tuple[str, ...]] = set()
    skipped: list[str] = []
    for parts, data in _walk(path):
        _add_folders(folders, parts, data)
        if data is None:
            continue
        try:
            image = _decode_image(data)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds of errors on bad data
            if on_corrupt == "error":
                raise DatasetError(f"cannot decode image {path / '/'.join(parts)}: {e}; pass on_corrupt='skip' "
                                   "(train.py --on-corrupt skip) to leave corrupt images out") from e
            skipped.append("/".join(parts))
            continue
        images.add(parts, image)
    files = sorted(images.arrays)
    if not files and not skipped:
        raise _no_images(path)
    (train_keys, train_labels), test, class_names = _folder_layout(path, files, folders)
    test_split = Split(images.stack(test[0]), test[1]) if test is not None else None
    return _Decoded(Split(images.stack(train_keys), train_labels), test_split, class_names, f"image folder {path}",
                    tuple(skipped))


_Keyed = tuple[list[tuple[str, ...]], np.ndarray]  # (file keys in order, their labels)


def _add_folders(folders: set[tuple[str, ...]], parts: tuple[str, ...], entry: object) -> None:
    """Record the folder `parts` (a `_walk` entry of None) or a file's folder, and all of their ancestors."""
    folder = parts if entry is None else parts[:-1]
    if folder not in folders:
        folders.update(folder[:i] for i in range(1, len(folder) + 1))


def _no_images(path: pathlib.Path) -> DatasetError:
    return DatasetError(f"no images in {path} (expected train/<class>/*.jpg or <class>/*.jpg, extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)})")


def _folder_layout(path: pathlib.Path, files: Sequence[tuple[str, ...]], folders: set[tuple[str, ...]]
                   ) -> tuple[_Keyed, _Keyed | None, tuple[str, ...]]:
    """The image folder rules (module docstring) on a listing: (train, test or None, class names)."""
    root: tuple[str, ...] = ()  # step into folders that wrap the whole tree
    while True:
        top = {f[len(root)] for f in files} | {d[len(root)] for d in folders if d[:len(root)] == root
                                               and len(d) > len(root)}
        if len(top) != 1 or top & {"train", "test"} or any(len(f) < len(root) + 3 for f in files):
            break
        root += (top.pop(),)
    level = root + ("train",) if root + ("train",) in folders else root
    if level != root:
        ignored = sorted({d[len(root)] for d in folders if len(d) > len(root) and d[:len(root)] == root}
                         - {"train", "test"})
        if ignored:
            warnings.warn(f"{path}: ignoring the top-level folders {ignored} (only train/ and test/ are read)",
                          stacklevel=5)

    def split(base: tuple[str, ...], class_names: Sequence[str] | None) -> tuple[_Keyed, tuple[str, ...]]:
        where = path / "/".join(base)
        stray = [f for f in files if f[:len(base)] == base and len(f) == len(base) + 1]
        if stray:
            raise DatasetError(f"{where}: images must be inside class folders, found {'/'.join(stray[0])}")
        names = sorted({d[len(base)] for d in folders if len(d) > len(base) and d[:len(base)] == base})
        if not names:
            raise DatasetError(f"{where}: no class folders (expected {where}/<class>/*.jpg)")
        index = {n: i for i, n in enumerate(class_names if class_names is not None else names)}
        if unknown := [n for n in names if n not in index]:
            raise DatasetError(f"{where}: class folders {unknown} are not in the train classes")
        members: dict[str, list[tuple[str, ...]]] = {n: [] for n in names}
        for f in files:
            if f[:len(base)] == base and len(f) > len(base) + 1:
                members[f[len(base)]].append(f)
        if empty := [n for n in names if not members[n]]:
            raise DatasetError(f"{where / empty[0]}: class folder with no images")
        keys = [f for n in names for f in members[n]]
        labels = np.concatenate([np.full(len(members[n]), index[n], np.int32) for n in names])
        return (keys, labels), tuple(names)

    if top == {"test"}:  # only test/<class>/: a test set, no training examples
        test, class_names = split(root + ("test",), None)
        return ([], np.zeros(0, np.int32)), test, class_names
    train, class_names = split(level, None)
    test = split(root + ("test",), class_names)[0] if level != root and root + ("test",) in folders else None
    return train, test, class_names


# --------------------------------------------------------------------------------------------------- streaming


@dataclasses.dataclass(frozen=True, eq=False)
class StreamSplit:
    """A split read example by example instead of held in memory: `split[i]` is (uint8 image (S, S, 3), label),
    grain's random-access source protocol. The labels are in memory (the validation split needs them)."""
    labels: np.ndarray
    positions: np.ndarray                    # the examples' positions in the source
    read: Any                                # position -> uint8 (S, S, 3)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.int32]:
        return self.read(int(self.positions[i])), self.labels[i]

    def subset(self, idx: np.ndarray) -> StreamSplit:
        return dataclasses.replace(self, labels=self.labels[idx], positions=self.positions[idx])

    def sample(self, n: int, seed: int) -> StreamSplit:
        """As `Split.sample`: `n` examples drawn at random, kept in their order; all of them when n >= len."""
        if n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def read_batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, S, S, 3) uint8, labels (B,) int32) of the examples `idx` of this split."""
        images = [self.read(int(p)) for p in self.positions[idx]]
        return (np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)), self.labels[idx]


@dataclasses.dataclass(frozen=True, eq=False)
class StreamDataset:
    """`Dataset`'s streaming twin (`open_stream`): the same splits, class names and source, read on demand."""
    train: StreamSplit
    val: StreamSplit
    test: StreamSplit | None
    class_names: tuple[str, ...]
    source: str
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_stream(spec: str, data_dir: str | os.PathLike[str] | None = None, *, val_fraction: float = 0.1,
                seed: int = 0, image_size: int | None = None) -> StreamDataset:
    """The dataset `load_dataset(spec, data_dir, ...)` would load, as sources that decode each image when it is
    asked for (for datasets larger than memory; `stream_batches` reads them in background threads). Same
    examples, labels, class names and validation split as `load_dataset`. Sources: a tfds name (through
    `tfds.data_source`; reading the labels decodes every example once) or an image folder (a directory; a tar
    archive cannot be read at random: extract it). Image size as `load_dataset`'s: `image_size` S (shorter side
    resized, center crop), else the images' own size when all have the same (a folder's file headers are read
    for that; a tfds dataset's image feature must have a fixed shape), else `DEFAULT_RESIZE`. An image that
    cannot be decoded raises `DatasetError` when it is read."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    kind, location = _resolve(spec, data_dir)
    if kind in _CIFAR_PYTHON:
        raise DatasetError(f"{location}: the CIFAR python batches are read whole ({kind} fits in memory); load it "
                           "without streaming")
    if kind == "tfds":
        splits, class_names, source, shape = _tfds_streams(location, data_dir)
    else:
        path = pathlib.Path(location)
        if not path.is_dir():
            raise DatasetError(f"{path}: an archive cannot be read at random; extract it and pass the folder, or "
                               "load it without streaming")
        splits, class_names, source, shape = _folder_streams(path, sizes=image_size is None)
    if image_size is None:  # (not square: load_dataset would fail stacking them too; resize as mixed sizes)
        image_size = shape[0] if shape is not None and shape[0] == shape[1] else DEFAULT_RESIZE
    splits = {k: dataclasses.replace(v, read=functools.partial(_sized, v.read, image_size)) for k, v in splits.items()}
    train_idx, val_idx = stratified_split(splits["train"].labels, val_fraction, seed)
    return StreamDataset(splits["train"].subset(train_idx), splits["train"].subset(val_idx), splits.get("test"),
                         class_names, source, image_size)


def decoded_bytes(spec: str, data_dir: str | os.PathLike[str] | None = None) -> int | None:
    """An estimate of the uint8 size of the decoded dataset (train and test), without decoding it: the example
    count times the image size (tfds: from the dataset info; a folder: its files and the first one's header;
    images of no fixed size count as `DEFAULT_RESIZE` squares). None where nothing can be streamed anyway (CIFAR
    python batches, archives), for a tfds dataset not prepared yet (its split sizes are not known before), or
    where the source cannot be inspected (the loaders then say why)."""
    try:
        kind, location = _resolve(spec, data_dir)
    except DatasetError:
        return None
    if kind == "tfds":
        try:
            import tensorflow_datasets as tfds
            info = tfds.builder(location, data_dir=data_dir).info
            image_key, label_key = _tfds_keys(location, info)
        except Exception:  # noqa: BLE001 - unknown, unprepared, offline: load_dataset reports it
            return None
        if "train" not in info.splits:  # not prepared yet: the split sizes come with the prepared files
            return None
        shape = tuple(info.features[image_key].shape[:2])
        pixels = shape[0] * shape[1] if None not in shape else DEFAULT_RESIZE ** 2
        return sum(int(info.splits[s].num_examples) for s in ("train", "test") if s in info.splits) * pixels * 3
    path = pathlib.Path(location)
    if kind != "folder" or not path.is_dir():
        return None
    files = [where for _, where in _walk(path, read=False) if where is not None]
    if not files:
        return None
    try:
        with Image.open(files[0]) as image:
            w, h = image.size
    except Exception:  # noqa: BLE001 - a corrupt first file: the loaders report it
        return None
    return len(files) * (w * h if w == h else DEFAULT_RESIZE ** 2) * 3


def _sized(read, size: int, position: int) -> np.ndarray:
    image = read(position)
    if image.shape[:2] == (size, size):
        return image
    return _resize_center_crop(Image.fromarray(image), size)


def _folder_streams(path: pathlib.Path, sizes: bool
                    ) -> tuple[dict[str, StreamSplit], tuple[str, ...], str, tuple[int, int] | None]:
    """The splits, class names, source, and (`sizes`) the images' common (height, width) from their headers."""
    listing = dict(_walk(path, read=False))
    files = sorted(k for k, v in listing.items() if v is not None)
    folders: set[tuple[str, ...]] = set()
    for parts, where in listing.items():
        _add_folders(folders, parts, where)
    if not files:
        raise _no_images(path)
    train, test, class_names = _folder_layout(path, files, folders)

    def stream(keyed: _Keyed) -> StreamSplit:
        paths = [listing[k] for k in keyed[0]]
        return StreamSplit(keyed[1], np.arange(len(paths)), functools.partial(_read_file, tuple(paths)))

    splits = {"train": stream(train)} | ({"test": stream(test)} if test is not None else {})
    shape = None
    if sizes:
        found = set()
        for key in train[0] + (test[0] if test is not None else []):
            try:
                with Image.open(listing[key]) as image:  # the header only
                    found.add(image.size[::-1])
            except Exception as e:  # noqa: BLE001
                raise DatasetError(f"cannot decode image {listing[key]}: {e}") from e
            if len(found) > 1:
                break
        shape = found.pop() if len(found) == 1 else None
    return splits, class_names, f"image folder {path} (streamed)", shape


def _read_file(paths: tuple[pathlib.Path, ...], position: int) -> np.ndarray:
    try:
        image = _decode_image(paths[position].read_bytes())
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds of errors on bad data
        raise DatasetError(f"cannot decode image {paths[position]}: {e}") from e
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _tfds_streams(name: str, data_dir: str | os.PathLike[str] | None
                  ) -> tuple[dict[str, StreamSplit], tuple[str, ...], str, tuple[int, int] | None]:
    sources, info = _tfds_sources(name, data_dir)
    image_key, label_key = _tfds_keys(name, info)
    splits = {}
    for split_name, src in sources.items():
        labels = np.fromiter((src[i][label_key] for i in range(len(src))), np.int32, len(src))
        splits[split_name] = StreamSplit(labels, np.arange(len(src)), functools.partial(_read_tfds, src, image_key))
    shape = tuple(info.features[image_key].shape[:2])
    return (splits, tuple(info.features[label_key].names), f"tfds {name} ({info.data_dir}, streamed)",
            shape if None not in shape else None)


def _read_tfds(source, image_key: str, position: int) -> np.ndarray:
    image = np.asarray(source[position][image_key], np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def stream_batches(split: StreamSplit, batches: Sequence[np.ndarray], *, num_threads: int = 4,
                   prefetch: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each index array in `batches` (positions in `split`), in order, read by a grain
    pipeline: `num_threads` threads decode whole batches ahead of the consumer, at most `prefetch` batches."""
    import grain

    batches = [np.asarray(b) for b in batches]
    ds = grain.MapDataset.range(len(batches)).map(lambda b: split.read_batch(batches[b]))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


# ------------------------------------------------------------------------------------------------ CIFAR python


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing that runs other code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_python(path: pathlib.Path, kind: str, image_size: int | None) -> _Decoded:
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
            images = np.stack([_resize_center_crop(Image.fromarray(x), image_size) for x in images])
        return Split(np.ascontiguousarray(images), labels)

    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in found[meta_file][names_key])
    return _Decoded(split(train_files), split([test_file]), class_names, f"{kind} python version {path}")


# ---------------------------------------------------------------------------------------------------------- tfds


def _load_tfds(name: str, data_dir: str | os.PathLike[str] | None, image_size: int | None,
               cache_dir: str | os.PathLike[str] | Literal[False] | None) -> _Decoded:
    sources, info = _tfds_sources(name, data_dir)
    prepared = pathlib.Path(str(info.data_dir))  # the prepared files (absent under tfds.testing.mock_data)
    entry = None
    if prepared.is_dir():
        stem = f"{name.replace('/', '_').replace(':', '_')}-tfds"
        entry = _cache_entry(cache_dir, stem, kind="tfds", path=prepared, image_size=image_size)
    if entry is not None and (hit := _read_cache(entry)) is not None:
        return hit

    image_key, label_key = _tfds_keys(name, info)
    images = _Images(image_size)
    labels: dict[str, np.ndarray] = {}
    for split_name, source in sources.items():
        split_labels = np.empty(len(source), np.int32)
        for i in range(len(source)):
            example = source[i]
            image = np.asarray(example[image_key], np.uint8)
            images.add((split_name, i), Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image))
            split_labels[i] = example[label_key]
        labels[split_name] = split_labels
    splits = {s: Split(images.stack([(s, i) for i in range(len(labels[s]))]), labels[s]) for s in sources}
    decoded = _Decoded(splits["train"], splits.get("test"), tuple(info.features[label_key].names),
                       f"tfds {name} ({prepared})")
    if entry is not None:
        _write_cache(entry, decoded)
    return decoded


def _tfds_sources(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[dict[str, Any], Any]:
    """({'train': source[, 'test': source]}, dataset info) through `tfds.data_source` (random access). A dataset
    tfds has prepared already is read as it is (no TensorFlow needed); preparing one needs TensorFlow, so without
    it this stops before tfds downloads anything."""
    import tensorflow_datasets as tfds  # ~1 s to import: only when a tfds dataset is asked for
    from tensorflow_datasets.core.registered import DatasetNotFoundError

    def open_splits(download: bool) -> tuple[dict[str, Any], Any]:
        sources = {"train": tfds.data_source(name, split="train", data_dir=data_dir, download=download)}
        info = sources["train"].dataset_info
        if "test" in info.splits:
            sources["test"] = tfds.data_source(name, split="test", data_dir=data_dir, download=False)
        return sources, info

    try:
        try:
            return open_splits(download=False)  # prepared already (or mocked in tests)
        except DatasetNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - tfds says "not prepared" in several ways
            if importlib.util.find_spec("tensorflow") is None:
                raise DatasetUnavailableError(_no_tensorflow_message(name, data_dir)) from e
        return open_splits(download=True)
    except DatasetNotFoundError as e:
        raise DatasetError(f"unknown dataset {name!r}: not a TensorFlow Datasets name; for a local image folder "
                           "pass 'folder:PATH'") from e
    except DatasetUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - tfds fails in many ways when offline or unprepared
        raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e


def _no_tensorflow_message(name: str, data_dir: str | os.PathLike[str] | None) -> str:
    where = f"in {data_dir}" if data_dir is not None else "in the default tfds data folder (~/tensorflow_datasets)"
    cifar = (f" For {name}, --dataset {name} without --data-dir downloads the official archive instead, without "
             "TensorFlow." if name in CIFAR_ARCHIVES else "")
    return (f"dataset {name!r} is not prepared {where}, and TensorFlow Datasets needs TensorFlow to prepare it "
            f"(nothing was downloaded). Install it once with `pip install -e '.[tfds]'` (tensorflow-cpu) and run "
            f"again; the prepared copy is then read without TensorFlow. Or pass --dataset folder:PATH (or "
            f"--data-dir PATH) with an image folder (train/<class>/*.jpg, optional test/<class>/) or a .tar.gz of "
            f"one.{cifar}")


def _tfds_keys(name: str, info: Any) -> tuple[str, str]:
    """(image key, label key) of an image classification dataset."""
    image_key, label_key = info.supervised_keys or ("image", "label")
    label_feature = info.features[label_key] if label_key in info.features else None
    if image_key not in info.features or not hasattr(label_feature, "names"):
        raise DatasetError(f"{name}: not an image classification dataset (features {list(info.features)})")
    return image_key, label_key


def _unavailable_message(name: str, data_dir: str | os.PathLike[str] | None, error: Exception) -> str:
    detail = str(error).strip().splitlines()
    reason = type(error).__name__ + (f": {detail[0]}" if detail else "")
    where = f"data_dir={str(data_dir)!r}" if data_dir is not None else "the default tfds data folder"
    options = [f"prepare it where there is internet (python -c \"import tensorflow_datasets as tfds; "
               f"tfds.data_source('{name}', data_dir='DIR')\") and pass --data-dir DIR"]
    if name in CIFAR_ARCHIVES:
        options.append(f"--dataset {name} without --data-dir (downloads {CIFAR_BASE_URL}/"
                       f"{CIFAR_ARCHIVES[name].file_name}, no TensorFlow needed)")
    options.append("pass --data-dir with an image folder (train/<class>/*.jpg, optional test/<class>/) or a "
                   ".tar.gz of one")
    return (f"dataset {name!r} is not available from TensorFlow Datasets in {where} ({reason}). To use it: "
            + "; or ".join(options) + ".")


# ------------------------------------------------------------------------------------------------- augmentation


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """On-device augmentation (hashable: a static argument of the jitted functions).

    crop_padding: zero-pad each side by this many pixels, then crop the original size at a uniform random offset
        (torchvision `RandomCrop(size, padding)`); 0 disables.
    flip: horizontal flip with probability 1/2.
    rotation: maximum angle in degrees, uniform in [-rotation, rotation].
    zoom: the sampled area is scaled by a factor uniform in [1 - zoom, 1 + zoom] (> 1 zooms out), both axes alike
        (Keras `RandomZoom(zoom)`).
    translation: shifts uniform in [-translation, translation] times the height / width, drawn per axis (Keras
        `RandomTranslation(translation, translation)`).
    fill_mode: how rotation/zoom/translation fill points outside the image: 'reflect' (Keras' default),
        'constant' (zeros) or 'nearest'.
    contrast: per-channel (x - mean) * f + mean with f uniform in [1 - contrast, 1 + contrast], clipped to [0, 1]
        (Keras `RandomContrast`).
    resolution: side of the square output (bilinear `jax.image.resize`, antialiased when shrinking); None keeps
        the input size.
    mean, std: normalization of the [0, 1] images.
    """
    crop_padding: int = 4
    flip: bool = True
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    fill_mode: Literal["reflect", "constant", "nearest"] = "reflect"
    contrast: float = 0.0
    resolution: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop_padding < 0 or self.rotation < 0 or self.translation < 0:
            raise ConfigError("crop_padding, rotation and translation must be >= 0")
        if not 0 <= self.zoom < 1 or not 0 <= self.contrast <= 1:
            raise ConfigError(f"zoom must be in [0, 1) and contrast in [0, 1], got {self.zoom}, {self.contrast}")
        if self.fill_mode not in ("reflect", "constant", "nearest"):
            raise ConfigError(f"fill_mode must be 'reflect', 'constant' or 'nearest', got {self.fill_mode!r}")
        if self.resolution is not None and self.resolution <= 0:
            raise ConfigError(f"resolution must be positive, got {self.resolution}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("mean and std must have 3 values")


@functools.partial(jax.jit, static_argnames="cfg")
def augment_batch(key: jax.Array, images: jax.Array, indices: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Augment a batch of uint8 images (B, H, W, 3) -> float32 (B, R, R, 3) normalized, R = cfg.resolution (or
    H, W). `indices` (B,) are the examples' global indices: example i uses `jax.random.fold_in(key, indices[i])`."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices.astype(jnp.uint32))
    x = jax.vmap(functools.partial(_augment_one, cfg=cfg))(keys, images)
    return _resize_normalize(x, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def eval_batch(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 normalized, resized to cfg.resolution when set; no randomness."""
    return _resize_normalize(images.astype(jnp.float32) / 255.0, cfg)


def _augment_one(key: jax.Array, image: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """One uint8 HWC image -> float32 in [0, 1]. Each operation has its own subkey, whatever else is enabled."""
    k_crop, k_flip, k_affine, k_contrast = jax.random.split(key, 4)
    h, w, c = image.shape
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
    if cfg.flip:
        image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
    x = image.astype(jnp.float32) / 255.0
    if cfg.rotation or cfg.zoom or cfg.translation:
        x = _affine(k_affine, x, cfg)
    if cfg.contrast:
        f = jax.random.uniform(k_contrast, minval=1.0 - cfg.contrast, maxval=1.0 + cfg.contrast)
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = jnp.clip((x - mean) * f + mean, 0.0, 1.0)
    return x


def _affine(key: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Resample `x` (H, W, C) once through a random rotation about the center, zoom and translation (bilinear)."""
    h, w, _ = x.shape
    k_rot, k_zoom, k_shift = jax.random.split(key, 3)
    theta = jnp.deg2rad(jax.random.uniform(k_rot, minval=-cfg.rotation, maxval=cfg.rotation))
    zoom = jax.random.uniform(k_zoom, minval=1.0 - cfg.zoom, maxval=1.0 + cfg.zoom)
    shift = jax.random.uniform(k_shift, (2,), minval=-cfg.translation, maxval=cfg.translation) * jnp.array([h, w])
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    dy, dx = yy - cy - shift[0], xx - cx - shift[1]  # output pixel -> input pixel: undo shift, rotate, scale
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    src = [zoom * (cos * dy - sin * dx) + cy, zoom * (sin * dy + cos * dx) + cx]

    def sample(channel: jax.Array) -> jax.Array:
        return map_coordinates(channel, src, order=1, mode=cfg.fill_mode)

    return jax.vmap(sample, in_axes=2, out_axes=2)(x)


def _resize_normalize(x: jax.Array, cfg: AugmentConfig) -> jax.Array:
    if cfg.resolution is not None and x.shape[1:3] != (cfg.resolution, cfg.resolution):
        x = jax.image.resize(x, (x.shape[0], cfg.resolution, cfg.resolution, x.shape[3]), "bilinear")
    return (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)


# ----------------------------------------------------------------------------------------------------- batching


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) (int32) that depends only on (seed, epoch): the same on every host."""
    if not 0 <= n < 2**31:
        raise ValueError(f"n must be in [0, 2**31), got {n}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def batch_indices(perm: np.ndarray, batch_size: int, drop_last: bool = True) -> list[np.ndarray]:
    """Consecutive batches of `perm`; the last, shorter one is dropped when `drop_last`, else kept."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    stop = len(perm) - len(perm) % batch_size if drop_last else len(perm)
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def eval_batches(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask), both (ceil(n / batch_size), batch_size): examples 0..n-1 in order, the last batch padded
    with index 0 and mask False, so that counting only masked-in entries sees every example exactly once."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num = -(-n // batch_size)
    flat = np.arange(num * batch_size, dtype=np.int32)
    mask = flat < n
    return np.where(mask, flat, 0).reshape(num, batch_size), mask.reshape(num, batch_size)
