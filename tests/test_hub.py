"""`effnet_jax.weights.hub`: timm checkpoints downloaded from the Hugging Face Hub into the HF cache.

The `hub` fixture (tests/hub_server.py) stands in for the Hub, serving a tiny safetensors file and a timm-like
config.json, and points huggingface_hub at it and at an empty cache in a temp folder. Each failure must come as one
`UserError` line that says what to do, and leave nothing of the failed file in the cache. Seconds each; no JAX.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from huggingface_hub import constants

from effnet_jax.errors import ConfigError, UserError
from effnet_jax.weights.hub import (HubAccessError, HubDownloadError, HubFileError, HubNotFoundError, HubOfflineError,
                                    hub_files, parse_hub_id)
from helpers import unused_port

pytest_plugins = ["hub_server"]  # the `hub` fixture

from hub_server import HubServer, git_blob_sha1, point_hub_at  # noqa: E402

REPO = "timm/tf_efficientnet_b0.ns_jft_in1k"
FOLDER = "models--timm--tf_efficientnet_b0.ns_jft_in1k"
TENSORS = {"conv_stem.weight": np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3),
           "bn1.running_var": np.ones(2, np.float32)}
WEIGHTS = safetensors.numpy.save(TENSORS)
CONFIG = {"architecture": "tf_efficientnet_b0", "num_classes": 1000,
          "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875,
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
FILES = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": WEIGHTS}
OFFLINE_BOUND_S = 5.0  # measured (2 cores): HF_HUB_OFFLINE 0.3 ms, a closed port 1 ms, a silent one the 1 s timeout


def cache_dir() -> pathlib.Path:
    return pathlib.Path(constants.HF_HUB_CACHE)


def cached_files(folder: str = FOLDER) -> list[str]:
    """Every file and link of a repo's cache folder, relative to it (empty folders left out)."""
    root = cache_dir() / folder
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def single_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in message, message
    return message


def test_parse_hub_id() -> None:
    assert parse_hub_id(f"hf-hub:{REPO}") == (REPO, None)
    assert parse_hub_id(f"hf-hub:{REPO}@v1.0") == (REPO, "v1.0")
    for bad in (REPO, "hf-hub:", "hf-hub:timm/", "hf-hub:a/b/c", "hf-hub:timm/x y", f"hf-hub:{REPO}@"):
        with pytest.raises(ConfigError, match="hf-hub:|Hub"):
            parse_hub_id(bad)


def test_download_into_the_hf_cache_then_offline(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = hub.serve(REPO, FILES)
    weights, config = hub_files(REPO)
    snapshot = cache_dir() / FOLDER / "snapshots" / commit
    assert weights == snapshot / "model.safetensors" and config == CONFIG
    assert weights.is_symlink() and weights.resolve().parent == cache_dir() / FOLDER / "blobs"
    assert weights.read_bytes() == WEIGHTS and json.loads((snapshot / "config.json").read_bytes()) == CONFIG
    assert (cache_dir() / FOLDER / "refs" / "main").read_text() == commit
    assert hub_files(REPO, revision=commit)[0] == weights

    served = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_files(REPO) == (weights, CONFIG)
    assert len(hub.requests) == served  # nothing asked

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.stop()  # the endpoint refuses connections: huggingface_hub falls back to the cache
    start = time.monotonic()
    assert hub_files(REPO) == (weights, CONFIG)
    assert time.monotonic() - start < OFFLINE_BOUND_S


def test_cut_transfer_keeps_nothing(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries and resumes (Range) 5 times, 1 s apart; the server cuts every try at the same byte."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)  # write (and so resume) before the cut
    hub.serve(REPO, FILES)
    hub.cut_after[(REPO, "model.safetensors")] = len(WEIGHTS) // 2
    blobs = cache_dir() / FOLDER / "blobs"
    blobs.mkdir(parents=True)
    stale, live = blobs / "0123.4567abcd.incomplete", blobs / "89ab.cdef0123.incomplete"  # killed run, other process
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600,) * 2)

    with pytest.raises(HubDownloadError) as excinfo:
        hub_files(REPO)
    message = single_line_error(excinfo)
    assert "model.safetensors" in message and REPO in message and "run again" in message
    assert any(method == "GET" and (range_ or "").startswith("bytes=") for method, _, range_ in hub.requests)
    kept = cached_files()
    assert not [name for name in kept if "model.safetensors" in name], kept  # no snapshot entry
    config_blob = f"blobs/{git_blob_sha1(FILES['config.json'])}"
    assert [name for name in kept if name.startswith("blobs/")] == ["blobs/89ab.cdef0123.incomplete", config_blob], kept

    del hub.cut_after[(REPO, "model.safetensors")]
    assert hub_files(REPO)[0].read_bytes() == WEIGHTS


@pytest.mark.parametrize("bad", [b"\x00" * 64, "zip"], ids=["random", "zip"])
def test_not_safetensors_is_removed(hub: HubServer, bad: bytes | str) -> None:
    if bad == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("archive/data.pkl", b"torch.save's pickle")
        bad = buffer.getvalue()
    hub.serve(REPO, {**FILES, "model.safetensors": bad})
    with pytest.raises(HubFileError) as excinfo:
        hub_files(REPO)
    message = single_line_error(excinfo)
    assert "model.safetensors" in message and REPO in message and "not a safetensors file" in message
    assert [name for name in cached_files() if "model.safetensors" in name or ".incomplete" in name] == []
    assert not (cache_dir() / FOLDER / "blobs" / hashlib.sha256(bad).hexdigest()).exists()

    commit = hub.serve(REPO, FILES)  # fixed: a new commit
    weights, config = hub_files(REPO)
    assert weights.parent.name == commit and weights.read_bytes() == WEIGHTS and config == CONFIG


