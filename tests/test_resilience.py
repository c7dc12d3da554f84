"""Scale-out, killed runs and bad inputs (`train.py` as a user runs it, in subprocesses).

* Two processes on 127.0.0.1 (`jax.distributed`, 2 CPU devices each, reading the images with `--stream`)
  against one process with 4 devices and the images on them (this one starts from the Lite0 ImageNet weights
  and trains its top 6 blocks, 2 steps): with SGD the same final parameters (≤ 1e-6; BN statistics ≤ 1e-5
  relative) and the same metrics (≤ 1e-6); with AdamW, the default, whose first steps turn rounding-level
  gradients into steps of about lr, parameters within lr, losses within 1e-4 and the same accuracies (what the
  docs/devices.md claims for each).
* A run killed with SIGKILL mid-epoch (while it saves a checkpoint every step) and resumed ends bit-identical
  to an uninterrupted run; SIGTERM saves a checkpoint and exits 143, and that run resumed ends the same too
  (this one reads the images with `--stream`, against a reference that holds them); an interrupted orbax save
  (its temporary directory) does not hide the previous checkpoint. SIGTERM / SIGINT while the data loads
  (before the first step: nothing to save) stop the run at once.
* Bad inputs: one `error: ...` line, exit 2, no traceback, no checkpoint lost.
* No run is lost (issue 41): a --workdir holding a run is refused without --resume (nothing touched) and moved
  aside with --overwrite; a second run into a directory in use is refused in seconds naming the first, which
  ends as a run alone does; a SIGKILLed holder leaves no lock; a damaged newest step (data, _METADATA, _sharding,
  a truncated or a missing file) is caught by its SHA256SUMS and the run resumes from the step before, ending as
  the uninterrupted run; every step damaged, or a damaged best for evaluate / predict / export: one line, exit
  2; a save that fails (ENOSPC injected) keeps the step before, and --resume goes on from it.

The data is a small folder of real CIFAR-10 JPEGs (from ../shared/data); the model lite0 scaled down to a
quarter of its width and depth (random weights, `--init` from a model directory: the killed-run tests do not
depend on the network's size; XLA compiled the small one's train step in 15 s, full lite0's in 25 s) at 32 px,
SGD (linear in the gradient: see tests/test_train.py on Adam's first step). The subprocesses share JAX's
persistent compilation cache, so a step is compiled once per device layout and schedule.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from effnet_jax.train.config import TrainConfig
from effnet_jax.errors import CheckpointReadError
from effnet_jax.train.rundir import restore_checkpoint, restore_readable
from helpers import REPO, cifar_jpegs, last_json, load_train_cli, read_metrics, run_main, unused_port

CLASSES, PER_CLASS = 4, 10                    # 40 images: 32 train, 8 validation (val fraction 0.2)
STEPS_PER_EPOCH, EPOCHS = 32 // 4, 2
BASE = ["--variant", "lite0", "--init", "scratch", "--resolution", "32", "--batch-size", "4",
        "--eval-batch-size", "8", "--val-fraction", "0.2", "--epochs", str(EPOCHS), "--optimizer", "sgd",
        "--lr", "0.01", "--freeze", "none", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience_env")
    e = dict(os.environ, JAX_PLATFORMS="cpu", EFFNET_JAX_CACHE=str(root / "data_cache"),
             JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    e.pop("XLA_FLAGS", None)
    return e


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_tar) -> pathlib.Path:
    """<class>/NNNN.jpg: the first PER_CLASS training JPEGs of the first CLASSES classes, as in the tarball."""
    root = tmp_path_factory.mktemp("cifar_folder")
    counts: dict[str, int] = {}
    for cls, name, jpeg in cifar_jpegs(cifar_tar):
        if counts.get(cls, 0) >= PER_CLASS or (cls not in counts and len(counts) == CLASSES):
            continue
        counts[cls] = counts.get(cls, 0) + 1
        (root / cls).mkdir(exist_ok=True)
        (root / cls / name).write_bytes(jpeg)
        if sum(counts.values()) == CLASSES * PER_CLASS:
            break
    return root


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> pathlib.Path:
    """A model directory (as `effnet-convert` writes) of lite0 at width and depth 0.25 with
    random weights drawn in numpy (`models.random_variables`), so that nothing is compiled here."""
    from effnet_jax.weights import model_dir as checkpoint
    from effnet_jax import create_model
    from effnet_jax.model.network import random_variables
    overrides = {"width": 0.25, "depth": 0.25}
    directory = tmp_path_factory.mktemp("small_model") / "lite0_w0.25_d0.25"
    checkpoint.save_model(directory, random_variables(create_model("lite0", CLASSES, **overrides), 32),
                          {"variant": "lite0", "num_classes": CLASSES, "overrides": overrides})
    return directory


@pytest.fixture(scope="module")
def base(folder, small_model) -> list[str]:
    """train.py's flags common to the training runs below (the data, the small model)."""
    return [*BASE, "--dataset", f"folder:{folder}", "--init", str(small_model)]


