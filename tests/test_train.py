"""The trainer (`train.py` + `effnet_jax.train`) and `effnet-evaluate`, end to end on tiny data.

XLA compiles slowly on CPU, so the runs are few, shared through module-scoped fixtures, and tiny (b0 at 32 px,
batch 4, a 3-class folder of 36 PNGs), and the module turns on JAX's persistent compilation cache (in a temp
folder) so that a computation compiled once (model init, eval step, the train step of a resumed run) is not
compiled again by a later run. The runs:

* A: `--init scratch --width 0.25 --depth 0.1` (b0 scaled down to one block per stage: a cold run of it took
  57 s against full b0's 86 s), 2 epochs, constant schedule with a 1-epoch warmup; then `effnet_jax.cli.evaluate`.
* C: a copy of A resumed with `--epochs 3` (the same compiled step: a constant schedule with an explicit warmup
  does not depend on `epochs`).
* D: `--init imagenet` (a torchvision b0 file with random weights, served by a local HTTP server) with
  `--freeze head-only`, 2 epochs of warmup + cosine: the download, the freezing and the schedule.
* a subprocess with two host devices: one sharded train step against the one-device step (started at the
  beginning of run A, so that the two compile side by side).

Expected values come from outside the code under test: counts (stratified split, steps per epoch), the
closed-form schedule, the torch file's tensors, the initial variables.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from effnet_jax.cli import evaluate as evaluate_cli
from effnet_jax.cli import host
from effnet_jax.train import optim
from effnet_jax.model import variants
from effnet_jax.errors import ConfigError
from effnet_jax.train import build as trainer
from effnet_jax.train.config import TrainConfig
from effnet_jax.weights import published as weights
from effnet_jax.train.rundir import restore_checkpoint
from effnet_jax.train.steps import jit_eval_step
from effnet_jax.train.optim import param_names
from effnet_jax.model.variants import VARIANTS
from helpers import (NOISE_CLASSES, last_json, load_train_cli, persistent_compilation_cache, read_metrics, run_main,
                     serve_folder, unused_port, write_noise_folder)

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = NOISE_CLASSES                 # ("zebra", "ant", "mole"): the class index is the sorted position
PER_CLASS = 12
N_IMAGES = PER_CLASS * len(CLASSES)     # 36
VAL_FRACTION = 0.25
N_VAL = round(VAL_FRACTION * N_IMAGES)  # 9: 3 per class, the stratified rule
N_TRAIN = N_IMAGES - N_VAL              # 27
BATCH = 4
STEPS_PER_EPOCH = N_TRAIN // BATCH      # 6 (the last, short batch is dropped)
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "img_s", "lr", "time_s",
               "resolution"}
SHARDED_TEST = "test_two_device_step_equals_one_device_step"
SMALL = (0.25, 0.1)                     # run A's --width, --depth


cli = load_train_cli()


def flat(tree) -> dict[str, np.ndarray]:
    """{'/'-joined path: numpy array} of a pytree."""
    return {n: np.asarray(v) for n, v in zip(jax.tree.leaves(param_names(tree)), jax.tree.leaves(tree))}


def is_count(fraction: float, n: int) -> bool:
    """`fraction` is k / n for an integer k."""
    return abs(fraction * n - round(fraction * n)) < 1e-9


def step_dirs(manager_dir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in manager_dir.iterdir() if p.is_dir() and p.name.isdigit())


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# ---------------------------------------------------------------------------------------------- 1. the flags

def test_defaults_are_the_train_config():
    assert cli.parse_args([]) == TrainConfig()


def test_default_freeze_is_the_top_8_blocks_or_all_of_a_smaller_network():
    """Without --freeze: the top 8 blocks with pretrained weights (Lite0 and B0 have 16), every block of a network
    with fewer (a scaled network fine-tuned from its run directory: an explicit N > its blocks is an error), and
    everything from scratch."""
    cfg = cli.parse_args(["--variant", "lite0"])
    assert cfg.resolution == 128 and cfg.optim_config().freeze == 8 and cfg.optim_config(16).freeze == 8
    assert optim.frozen_units(variants.model_config("lite0"), cfg.optim_config(16).freeze) == 1 + 16 - 8
    assert cfg.optim_config(7).freeze == 7
    assert cli.parse_args(["--init", "scratch"]).optim_config(16).freeze == "none"
    assert cli.parse_args(["--freeze", "6"]).optim_config(7).freeze == 6
    with pytest.raises(ConfigError, match="has 7 blocks"):
        optim.frozen_units(variants.model_config("b0", width=0.25, depth=0.25), 8)


def test_notebook_preset():
    cfg = cli.parse_args(["--preset", "notebook"])
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.resolution) == ("adam", 1e-3, 64, 25, 32)
    assert cfg.schedule == "constant" and cfg.label_smoothing == 0.0 and cfg.warmup_epochs == 0.0
    assert cfg.weight_decay == 0.0 and cfg.augment.crop_padding == 4 and cfg.augment.flip
    # fields the preset does not set keep the defaults
    assert cfg.variant == TrainConfig().variant and cfg.dataset == TrainConfig().dataset


def test_flags_override_the_preset_whatever_their_position():
    cfg = cli.parse_args(["--lr", "0.01", "--preset", "notebook", "--epochs", "3", "--schedule", "cosine",
                          "--max-train-examples", "100", "--drop-rate", "0.5"])
    assert (cfg.lr, cfg.epochs, cfg.schedule, cfg.optimizer, cfg.batch_size) == (0.01, 3, "cosine", "adam", 64)
    assert cfg.max_train_examples == 100 and isinstance(cfg.max_train_examples, int)
    assert cfg.drop_rate == 0.5 and isinstance(cfg.drop_rate, float)


def test_boolean_flags():
    assert cli.parse_args([]).augment.flip is True and cli.parse_args([]).two_phase is False
    assert cli.parse_args(["--no-flip"]).augment.flip is False
    assert cli.parse_args(["--preset", "notebook", "--no-flip"]).augment.flip is False
    assert cli.parse_args(["--two-phase", "--phase1-epochs", "1"]).two_phase is True
    assert cli.parse_args(["--no-progress", "--resume"]) == TrainConfig(progress=False, resume=True)


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--preset", "nope"], ["--epochs", "two"]])
def test_bad_flags_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code != 0
    assert "error" in capsys.readouterr().err


def test_normalization_is_the_weights_unless_given():
    from effnet_jax.weights.published import IMAGENET_MEAN, IMAGENET_STD, TF_LITE_MEAN, TF_LITE_STD
    assert cli.parse_args(["--variant", "b3"]).normalization() == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    assert cli.parse_args(["--variant", "lite0"]).normalization() == (tuple(TF_LITE_MEAN), tuple(TF_LITE_STD))
    cfg = cli.parse_args(["--variant", "lite0", "--input-mean", "0.4914,0.4822,0.4465",
                          "--input-std", "0.247,0.243,0.261"])
    assert cfg.normalization() == ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    assert cli.parse_args(["--input-mean", "0.5,0.5,0.5"]).normalization()[1] == tuple(IMAGENET_STD)
    for flag, text in (("--input-mean", "0.5,0.5"), ("--input-mean", "a,b,c"), ("--input-std", "1,-1,1"),
                       ("--input-std", "nan,1,1")):
        with pytest.raises(ValueError, match=f"{flag} '{text}': expected three numbers"):
            cli.parse_args([flag, text]).normalization()


@pytest.mark.parametrize("schedule, epochs, plan", [
    ("", 3, [96, 96, 96]), ("64:2", 3, [64, 64, 96]), ("64:2, 80:1", 5, [64, 64, 80, 96, 96]),
    ("128:1", 2, [128, 96])])
def test_resolution_plan(schedule, epochs, plan):
    cfg = cli.parse_args(["--resolution", "96", "--epochs", str(epochs), "--resolution-schedule", schedule])
    assert cfg.resolution_plan() == plan


@pytest.mark.parametrize("schedule, message", [
    ("64:3", "covers 3 of the 3 epochs"), ("64", "expected SIDE:EPOCHS"), ("64:x", "expected SIDE:EPOCHS"),
    ("16:1", "must be >= 32"), ("64:0", "must be >= 32")])
def test_resolution_plan_refuses(schedule, message):
    with pytest.raises(ValueError, match=message):  # TrainConfig checks the flags when it is made
        cli.parse_args(["--epochs", "3", "--resolution-schedule", schedule])


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trainer_env(tmp_path_factory):
    """The dataset cache in a temp folder and JAX's persistent compilation cache on (restored afterwards)."""
    root = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp, persistent_compilation_cache(root / "xla_cache"):
        mp.setenv("EFFNET_JAX_CACHE", str(root / "data_cache"))
        yield root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> pathlib.Path:
    """<class>/NN.png, 32x32 RGB noise with one channel bright per class."""
    return write_noise_folder(tmp_path_factory.mktemp("images"), PER_CLASS, CLASSES)


