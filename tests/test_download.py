"""Downloads: `effnet_jax.download` (verified, atomic) and `--dataset cifar10` fetching the official archive.

A local HTTP server stands in for the CIFAR site (`EFFNET_JAX_DATA_URL`, as a user's mirror would): it serves a
CIFAR-10 python archive in the official layout, built here with a few images per batch, and can cut a transfer
short. The expected sizes and SHA-256 come from outside the code under test: the real table's entry (which the
small archive must fail), or the served file's own digest computed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.util
import io
import json
import pathlib
import pickle
import tarfile
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from effnet_jax import data
from effnet_jax.download import ChecksumError, DownloadError, download
from helpers import load_train_cli, persistent_compilation_cache, read_metrics, run_main, unused_port

cli = load_train_cli()
ARCHIVE = data.CIFAR_ARCHIVES["cifar10"].file_name  # cifar-10-python.tar.gz
ROWS = 4  # images per batch file


def test_no_tensorflow_in_the_test_venv() -> None:
    """These tests mean something only where tfds could not prepare CIFAR itself: the README's test venv."""
    assert importlib.util.find_spec("tensorflow") is None


def cifar10_archive(path: pathlib.Path) -> bytes:
    """The official layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`, `batches.meta`, pickled dicts
    with byte-string keys), ROWS images per batch; returns the .tar.gz bytes, also written to `path`."""
    rng = np.random.default_rng(0)
    members = {"batches.meta": {b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat",
                                "deer", "dog", "frog", "horse", "ship", "truck")], b"num_cases_per_batch": ROWS,
                                b"num_vis": 3072}}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        members[name] = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (ROWS, 3072), np.uint8),
                         b"labels": [(i * ROWS + j) % 10 for j in range(ROWS)], b"filenames": [b"x.png"] * ROWS}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@dataclasses.dataclass
