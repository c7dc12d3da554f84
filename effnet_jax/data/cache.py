"""The decoded-dataset cache: every dataset decoded into memory is stored as an uncompressed `.npz` in `cache_dir`
(default `$EFFNET_JAX_CACHE/datasets`, else `$XDG_CACHE_HOME/effnet_jax/datasets`, else
`~/.cache/effnet_jax/datasets`; `cache_dir=False` disables it), keyed by the source (path, and the size and mtime of
every file in it; for tfds the prepared files) and `image_size`. Written to a temp file and renamed, so readers
never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable

import numpy as np

from effnet_jax.data.dataset import CacheDir, Contents, Split, warn

__all__ = ["CACHE_ENV_VAR", "cache_root", "default_cache_dir", "entry", "cached"]

CACHE_ENV_VAR = "EFFNET_JAX_CACHE"
_CACHE_VERSION = 1


def cache_root() -> pathlib.Path:
    """`$EFFNET_JAX_CACHE`, else `$XDG_CACHE_HOME/effnet_jax`, else `~/.cache/effnet_jax`."""
    root = os.getenv(CACHE_ENV_VAR) or os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")),
                                                     "effnet_jax")
    return pathlib.Path(root).expanduser()


def default_cache_dir() -> pathlib.Path:
    """`$EFFNET_JAX_CACHE/datasets`, else `$XDG_CACHE_HOME/effnet_jax/datasets`, else `~/.cache/...`."""
    return cache_root() / "datasets"


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


def entry(cache_dir: CacheDir, stem: str, kind: str, path: pathlib.Path,
          image_size: int | None) -> pathlib.Path | None:
    """The cache file for the data at `path` (None when caching is off): its name hashes the path, the size and
    mtime of every file, `image_size` and the cache format version."""
    if cache_dir is False:
        return None
    key = {"v": _CACHE_VERSION, "kind": kind, "path": str(path.resolve()), "files": _file_signature(path),
           "image_size": image_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{stem}-{digest}.npz"


def cached(at: pathlib.Path | None, decode: Callable[[], Contents]) -> Contents:
    """The contents stored at the cache entry `at`, else `decode()`, then stored there (`at` None: no cache)."""
    if at is not None and (hit := _read(at)) is not None:
        return hit
    contents = decode()
    if at is not None:
        _write(at, contents)
    return contents


def _read(at: pathlib.Path) -> Contents | None:
    if not at.is_file():
        return None
    try:
        with np.load(at, allow_pickle=False) as z:
            test = Split(z["test_images"], z["test_labels"]) if bool(z["has_test"]) else None
            return Contents(train=Split(z["train_images"], z["train_labels"]), test=test,
                            class_names=tuple(str(n) for n in z["class_names"]), source=str(z["source"]),
                            skipped=tuple(str(n) for n in z["skipped"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warn(f"ignoring unreadable dataset cache {at}: {e}")
        return None


def _write(at: pathlib.Path, d: Contents) -> None:
    """Store `d` at `at` atomically (temp file in the same folder, then rename); a failure only warns. The temp
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
        at.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=at.parent, prefix=f".{at.name}.", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, at)
        tmp = None
    except OSError as e:
        warn(f"could not write the dataset cache {at}: {e}")
    finally:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)
