"""A run directory written by the code before the package was laid out by concern (tests/fixtures/run-9802a31,
made as tests/fixtures/README.md says) still loads: today's loader reads its config into today's layout, evaluate
recomputes the validation it logged, and `--resume` continues it as the old code did."""

from __future__ import annotations

import json
import shutil

import pytest

from effnet_jax.cli import evaluate as evaluate_cli
from effnet_jax.cli import train as train_cli
from effnet_jax.loader import load
from helpers import REPO, last_json, read_metrics, run_main, write_noise_folder

FIXTURE = REPO / "tests" / "fixtures" / "run-9802a31"
# the command that wrote it (tests/fixtures/README.md)
ARGV = ["--dataset", "folder:images", "--variant", "b0", "--init", "scratch", "--width", 0.1, "--depth", 0.1,
        "--resolution", 32, "--batch-size", 4, "--lr", 1e-3, "--freeze", "none", "--epochs", 1,
        "--eval-batch-size", 16, "--val-fraction", 0.25, "--no-progress", "--input-mean", "0.5,0.5,0.5",
        "--input-std", "0.25,0.25,0.25", "--rotation", 0.05, "--crop-padding", 2, "--workdir", "run-9802a31"]
# the old code on one CPU kind, today's on any: the last bits of a float32 sum may differ
RTOL = 1e-5
# after an epoch of training those differences grow: the resumed epoch's val loss on the same Zen 4 run as an AVX2
# machine was 6.4e-5 (relative) from the Zen 4 record (benchmarks/results/test-suite.md, 2026-12-07 23:37)
TRAINED_RTOL = 1e-3


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A copy of the fixture beside the images it was trained on, in the working directory (its config.json
    names both relatively), with the dataset cache in the temp folder."""
    write_noise_folder(tmp_path / "images")
    shutil.copytree(FIXTURE, tmp_path / "run-9802a31")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "run-9802a31"


def test_the_fixture_is_in_the_old_layout():
    """What makes it old: the copies today's config.json no longer writes, and the flat augmentation keys."""
    saved = json.loads((FIXTURE / "config.json").read_text())
    assert {"mean", "std", "preprocess", "rotation", "crop_padding"} <= saved.keys()
    assert "augment" not in saved and saved["input_mean"] == "0.5,0.5,0.5"


def test_loader_reads_the_old_config_into_todays_layout(old_run):
    loaded = load(str(old_run))
    cfg = loaded.run.train_config
    assert (cfg.augment.rotation, cfg.augment.crop_padding, cfg.augment.flip) == (0.05, 2, True)
    assert cfg.input_mean == (0.5, 0.5, 0.5) and cfg.input_std == (0.25, 0.25, 0.25)
    assert (loaded.preprocess.mean, loaded.preprocess.std, loaded.preprocess.input_size) == (
        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32)
    assert loaded.overrides == {"width": 0.1, "depth": 0.1}
    assert loaded.class_names == sorted(["zebra", "ant", "mole"]) and loaded.model.num_classes == 3


def test_evaluate_recomputes_the_logged_validation(old_run):
    logged = read_metrics(old_run)[-1]
    rc, out, err = run_main(evaluate_cli.main, ["--workdir", old_run])
    assert rc == 0, err
    res = last_json(out)
    assert (res["epoch"], res["n"]) == (1, 9)
    assert res["top1"] == pytest.approx(logged["val_acc"], abs=1e-12)
    assert res["loss"] == pytest.approx(logged["val_loss"], rel=RTOL)


def test_resume_continues_as_the_old_code_did(old_run):
    """`--resume --epochs 2` with the run's own command: the old epochs are kept as logged, and epoch 2 equals
    the one the old code logged when it resumed the same directory."""
    before = read_metrics(old_run)
    rc, out, err = run_main(train_cli.main, [*ARGV, "--epochs", 2, "--resume"])
    assert rc == 0, err
    after = read_metrics(old_run)
    assert after[:2] == before
    expected = json.loads((REPO / "tests" / "fixtures" / "run-9802a31-resumed-epoch2.json").read_text())
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr"):
        assert after[2][key] == pytest.approx(expected[key], rel=TRAINED_RTOL), key
    saved = json.loads((old_run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["augment"]["rotation"] == 0.05
    assert not {"mean", "std", "preprocess"} & saved.keys()  # rewritten in today's layout
