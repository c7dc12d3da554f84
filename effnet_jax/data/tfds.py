"""TensorFlow Datasets by name ('svhn_cropped', 'tf_flowers', ..., or 'tfds:NAME' to go through tfds for CIFAR too):
`TfdsSource`, read through `tfds.data_source` (random access), decoded into memory or streamed.

A prepared dataset is read without TensorFlow; preparing it (tfds downloads and converts it) needs TensorFlow
(`pip install -e '.[tfds]'`), so without it an unprepared dataset is refused before anything is downloaded. The
'train' split, and 'test' when the dataset has one; class names from the label feature.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from effnet_jax.data import cache
from effnet_jax.data.cifar import CIFAR_ARCHIVES, CIFAR_BASE_URL
from effnet_jax.data.dataset import CacheDir, Contents, DatasetError, DatasetUnavailableError, Split
from effnet_jax.data.image import DEFAULT_RESIZE, Images

__all__ = ["TfdsSource"]


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """The tfds dataset `name` in the tfds data folder `data_dir` (None: tfds' default)."""
    name: str
    data_dir: str | os.PathLike[str] | None

    def decode(self, image_size: int | None, on_corrupt: str, cache_dir: CacheDir, progress: bool) -> Contents:
        name = self.name
        sources, info = _tfds_sources(name, self.data_dir)
        prepared = pathlib.Path(str(info.data_dir))  # the prepared files (absent under tfds.testing.mock_data)
        at = None
        if prepared.is_dir():
            stem = f"{name.replace('/', '_').replace(':', '_')}-tfds"
            at = cache.entry(cache_dir, stem, kind="tfds", path=prepared, image_size=image_size)

        def decode() -> Contents:
            image_key, label_key = _tfds_keys(name, info)
            images = Images(image_size)
            labels: dict[str, np.ndarray] = {}
            for split_name, source in sources.items():
                split_labels = np.empty(len(source), np.int32)
                for i in range(len(source)):
                    example = source[i]
                    images.add((split_name, i), Image.fromarray(_example_image(example, image_key)))
                    split_labels[i] = example[label_key]
                labels[split_name] = split_labels
            splits = {s: Split(images.stack([(s, i) for i in range(len(labels[s]))]), labels[s]) for s in sources}
            return Contents(splits["train"], splits.get("test"), tuple(info.features[label_key].names),
                            f"tfds {name} ({prepared})")

        return cache.cached(at, decode)

    def open(self, sizes: bool) -> Contents:
        """Streamed splits (reading the labels decodes every example once); `Contents.shape` from the image
        feature, when it has a fixed one."""
        sources, info = _tfds_sources(self.name, self.data_dir)
        image_key, label_key = _tfds_keys(self.name, info)
        splits = {}
        for split_name, src in sources.items():
            labels = np.fromiter((src[i][label_key] for i in range(len(src))), np.int32, len(src))
            splits[split_name] = Split.streamed_from(labels, functools.partial(_read, src, image_key))
        shape = tuple(info.features[image_key].shape[:2])
        return Contents(splits["train"], splits.get("test"), tuple(info.features[label_key].names),
                        f"tfds {self.name} ({info.data_dir}, streamed)", shape=shape if None not in shape else None)

    def decoded_bytes(self) -> int | None:
        """From the dataset info: the example count times the image feature's size (a `DEFAULT_RESIZE` square
        when it has none); None when the dataset is not prepared yet (its split sizes come with the prepared
        files) or cannot be looked up."""
        try:
            import tensorflow_datasets as tfds
            info = tfds.builder(self.name, data_dir=self.data_dir).info
            image_key, label_key = _tfds_keys(self.name, info)
        except Exception:  # noqa: BLE001 - unknown, unprepared, offline: decoding it reports it
            return None
        if "train" not in info.splits:
            return None
        shape = tuple(info.features[image_key].shape[:2])
        pixels = shape[0] * shape[1] if None not in shape else DEFAULT_RESIZE ** 2
        return sum(int(info.splits[s].num_examples) for s in ("train", "test") if s in info.splits) * pixels * 3


def _example_image(example: dict[str, Any], image_key: str) -> np.ndarray:
    """An example's image as uint8 (H, W, 3) (grayscale repeated over the channels) or as stored."""
    image = np.asarray(example[image_key], np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _read(source: Any, image_key: str, position: int) -> np.ndarray:
    return _example_image(source[position], image_key)


def _tfds_sources(name: str, data_dir: str | os.PathLike[str] | None) -> tuple[dict[str, Any], Any]:
    """({'train': source[, 'test': source]}, dataset info) through `tfds.data_source` (random access). A dataset
    tfds has prepared already is read as it is (no TensorFlow needed); preparing one needs TensorFlow, so without
    it this stops before tfds downloads anything."""
    import tensorflow_datasets as tfds  # slow to import: only when a tfds dataset is asked for
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