def base_argv(folder, workdir, *extra):
    return ["--dataset", f"folder:{folder}", "--variant", "b0", "--resolution", 32, "--batch-size", BATCH,
            "--lr", 1e-3, "--freeze", "none",  # explicit: the tests below expect these, whatever the defaults
            "--eval-batch-size", 16, "--val-fraction", VAL_FRACTION, "--no-progress", "--workdir", workdir, *extra]


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from effnet_jax import create_model, data as data_lib
    from effnet_jax.model.network import param_shapes
    from effnet_jax.train import optim
    from effnet_jax.train.mesh import Mesh
    from effnet_jax.train.steps import create_train_state, jit_train_step
    from effnet_jax.train.config import TrainConfig

    # SGD: the update is linear in the gradient. (Adam's first step is ~lr * sign(g): for parameters whose
    # gradient is analytically 0, e.g. the bias of a BN followed by another BN, it turns float noise into +-lr.)
    cfg = TrainConfig(optimizer="sgd", lr=1e-2, weight_decay=1e-4, warmup_epochs=0.0, schedule="constant",
                      label_smoothing=0.1, resolution=32)
    model = create_model("b0", num_classes=3, width=0.25, depth=0.25)   # dropout and drop path on
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 12).astype(np.int32)
    indices = np.array([5, 1, 7, 3, 0, 2, 6, 4], np.int32)

    def init(path, s):  # no compiled init: random variables of the right shapes
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if name.endswith(("scale", "var")):
            return np.ones(s.shape, np.float32)
        if name.endswith("mean"):
            return np.zeros(s.shape, np.float32)
        if name.endswith("bias"):
            return rng.normal(0, 0.1, s.shape).astype(np.float32)
        return (rng.normal(0, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(init, param_shapes(model, 32))
    tx = optim.make_optimizer(cfg.optim_config(len(model.config.blocks)), variables["params"], model.config, 1)
    aug = data_lib.AugmentConfig(crop_padding=4, flip=True)
    out = {}
    for n in (1, 2):
        mesh = Mesh(jax.devices()[:n])
        step = jit_train_step(model, tx, aug, cfg.eval_transform(), label_smoothing=0.1, ema_decay=0.0)
        state = mesh.replicate(create_train_state(variables, tx, cfg.seed, cfg.ema_decay > 0))
        arrays = mesh.replicate((jnp.asarray(images), jnp.asarray(labels)))
        state, m = step(state, *arrays, mesh.put_batch(indices))
        out[n] = jax.device_get({"params": state.params, "batch_stats": state.batch_stats, "m": m,
                                 "sharding": str(state.params["classifier"]["kernel"].sharding)})

    def maxdiff(a, b, rel=False):
        return max(float(np.max(np.abs(x - y) / (np.maximum(np.abs(y), 1.0) if rel else 1.0)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    print(json.dumps({
        "device_count": jax.device_count(), "mesh_sizes": [1, 2],
        "params_diff": maxdiff(out[1]["params"], out[2]["params"]),
        "params_moved": maxdiff(out[1]["params"], variables["params"]),
        "batch_stats_rel_diff": maxdiff(out[1]["batch_stats"], out[2]["batch_stats"], rel=True),
        "batch_stats_moved": maxdiff(out[1]["batch_stats"], variables["batch_stats"]),
        "loss": [float(out[n]["m"]["loss"] / out[n]["m"]["count"]) for n in (1, 2)],
        "count": [float(out[n]["m"]["count"]) for n in (1, 2)],
        "correct": [float(out[n]["m"]["correct"]) for n in (1, 2)],
    }))
""")


@pytest.fixture(scope="module")
def sharded_proc(tmp_path_factory):
    """The two-device comparison, running in a subprocess (started when first asked for)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", SHARDED_SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path_factory.mktemp("sharded"))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@dataclasses.dataclass
class Run:
    workdir: pathlib.Path
    argv: list
    rc: int
    stdout: str
    stderr: str
    metrics: list[dict] | None = None
    evaluated: tuple | None = None      # (rc, stdout, stderr) of `effnet_jax.cli.evaluate`
    extra: dict | None = None


@pytest.fixture(scope="module")
def run_a(trainer_env, image_folder, tmp_path_factory, request):
    """Run A (scratch, a small custom scaling of b0, 2 epochs, constant lr after a 1-epoch warmup), then
    `evaluate --which latest` on it."""
    if any(item.name == SHARDED_TEST for item in request.session.items):
        request.getfixturevalue("sharded_proc")  # compile the two-device step meanwhile
    workdir = tmp_path_factory.mktemp("run") / "a"
    argv = base_argv(image_folder, workdir, "--init", "scratch", "--width", SMALL[0], "--depth", SMALL[1],
                     "--epochs", 2, "--schedule", "constant",
                     "--warmup-epochs", 1)  # explicit: the default warmup depends on --epochs
    run = Run(workdir, argv, *run_main(cli.main, argv))
    assert run.rc == 0, run.stderr
    run.metrics = read_metrics(workdir)
    run.evaluated = run_main(evaluate_cli.main, ["--workdir", workdir, "--which", "latest"])
    return run


@pytest.fixture(scope="module")
def run_c(run_a, tmp_path_factory):
    """A copy of run A (another path) resumed with --epochs 3."""
    workdir = tmp_path_factory.mktemp("run") / "c"
    shutil.copytree(run_a.workdir, workdir)
    argv = [a if a != run_a.workdir else workdir for a in run_a.argv]
    argv[argv.index("--epochs") + 1] = 3
    run = Run(workdir, argv, *run_main(cli.main, [*argv, "--resume"]))
    assert run.rc == 0, run.stderr
    run.metrics = read_metrics(workdir)
    return run


# ------------------------------------------------------------------------------ 2. end to end: files, evaluate

def test_run_writes_config_and_class_names(run_a):
    saved = json.loads((run_a.workdir / "config.json").read_text())
    cfg = cli.parse_args([str(a) for a in run_a.argv])
    assert {k: saved[k] for k in dataclasses.asdict(cfg)} == cfg.to_saved()
    assert saved["num_classes"] == len(CLASSES) and saved["model_overrides"] == {}
    assert saved["input_mean"] == list(weights.IMAGENET_MEAN) and saved["input_std"] == list(weights.IMAGENET_STD)
    assert not {"mean", "std", "preprocess"} & set(saved)  # each value once
    assert json.loads((run_a.workdir / "class_names.json").read_text()) == sorted(CLASSES)


def test_metrics_records(run_a):
    records = run_a.metrics
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(set(r) == METRIC_KEYS for r in records)
    assert all(records[0][k] is None for k in ("train_loss", "train_acc", "img_s", "lr"))
    assert [r["resolution"] for r in records] == [32, 32, 32]
    for r in records:
        assert is_count(r["val_acc"], N_VAL)                  # a count of the 9 validation images
        assert r["val_top5"] == 1.0                           # 3 classes: the label is always in the top 3
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
    for r in records[1:]:
        assert is_count(r["train_acc"], STEPS_PER_EPOCH * BATCH)  # of the 24 images trained on
        assert math.isfinite(r["train_loss"]) and r["img_s"] > 0
    assert [r["time_s"] for r in records] == sorted(r["time_s"] for r in records)


def test_constant_schedule_lr_with_warmup(run_a, run_c):
    """Logged lr = the lr of the epoch's last step: 1-epoch linear warmup (6 steps), then constant 1e-3."""
    peak, warmup = 1e-3, STEPS_PER_EPOCH
    assert run_a.metrics[1]["lr"] == pytest.approx(peak * (STEPS_PER_EPOCH - 1) / warmup, rel=1e-6)
    assert run_a.metrics[2]["lr"] == pytest.approx(peak, rel=1e-6)
    assert run_c.metrics[3]["lr"] == pytest.approx(peak, rel=1e-6)


def test_curves_png(run_a):
    path = run_a.workdir / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (1100, 400)  # figsize (11, 4) at dpi 100


def test_curves_leave_the_callers_matplotlib_alone(tmp_path):
    """In a notebook, drawing curves.png must neither switch the backend nor leave figures open in pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt
    from effnet_jax.train.rundir import plot_curves
    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # (a backend other than the Agg a headless run has)
    try:
        figures = plt.get_fignums()
        plot_curves([{"epoch": 0, "val_loss": 2.3, "val_acc": 0.1},
                     {"epoch": 1, "train_loss": 1.0, "train_acc": 0.7, "val_loss": 0.6, "val_acc": 0.8}],
                    tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        plt.switch_backend(backend)
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (1100, 400)


def test_checkpoints(run_a):
    ck = run_a.workdir / "checkpoints"
    # keyed by global step; the newest two kept (rundir.KEEP_LATEST), each with its SHA256SUMS
    assert step_dirs(ck / "latest") == sorted(str(e * STEPS_PER_EPOCH) for e in (1, 2))
    assert all((ck / "latest" / d / "SHA256SUMS").is_file() for d in step_dirs(ck / "latest"))
    tree, meta = restore_checkpoint(ck / "latest")
    assert int(tree["step"]) == 2 * STEPS_PER_EPOCH and meta["epoch"] == 2
    assert meta["val_top1"] == run_a.metrics[-1]["val_acc"]
    best_acc = max(r["val_acc"] for r in run_a.metrics[1:])
    _, best_meta = restore_checkpoint(ck / "best")
    assert step_dirs(ck / "best") == [str(best_meta["epoch"])] and best_meta["val_top1"] == best_acc
    assert run_a.metrics[best_meta["epoch"]]["val_acc"] == best_acc


def test_width_and_depth_build_the_custom_network(run_a):
    """--width 0.25 --depth 0.1 on b0: ceil(0.1 * repeats) = 1 block per stage (7), channels round(c / 4) to
    multiples of 8 (stem 32 -> 8, head 1280 -> 320); the checkpoint holds that network, and `evaluate` (above)
    rebuilt it from config.json."""
    tree, _ = restore_checkpoint(run_a.workdir / "checkpoints" / "latest")
    params = tree["params"]
    assert sorted(k for k in params if k.startswith("blocks_")) == [f"blocks_{i}" for i in range(7)]
    assert params["stem"]["kernel"].shape == (3, 3, 3, 8)
    assert params["head"]["kernel"].shape[-1] == 320 and params["classifier"]["kernel"].shape == (320, 3)


def test_init_from_a_custom_scaled_run(run_a, image_folder, tmp_path):
    """`--init RUN_DIR` of run A builds run A's network (its width and depth come from its config.json), and
    the new run's own config records them for `evaluate`."""
    workdir = tmp_path / "from_a"
    argv = base_argv(image_folder, workdir, "--init", run_a.workdir, "--epochs", 2, "--schedule", "constant",
                     "--warmup-epochs", 1)  # run A's schedule: its compiled step, from the persistent cache
    rc, stdout, stderr = run_main(cli.main, argv)
    assert rc == 0, stderr
    # the accuracy before fine-tuning is run A's best checkpoint's (the head kept: the same classes)
    best = max(r["val_acc"] for r in run_a.metrics[1:])
    assert read_metrics(workdir)[0]["val_acc"] == best
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model_overrides"] == {"width": SMALL[0], "depth": SMALL[1]}
    rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", workdir, "--which", "latest"])
    assert rc == 0, stderr


def test_summary_line(run_a):
    summary = last_json(run_a.stdout)
    assert summary["final_val_acc"] == run_a.metrics[-1]["val_acc"]
    assert summary["pre_finetune_val_acc"] == run_a.metrics[0]["val_acc"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in run_a.metrics[1:])
    assert (summary["n_train"], summary["n_val"], summary["epochs"]) == (N_TRAIN, N_VAL, 2)
    assert json.loads((run_a.workdir / "summary.json").read_text())["final_val_acc"] == summary["final_val_acc"]


def test_evaluate_cli_reproduces_the_logged_validation_exactly(run_a):
    rc, stdout, stderr = run_a.evaluated
    assert rc == 0, stderr
    out = last_json(stdout)
    last = run_a.metrics[-1]
    assert out["top1"] == last["val_acc"] and out["loss"] == last["val_loss"] and out["top5"] == last["val_top5"]
    assert out["n"] == N_VAL and (out["epoch"], out["split"], out["which"]) == (2, "val", "latest")
    per_class = stdout.strip().splitlines()[:-1]
    assert [line.split()[0] for line in per_class] == sorted(CLASSES)
    # per-class accuracies over 3 images each average to the overall top-1
    assert np.mean([float(line.split()[1]) for line in per_class]) == pytest.approx(100 * out["top1"], abs=0.01)


def test_eval_flip_averages_the_logits_of_the_image_and_its_mirror():
    """`eval_step(flip=True)` against model.apply on the images and on their mirrors made by numpy."""
    from effnet_jax import create_model, data as data_lib
    from effnet_jax.data.transform import run_eval_transform
    from effnet_jax.weights.published import IMAGENET_MEAN, IMAGENET_STD
    model = create_model("b0", num_classes=3, width=0.25, depth=0.25)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0], np.int32)
    transform = run_eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    x = np.asarray(data_lib.eval_batch(images, 32))
    # compiled, as the trainer runs them: op by op, init and the two eval steps took ~100 s on 2 cores
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:1])
    variables = jax.tree.map(lambda v: v + rng.normal(0, 0.1, v.shape).astype(v.dtype), variables)  # BN too
    apply = jax.jit(functools.partial(model.apply, train=False))
    direct, mirrored = (np.asarray(apply(variables, v)) for v in (x, x[:, :, ::-1].copy()))
    assert not np.allclose(direct, mirrored, atol=1e-3)  # the mirror does change the logits
    indices, mask = np.array([0, 1, 2, 3, 4, 0], np.int32), np.array([1, 1, 1, 1, 1, 0], bool)
    for flip, want in ((False, direct), (True, (direct + mirrored) / 2)):
        out = jit_eval_step(model, transform, flip)(variables, images, labels, indices, mask)
        np.testing.assert_allclose(np.asarray(out["logits"])[:5], want, atol=1e-5)
        logp = want - want.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        assert float(out["loss"]) == pytest.approx(-logp[np.arange(5), labels].sum(), rel=1e-5)
        assert float(out["correct"]) == np.sum(want.argmax(-1) == labels) and float(out["count"]) == 5


def test_evaluate_flip_flag(run_a):
    rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", run_a.workdir, "--which", "latest", "--flip"])
    assert rc == 0, stderr
    out = last_json(stdout)
    assert out["flip"] is True and out["n"] == N_VAL and is_count(out["top1"], N_VAL)
    assert last_json(run_a.evaluated[1])["flip"] is False  # the run's own setting (no --eval-flip)


def test_evaluate_a_folder_of_only_a_test_split(run_a, image_folder, tmp_path):
    """`evaluate --dataset folder:DIR --split test` on a folder that holds only test/<class>/ (it was read as one
    class named 'test', and --split test answered "no 'test' split"). The folder holds run A's validation images
    (the stratified split of its seed 0, by file), so the scores are the validation numbers the run logged; the
    same loaded and streamed."""
    from effnet_jax import data as data_lib
    files = [image_folder / c / f"{i:02d}.png" for c in sorted(CLASSES) for i in range(PER_CLASS)]  # loader order
    _, val_idx = data_lib.stratified_split(np.repeat(np.arange(len(CLASSES)), PER_CLASS), VAL_FRACTION, 0)
    for k in val_idx:
        dest = tmp_path / "scores" / "test" / files[k].parent.name / files[k].name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[k], dest)
    last = run_a.metrics[-1]
    for stream in ("--no-stream", "--stream"):
        rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", run_a.workdir, "--which", "latest", "--dataset",
                                                          f"folder:{tmp_path / 'scores'}", "--split", "test", stream])
        assert rc == 0, stderr
        out = last_json(stdout)
        assert (out["n"], out["split"]) == (N_VAL, "test")
        assert out["top1"] == last["val_acc"] and out["top5"] == last["val_top5"], stream
        assert out["loss"] == pytest.approx(last["val_loss"], rel=1e-6, abs=1e-7), stream
        assert [line.split()[0] for line in stdout.strip().splitlines()[:-1]] == sorted(CLASSES)


