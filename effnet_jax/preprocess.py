"""ImageNet eval preprocessing of each weight set, in PIL + numpy (no torch), and the ImageNet class names.

`eval_transform(variant)` turns a PIL image into the float32 HWC array the variant's published weights were
evaluated on, with the parameters of its `effnet_jax.weights.WEIGHTS` entry:

* b0..b7, v2_s/m/l (`crop_style='torchvision'`): torchvision's `ImageClassification` preset exactly — resize the shorter
  side to `resize_size` with PIL (the longer side becomes `int(resize_size * long / short)`, no resize when the
  size already matches), center crop `input_size` at offsets `int(round((side - input_size) / 2))`, scale to
  [0, 1], normalize with the mean/std (bicubic and ImageNet's mean/std for B; bilinear for V2-S/M; bicubic and
  mean = std = 0.5 for V2-L). Matches torchvision 0.29.1 on PIL images to float rounding.
* lite0..lite4 (`crop_style='tf'`): the TF EfficientNet eval crop — center crop `input_size / (input_size + 32)`
  of the shorter side (size truncated, offsets `(side - crop + 1) // 2`), bicubic resize to `input_size` — and
  the TF Lite normalization (x - 127) / 128 (why: docs/weights.md).

* a fine-tuning run (`crop_style='run'`, `run_preprocess_config(resolution, mean, std)`; what `export --workdir`
  writes and `predict --workdir` uses): the run's own evaluation preprocessing. The image as the training data
  loader (`effnet_jax.data`) stores it: kept at its size when square, otherwise the shorter side resized to
  `resize_size` (256, `data.DEFAULT_RESIZE`; PIL bilinear) and center-cropped to a square; then
  `effnet_jax.data.eval_batch`, the function the run's validation runs: scaled to [0, 1], resized to `input_size`
  with `jax.image.resize(..., 'bilinear')` (antialiased when shrinking), normalized with the run's mean/std. So a
  32 x 32 image (a run on CIFAR: its images are kept at 32 px and resized on the device) gets exactly what the
  run's evaluation computes for it, and so does a photo that is not square or is 256 x 256 (a run on a folder of
  mixed-size photos). Not reproduced exactly: a square photo of another size in a mixed-size folder (the loader
  resizes it to 256 first; here it goes to `input_size` in one resampling), and a folder of images that all
  have one non-square size (the loader keeps them, and the run stretches them to a square; here they are
  cropped). Needs jax (imported on the first call).

Images are converted to RGB first (grayscale, palette, RGBA inputs), as torchvision's `ImageFolder` loader does
before any transform.

`preprocess_config(variant)` is the same recipe as a JSON-ready dict, meant for checkpoint metadata;
`EvalTransform(**config)` rebuilds the transform from it. `run_preprocess_config` is a run's.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image

from effnet_jax.data.image import DEFAULT_RESIZE, resize_center_crop
from effnet_jax.weights import weights_entry

__all__ = ["EvalTransform", "eval_transform", "preprocess_config", "run_preprocess_config", "imagenet_class_names"]

TF_CROP_PADDING = 32  # TF EfficientNet eval: crop input_size / (input_size + 32) of the shorter side

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """PIL image -> normalized float32 HWC array of shape (input_size, input_size, 3). `crop_style`: 'torchvision'
    (B0-B7's weights), 'tf' (Lite's) or 'run' (a fine-tuning run's evaluation); see the module docstring."""
    input_size: int
    resize_size: int
    interpolation: Literal["bicubic", "bilinear"]
    mean: Sequence[float]
    std: Sequence[float]
    crop_style: Literal["torchvision", "tf", "run"]

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if self.crop_style not in ("torchvision", "tf", "run"):
            raise ValueError(f"crop_style must be 'torchvision', 'tf' or 'run', got {self.crop_style!r}")
        if self.crop_style == "torchvision" and self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")
        if self.crop_style == "run" and self.interpolation != "bilinear":
            raise ValueError(f"crop_style 'run' resizes bilinearly (as the run's evaluation), got "
                             f"{self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready spec (model.json, an export's metadata): `EvalTransform(**spec)` rebuilds the transform."""
        spec = dataclasses.asdict(self)
        return spec | {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.crop_style == "run":
            return self._run_eval(image)
        if self.crop_style == "torchvision":
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
        from effnet_jax import data  # (imports jax)
        w, h = image.size
        stored = np.asarray(image) if w == h else resize_center_crop(image, self.resize_size)
        cfg = data.AugmentConfig(crop_padding=0, flip=False, resolution=self.input_size,
                                 mean=tuple(self.mean), std=tuple(self.std))
        return np.asarray(data.eval_batch(stored[None], cfg)[0], np.float32)


def preprocess_config(variant: str) -> dict[str, Any]:
    """The eval preprocessing of `variant`'s ImageNet weights as a JSON-ready dict (the fields of
    `EvalTransform`): input_size, resize_size, interpolation, mean, std, crop_style."""
    e = weights_entry(variant)
    return {"input_size": e.crop_size, "resize_size": e.resize_size, "interpolation": e.interpolation,
            "mean": list(e.mean), "std": list(e.std), "crop_style": e.crop_style}


def run_preprocess_config(resolution: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """A fine-tuning run's evaluation preprocessing (`crop_style='run'`, see the module docstring) as a JSON-ready
    dict of `EvalTransform`'s fields: the run's resolution and its input mean/std (config.json)."""
    return {"input_size": int(resolution), "resize_size": DEFAULT_RESIZE, "interpolation": "bilinear",
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "crop_style": "run"}


def eval_transform(variant: str) -> EvalTransform:
    """The ImageNet eval transform of `variant` ('b0'..'b7', 'lite0'..'lite4', 'v2_s'..'v2_l'): PIL image ->
    float32 HWC."""
    return EvalTransform(**preprocess_config(variant))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's list: 0 'tench' .. 999 'toilet tissue')."""
    text = importlib.resources.files("effnet_jax").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()
