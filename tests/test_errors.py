"""What reaches the terminal: a user error is one line `error: ...` with exit status 2; any other exception (a bug,
XLA, memory) shows its traceback (`effnet_jax.errors.cli`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from effnet_jax import errors
from helpers import REPO, load_train_cli, run_main

cli = load_train_cli("effnet_jax_train_cli_errors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of eight 32 px noise images."""
    root = tmp_path_factory.mktemp("errors_images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def data_argv(folder, workdir):
    return ["--dataset", f"folder:{folder}", "--resolution", 32, "--batch-size", 8, "--epochs", 1,
            "--val-fraction", 0.25, "--no-progress", "--workdir", workdir]


def tiny_argv(folder, workdir):
    return ["--variant", "lite0", "--init", "scratch", "--width", 0.25, "--depth", 0.1, *data_argv(folder, workdir)]


def test_user_errors_are_one_line_with_status_2(folder, tmp_path):
    for argv, message in (
            (["--resolution", 16], "error: --resolution 16 is too small: EfficientNet downsamples by 32; use >= 32"),
            (["--init", tmp_path / "missing.pth", *data_argv(folder, tmp_path / "w")],
             f"error: --init {tmp_path / 'missing.pth'}: not 'imagenet', 'scratch', 'hf-hub:timm/<name>', a .pth, "
             ".safetensors, .keras or .weights.h5 file, a run directory, a timm directory or a converted model "
             "directory (no such path)"),
            (tiny_argv(folder, tmp_path / "w") + ["--batch-size", 64], "error: 12 training examples are fewer than one "
                                                                         "batch of 64")):
        rc, out, err = run_main(cli.main, argv)
        assert rc == 2 and err == message + "\n" and "Traceback" not in err, (argv, err)
    # every error class a user can fix is a UserError: the CLIs report all of them this way
    from effnet_jax.weights import convert, torch_reader, published as weights
    from effnet_jax import data, download
    for cls in (data.DatasetError, data.DatasetUnavailableError, weights.WeightsUnavailableError,
                weights.WeightsIntegrityError, torch_reader.CheckpointReadError, torch_reader.UnsafeCheckpointError,
                convert.ConversionError, download.DownloadError, download.ChecksumError, errors.ConfigError):
        assert issubclass(cls, errors.UserError), cls


def test_an_error_inside_the_train_step_propagates(folder, tmp_path, monkeypatch):
    """A bug (here: an exception raised while the train step is traced) is not turned into a one-line message:
    `main` lets it through, so the interpreter prints its traceback."""
    from effnet_jax import data as data_lib

    def broken(*args, **kwargs):
        raise RuntimeError("a bug inside the step")

    monkeypatch.setattr(data_lib, "augment_batch", broken)  # called only by the train step
    with pytest.raises(RuntimeError, match="a bug inside the step"):
        run_main(cli.main, tiny_argv(folder, tmp_path / "w"))


def test_a_non_user_error_reaches_the_terminal_as_a_traceback(tmp_path):
    script = textwrap.dedent(f"""
        import runpy, sys
        import effnet_jax.train.loop
        def broken(cfg):
            raise RuntimeError("not the user's fault")
        effnet_jax.train.loop.setup = broken
        sys.argv = ["train.py", "--workdir", {str(tmp_path / "w")!r}]
        runpy.run_path({str(REPO / "train.py")!r}, run_name="__main__")
    """)
    env = dict(os.environ, EFFNET_JAX_NO_REEXEC="1")  # (no restart: it would drop the patch)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("RuntimeError: not the user's fault")