class Server:
    root: pathlib.Path
    url: str
    requests: list[str]
    agents: list[str]     # the User-Agent of each request
    truncate: list[bool]  # [True]: announce the whole file, send half, close
    stop: object


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    root = tmp_path / "served"
    (root / "kriz").mkdir(parents=True)
    requests: list[str] = []
    agents: list[str] = []
    truncate = [False]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            agents.append(self.headers.get("User-Agent", ""))
            if not truncate[0]:
                return super().do_GET()
            body = (root / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:  # a client that hangs up early: expected here
            pass

    httpd = Quiet(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopped = []

    def stop() -> None:
        if not stopped:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
            stopped.append(True)

    try:
        yield Server(root / "kriz", f"http://127.0.0.1:{httpd.server_address[1]}/kriz", requests, agents, truncate,
                     stop)
    finally:
        stop()


# ------------------------------------------------------------------------------------------ effnet_jax.download


def test_download_verifies_then_renames(server: Server, tmp_path: pathlib.Path) -> None:
    body = bytes(range(256)) * 300
    (server.root / "f.bin").write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    out = tmp_path / "cache" / "f.bin"
    download(f"{server.url}/f.bin", out, sha256=digest, size=len(body), progress=False)
    assert out.read_bytes() == body and [p.name for p in out.parent.iterdir()] == ["f.bin"]
    assert server.agents == ["effnet-jax (python urllib)"]  # not Python's default, which some servers refuse

    cases = [(dict(sha256=digest, size=len(body) + 1), "announces 76,800 bytes, expected 76,801"),
             (dict(sha256="0" * 64, size=len(body)), f"its SHA-256 is {digest}, expected the SHA-256 " + "0" * 64),
             (dict(sha256=digest[:8] + "0"), "expected the SHA-256 prefix")]
    for kwargs, message in cases:
        with pytest.raises(ChecksumError, match=message):
            download(f"{server.url}/f.bin", tmp_path / "other" / "f.bin", progress=False, **kwargs)
        assert list((tmp_path / "other").iterdir()) == []  # no partial file
    server.truncate[0] = True
    with pytest.raises(ChecksumError, match="38,400 bytes arrived, expected 76,800"):
        download(f"{server.url}/f.bin", tmp_path / "other" / "f.bin", sha256=digest, size=len(body), progress=False)
    assert list((tmp_path / "other").iterdir()) == []
    server.truncate[0] = False
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/missing.bin", tmp_path / "other" / "m.bin", sha256=digest, progress=False)


# ------------------------------------------------------------------------------- train.py --dataset cifar10


@pytest.fixture
def cifar_env(tmp_path: pathlib.Path, server: Server, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """The served archive, EFFNET_JAX_DATA_URL at the server, the effnet_jax cache in a temp folder; returns the
    folder the archive must land in."""
    cifar10_archive(server.root / ARCHIVE)
    monkeypatch.setenv(data.DATA_URL_ENV_VAR, server.url)
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache" / "downloads"


def train_argv(workdir: pathlib.Path) -> list:
    return ["--dataset", "cifar10", "--variant", "b0", "--init", "scratch", "--width", 0.25, "--depth", 0.1,
            "--resolution", 32, "--batch-size", 4, "--eval-batch-size", 16, "--epochs", 1, "--val-fraction", 0.25,
            "--no-progress", "--workdir", workdir]


def test_mission_command_refuses_a_file_that_is_not_the_official_archive(
        cifar_env: pathlib.Path, server: Server, tmp_path: pathlib.Path) -> None:
    """The table untouched: the small served archive is not CIFAR-10's (size announced first, then the SHA-256
    when the size is made to match). Exit 2, one line naming the mismatch, nothing kept in any cache."""
    rc, out, err = run_main(cli.main, train_argv(tmp_path / "w1"))
    assert rc == 2 and err.count("\n") == 1 and "error:" in err and "Traceback" not in err
    assert f"{data.CIFAR_ARCHIVES['cifar10'].size:,}" in err and ARCHIVE in err
    assert not cifar_env.exists() or list(cifar_env.iterdir()) == []

    served = (server.root / ARCHIVE).read_bytes()
    real = data.CIFAR_ARCHIVES["cifar10"]
    with pytest.MonkeyPatch.context() as mp:  # the right size, the wrong content: the SHA-256 refuses it
        mp.setitem(data.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(real, size=len(served)))
        rc, out, err = run_main(cli.main, train_argv(tmp_path / "w2"))
    assert rc == 2 and err.count("\n") == 1 and real.sha256 in err and hashlib.sha256(served).hexdigest() in err
    assert list(cifar_env.iterdir()) == []
    assert len(server.requests) == 2 and not (tmp_path / "cache" / "datasets").exists()


def test_mission_command_downloads_verifies_caches_and_trains_then_runs_offline(
        cifar_env: pathlib.Path, server: Server, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = (server.root / ARCHIVE).read_bytes()
    monkeypatch.setitem(data.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(
        data.CIFAR_ARCHIVES["cifar10"], size=len(served), sha256=hashlib.sha256(served).hexdigest()))
    with persistent_compilation_cache(tmp_path / "xla_cache"):  # the second run compiles nothing
        server.truncate[0] = True  # a transfer cut short: refused, nothing kept
        rc, out, err = run_main(cli.main, train_argv(tmp_path / "w0"))
        assert rc == 2 and err.count("\n") == 1 and f"{len(served) // 2:,} bytes arrived" in err
        assert list(cifar_env.iterdir()) == []

        server.truncate[0] = False  # the next run downloads again, verifies, keeps the archive, trains
        rc, out, err = run_main(cli.main, train_argv(tmp_path / "w1"))
        assert rc == 0, err
        assert (cifar_env / ARCHIVE).read_bytes() == served and [p.name for p in cifar_env.iterdir()] == [ARCHIVE]
        assert server.requests == [f"/kriz/{ARCHIVE}"] * 2
        first = read_metrics(tmp_path / "w1")
        assert [m["epoch"] for m in first] == [0, 1]
        names = json.loads((tmp_path / "w1" / "class_names.json").read_text())
        assert names[:2] == ["airplane", "automobile"] and len(names) == 10  # from the archive's batches.meta

        server.stop()  # offline: the cache serves the second run
        rc, out, err = run_main(cli.main, train_argv(tmp_path / "w2"))
        assert rc == 0, err
        second = read_metrics(tmp_path / "w2")
        assert [m["val_acc"] for m in second] == [m["val_acc"] for m in first]  # same data, seed, flags
        assert second[1]["train_loss"] == pytest.approx(first[1]["train_loss"], rel=1e-5)
        assert len(server.requests) == 2


def test_offline_message_names_file_source_destination_and_flags(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No route to the host (a closed port here): one message, at once, saying what to fetch from where, where to
    put it, and which flags avoid it."""
    port = unused_port()
    monkeypatch.setenv(data.DATA_URL_ENV_VAR, f"http://127.0.0.1:{port}/kriz")
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "cache"))
    rc, out, err = run_main(cli.main, train_argv(tmp_path / "w"))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    destination = tmp_path / "cache" / "downloads" / ARCHIVE
    for part in (f"http://127.0.0.1:{port}/kriz/{ARCHIVE}", f"{data.CIFAR_BASE_URL}/{ARCHIVE}", str(destination),
                 "--data-dir", data.DATA_URL_ENV_VAR, "folder:PATH"):
        assert part in err
    assert not destination.exists()
