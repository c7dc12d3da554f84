"""Datasets for fine-tuning: loading (into memory or streamed), on-device augmentation, deterministic batching.

`load_dataset(spec, data_dir, ...)` returns a `Dataset` of `Split`s: uint8 NHWC images and int32 labels held in
memory, or, streamed (`stream=True`, or by size with `stream=None`), read from the source an image at a time.

Modules:

* `load`: `load_dataset` (the one entry point: argument checks, source resolution, stream or not, the validation
  split), `decoded_bytes`, `STREAM_ABOVE_BYTES`.
* `dataset`: `Split`, `Dataset` (in memory or streamed), `Contents`, the `Source` protocol, the errors,
  `stratified_split`.
* one module per source, each one type serving both paths: `folder` (image folders and their .tar/.tar.gz),
  `cifar` (the CIFAR python versions and their verified download: `CIFAR_ARCHIVES`, `cifar_archive`,
  `cifar_url`, `downloads_dir`), `tfds` (TensorFlow Datasets through `tfds.data_source`).
* `image`: decoding, `resize_center_crop`, `IMAGE_EXTENSIONS`, `DEFAULT_RESIZE` (PIL and numpy only).
* `cache`: the decoded uint8 cache (`default_cache_dir`, `$EFFNET_JAX_CACHE`).
* `augment`: `AugmentConfig`, `augment_batch`, `resize_normalize`, `eval_batch` (jitted, on the device).
* `transform`: `EvalTransform`, the preprocessing spec of each weight set and of a run.
* `batching`: `epoch_permutation`, `batch_indices`, `eval_batches`, `stream_batches` (grain threads).

Names are imported lazily: `effnet_jax.data.image` (used by `predict` and `transform`) does not import jax.
"""

import importlib

_EXPORTS = {
    "Split": "dataset", "Dataset": "dataset", "DatasetError": "dataset", "DatasetUnavailableError": "dataset",
    "stratified_split": "dataset",
    "load_dataset": "load", "decoded_bytes": "load", "STREAM_ABOVE_BYTES": "load",
    "CACHE_ENV_VAR": "cache", "default_cache_dir": "cache",
    "Archive": "cifar", "CIFAR_ARCHIVES": "cifar", "CIFAR_BASE_URL": "cifar", "DATA_URL_ENV_VAR": "cifar",
    "cifar_archive": "cifar", "cifar_url": "cifar", "downloads_dir": "cifar",
    "DEFAULT_RESIZE": "image", "IMAGE_EXTENSIONS": "image", "decode_image": "image",
    "resize_center_crop": "image",
    "AugmentConfig": "augment", "augment_batch": "augment", "eval_batch": "augment", "resize_normalize": "augment",
    "EvalTransform": "transform",
    "epoch_permutation": "batching", "batch_indices": "batching", "eval_batches": "batching",
    "stream_batches": "batching",
}
_MODULES = ("load", "dataset", "folder", "cifar", "tfds", "image", "cache", "augment", "batching", "transform")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'effnet_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__ + list(_MODULES))
