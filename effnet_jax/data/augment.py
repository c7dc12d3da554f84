"""On-device augmentation: `augment_batch(key, images, indices, cfg)` is jitted and pure; each example draws its
randomness from `jax.random.fold_in(key, index)` with its global example index, so the result does not depend on
how a batch is split over devices or processes. Order: random crop after zero padding (torchvision
`RandomCrop(size, padding)`), horizontal flip, one affine resampling for rotation/zoom/translation (Keras
`RandomRotation`, `RandomZoom`, `RandomTranslation` ranges, bilinear, `fill_mode`), contrast (Keras
`RandomContrast`), resize to `resolution` (bilinear), normalize. `eval_batch(images, cfg)`: resize and normalize
only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from effnet_jax.errors import ConfigError
from effnet_jax.weights import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AugmentConfig", "augment_batch", "eval_batch"]


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