def test_streamed_run_equals_the_run_with_the_data_on_the_device(run_a, tmp_path):
    """Run A again with --stream (the images decoded from the folder by grain threads, batch by batch): the same
    data order and per-example augmentation, so the same metrics and weights; evaluate follows the run's --stream."""
    workdir = tmp_path / "streamed"
    argv = [a if a != run_a.workdir else workdir for a in run_a.argv] + ["--stream"]
    rc, stdout, stderr = run_main(cli.main, argv)
    assert rc == 0, stderr
    assert json.loads((workdir / "config.json").read_text())["stream"] is True
    metrics = read_metrics(workdir)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5")
    assert [r["epoch"] for r in metrics] == [r["epoch"] for r in run_a.metrics]
    for got, want in zip(metrics, run_a.metrics):  # (epoch 0 has no train figures)
        assert [k for k in keys if got[k] is None] == [k for k in keys if want[k] is None]
        assert ({k: got[k] for k in keys if got[k] is not None}
                == pytest.approx({k: want[k] for k in keys if want[k] is not None}, rel=1e-5, abs=1e-6))
    got, _ = restore_checkpoint(workdir / "checkpoints" / "latest")
    want, _ = restore_checkpoint(run_a.workdir / "checkpoints" / "latest")
    for k, v in flat(want["params"]).items():
        np.testing.assert_allclose(flat(got["params"])[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", workdir, "--which", "latest"])
    assert rc == 0, stderr
    assert last_json(stdout)["top1"] == metrics[-1]["val_acc"]


def test_stream_by_default_above_the_size_limit(image_folder, trainer_env, monkeypatch):
    """--stream unset: streamed when `data.decoded_bytes` exceeds STREAM_ABOVE_BYTES; --stream/--no-stream win."""
    from effnet_jax import data as data_lib
    argv = ["--dataset", f"folder:{image_folder}", "--val-fraction", str(VAL_FRACTION)]
    assert not trainer.load_data(cli.parse_args(argv)).streamed
    assert trainer.load_data(cli.parse_args([*argv, "--stream"])).streamed
    monkeypatch.setattr(data_lib.load, "STREAM_ABOVE_BYTES", len(CLASSES) * PER_CLASS * 32 * 32 * 3 - 1)
    streamed = trainer.load_data(cli.parse_args(argv))
    assert streamed.streamed and len(streamed.val) == N_VAL
    assert not trainer.load_data(cli.parse_args([*argv, "--no-stream"])).streamed
    with pytest.raises(ValueError, match="does not go with --stream"):
        trainer.load_data(cli.parse_args([*argv, "--stream", "--on-corrupt", "skip"]))


# ------------------------------------------------------------------------------------------------- 3. resume

def test_resume_continues_at_the_next_epoch(run_a, run_c):
    assert [r["epoch"] for r in run_c.metrics] == [0, 1, 2, 3]
    assert run_c.metrics[:3] == run_a.metrics  # the earlier records kept as they were
    tree, meta = restore_checkpoint(run_c.workdir / "checkpoints" / "latest")
    assert int(tree["step"]) == 3 * STEPS_PER_EPOCH and meta["epoch"] == 3  # the step count carried on
    summary = last_json(run_c.stdout)
    assert summary["epochs"] == 3 and summary["final_val_acc"] == run_c.metrics[-1]["val_acc"]
    assert json.loads((run_c.workdir / "config.json").read_text())["workdir"] == str(run_c.workdir)


def test_resume_without_checkpoint(run_a, image_folder, tmp_path):
    workdir = tmp_path / "empty"
    rc, _, stderr = run_main(cli.main, base_argv(image_folder, workdir, "--init", run_a.workdir, "--resume"))
    assert rc == 2
    assert str(workdir / "checkpoints" / "latest") in stderr and "Traceback" not in stderr


def test_resume_with_another_config_is_refused(run_a):
    before = {p: p.read_bytes() for p in (run_a.workdir / "config.json", run_a.workdir / "metrics.jsonl")}
    argv = [*run_a.argv, "--resume", "--lr", "0.01"]
    rc, _, stderr = run_main(cli.main, argv)
    assert rc == 2
    assert "different config (lr)" in stderr and "Traceback" not in stderr
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten


# ------------------------------------------------------------------------------------------ 7. bad inputs

@pytest.mark.parametrize("case", ["variant", "batch", "resolution", "missing_folder", "width_with_weights", "std",
                                  "test_split_only"])
def test_bad_inputs_exit_2(case, trainer_env, image_folder, tmp_path):
    workdir = tmp_path / "w"
    argv = base_argv(image_folder, workdir, "--init", "scratch")
    expect = {"variant": ["b9", *VARIANTS], "batch": [str(N_TRAIN), "64"], "resolution": ["16", "32"],
              "missing_folder": ["/nonexistent/images", "does not exist"],
              "width_with_weights": ["--width/--depth", "--init imagenet"],
              "std": ["--input-std '0.2,0,0.2'", "three numbers", "all > 0"],
              "test_split_only": ["no training images, only a test split", "train/<class>/",
                                  f"--dataset folder:{tmp_path / 'tests'} --split test"]}[case]
    if case == "variant":
        argv += ["--variant", "b9"]
    elif case == "batch":
        argv += ["--batch-size", 64]
    elif case == "resolution":
        argv += ["--resolution", 16]
    elif case == "width_with_weights":
        argv += ["--init", "imagenet", "--width", 0.5]
    elif case == "std":
        argv += ["--input-std", "0.2,0,0.2"]
    elif case == "test_split_only":  # a test set: train.py cannot use it, and says what to do with it
        shutil.copytree(image_folder, tmp_path / "tests" / "test")
        argv[1] = f"folder:{tmp_path / 'tests'}"
    else:
        argv[1] = "folder:/nonexistent/images"
    rc, stdout, stderr = run_main(cli.main, argv)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")  # one message, no traceback
    for text in expect:
        assert text in stderr
    assert not (workdir / "checkpoints").exists()


def test_v2_imagenet_init_offline_names_the_file(trainer_env, image_folder, tmp_path, monkeypatch):
    """`--variant v2_s --init imagenet` without network (a closed local port) and with an empty torch hub cache:
    exit 2 with the one weights message, naming torchvision's V2-S file and where to put it."""
    monkeypatch.setenv(weights.URL_ENV_VAR, f"http://127.0.0.1:{unused_port()}/models")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    workdir = tmp_path / "w"
    argv = base_argv(image_folder, workdir, "--variant", "v2_s", "--init", "imagenet")
    rc, stdout, stderr = run_main(cli.main, argv)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: Could not download ")
    path = tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth"
    assert f"/models/{path.name}" in stderr and str(path) in stderr and "--init PATH.pth" in stderr
    assert not path.exists() and not (workdir / "checkpoints").exists()


# ------------------------------------------------ 4, 5, 8. --init imagenet (local server), head-only, cosine

@pytest.fixture(scope="module")
def run_d(trainer_env, image_folder, tmp_path_factory):
    """A torchvision efficientnet_b0 state dict (random weights; the BN running statistics randomized too)
    served over HTTP as the b0 ImageNet file; `--init imagenet --freeze head-only --head-init uniform`, 2 epochs
    of 5 steps, warmup 1.25 epochs (floor(6.25) = 6 steps) then cosine."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.models")
    root = tmp_path_factory.mktemp("imagenet")
    torch.manual_seed(0)
    model = tv.efficientnet_b0()
    with torch.no_grad():  # every BN's statistics randomized: the features depend on the input (as trained ones do)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    content = buf.getvalue()
    name = f"efficientnet_b0_fake-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    (root / "served" / "mirror").mkdir(parents=True)
    (root / "served" / "mirror" / name).write_bytes(content)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items() if v.dtype == torch.float32}

    workdir = root / "d"
    argv = base_argv(image_folder, workdir, "--init", "imagenet", "--freeze", "head-only", "--epochs", 2,
                     "--warmup-epochs", 1.25, "--max-train-examples", 20,
                     "--head-init", "uniform",  # logits far from 0: the resolution test compares losses
                     "--resolution", 48, "--resolution-schedule", "32:1")  # progressive: epoch 1 at 32 px
    with serve_folder(root / "served") as (url, requests):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(weights.URL_ENV_VAR, f"{url}/mirror/")
            mp.setenv("TORCH_HOME", str(root / "torch"))
            mp.setitem(weights.WEIGHTS, "b0", dataclasses.replace(
                weights.WEIGHTS["b0"], file_name=name, url=f"{weights.DEFAULT_BASE_URL}/{name}"))
            run = Run(workdir, argv, *run_main(cli.main, argv))
            assert run.rc == 0, run.stderr
            requests_after_run = list(requests)
            cfg = cli.parse_args([str(a) for a in argv])
            initial = trainer.initial_variables(cfg, len(CLASSES), jax.random.fold_in(jax.random.key(cfg.seed), 1))[0]
    run.metrics = read_metrics(workdir)
    run.extra = dict(name=name, content=content, sd=sd, requests=requests_after_run, all_requests=requests,
                     checkpoints=root / "torch" / "hub" / "checkpoints", initial=jax.device_get(initial))
    return run


def test_imagenet_init_downloads_into_torch_hub_cache(run_d):
    x = run_d.extra
    assert x["requests"] == [f"/mirror/{x['name']}"]
    assert x["all_requests"] == x["requests"]  # the reference init read the cached file
    assert sorted(p.name for p in x["checkpoints"].iterdir()) == [x["name"]]
    assert (x["checkpoints"] / x["name"]).read_bytes() == x["content"]
    summary = last_json(run_d.stdout)
    assert summary["init"] == "imagenet" and summary["n_train"] == 20 and summary["n_val"] == N_VAL


def test_head_only_freezes_everything_but_the_classifier(run_d):
    tree, meta = restore_checkpoint(run_d.workdir / "checkpoints" / "latest")
    assert meta["epoch"] == 2 and int(tree["step"]) == 2 * (20 // BATCH)
    initial = run_d.extra["initial"]
    params, init_params = flat(tree["params"]), flat(initial["params"])
    assert params.keys() == init_params.keys()
    frozen = [k for k in params if not k.startswith("classifier/")]
    assert len(frozen) > 200
    changed = [k for k in frozen if not np.array_equal(params[k], init_params[k])]
    assert changed == []
    assert not np.array_equal(params["classifier/kernel"], init_params["classifier/kernel"])
    assert not np.array_equal(params["classifier/bias"], init_params["classifier/bias"])
    stats, init_stats = flat(tree["batch_stats"]), flat(initial["batch_stats"])
    assert stats.keys() == init_stats.keys()
    assert [k for k in stats if not np.array_equal(stats[k], init_stats[k])] == []  # BN in inference mode
    # the backbone is the torch file's, unchanged: stem conv (OIHW -> HWIO) and the stem BN's statistics
    sd = run_d.extra["sd"]
    np.testing.assert_array_equal(params["stem/kernel"], sd["features.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["stem_bn/mean"], sd["features.0.1.running_mean"])
    np.testing.assert_array_equal(stats["stem_bn/var"], sd["features.0.1.running_var"])


def test_progressive_resolution(run_d):
    """`--resolution-schedule 32:1 --resolution 48`: epoch 1 trains and validates at 32 px, epoch 2 (and the
    accuracy before fine-tuning, and `evaluate`) at 48; only --resolution epochs compete for checkpoints/best."""
    assert [r["resolution"] for r in run_d.metrics] == [48, 32, 48]
    assert step_dirs(run_d.workdir / "checkpoints" / "best") == ["2"]
    rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", run_d.workdir])
    assert rc == 0, stderr
    assert last_json(stdout)["top1"] == run_d.metrics[2]["val_acc"]


def test_evaluate_at_another_resolution_matches_torch(run_d):
    """`evaluate --resolution 32` on a run whose best checkpoint was validated at 48 px scores the validation
    images at their own 32 px. Reference: torchvision's efficientnet_b0 with the served backbone (`--freeze
    head-only` left it unchanged, BN in inference mode) and the checkpoint's classifier, on the same images."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.models")
    rc, stdout, stderr = run_main(evaluate_cli.main, ["--workdir", run_d.workdir, "--resolution", "32"])
    assert rc == 0, stderr
    out = last_json(stdout)
    assert (out["resolution"], out["n"], out["epoch"]) == (32, N_VAL, 2)
    saved = json.loads((run_d.workdir / "config.json").read_text())
    val = trainer.load_data(TrainConfig.from_saved(saved)).val
    model = tv.efficientnet_b0()
    model.load_state_dict(torch.load(io.BytesIO(run_d.extra["content"])))
    tree, _ = restore_checkpoint(run_d.workdir / "checkpoints" / "best")
    head = flat(tree["params"])
    model.classifier[1] = torch.nn.Linear(1280, len(CLASSES))
    with torch.no_grad():
        model.classifier[1].weight.copy_(torch.from_numpy(np.array(head["classifier/kernel"]).T))
        model.classifier[1].bias.copy_(torch.from_numpy(np.array(head["classifier/bias"])))
    x = (np.asarray(val.images, np.float32) / 255.0 - np.asarray(saved["input_mean"], np.float32)) / np.asarray(
        saved["input_std"], np.float32)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).double()
    labels = torch.from_numpy(np.asarray(val.labels, np.int64))
    assert abs(logits).max() > 0.1  # the head (torchvision's uniform init) makes the loss depend on the input
    assert out["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
    assert out["top1"] == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))
    _, stdout48, _ = run_main(evaluate_cli.main, ["--workdir", run_d.workdir])
    assert last_json(stdout48)["resolution"] == 48 and last_json(stdout48)["loss"] != pytest.approx(out["loss"])


def test_cosine_schedule_lr(run_d):
    """Logged lr at epoch e = the closed-form warmup-cosine at its last step e * 5 - 1 (warmup 6, total 10)."""
    steps, peak = 20 // BATCH, 1e-3
    warmup, total = int(1.25 * steps), 2 * steps
    assert warmup == 6
    lrs = [r["lr"] for r in run_d.metrics[1:]]
    assert lrs == pytest.approx([warmup_cosine(e * steps - 1, peak, warmup, total) for e in (1, 2)], rel=1e-6)
    assert lrs[0] == pytest.approx(peak * 4 / 6, rel=1e-6)  # in the warmup
    assert lrs[1] == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * 3 / 4)), rel=1e-6)  # decaying


# ---------------------------------------------------------------------------------------- 6. two devices

def test_two_device_step_equals_one_device_step(sharded_proc):
    stdout, stderr = sharded_proc.communicate(timeout=600)
    assert sharded_proc.returncode == 0, stderr[-3000:]
    r = last_json(stdout)
    assert r["device_count"] == 2 and r["count"] == [8.0, 8.0] and r["correct"][0] == r["correct"][1]
    assert r["params_moved"] > 1e-3 and r["batch_stats_moved"] > 1e-2  # the step did something
    assert r["params_diff"] <= 1e-6
    assert r["batch_stats_rel_diff"] <= 1e-5
    assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables: Linux only")
def test_with_fast_malloc_restarts_once_with_huge_page_malloc(monkeypatch):
    """`with_fast_malloc()` re-executes the process (same interpreter flags and arguments) with glibc's
    `malloc.hugetlb=1` added to GLIBC_TUNABLES, once; not when it is there already or when turned off."""
    calls = []
    monkeypatch.setattr(host.os, "execve", lambda *a: calls.append(a))
    monkeypatch.delenv("EFFNET_JAX_NO_REEXEC", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    host.with_fast_malloc()
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])   # the restarted process
    host.with_fast_malloc()
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    monkeypatch.setenv("EFFNET_JAX_NO_REEXEC", "1")
    host.with_fast_malloc()
    assert len(calls) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables: Linux only")
@pytest.mark.parametrize("script", ["train.py", "benchmarks/throughput.py", "benchmarks/epoch.py"])
def test_entry_points_restart_with_huge_page_malloc(script, tmp_path):
    """The scripts users run for speed call `with_fast_malloc()` under `__main__`: started without the
    tunable, the process that prints --help has it (read from /proc/self/environ via a sitecustomize)."""
    probe = tmp_path / "sitecustomize.py"
    probe.write_text("import atexit, os\natexit.register(lambda: print('TUNABLES=' + "
                     "os.environ.get('GLIBC_TUNABLES', '')))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "EFFNET_JAX_NO_REEXEC")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(REPO / script), "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TUNABLES=glibc.malloc.hugetlb=1" in out.stdout.splitlines()


def test_checkpoint_managers_synchronize_under_names_of_their_own(tmp_path):
    """With several processes orbax synchronizes each save with fixed barrier names; the 'latest' and 'best'
    managers both save at an epoch's end, and with shared names one's save met the other's background end on the
    same barrier ("... set_value_start is already ongoing"): two-process runs failed or hung at an epoch's end in 2
    of 4 runs of 8 epochs, 0 of 6 with names of their own (benchmarks/results/devices.md, 2026-12-06)."""
    from effnet_jax.train.rundir import RunDir

    latest, best = RunDir(tmp_path).managers()
    prefixes = [m.manager._options.multiprocessing_options.barrier_sync_key_prefix for m in (latest, best)]
    assert all(prefixes) and len(set(prefixes)) == 2
    latest.close()
    best.close()
