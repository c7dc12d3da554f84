"""Tests of `effnet_jax.data.transform`: the eval transforms against torchvision's presets on real photos, the Lite
transform, the metadata dict, the ImageNet class names."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from effnet_jax.data.transform import EvalTransform, eval_transform, preprocess_config, run_eval_transform
from effnet_jax.weights.published import imagenet_class_names
from effnet_jax.weights.published import WEIGHTS
from helpers import cifar_jpegs

NUM_PHOTOS = 20  # the first JPEGs of the archive
# (width, height) the 32x32 photos are upscaled to first (in turn), so that both the resize (down and up, odd
# aspect ratios, a shorter side already at 256) and the crop offsets (half-pixel rounding) matter.
SIZES = [(300, 260), (200, 341), (333, 256)]


@pytest.fixture(scope="module")
def photos(cifar_tar: pathlib.Path) -> list[Image.Image]:
    images: list[Image.Image] = []
    for _, _, jpeg in cifar_jpegs(cifar_tar):
        images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        if len(images) == NUM_PHOTOS:
            break
    return [image.resize(SIZES[k % len(SIZES)], Image.Resampling.BICUBIC) for k, image in enumerate(images)]


# v2_s: bilinear (ImageNet mean/std); v2_l: bicubic with mean = std = 0.5
@pytest.mark.parametrize("variant", ["b0", "b1", "b3", "v2_s", "v2_l"])
def test_matches_torchvision(variant: str, photos: list[Image.Image]) -> None:
    tv = pytest.importorskip("torchvision.models")
    reference = getattr(tv, f"EfficientNet_{variant.upper()}_Weights").IMAGENET1K_V1.transforms()
    ours = eval_transform(variant)
    mean, std = np.asarray(ours.mean, np.float32), np.asarray(ours.std, np.float32)
    worst = 0.0
    for image in photos:
        x = ours(image)
        assert x.dtype == np.float32 and x.shape == (ours.input_size, ours.input_size, 3)
        expected = reference(image).permute(1, 2, 0).numpy()
        worst = max(worst, float(np.abs((x * std + mean) - (expected * std + mean)).max()))  # in [0, 1] units
    assert worst <= 1 / 255


def test_lite_transform() -> None:
    t = eval_transform("lite0")
    assert (t.input_size, t.crop_style) == (224, "tf")
    gray = Image.new("L", (300, 260), 200)  # also checks the RGB conversion
    np.testing.assert_allclose(t(gray), np.full((224, 224, 3), (200 - 127) / 128, np.float32), rtol=1e-6)
    # TF eval crop: int(224 / 256 * 260) = 227 pixels of the shorter side, offsets ((side - 227 + 1) // 2).
    y, x = np.mgrid[:260, :300]
    ramp = Image.fromarray(((3 * x + 5 * y) % 256).astype(np.uint8)).convert("RGB")
    expected = ramp.crop((37, 17, 37 + 227, 17 + 227)).resize((224, 224), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(t(ramp) * (128 / 255) + 127 / 255, np.asarray(expected) / 255, atol=1e-6)


@pytest.mark.parametrize("variant", list(WEIGHTS))
def test_config_is_json_and_rebuilds_the_transform(variant: str) -> None:
    config = preprocess_config(variant)
    assert json.loads(json.dumps(config)) == config
    assert EvalTransform(**config) == eval_transform(variant)
    assert config["input_size"] == WEIGHTS[variant].crop_size


def test_config_values() -> None:
    assert preprocess_config("b3") == {
        "input_size": 300, "resize_size": 320, "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_style": "torchvision"}


def test_run_transform_is_the_runs_evaluation(photos: list[Image.Image], tmp_path: pathlib.Path) -> None:
    """A run's transform (crop style 'run') against the run's own evaluation path: a folder of photos of mixed sizes
    loaded by the data loader (`load_dataset`: 256 x 256 crops), then `eval_batch` at the run's resolution."""
    from effnet_jax import data
    mean, std, resolution = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 96
    config = run_eval_transform(resolution, mean, std).to_dict()
    assert json.loads(json.dumps(config)) == config
    transform = EvalTransform(**config)
    # non-square photos (resized and cropped to 256 by the loader) and a 256 x 256 one (kept as it is)
    images = photos[:5] + [photos[5].resize((256, 256))]
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(tmp_path / "train" / "a" / f"{i}.png")
    ds = data.load_dataset(f"folder:{tmp_path}", val_fraction=0.0, cache_dir=False)
    assert ds.train.images.shape == (len(images), 256, 256, 3)
    expected = np.asarray(data.eval_batch(ds.train.images, resolution, mean, std))
    got = np.stack([transform(image) for image in images])
    assert got.shape == (len(images), resolution, resolution, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # a square image (a 32 px CIFAR image: kept by the loader, resized on the device)
    small = photos[6].resize((32, 32))
    np.testing.assert_allclose(transform(small),
                               np.asarray(data.eval_batch(np.asarray(small)[None], resolution, mean, std))[0],
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="bilinear"):
        EvalTransform(**dict(config, interpolation="bicubic"))


def test_imagenet_class_names() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[999] == "toilet tissue"
