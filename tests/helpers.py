"""Helpers shared by the test files (importable as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import pathlib
import socket
import tarfile
import threading
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[1]
# The real-data archive: CIFAR-10's training set as JPEGs, train/<class>/NNNN.jpg grouped by class, in the shared
# data folder beside the repository (../shared/data). Tests take it through the `cifar_tar` fixture (conftest.py),
# which skips them, naming this path, when it is missing.
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


def run_main(main, argv):
    """(exit status, stdout, stderr) of an in-process CLI `main(argv)`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict:
    """The JSON summary a CLI prints as its last line of stdout."""
    return json.loads(stdout.strip().splitlines()[-1])


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """A training run's metrics.jsonl: one dict an evaluation."""
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def load_train_cli(module_name: str = "effnet_jax_train_cli"):
    """The repository's `train.py` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cifar_jpegs(tar_path: pathlib.Path) -> Iterator[tuple[str, str, bytes]]:
    """(class, file name, JPEG bytes) of the archive's images, in archive order (grouped by class)."""
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile():
                yield member.name.split("/")[-2], member.name.rsplit("/", 1)[-1], tar.extractfile(member).read()


def unused_port() -> int:
    """A local TCP port that nothing listens on (bound, then released): to refuse a connection, or to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_folder(directory: pathlib.Path) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 serving `directory` (a thread) for the block: (its URL, http://127.0.0.1:PORT,
    and the list the paths of the GET requests it receives are appended to)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def persistent_compilation_cache(directory: pathlib.Path, min_compile_time_secs: float = 0.5) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` for the block (the settings restored afterwards), so that
    a second run of the same step compiles nothing."""
    import jax
    from jax._src import compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


NOISE_CLASSES = ("zebra", "ant", "mole")  # written in this order; the class index is the sorted position


def write_noise_folder(root: pathlib.Path, per_class: int = 12, classes: tuple[str, ...] = NOISE_CLASSES
                       ) -> pathlib.Path:
    """`root/<class>/NN.png`: 32x32 RGB noise (seed 0) with channel c bright for the c-th class written, so that a
    small network learns it in a few steps. The same call gives the same files: tests/fixtures' old run used it."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            a[..., c] = 220
            Image.fromarray(a).save(root / name / f"{i:02d}.png")
    return root