def test_config_not_json_is_removed(hub: HubServer) -> None:
    hub.serve(REPO, {**FILES, "config.json": b"<html>Not the file</html>"})
    with pytest.raises(HubFileError) as excinfo:
        hub_files(REPO)
    assert "config.json" in single_line_error(excinfo)
    assert [name for name in cached_files() if not name.startswith("refs/")] == []
    assert not any("model.safetensors" in path for _, path, _ in hub.requests)  # stopped before the big file
    hub.serve(REPO, FILES)
    assert hub_files(REPO)[1] == CONFIG


def check_offline_message(message: str) -> None:
    assert f"hf-hub:{REPO}" in message and constants.HF_HUB_CACHE in message
    assert f"hf download {REPO} model.safetensors config.json" in message and "HF_ENDPOINT" in message
    assert ".safetensors file" in message


def test_offline_nothing_cached(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.serve(REPO, FILES)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(HubOfflineError) as excinfo:
        hub_files(REPO)
    assert time.monotonic() - start < OFFLINE_BOUND_S
    message = single_line_error(excinfo)
    check_offline_message(message)
    assert "HF_HUB_OFFLINE" in message and hub.requests == []


def test_unreachable_endpoint_nothing_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone, hf_hub_download retries a refused connection for ~23 s (backoff 1+2+4+8+8 s) before failing."""
    endpoint = f"http://127.0.0.1:{unused_port()}"
    point_hub_at(monkeypatch, endpoint, tmp_path / "hf")
    start = time.monotonic()
    with pytest.raises(HubOfflineError) as excinfo:
        hub_files(REPO)
    assert time.monotonic() - start < OFFLINE_BOUND_S
    message = single_line_error(excinfo)
    check_offline_message(message)
    assert f"{endpoint} cannot be reached" in message


def test_silent_endpoint_nothing_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that never answers (a blackholed network): one HEAD for HF_HUB_ETAG_TIMEOUT, then the message;
    alone, hf_hub_download would try again 5 times with a 60 s timeout."""
    with socket.socket() as listening:  # the kernel accepts the connections, nothing reads them
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        point_hub_at(monkeypatch, f"http://127.0.0.1:{listening.getsockname()[1]}", tmp_path / "hf")
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        start = time.monotonic()
        with pytest.raises(HubOfflineError) as excinfo:
            hub_files(REPO)
        assert time.monotonic() - start < OFFLINE_BOUND_S
    check_offline_message(single_line_error(excinfo))


def test_environment_variables_in_a_fresh_process(hub: HubServer, tmp_path: pathlib.Path) -> None:
    """HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them: read by huggingface_hub at import. No torch or
    TensorFlow is imported."""
    hub.serve(REPO, FILES)
    script = textwrap.dedent(f"""
        import sys, time
        from effnet_jax.errors import UserError
        from effnet_jax.weights.hub import hub_files
        start = time.monotonic()
        try:
            print(hub_files({REPO!r})[0])
        except UserError as e:
            print(f"error: {{e}}")
        print(time.monotonic() - start)
        print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'tensorflow', 'jax'}}))
    """)

    def run(**env: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60, cwd=pathlib.Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    online_cache = tmp_path / "online"
    path, _, modules = run(HF_HUB_CACHE=str(online_cache))
    assert pathlib.Path(path).is_relative_to(online_cache / FOLDER / "snapshots") and modules == "[]"
    assert run(HF_HUB_CACHE=str(online_cache), HF_HUB_OFFLINE="1")[0] == path

    offline_cache = tmp_path / "empty"
    message, elapsed, _ = run(HF_HUB_CACHE=str(offline_cache), HF_HUB_OFFLINE="1")
    assert message.startswith("error: ") and str(offline_cache) in message and "HF_HUB_OFFLINE" in message
    assert float(elapsed) < OFFLINE_BOUND_S


def test_unknown_repo(hub: HubServer) -> None:
    with pytest.raises(HubNotFoundError) as excinfo:
        hub_files("timm/no_such_model")
    message = single_line_error(excinfo)
    assert "hf-hub:timm/no_such_model" in message and "no such model repo" in message and "HF_TOKEN" in message


def test_unknown_revision(hub: HubServer) -> None:
    hub.serve(REPO, FILES)
    with pytest.raises(HubNotFoundError, match="no revision 'v9'") as excinfo:
        hub_files(REPO, revision="v9")
    single_line_error(excinfo)


def test_pytorch_only_repo(hub: HubServer) -> None:
    hub.serve(REPO, {"config.json": FILES["config.json"], "pytorch_model.bin": b"PK\x03\x04 a torch zip"})
    with pytest.raises(HubNotFoundError) as excinfo:
        hub_files(REPO)
    message = single_line_error(excinfo)
    assert f"hf-hub:{REPO}" in message and "only safetensors" in message and "no torch" in message


def test_gated_repo(hub: HubServer) -> None:
    hub.serve(REPO, FILES)
    hub.gated.add(REPO)
    with pytest.raises(HubAccessError) as excinfo:
        hub_files(REPO)
    message = single_line_error(excinfo)
    assert f"hf-hub:{REPO}" in message and "gated" in message and "HF_TOKEN" in message
    assert "hf auth login" in message


