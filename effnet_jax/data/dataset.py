"""The types every source produces: `Split` and `Dataset` (in memory or streamed: one type each), `Contents` (a
source read before the validation split, what the cache holds) and the `Source` protocol the source modules
implement; the errors; the validation split.

Validation is always carved from train, a stratified split seeded by `seed` (`stratified_split`), computed from the
labels alone, so every host and process gets the same split. A dataset's own test split is kept apart as `test`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import warnings
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np

from effnet_jax.errors import UserError

__all__ = ["DatasetError", "DatasetUnavailableError", "Split", "Dataset", "Contents", "Source", "stratified_split"]

CacheDir = str | os.PathLike[str] | Literal[False] | None  # a cache folder; None: the default one; False: no cache


class DatasetError(UserError, ValueError):
    """The data given is not a usable dataset (bad layout, corrupt image, unknown name)."""


class DatasetUnavailableError(UserError, RuntimeError):
    """The dataset cannot be obtained here (not prepared and no download possible)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Labels (N,) int32 and their images, held in memory or read from the source when asked for.

    In memory: `images` (N, H, W, 3) uint8. Streamed: `images` is None, and example i is `reader(positions[i])`, a
    uint8 (S, S, 3) image decoded when it is asked for (the labels are in memory: the validation split needs
    them). `split[i]` (grain's random-access source protocol), `read_batch`, `subset` and `sample` serve both.
    """
    images: np.ndarray | None
    labels: np.ndarray
    positions: np.ndarray | None = None                   # streamed: the examples' positions in the source
    reader: Callable[[int], np.ndarray] | None = None     # streamed: position -> uint8 (S, S, 3)

    @classmethod
    def streamed_from(cls, labels: np.ndarray, reader: Callable[[int], np.ndarray]) -> Split:
        """A streamed split of all of a source's examples: example i at position i."""
        return cls(None, labels, np.arange(len(labels)), reader)

    @property
    def streamed(self) -> bool:
        return self.images is None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.int32]:
        if self.streamed:
            return self.reader(int(self.positions[i])), self.labels[i]
        return self.images[i], self.labels[i]

    def subset(self, idx: np.ndarray) -> Split:
        """The examples `idx` (indices into this split), in that order."""
        if self.streamed:
            return dataclasses.replace(self, labels=self.labels[idx], positions=self.positions[idx])
        return Split(self.images[idx], self.labels[idx])

    def sample(self, n: int, seed: int) -> Split:
        """`n` examples drawn at random (`np.random.default_rng(seed)`), kept in their stored order; all of them
        when n >= len. (Not the first n: the stored splits are grouped by class.)"""
        if n >= len(self):
            return self
        return self.subset(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def read_batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (B, H, W, 3) uint8, labels (B,) int32) of the examples `idx` of this split."""
        if not self.streamed:
            return self.images[idx], self.labels[idx]
        images = [self.reader(int(p)) for p in self.positions[idx]]
        return (np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)), self.labels[idx]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset, in memory or streamed (`streamed`: its splits read each image when it is asked
    for). `val` is carved from the source's train split; `test` is the source's own test split, None when it has
    none. `source` says where it came from, for logs and checkpoint metadata. `image_size`: the side of the square
    images (streamed: the side every image is read at), None when they are not square."""
    train: Split
    val: Split
    test: Split | None
    class_names: tuple[str, ...]
    source: str
    image_size: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def streamed(self) -> bool:
        return self.train.streamed


@dataclasses.dataclass(frozen=True, eq=False)
class Contents:
    """What a source holds, before the validation split: its train and test splits (in memory: what the cache
    holds; or streamed), class names and description."""
    train: Split
    test: Split | None
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[str, ...] = ()                 # in memory: corrupt images left out (on_corrupt='skip')
    shape: tuple[int, int] | None = None          # streamed: the images' common (height, width), when known


class Source(Protocol):
    """One kind of source (`folder.FolderSource`, `cifar.CifarSource`, `tfds.TfdsSource`): the same examples,
    labels and class names whether decoded into memory or streamed."""

    def decode(self, image_size: int | None, on_corrupt: str, cache_dir: CacheDir, progress: bool) -> Contents:
        """Every image decoded into memory, through the cache (`image.Images` sizes them)."""

    def open(self, sizes: bool) -> Contents:
        """Streamed splits that decode an image when it is asked for, at its own size (`Contents.shape`: their
        common size, looked up when `sizes`). Raises `DatasetError` when the source cannot be read at random."""

    def decoded_bytes(self) -> int | None:
        """An estimate of the decoded uint8 size without decoding (None: not streamable, or unknown)."""


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


_PACKAGE = str(pathlib.Path(__file__).parent) + os.sep


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this package (the line that loaded the dataset)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