def start(env, base, workdir, *extra, devices=1, before=""):
    """train.py in a subprocess; `before`: Python code to run in it first (a fault to inject), then train.py."""
    e = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [*base, "--workdir", str(workdir), *map(str, extra)]
    if before:  # (no restart with the huge-page malloc: it would drop what `before` did)
        e["EFFNET_JAX_NO_REEXEC"] = "1"
        code = before + f"\nimport runpy, sys\nsys.argv = {['train.py', *args]!r}\n" \
                        f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, str(REPO / "train.py"), *args]
    return subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def run(env, base, workdir, *extra, devices=1, ok=True, before=""):
    proc = start(env, base, workdir, *extra, devices=devices, before=before)
    out, err = proc.communicate(timeout=600)
    if ok:
        assert proc.returncode == 0, err
    return proc.returncode, out, err


def final_state(workdir) -> dict:
    tree, meta = restore_checkpoint(pathlib.Path(workdir) / "checkpoints" / "latest")
    return {"params": tree["params"], "batch_stats": tree["batch_stats"], "opt_state": tree["opt_state"],
            "step": tree["step"], "meta": meta}


def leaves(tree) -> list[np.ndarray]:
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def metrics(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in m.items() if k not in ("time_s", "img_s")} for m in read_metrics(workdir)]


def assert_bit_identical(a_dir, b_dir):
    a, b = final_state(a_dir), final_state(b_dir)
    assert int(a["step"]) == int(b["step"]) == EPOCHS * STEPS_PER_EPOCH
    for name in ("params", "batch_stats", "opt_state"):
        la, lb = leaves(a[name]), leaves(b[name])
        assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb)), name
    assert metrics(a_dir) == metrics(b_dir)


@pytest.fixture(scope="module")
def uninterrupted(env, base, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run(env, base, workdir)
    return workdir


def wait_for(predicate, proc, timeout=300.0, what=""):
    t = time.time()
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def follow(stream) -> list[str]:
    """The lines of a subprocess's pipe, read by a thread as they come (the list grows while the process runs)."""
    lines: list[str] = []

    def read():
        for line in stream:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def saved_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints" / "latest"
    return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()) if d.exists() else []


def lock_pid(workdir) -> int | None:
    """The PID the run directory's lock file names (its last holder), or None without one."""
    lock = pathlib.Path(workdir) / "run.lock"
    return json.loads(lock.read_text())["pid"] if lock.exists() else None


def snapshot(directory) -> dict[str, bytes]:
    """Every file under `directory` (but the lock file), by relative path: its bytes."""
    root = pathlib.Path(directory)
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file() and f.name != "run.lock"}


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of a step (orbax's OCDBT data under state/)."""
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and "/d/" in f.as_posix()),
               key=lambda f: f.stat().st_size)


def damage(step_dir: pathlib.Path, how: str) -> None:
    """Damage one step as a failing disk or a cut copy would: bytes flipped in its largest data file, in its
    array metadata (_METADATA) or its _sharding; the data file cut to half; or the data file gone."""
    if how in ("data", "_METADATA", "_sharding"):
        f = data_file(step_dir) if how == "data" else step_dir / "state" / how
        b = bytearray(f.read_bytes())
        mid = len(b) // 2
        b[mid:mid + 16] = bytes(x ^ 0xFF for x in b[mid:mid + 16])
        f.write_bytes(bytes(b))
    elif how == "truncated":
        f = data_file(step_dir)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing":
        data_file(step_dir).unlink()
    else:
        raise AssertionError(how)


def copy_run(src, dest) -> pathlib.Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("run.lock"))
    return dest


