"""Helpers shared by the test files (importable as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


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
