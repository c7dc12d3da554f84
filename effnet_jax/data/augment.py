"""On-device augmentation and input normalization, jitted and pure.

`augment_batch(key, images, indices, cfg)`: each example draws its randomness from `jax.random.fold_in(key,
index)` with its global example index, so the result does not depend on how a batch is split over devices or
processes. Order: random crop after zero padding (torchvision `RandomCrop(size, padding)`), horizontal flip, one
affine resampling for rotation/zoom/translation (Keras `RandomRotation`, `RandomZoom`, `RandomTranslation`
ranges, bilinear, `fill_mode`), contrast (Keras `RandomContrast`). `resize_normalize(x, size, mean, std)` then
gives the network its input; `eval_batch` is the same without augmentation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from effnet_jax.errors import ConfigError
from effnet_jax.weights.published import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AugmentConfig", "augment_batch", "eval_batch", "resize_normalize"]


def _option(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation (hashable: a static argument of the jitted functions); each field is a flag of
    `effnet-train`, its help in the field's metadata."""
    crop_padding: int = _option(4, "zero-pad each side by this many pixels, then crop the original size at a "
                                "uniform random offset (torchvision RandomCrop(size, padding)); 0 = off")
    flip: bool = _option(True, "horizontal flip with probability 1/2")
    rotation: float = _option(0.0, "maximum rotation in degrees, uniform in [-rotation, rotation]")
    zoom: float = _option(0.0, "scale the sampled area by a factor uniform in [1 - zoom, 1 + zoom] (> 1 zooms "
                          "out), both axes alike (Keras RandomZoom)")
    translation: float = _option(0.0, "shifts uniform in [-translation, translation] times the height / width, "
                                 "per axis (Keras RandomTranslation)")
    fill_mode: Literal["reflect", "constant", "nearest"] = _option(
        "reflect", "how rotation/zoom/translation fill points outside the image: reflect (Keras' default), "
        "constant (zeros) or nearest")
    contrast: float = _option(0.0, "per-channel (x - mean) * f + mean with f uniform in [1 - contrast, "
                              "1 + contrast], clipped to [0, 1] (Keras RandomContrast)")

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.rotation < 0 or self.translation < 0:
            raise ConfigError("crop_padding, rotation and translation must be >= 0")
        if not 0 <= self.zoom < 1 or not 0 <= self.contrast <= 1:
            raise ConfigError(f"zoom must be in [0, 1) and contrast in [0, 1], got {self.zoom}, {self.contrast}")
        if self.fill_mode not in ("reflect", "constant", "nearest"):
            raise ConfigError(f"fill_mode must be 'reflect', 'constant' or 'nearest', got {self.fill_mode!r}")


@functools.partial(jax.jit, static_argnames="cfg")
def augment_batch(key: jax.Array, images: jax.Array, indices: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Augment a batch of uint8 images (B, H, W, 3) -> float32 (B, H, W, 3) in [0, 1]. `indices` (B,) are the
    examples' global indices: example i uses `jax.random.fold_in(key, indices[i])`."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices.astype(jnp.uint32))
    return jax.vmap(functools.partial(_augment_one, cfg=cfg))(keys, images)


def eval_batch(images: jax.Array, size: int | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 normalized, resized to `size` when given; no randomness."""
    return resize_normalize(images.astype(jnp.float32) / 255.0, size, tuple(mean), tuple(std))


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


@functools.partial(jax.jit, static_argnames=("size", "mean", "std"))
def resize_normalize(x: jax.Array, size: int | None, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """float32 (B, H, W, 3) in [0, 1] -> (B, size, size, 3) (bilinear `jax.image.resize`, antialiased when
    shrinking; `size` None keeps H, W), normalized with `mean`/`std`."""
    if size is not None and x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear")
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