# ------------------------------------------------------------------------------------------ killed runs

def test_sigkill_mid_epoch_then_resume_is_bit_identical(env, base, uninterrupted, tmp_path):
    """The killed run's lock file stays, naming it, and blocks nothing: the resumed run takes it."""
    workdir = tmp_path / "killed"
    proc = start(env, base, workdir, "--checkpoint-every", 1)   # saving nearly all the time
    wait_for(lambda: any(s >= 3 for s in saved_steps(workdir)), proc, what="step 3's checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "summary.json").exists()
    steps = saved_steps(workdir)
    assert steps and max(steps) < EPOCHS * STEPS_PER_EPOCH  # killed before the end
    # the newest two; a third when the kill came between a save's end and orbax removing the oldest
    assert 2 <= len(steps) <= 3, steps
    assert lock_pid(workdir) == proc.pid
    rc, out, err = run(env, base, workdir, "--checkpoint-every", 1, "--resume")
    assert "resumed at epoch" in err and "unreadable" not in err
    assert lock_pid(workdir) not in (None, proc.pid)
    assert_bit_identical(uninterrupted, workdir)
    assert last_json(out)["final_val_acc"] == metrics(uninterrupted)[-1]["val_acc"]


def test_sigterm_saves_then_resume_is_bit_identical(env, base, uninterrupted, tmp_path):
    """The interrupted and the resumed run read the images with --stream (the reference holds them): the
    resumed feed starts at the saved batch, and the streamed step computes what the gathering one does."""
    workdir = tmp_path / "terminated"
    proc = start(env, base, workdir, "--stream")  # no --checkpoint-every: the signal alone makes it save
    err_lines = follow(proc.stderr)
    # the log line `training: ...` comes just before the first step (before it a signal stops at once, below)
    wait_for(lambda: any(line.startswith("training: ") for line in err_lines), proc, what="the training log line")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    time.sleep(0.5)  # the reader thread takes the last lines
    err = "".join(err_lines)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped: interrupted at step" in err and "--resume" in err and "Traceback" not in err
    step = saved_steps(workdir)[-1]
    assert 1 <= step < EPOCHS * STEPS_PER_EPOCH
    tree, meta = restore_checkpoint(workdir / "checkpoints" / "latest")
    assert int(tree["step"]) == step
    assert meta["epoch"] * STEPS_PER_EPOCH + meta.get("batches_done", 0) == step
    run(env, base, workdir, "--resume", "--stream")
    assert_bit_identical(uninterrupted, workdir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_the_data_loads_stops_at_once(env, signum, tmp_path):
    """Before the first step there is nothing to save: SIGTERM / Ctrl-C stop the run at once (they were held
    until training started). The data here cannot finish loading: its one image file is a FIFO that nobody
    writes to, so reading it blocks for ever; the signal comes half a second after the `loading` log line."""
    fifo = tmp_path / "data" / "train" / "cls" / "0.png"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    workdir = tmp_path / "run"
    proc = start(env, [*BASE, "--dataset", f"folder:{tmp_path / 'data'}"], workdir)
    err_lines = follow(proc.stderr)
    try:
        wait_for(lambda: any(line.startswith("loading folder:") for line in err_lines), proc,
                 what="the loading log line")
        time.sleep(0.5)  # blocked in the read by now
        t = time.time()
        proc.send_signal(signum)
        proc.wait(timeout=60)
        seconds = time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)  # the reader thread takes the last lines
    err = "".join(err_lines)
    assert proc.returncode == 128 + signum, err
    assert seconds < 5, seconds
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"stopped: {signal.Signals(signum).name} before the first training step; "
                                    "nothing to save"), err
    assert not any(line.startswith("training: ") for line in err_lines)
    assert not (workdir / "checkpoints").exists()


def test_interrupted_save_leaves_the_previous_checkpoint(env, base, uninterrupted, tmp_path):
    """What a kill during an orbax save leaves (the step's temporary directory, half written) is ignored:
    --resume restores the previous, complete checkpoint."""
    workdir = tmp_path / "half_saved"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / "latest"
    last = saved_steps(workdir)[-1]
    tmp = latest / f"{last + 1}.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(latest / str(last), tmp)
    for f in list(tmp.rglob("*"))[::2]:   # half of it missing
        if f.is_file():
            f.unlink()
    tree, meta = restore_checkpoint(latest)
    assert int(tree["step"]) == last and meta["epoch"] == EPOCHS
    rc, out, err = run(env, base, workdir, "--resume", "--epochs", EPOCHS + 1)
    assert saved_steps(workdir)[-1] == (EPOCHS + 1) * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------- two processes vs one

