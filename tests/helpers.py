"""Helpers shared by the test files (importable as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib
import tarfile
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
