"""The entry point: `load_dataset(spec, data_dir, ...)` resolves `spec` to a source (`FolderSource`,
`CifarSource`, `TfdsSource`), checks the arguments once, decides whether to hold the decoded images in memory or to
stream them, and carves the validation split.

Sources, by `spec` and `data_dir`:

* 'cifar10' / 'cifar100' without `data_dir`: the official python version, downloaded once (`cifar.cifar_archive`).
* a TensorFlow Datasets name ('svhn_cropped', 'tf_flowers', ..., or 'tfds:NAME' to go through tfds for CIFAR
  too); `data_dir` is then the tfds data folder, unless it is a local dataset (below).
* 'cifar10' / 'cifar100' with `data_dir` the official python version (the tarball or the folder extracted from it).
* 'folder:PATH', or any `spec` with `data_dir` an image folder (a directory, or a `.tar` / `.tar.gz` of one).

Image size: with `image_size=None` images keep their size when all have the same; otherwise (tf_flowers, most
photo folders) every image is resized so that its shorter side is 256 (PIL bilinear) and center-cropped to
256 x 256. With `image_size=S` every image is resized and center-cropped that way to S x S.

Streaming (`stream=True`, or `stream=None` and more than `STREAM_ABOVE_BYTES` decoded by `decoded_bytes`' estimate):
the same splits (same examples, labels, class names, validation split) read from the source an image at a time (a
tfds name, or an image folder that is a directory); `batching.stream_batches` reads them in background threads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from typing import Literal

from effnet_jax.data.cifar import CIFAR_ARCHIVES, CifarSource, cifar_kind, downloads_dir
from effnet_jax.data.dataset import CacheDir, Contents, Dataset, DatasetError, Source, Split, stratified_split, warn
from effnet_jax.data.folder import FolderSource
from effnet_jax.data.image import DEFAULT_RESIZE, fit
from effnet_jax.data.tfds import TfdsSource
from effnet_jax.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["STREAM_ABOVE_BYTES", "load_dataset", "decoded_bytes", "resolve"]

STREAM_ABOVE_BYTES = 4 << 30  # stream=None (train.py without --stream/--no-stream): datasets whose decoded uint8
                              # images take more are streamed


def load_dataset(spec: str, data_dir: str | os.PathLike[str] | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None, cache_dir: CacheDir = None,
                 on_corrupt: Literal["error", "skip"] = "error", progress: bool = True, stream: bool | None = False,
                 max_train_examples: int | None = None) -> Dataset:
    """Load a dataset, decoded into memory or streamed (see the module docstring for the sources and rules).

    spec: a tfds name ('cifar10', 'tf_flowers', ...) or 'folder:PATH'. data_dir: the tfds data folder, or a local
    dataset (CIFAR python tarball or folder for 'cifar10'/'cifar100'; an image folder or its .tar/.tar.gz for any
    name). val_fraction, seed: the stratified validation split of train. image_size: None keeps a uniform size
    (else 256 crops); S resizes the shorter side to S and center-crops S x S. cache_dir: None for the default
    cache, False for none (in memory only). on_corrupt: 'error' or 'skip' for undecodable images in a folder (in
    memory only: a streamed image that cannot be decoded raises `DatasetError` when it is read). progress: a
    progress bar while a CIFAR archive downloads. stream: True streams, False decodes into memory, None streams
    when `decoded_bytes` says the decoded images would take more than `STREAM_ABOVE_BYTES`. max_train_examples: a
    seeded random N of the training examples (`Split.sample(N, seed)`), for smoke tests and quick looks.
    """
    if on_corrupt not in ("error", "skip"):
        raise ConfigError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    source = resolve(spec, data_dir)
    why = ""
    if stream is None:
        why = _too_large(spec, source)
        stream = bool(why)
    if stream:
        if on_corrupt != "error":
            raise ConfigError("--on-corrupt skip needs the whole dataset decoded first; it does not go with --stream"
                             + (f" ({spec}: {why})" if why else ""))
        contents, image_size = _open(source, image_size)
    else:
        contents = source.decode(image_size, on_corrupt, cache_dir, progress)
        if skipped := contents.skipped:
            if on_corrupt == "error":
                raise DatasetError(f"{contents.source}: cannot decode image {skipped[0]} (and {len(skipped) - 1} "
                                   "more); pass on_corrupt='skip' (train.py --on-corrupt skip) to leave them out")
            warn(f"{contents.source}: skipped {len(skipped)} corrupt image(s): "
                 f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}")
        shape = contents.train.images.shape[1:3]
        image_size = shape[0] if shape[0] == shape[1] and shape[0] > 0 else None
    train_idx, val_idx = stratified_split(contents.train.labels, val_fraction, seed)
    train = contents.train.subset(train_idx)
    if max_train_examples is not None:
        train = train.sample(max_train_examples, seed)
    return Dataset(train=train, val=contents.train.subset(val_idx), test=contents.test,
                   class_names=contents.class_names, source=contents.source, image_size=image_size)


def _too_large(spec: str, source: Source) -> str:
    """Why `spec` is streamed by default (logged), or '' when `decoded_bytes` says it fits under
    `STREAM_ABOVE_BYTES` or cannot say."""
    size = source.decoded_bytes()
    if size is None or size <= STREAM_ABOVE_BYTES:
        return ""
    why = (f"about {size / 2**30:.1f} GiB decoded, more than {STREAM_ABOVE_BYTES / 2**30:.1f} GiB: streamed "
           "(--no-stream loads it anyway)")
    log.info("%s: %s", spec, why)
    return why


def _open(source: Source, image_size: int | None) -> tuple[Contents, int]:
    """The source's streamed contents with every image read at S x S, and S: `image_size`, else the images' own
    size when all share one square size, else `DEFAULT_RESIZE` (as decoding them sizes them)."""
    contents = source.open(sizes=image_size is None)
    if image_size is None:  # (not square: decoding would fail stacking them too; resize as mixed sizes)
        shape = contents.shape
        image_size = shape[0] if shape is not None and shape[0] == shape[1] else DEFAULT_RESIZE

    def sized(split: Split) -> Split:
        return dataclasses.replace(split, reader=functools.partial(fit, split.reader, image_size))

    return dataclasses.replace(contents, train=sized(contents.train),
                               test=None if contents.test is None else sized(contents.test)), image_size


def decoded_bytes(spec: str, data_dir: str | os.PathLike[str] | None = None) -> int | None:
    """An estimate of the uint8 size of the decoded dataset (train and test), without decoding it: the example
    count times the image size (tfds: from the dataset info; a folder: its files and the first one's header;
    images of no fixed size count as `DEFAULT_RESIZE` squares). None where nothing can be streamed anyway (CIFAR
    python batches, archives), for a tfds dataset not prepared yet (its split sizes are not known before), or
    where the source cannot be inspected (loading it then says why)."""
    try:
        source = resolve(spec, data_dir)
    except DatasetError:
        return None
    return source.decoded_bytes()


def resolve(spec: str, data_dir: str | os.PathLike[str] | None) -> Source:
    """The source `spec` and `data_dir` name (module docstring); nothing is downloaded or decoded yet."""
    if spec.startswith("folder:"):
        if data_dir is not None:
            raise ConfigError(f"spec {spec!r} names its folder; data_dir must be None, got {data_dir!r}")
        path = pathlib.Path(spec[len("folder:"):]).expanduser()
        if not path.exists():
            raise DatasetError(f"image folder {path} does not exist")
        return _local(path, cifar_kind(path))
    if spec.startswith("tfds:"):
        return TfdsSource(spec[len("tfds:"):], data_dir)
    if data_dir is None:
        if spec in CIFAR_ARCHIVES:  # downloaded by us (`cifar_archive`), read as the python version
            return CifarSource(downloads_dir() / CIFAR_ARCHIVES[spec].file_name, spec, download=True)
        return TfdsSource(spec, data_dir)
    path = pathlib.Path(data_dir).expanduser()
    if path.is_dir():
        kind = cifar_kind(path)
        if kind is None:
            base = spec.split("/")[0].split(":")[0]
            if not any(path.iterdir()) or (path / base).is_dir() or (path / "downloads").is_dir():
                return TfdsSource(spec, data_dir)  # a tfds data folder (empty: tfds downloads into it)
    elif path.exists():
        kind = cifar_kind(path)
    elif path.name.endswith((".tar", ".tar.gz", ".tgz")):
        raise DatasetError(f"{path} does not exist")
    else:
        return TfdsSource(spec, data_dir)  # a new tfds data folder: tfds downloads into it
    if kind is not None and kind != spec:
        raise DatasetError(f"{path} holds the {kind} python batches; load it with spec {kind!r}, not {spec!r}")
    return _local(path, kind)


def _local(path: pathlib.Path, kind: str | None) -> Source:
    """The CIFAR python version `kind` at `path`, or (None) the image folder there."""
    return FolderSource(path) if kind is None else CifarSource(path, kind)