@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adamw", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_with_four_devices(env, base, tmp_path, optimizer):
    one = tmp_path / "one_process"
    two = tmp_path / "two_processes"
    # the ImageNet weights, a small lr and 2 steps of 8 (2 per device): a well-conditioned start, where float
    # rounding of the reductions stays at rounding level (a scratch net at batch 4 amplifies it chaotically);
    # the top 6 blocks and the head trained, as by default with pretrained weights (their train-mode BN and
    # gradients are reduced across the processes; the frozen part has no backward pass to compile)
    extra = ("--epochs", 1, "--init", "imagenet", "--freeze", 6, "--lr", 1e-3, "--batch-size", 8,
             "--max-train-examples", 16)
    if optimizer == "adamw":  # the default optimizer, with its default lr
        extra += ("--optimizer", "adamw", "--lr", TrainConfig().lr)
    address = f"127.0.0.1:{unused_port()}"
    # the two processes stream the images (each reads its rows of every batch), the single one holds them
    procs = [start(env, base, two, *extra, "--stream", "--coordinator-address", address, "--num-processes", 2,
                   "--process-id", i, devices=2) for i in (0, 1)]
    single = start(env, base, one, *extra, devices=4)
    outs = [p.communicate(timeout=600) for p in (*procs, single)]
    for p, (out, err) in zip((*procs, single), outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2; 2 local / 4 global devices" in outs[1][1]
    a, b = final_state(one), final_state(two)
    assert int(a["step"]) == int(b["step"]) == 2
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a["params"]), leaves(b["params"])))
    # BN running variances reach the hundreds (one float32 ulp there: ~3e-5), and flax computes them as
    # E[x²] - E[x]², which cancels digits: the reduction order of 1 vs 2 processes shows at ~1e-6 relative
    rel = max(float(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))))
              for x, y in zip(leaves(a["batch_stats"]), leaves(b["batch_stats"])))
    ma, mb = metrics(one), metrics(two)
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb] == [0, 1]
    assert all(ra.keys() == rb.keys() for ra, rb in zip(ma, mb))
    mdiff = {k: max(abs(ra[k] - rb[k]) for ra, rb in zip(ma, mb) if ra[k] is not None) for k in ma[0]
             if k != "epoch" and any(r[k] is not None for r in ma)}
    print(f"\n{optimizer}: params max |diff| {diff:.3g}, batch_stats max rel diff {rel:.3g}, metrics max |diff| "
          f"{ {k: float(f'{v:.3g}') for k, v in mdiff.items()} }")
    assert rel <= 1e-5, ("batch_stats", rel)
    if optimizer == "sgd":  # linear in the gradient: the layouts agree to float rounding
        assert diff <= 1e-6, ("params", diff)
        assert max(mdiff.values()) <= 1e-6, mdiff
    else:
        # Adam's first steps move a weight by about lr * sign(g) however small g is: where g is at rounding level
        # (a weight whose gradient is analytically ~0) the layouts move it differently, by up to about lr (measured
        # here: 1.3e-3 and 1.7e-3 at lr 3e-3); the losses stay close (measured: train 2.4e-7 and 0, validation
        # 3.0e-5 and, after BatchNorm's backward pass was written out (001acc9), 1.1e-4: the validation loss sums
        # over the moved weights' effect, so the bound leaves room above one measurement) and the accuracies equal
        assert diff <= TrainConfig().lr, ("params", diff)
        assert max(mdiff["train_loss"], mdiff["val_loss"]) <= 1e-3, mdiff
        assert mdiff["train_acc"] == mdiff["val_acc"] == mdiff["val_top5"] == 0, mdiff
        assert mdiff["lr"] == 0 and mdiff["resolution"] == 0, mdiff
    assert last_json(outs[0][0])["final_val_acc"] == mb[-1]["val_acc"]


# ------------------------------------------------------------------------------------------- bad inputs

def _cli():
    return load_train_cli("train_cli")


