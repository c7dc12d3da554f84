"""Image folders, as directories or `.tar` / `.tar.gz` archives of them: `FolderSource`, decoded into memory or
streamed file by file (the layout it reads: its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from effnet_jax.data import cache
from effnet_jax.data.dataset import CacheDir, Contents, DatasetError, Split, warn
from effnet_jax.data.image import DEFAULT_RESIZE, IMAGE_EXTENSIONS, Images, decode_image, rgb_array

__all__ = ["FolderSource"]

_Keyed = tuple[list[tuple[str, ...]], np.ndarray]  # (file keys in order, their labels)


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """An image folder at `path` (a directory, or a tar archive of one).

    The tree is `train/<class>/*.jpg` with an optional `test/<class>/...`, or, without a `train/` level,
    `<class>/*.jpg`, or only `test/<class>/...` (a test set, to score a run on with `evaluate --split test`: its
    train split, and so validation, are empty). A single folder wrapping the whole tree (`mydata/train/...`) is
    stepped into; hidden files and folders are skipped; image files are those with `IMAGE_EXTENSIONS`
    (torchvision's `ImageFolder` extensions), searched recursively inside each class folder. Class index =
    position in the sorted class names of `train/` (of `test/` when it is the only folder).

    Decoded into memory, images are decoded with PIL in RGB, one after another (an archive is read as a stream):
    on two cores neither a thread pool nor a process pool made CIFAR-10's small JPEGs, each mostly Python overhead,
    load faster. Corrupt images raise `DatasetError` naming the file (`on_corrupt='error'`), or are left out with a
    warning (`on_corrupt='skip'`). Streamed (a directory only: an archive cannot be read at random), each file is
    decoded when it is read; a corrupt one raises `DatasetError` then."""
    path: pathlib.Path

    def decode(self, image_size: int | None, on_corrupt: str, cache_dir: CacheDir, progress: bool) -> Contents:
        at = cache.entry(cache_dir, f"{self.path.name.split('.')[0]}-folder", kind="folder", path=self.path,
                         image_size=image_size)
        return cache.cached(at, functools.partial(self._decode, image_size, on_corrupt))

    def _decode(self, image_size: int | None, on_corrupt: str) -> Contents:
        path = self.path
        images = Images(image_size)
        folders: set[tuple[str, ...]] = set()
        skipped: list[str] = []
        for parts, data in _walk(path):
            _add_folders(folders, parts, data)
            if data is None:
                continue
            try:
                image = decode_image(data)
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
        return Contents(Split(images.stack(train_keys), train_labels), test_split, class_names, f"image folder {path}",
                        tuple(skipped))

    def open(self, sizes: bool) -> Contents:
        path = self.path
        if not path.is_dir():
            raise DatasetError(f"{path}: an archive cannot be read at random; extract it and pass the folder, or "
                               "load it without streaming")
        listing = dict(_walk(path, read=False))
        files = sorted(k for k, v in listing.items() if v is not None)
        folders: set[tuple[str, ...]] = set()
        for parts, where in listing.items():
            _add_folders(folders, parts, where)
        if not files:
            raise _no_images(path)
        train, test, class_names = _folder_layout(path, files, folders)

        def stream(keyed: _Keyed) -> Split:
            return Split.streamed_from(keyed[1], functools.partial(_read_file, tuple(listing[k] for k in keyed[0])))

        shape = None
        if sizes:
            found = set()
            for key in train[0] + (test[0] if test is not None else []):
                try:
                    found.add(_header_size(listing[key])[::-1])
                except Exception as e:  # noqa: BLE001
                    raise DatasetError(f"cannot decode image {listing[key]}: {e}") from e
                if len(found) > 1:
                    break
            shape = found.pop() if len(found) == 1 else None
        return Contents(stream(train), stream(test) if test is not None else None, class_names,
                        f"image folder {path} (streamed)", shape=shape)

    def decoded_bytes(self) -> int | None:
        """The file count times the first image's size (a `DEFAULT_RESIZE` square when it is not square); None for
        an archive or when there is no readable first image."""
        if not self.path.is_dir():
            return None
        files = [where for _, where in _walk(self.path, read=False) if where is not None]
        if not files:
            return None
        try:
            w, h = _header_size(files[0])
        except Exception:  # noqa: BLE001 - a corrupt first file: the loaders report it
            return None
        return len(files) * (w * h if w == h else DEFAULT_RESIZE ** 2) * 3


def _header_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header."""
    with Image.open(path) as image:
        return image.size


def _read_file(paths: tuple[pathlib.Path, ...], position: int) -> np.ndarray:
    try:
        image = decode_image(paths[position].read_bytes())
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds of errors on bad data
        raise DatasetError(f"cannot decode image {paths[position]}: {e}") from e
    return rgb_array(image)


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
    """The image folder rules (`FolderSource`'s docstring) on a listing: (train, test or None, class names)."""
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
            warn(f"{path}: ignoring the top-level folders {ignored} (only train/ and test/ are read)")

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
