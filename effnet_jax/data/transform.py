"""The one preprocessing spec, `EvalTransform`: a PIL image -> the float32 HWC array a model was evaluated on.

Four recipes: 'torchvision' (B0-B7, V2: torchvision's `ImageClassification` preset, also timm's `crop_mode`
'center'), 'squash' (timm's `crop_mode` 'squash': both sides resized to `resize_size`, then the center crop), 'tf'
(Lite: the TF EfficientNet eval crop) and 'run' (a fine-tuning run's own validation: the image as the data loader
stores it, then `effnet_jax.data.augment.resize_normalize` on the device). `EvalTransform(**spec)` rebuilds one from its
JSON form (`to_dict`, as in model.json and an export's metadata). The recipes in detail: docs/weights.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

from effnet_jax.data.image import DEFAULT_RESIZE, resize_center_crop
from effnet_jax.weights.published import weights_entry

__all__ = ["EvalTransform", "eval_transform", "preprocess_config", "run_eval_transform"]

TF_CROP_PADDING = 32  # TF EfficientNet eval: crop input_size / (input_size + 32) of the shorter side

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """PIL image -> normalized float32 HWC array of shape (input_size, input_size, 3). `crop_style`: 'torchvision'
    (B0-B7's weights), 'squash' (some timm weights), 'tf' (Lite's) or 'run' (a fine-tuning run's evaluation);
    docs/weights.md."""
    input_size: int
    resize_size: int
    interpolation: Literal["bicubic", "bilinear"]
    mean: Sequence[float]
    std: Sequence[float]
    crop_style: Literal["torchvision", "squash", "tf", "run"]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))  # (hashable, as JSON reads it)
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if self.crop_style not in ("torchvision", "squash", "tf", "run"):
            raise ValueError(f"crop_style must be 'torchvision', 'squash', 'tf' or 'run', got {self.crop_style!r}")
        if self.crop_style in ("torchvision", "squash") and self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")
        if self.crop_style == "run" and self.interpolation != "bilinear":
            raise ValueError(f"crop_style 'run' resizes bilinearly (as the run's evaluation), got "
                             f"{self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready spec (model.json, an export's metadata): `EvalTransform(**spec)` rebuilds the transform."""
        spec = dataclasses.asdict(self)
        return spec | {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def at(self, input_size: int) -> "EvalTransform":
        """The same recipe for another input side; torchvision's crop keeps its resize-to-crop ratio."""
        resize = self.resize_size
        if input_size != self.input_size and self.crop_style in ("torchvision", "squash"):
            resize = max(input_size, round(self.resize_size * input_size / self.input_size))
        return dataclasses.replace(self, input_size=input_size, resize_size=resize)

    def on_device(self, x):
        """The device's part of the recipe: float32 (B, H, W, 3) in [0, 1] -> resized to `input_size` and
        normalized (imports jax). Training ends its augmentation with it, evaluation starts with it."""
        from effnet_jax.data.augment import resize_normalize
        return resize_normalize(x, self.input_size, self.mean, self.std)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.crop_style == "run":
            return self._run_eval(image)
        if self.crop_style in ("torchvision", "squash"):
            if self.crop_style == "squash":
                image = image.resize((self.resize_size, self.resize_size), _RESAMPLE[self.interpolation])
            image = resize_center_crop(image, self.resize_size, self.input_size, _RESAMPLE[self.interpolation])
        else:
            image = self._tf_center_crop_resize(image)
        x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def _tf_center_crop_resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        crop = int(self.input_size / (self.input_size + TF_CROP_PADDING) * min(w, h))
        top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
        image = image.crop((left, top, left + crop, top + crop))
        return image.resize((self.input_size, self.input_size), _RESAMPLE[self.interpolation])

    def _run_eval(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        stored = np.asarray(image) if w == h else resize_center_crop(image, self.resize_size)
        return np.asarray(self.on_device(np.asarray(stored[None], np.float32) / np.float32(255.0))[0], np.float32)


def preprocess_config(variant: str) -> dict[str, Any]:
    """The eval preprocessing of `variant`'s ImageNet weights as a JSON-ready dict (the fields of
    `EvalTransform`): input_size, resize_size, interpolation, mean, std, crop_style."""
    e = weights_entry(variant)
    return {"input_size": e.crop_size, "resize_size": e.resize_size, "interpolation": e.interpolation,
            "mean": list(e.mean), "std": list(e.std), "crop_style": e.crop_style}


def run_eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """A fine-tuning run's evaluation transform (crop style 'run'): its side and input mean/std."""
    return EvalTransform(int(resolution), DEFAULT_RESIZE, "bilinear", mean, std, "run")


def eval_transform(variant: str) -> EvalTransform:
    """The ImageNet eval transform of `variant` ('b0'..'b7', 'lite0'..'lite4', 'v2_s'..'v2_l'): PIL image ->
    float32 HWC."""
    return EvalTransform(**preprocess_config(variant))