def _lite0_file() -> pathlib.Path:
    from effnet_jax.weights import published as weights
    return pathlib.Path(weights.weights_file("lite0", progress=False))


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _bad_input(case: str, folder: pathlib.Path, tmp: pathlib.Path) -> tuple[list, list[str]]:
    """(extra flags, texts the message must contain)."""
    if case == "unknown_dataset":
        return ["--dataset", "no_such_dataset_xyz"], ["no_such_dataset_xyz"]
    if case == "empty_folder":
        (tmp / "empty" / "cls").mkdir(parents=True)
        return ["--dataset", f"folder:{tmp / 'empty'}"], [str(tmp / "empty")]
    if case == "corrupt_image":
        bad = tmp / "corrupt"
        shutil.copytree(folder, bad)
        victim = sorted((bad / sorted(p.name for p in bad.iterdir())[0]).iterdir())[0]
        victim.write_bytes(b"not a jpeg at all")
        return ["--dataset", f"folder:{bad}"], [victim.name, "--on-corrupt"]
    if case == "unwritable_workdir":
        (tmp / "a_file").write_text("")
        return ["--workdir", tmp / "a_file" / "run"], ["not writable", str(tmp / "a_file" / "run")]
    if case == "truncated_weights":
        data = _lite0_file().read_bytes()
        (tmp / "cut.pth").write_bytes(data[: len(data) // 2])
        return ["--init", tmp / "cut.pth"], [str(tmp / "cut.pth"), "truncated or corrupt"]
    if case == "corrupt_weights":
        data = bytearray(_lite0_file().read_bytes())
        data[:64] = os.urandom(64)
        (tmp / "corrupt.pth").write_bytes(bytes(data))
        return ["--init", tmp / "corrupt.pth"], [str(tmp / "corrupt.pth")]
    if case == "weights_of_another_variant":
        return ["--variant", "lite1", "--init", _lite0_file()], ["lite1"]
    if case == "forbidden_pickle_global":
        torch = pytest.importorskip("torch")
        torch.save({"weight": _Evil()}, tmp / "evil.pth")
        return ["--init", tmp / "evil.pth"], [str(tmp / "evil.pth"), "system"]
    raise AssertionError(case)


BAD = ["unknown_dataset", "empty_folder", "corrupt_image", "unwritable_workdir", "truncated_weights",
       "corrupt_weights", "weights_of_another_variant", "forbidden_pickle_global"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_message_exit_2(case, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path / "data_cache"))
    workdir = tmp_path / "run"
    extra, texts = _bad_input(case, folder, tmp_path)
    argv = [*BASE, "--dataset", f"folder:{folder}", "--workdir", str(workdir), *map(str, extra)]
    rc = _cli().main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in texts:
        assert text in err, (text, err)
    assert not (workdir / "checkpoints").exists()


def test_corrupt_image_skipped_by_flag(folder, tmp_path, monkeypatch):
    """--on-corrupt skip goes on without the image (checked at the data level: no training needed)."""
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path / "data_cache"))
    _bad_input("corrupt_image", folder, tmp_path)
    from effnet_jax import data
    ds = data.load_dataset(f"folder:{tmp_path / 'corrupt'}", val_fraction=0.2, on_corrupt="skip")
    assert len(ds.train) + len(ds.val) == CLASSES * PER_CLASS - 1


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(env, base, tmp_path):
    workdir = tmp_path / "nan"
    rc, out, err = run(env, base, workdir, "--lr", "1e30", "--checkpoint-every", 1, "--epochs", 1, ok=False)
    assert rc == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "step" in line[0] and "last good checkpoint" in line[0], err
    steps = saved_steps(workdir)
    if steps:  # a checkpoint saved before the loss went bad holds finite numbers
        tree, _ = restore_checkpoint(workdir / "checkpoints" / "latest")
        assert all(np.all(np.isfinite(x)) for x in leaves(tree["params"]))


# ------------------------------------------------------------------------ no run is lost (issue 41)

