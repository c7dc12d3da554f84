"""Images as every source stores them: decoded with PIL in RGB, at their own size while all share one, else
resized so that the shorter side is S and center-cropped to S x S (torchvision's `Resize(S)` + `CenterCrop(S)`).

`IMAGE_EXTENSIONS` are the files read as images, by the image folders and by `predict` alike. This module
needs only PIL and numpy (no jax).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_RESIZE", "decode_image", "resize_center_crop", "rgb_array", "fit",
           "Images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
DEFAULT_RESIZE = 256  # shorter side and center crop for datasets whose images differ in size


def decode_image(data: bytes) -> Image.Image:
    """Decode one image file fully (so that a corrupt file fails here)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb_array(image: Image.Image) -> np.ndarray:
    """The image as uint8 (H, W, 3), converted to RGB first when it is not (grayscale, palette, RGBA)."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def resize_center_crop(image: Image.Image, size: int, crop: int | None = None,
                       resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize the shorter side to `size` (the longer one to `int(size * long / short)`; no resize when the
    shorter side is `size` already), then center crop `crop` x `crop` (default `size`) at offsets
    `int(round((side - crop) / 2))`: torchvision's `Resize(size)` + `CenterCrop(crop)` on a PIL image."""
    crop = size if crop is None else crop
    w, h = image.size
    if min(w, h) != size:
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((w, h), resample)
    if (w, h) != (crop, crop):
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image)


def fit(read: Callable[[int], np.ndarray], size: int, position: int) -> np.ndarray:
    """The image `read(position)` at `size` x `size`: as it is when it has that size, else resized and
    center-cropped (`resize_center_crop`). With `functools.partial(fit, read, size)`, a streamed split's reader."""
    image = read(position)
    if image.shape[:2] == (size, size):
        return image
    return resize_center_crop(Image.fromarray(image), size)


class Images:
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
            self.arrays = {k: resize_center_crop(Image.fromarray(a), self._size) for k, a in self.arrays.items()}
        self.arrays[key] = resize_center_crop(image, self._size)

    def stack(self, keys: Sequence[Any]) -> np.ndarray:
        """The images of `keys` as (N, H, W, 3) uint8 (shaped (0, S, S, 3) when there are none)."""
        if not keys:
            shape = (self._size, self._size, 3) if self._size else (self._shape or (0, 0, 3))
            return np.zeros((0, *shape), np.uint8)
        return np.stack([self.arrays[k] for k in keys])