@pytest.mark.parametrize("where", ["given", "default"])
def test_a_used_workdir_is_refused_without_resume(where, uninterrupted, base, tmp_path, monkeypatch, capsys):
    """Without --resume, a --workdir holding a run (also the default runs/default) is refused before anything
    loads: one line naming it and the three ways on; every file of the run as it was."""
    monkeypatch.chdir(tmp_path)
    workdir = copy_run(uninterrupted, tmp_path / ("run" if where == "given" else "runs/default"))
    before = snapshot(workdir)
    argv = [*base, *(["--workdir", str(workdir)] if where == "given" else [])]
    t = time.time()
    rc = _cli().main(argv)
    seconds = time.time() - t
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    shown = str(workdir) if where == "given" else "runs/default"
    assert err.startswith(f"error: --workdir {shown} holds a run (config.json, metrics.jsonl, summary.json, "
                          "checkpoints/)"), err
    assert all(way in err for way in ("--resume", "another --workdir", "--overwrite")), err
    assert snapshot(workdir) == before
    assert seconds < 5, seconds


def test_overwrite_moves_the_run_aside_and_a_second_run_is_refused(env, base, uninterrupted, tmp_path):
    """--overwrite moves the run into WORKDIR.old-<UTC time> (byte-identical) and trains afresh; a second run
    started meanwhile, --resume included, exits 2 within seconds naming the first's PID and host; the first ends
    as the uninterrupted run alone did."""
    workdir = copy_run(uninterrupted, tmp_path / "run")
    before = snapshot(workdir)
    first = start(env, base, workdir, "--overwrite")
    err_lines = follow(first.stderr)
    wait_for(lambda: lock_pid(workdir) == first.pid, first, what="the first run's lock")
    t = time.time()
    rc, out, err = run(env, base, workdir, "--resume", ok=False)
    seconds = time.time() - t
    assert rc == 2 and out == "" and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: --workdir {workdir} is in use by another run (process {first.pid} on host "
                           f"{socket.gethostname()}"), err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [line]
    first.wait(timeout=600)
    time.sleep(0.2)  # the reader thread takes the last lines
    assert first.returncode == 0, "".join(err_lines)
    moved = [x.split(" is now in ")[1].strip() for x in err_lines if x.startswith("--overwrite: the run that was in")]
    assert len(moved) == 1 and pathlib.Path(moved[0]).name.startswith("run.old-"), err_lines
    assert snapshot(moved[0]) == before
    assert_bit_identical(uninterrupted, workdir)
    print(f"\nthe second run refused in {seconds:.1f} s")
    assert seconds < 30, seconds


@pytest.mark.parametrize("how", ["data", "_METADATA", "_sharding", "truncated", "missing"])
def test_a_damaged_step_does_not_read_back(how, uninterrupted, tmp_path):
    """Each damage is caught on restore (SHA256SUMS), with the file named; the step before still reads."""
    latest = shutil.copytree(uninterrupted / "checkpoints" / "latest", tmp_path / "latest")
    last = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    damage(latest / str(last), how)
    with pytest.raises(CheckpointReadError, match=f"step {last} is unreadable"):
        restore_checkpoint(latest)
    tree, meta, step, bad = restore_readable(latest)
    assert step == last - STEPS_PER_EPOCH and int(tree["step"]) == step and [s for s, _ in bad] == [last]
    assert ("missing" if how == "missing" else "checksum mismatch") in bad[0][1]


def test_a_damaged_step_without_its_sha256sums_still_fails_in_one_error(uninterrupted, tmp_path):
    """A step without SHA256SUMS (saved by an older version) is left to orbax's checks: its error too becomes
    one CheckpointReadError."""
    latest = shutil.copytree(uninterrupted / "checkpoints" / "latest", tmp_path / "latest")
    last = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    (latest / str(last) / "SHA256SUMS").unlink()
    damage(latest / str(last), "missing")
    with pytest.raises(CheckpointReadError, match=f"step {last} is unreadable"):
        restore_checkpoint(latest)


def test_a_damaged_newest_step_resumes_from_the_one_before(env, base, uninterrupted, tmp_path):
    """Bytes flipped in the newest step's data: --resume warns once, naming the step, resumes from the step
    before (an epoch's end) and ends bit-identical to the uninterrupted run (which equals a run stopped at that
    step and resumed: test_sigkill_... above). The bad step is moved aside, not deleted."""
    workdir = copy_run(uninterrupted, tmp_path / "run")
    last = saved_steps(workdir)[-1]
    damage(workdir / "checkpoints" / "latest" / str(last), "data")
    rc, out, err = run(env, base, workdir, "--resume")
    warnings = [x for x in err.splitlines() if "unreadable" in x]
    assert len(warnings) == 1 and f"checkpoints/latest step {last} is unreadable" in warnings[0], err
    assert f"resuming from step {last - STEPS_PER_EPOCH} (epoch {EPOCHS - 1})" in warnings[0]
    assert "resumed at epoch 2, batch 0" in err
    assert (workdir / "checkpoints" / "set-aside" / "latest" / str(last)).is_dir()
    assert_bit_identical(uninterrupted, workdir)
    restore_checkpoint(workdir / "checkpoints" / "best")


@pytest.mark.parametrize("how", ["data", "_METADATA", "truncated", "missing"])
def test_every_step_damaged_is_one_line_exit_2(how, uninterrupted, base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path / "data_cache"))
    workdir = copy_run(uninterrupted, tmp_path / "run")
    steps = saved_steps(workdir)
    for s in steps:
        damage(workdir / "checkpoints" / "latest" / str(s), how)
    rc = _cli().main([*base, "--workdir", str(workdir), "--resume"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", err
    assert err.startswith("error: --resume: no readable checkpoint in ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(f"step {s} (" in err for s in steps) and "--overwrite" in err, err
    assert saved_steps(workdir) == steps  # nothing moved


def _evaluate(work, images):
    from effnet_jax.cli import evaluate
    return evaluate.main, ["--workdir", work]


def _predict(work, images):
    from effnet_jax.cli import predict
    return predict.main, ["--workdir", work, images]


def _export(work, images):
    from effnet_jax.cli import export
    return export.main, ["--workdir", work, "--format", "stablehlo", "--out", work.parent / "exported"]


@pytest.mark.parametrize("cli", [_evaluate, _predict, _export], ids=["evaluate", "predict", "export"])
def test_a_damaged_best_is_one_checkpoint_read_error(cli, uninterrupted, folder, tmp_path):
    workdir = copy_run(uninterrupted, tmp_path / "run")
    best = workdir / "checkpoints" / "best"
    damage(best / str(max(int(p.name) for p in best.iterdir() if p.name.isdigit())), "data")
    main, argv = cli(workdir, folder)
    rc, out, err = run_main(main, argv)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and "Event loop" not in err, err
    assert err.startswith(f"error: {best.absolute()} step ") and "is unreadable" in err and "--which latest" in err
    from effnet_jax import load
    with pytest.raises(CheckpointReadError):
        load(workdir)


FULL_DISK = textwrap.dedent("""
    import errno
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as h
    save = h.JsonCheckpointHandler._save_fn
    async def full_disk(self, x, directory):  # the meta item of one step's save: no space left
        if "/checkpoints/latest/{step}." in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await save(self, x, directory)
    h.JsonCheckpointHandler._save_fn = full_disk
""")


def test_a_failed_save_keeps_the_step_before_and_resume_goes_on(env, base, uninterrupted, tmp_path):
    """ENOSPC injected into the save of the last step (a copy of the uninterrupted run resumed for one more epoch,
    the step test_interrupted_save_... compiled): exit 2 with one line naming the step kept; that step reads
    back, and --resume continues from it."""
    workdir = copy_run(uninterrupted, tmp_path / "run")
    kept = saved_steps(workdir)
    new = (EPOCHS + 1) * STEPS_PER_EPOCH
    rc, out, err = run(env, base, workdir, "--resume", "--epochs", EPOCHS + 1, ok=False,
                       before=FULL_DISK.format(step=new))
    assert rc == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: saving step {new} into {workdir / 'checkpoints' / 'latest'} failed (OSError: "
                           f"[Errno {errno.ENOSPC}] No space left on device); step {kept[-1]} is kept and intact"), err
    assert "--resume" in line and [x for x in err.splitlines() if x.startswith("error:")] == [line]
    assert saved_steps(workdir) == kept
    tree, meta = restore_checkpoint(workdir / "checkpoints" / "latest")
    assert int(tree["step"]) == kept[-1] and meta["epoch"] == EPOCHS
    rc, out, err = run(env, base, workdir, "--resume", "--epochs", EPOCHS + 1)
    assert f"resumed at epoch {EPOCHS + 1}, batch 0 (step {kept[-1]})" in err
    assert saved_steps(workdir) == [kept[-1], new]
