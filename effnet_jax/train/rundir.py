"""A fine-tuning run's directory: its layout, and the reading and writing of each part.

    RUN/config.json          the run's TrainConfig (`TrainConfig.to_saved`), plus model_overrides, num_classes
    RUN/class_names.json     the class names, in label order
    RUN/metrics.jsonl        one record per epoch; the first (epoch 0) is the accuracy before fine-tuning
    RUN/curves.png           loss and accuracy per epoch
    RUN/summary.json         the run's summary (also the last stdout line of train.py)
    RUN/checkpoints/latest   orbax CheckpointManager: the two newest states (epoch ends, --checkpoint-every, a stop)
    RUN/checkpoints/best     orbax CheckpointManager: the state of the best validation top-1
    RUN/checkpoints/set-aside/{latest,best}/STEP   steps a resumed run moved out of orbax's sight (unreadable, or
                             of epochs it redoes); never deleted by the code
    RUN/run.lock             held (fcntl.flock) by the run's process 0 while it runs; names its host and PID

A checkpoint holds the train state as a tree ({'step', 'params', 'batch_stats', 'opt_state', 'rng',
'epoch_sums'} and 'ema' when the run keeps an EMA) and a JSON meta ({'epoch', 'batches_done', 'val_top1'}).
Each finished step directory gets a `SHA256SUMS` (the `sha256sum` format) once its save is complete, and every
restore checks the step's files against it before orbax reads them: orbax itself does not notice every damaged
file (a corrupt `_sharding` went through). `evaluation_variables` says which weights a run is evaluated with: the
EMA when it keeps one.

A directory holding any of config.json, metrics.jsonl, summary.json or checkpoints/ holds a run: a new run
(without --resume) refuses it, or with --overwrite first moves its contents aside to `RUN.old-<UTC time>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effnet_jax.errors import CheckpointReadError, ConfigError, UserError, describe

CONFIG = "config.json"
CLASS_NAMES = "class_names.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_KINDS = ("latest", "best")
LOCK = "run.lock"
MANIFEST = "SHA256SUMS"
SET_ASIDE = "set-aside"
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINTS)  # any of them: the directory holds a run
KEEP_LATEST = 2  # the newest step and the one before, to fall back on when the newest does not read back


class CheckpointSaveError(UserError):
    """A checkpoint save failed (a full disk, say); the steps saved before it are kept."""


def evaluation_variables(params: Any, batch_stats: Any, ema: Mapping | None = None) -> dict:
    """The variables a run is evaluated with (validation, `evaluate`, `predict`, `export`): its parameter EMA
    ({'params', 'batch_stats'}) when it keeps one, else the parameters and BatchNorm statistics."""
    return dict(ema) if ema is not None else {"params": params, "batch_stats": batch_stats}


class RunDir:
    """The directory of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.path)!r})"

    def file(self, name: str) -> pathlib.Path:
        return self.path / name

    def checkpoints(self, which: str) -> pathlib.Path:
        """The orbax CheckpointManager directory of `which` ('latest' or 'best')."""
        if which not in CHECKPOINT_KINDS:
            raise ConfigError(f"the checkpoint must be one of {', '.join(CHECKPOINT_KINDS)}, got {which!r}")
        return self.path / CHECKPOINTS / which

    @staticmethod
    def holds_run(path: str | os.PathLike) -> bool:
        """Whether `path` looks like a run directory (a config.json and a checkpoints/ folder)."""
        p = pathlib.Path(path)
        return (p / CONFIG).is_file() and (p / CHECKPOINTS).is_dir()

    # ---------------------------------------------------------------------------------------------- files

    def check_writable(self, flag: str = "--workdir") -> None:
        """A clear error now rather than a traceback from orbax or matplotlib after the first epoch."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"{flag} {self.path} is not writable: {e.strerror or e}") from None

    def read_config(self) -> dict:
        if not self.file(CONFIG).exists():
            raise UserError(f"{self.path}: no {CONFIG}; not a training run directory")
        return json.loads(self.file(CONFIG).read_text())

    def write_config(self, config: Mapping) -> None:
        self.file(CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def read_class_names(self) -> list[str]:
        if not self.file(CLASS_NAMES).exists():
            raise UserError(f"{self.path}: no {CLASS_NAMES}; not a complete training run directory")
        return json.loads(self.file(CLASS_NAMES).read_text())

    def write_class_names(self, names: Sequence[str]) -> None:
        self.file(CLASS_NAMES).write_text(json.dumps(list(names)) + "\n")

    def read_metrics(self, up_to_epoch: int | None = None) -> list[dict]:
        """The epoch records of metrics.jsonl (those up to `up_to_epoch` when given: a resumed run's)."""
        records = [json.loads(line) for line in self.file(METRICS).read_text().splitlines()]
        return [r for r in records if up_to_epoch is None or r["epoch"] <= up_to_epoch]

    def write_metrics(self, records: Sequence[dict]) -> None:
        """metrics.jsonl (rewritten whole, so a resumed run's file ends where its checkpoint does) and curves.png."""
        with open(self.file(METRICS), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        plot_curves(records, self.file(CURVES))

    def write_summary(self, summary: Mapping) -> None:
        self.file(SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    def check_resume(self, config: Mapping, upgrade: Callable[[dict], dict], ignored: Iterable[str]) -> None:
        """Refuse `--resume` when there is no finished checkpoint, or when the saved config.json, read into
        today's layout by `upgrade` (which also fills the keys the saved run predates), differs from `config` in
        a key outside `ignored`."""
        latest = self.checkpoints("latest")
        if not finished_steps(latest):
            raise UserError(f"--resume: no checkpoint in {latest}")
        if not self.file(CONFIG).exists():
            return
        old = upgrade(self.read_config())
        ignored = set(ignored)
        diff = {k for k in config if k not in ignored and old.get(k) != config[k]}
        if diff:
            raise ConfigError(f"--resume: the run in {self.path} has a different config ({', '.join(sorted(diff))})")

    # ---------------------------------------------------------------------------------------------- checkpoints

    def managers(self) -> tuple["Saver", "Saver"]:
        """The (latest, best) savers: latest keeps the KEEP_LATEST newest steps, best one, chosen by meta 'val_top1'.

        Each has barrier names of its own (`barrier_sync_key_prefix`): with several processes orbax synchronizes
        every save with fixed barrier names, and a save of one manager overlapping the background end of the
        other's (both save at an epoch's end) then waited on the same barrier twice ("Barrier
        ThreadSaveMultiHostValueHolder:set_value_start is already ongoing"), which ended a two-process run."""
        def options(name: str, **kwargs) -> ocp.CheckpointManagerOptions:
            return ocp.CheckpointManagerOptions(
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name), **kwargs)
        return (Saver(self.checkpoints("latest"), options("latest", max_to_keep=KEEP_LATEST)),
                Saver(self.checkpoints("best"),
                      options("best", max_to_keep=1, best_fn=lambda m: m["val_top1"], best_mode="max")))

    def restore(self, which: str, target: dict | None = None) -> tuple[dict, dict]:
        """(state tree, meta) of the newest checkpoint of `which`; see `restore_checkpoint`."""
        return restore_checkpoint(self.checkpoints(which), target)

    def set_aside(self, which: str, step: int) -> pathlib.Path:
        """Move step `step` of checkpoints/`which` to checkpoints/set-aside/`which`/ (another name when taken), out
        of orbax's sight: a resumed run saves that step number again, and orbax refuses a step that exists."""
        dest = unused(self.path / CHECKPOINTS / SET_ASIDE / which / str(step))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.checkpoints(which) / str(step), dest)
        return dest


class Saver:
    """An orbax CheckpointManager that saves one kind of a run's checkpoints, asynchronously as orbax does, and
    writes each finished step's SHA256SUMS once its save is complete: when the next save starts, or on `close`.
    A save that fails raises `CheckpointSaveError` there, naming the step that is kept."""

    def __init__(self, directory: pathlib.Path, options: ocp.CheckpointManagerOptions):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.pending: int | None = None  # the step in flight
        # a background save that fails is logged by orbax's thread, traceback and all, before `finish` raises
        # the one-line CheckpointSaveError that says it: those records are dropped while this saver lives
        self.hush = OrbaxErrorFilter()
        logging.getLogger("absl").addFilter(self.hush)

    def save(self, step: int, tree: dict, meta: dict, **kwargs) -> None:
        """One checkpoint: the state tree and its JSON meta (kwargs: orbax's, e.g. metrics for the best manager)."""
        self.finish()
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                            meta=ocp.args.JsonSave(meta)), **kwargs)
        except Exception as e:  # noqa: BLE001 — orbax's and the file system's errors alike: the save did not happen
            raise self.failed(step, e) from e
        self.pending = step

    def finish(self) -> None:
        """Wait for the save in flight, then write its SHA256SUMS (process 0; a step the best manager saved and
        dropped at once, as not better, has no directory)."""
        step, self.pending = self.pending, None
        try:
            with quiet_absl():  # (orbax logs the failure with its traceback; CheckpointSaveError says it in a line)
                self.manager.wait_until_finished()
            if step is not None and jax.process_index() == 0 and (self.directory / str(step)).is_dir():
                write_manifest(self.directory / str(step))
        except Exception as e:  # noqa: BLE001
            raise self.failed(step, e) from e

    def failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
        """The error for a failed save of `step`: what failed, which step is kept and whether it reads back."""
        kept = [s for s in finished_steps(self.directory) if s != step]
        if kept:
            try:
                verify_step(self.directory / str(kept[-1]))
                left = f"step {kept[-1]} is kept and intact"
            except CheckpointReadError as e:
                left = f"step {kept[-1]} is kept but does not verify ({e})"
        else:
            left = "no earlier step is kept"
        return CheckpointSaveError(f"saving step {step} into {self.directory} failed ({describe(error)}); {left}; "
                                   "fix the cause (free disk space, ...) and continue with the same flags and "
                                   "--resume")

    def close(self) -> None:
        try:
            self.finish()
        finally:
            with quiet_absl():
                self.manager.close()
            logging.getLogger("absl").removeFilter(self.hush)

    def __enter__(self) -> "Saver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OrbaxErrorFilter(logging.Filter):
    """Drops orbax's ERROR records (a failed background save, logged with its traceback by the saving thread):
    `Saver.finish` raises them as one CheckpointSaveError line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def existing_run(path: str | os.PathLike, flag: str = "--workdir") -> RunDir:
    """The run directory at `path`, or a UserError naming `flag` when there is none."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    if not RunDir.holds_run(path):
        raise UserError(f"{flag} {path}: not a training run directory (no {CONFIG} and {CHECKPOINTS}/)")
    return RunDir(path)


# ---------------------------------------------------------------------------------------------- one run per directory

def run_files(path: str | os.PathLike) -> list[str]:
    """The files of a run that `path` holds, of RUN_FILES (checkpoints/ with its slash)."""
    p = pathlib.Path(path)
    return [name + ("/" if name == CHECKPOINTS else "") for name in RUN_FILES if (p / name).exists()]


def unused(path: pathlib.Path) -> pathlib.Path:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def aside_path(path: pathlib.Path) -> pathlib.Path:
    """Where --overwrite moves the run in `path`: the sibling `<path>.old-<UTC time>` (another name when taken)."""
    p = path if path.name not in ("", ".", "..") else path.resolve()
    return unused(p.with_name(f"{p.name}.old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"))


def make_room(path: pathlib.Path, overwrite: bool) -> pathlib.Path | None:
    """A new run's rule for its directory: when `path` holds a run (`run_files`), refuse it in one line naming the
    ways on, or with `overwrite` move everything in it but the lock file into `aside_path(path)` (never deleted:
    the user removes it) and return that path."""
    found = run_files(path)
    if not found:
        return None
    if not overwrite:
        raise UserError(f"--workdir {path} holds a run ({', '.join(found)}): continue it with --resume, choose another "
                        "--workdir, or pass --overwrite to move it aside (to "
                        f"{path.name or path.resolve().name}.old-<UTC time>) and start afresh")
    dest = aside_path(path)
    dest.mkdir()
    for entry in sorted(path.iterdir()):
        if entry.name != LOCK:
            os.rename(entry, dest / entry.name)
    return dest


def lock_holder(fd: int) -> str:
    """'process PID on host HOST' from a lock file that another process holds (it writes that just after it takes
    the lock: a moment's wait for it)."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.05)
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on host {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
    """Hold `path`/run.lock for the block: an exclusive `fcntl.flock`, which the OS drops when the process ends
    however it ends, so that a killed run leaves no lock behind (the file stays; only a live holder counts). A
    second holder is refused in one line naming the first's host and PID. (`flock` works on local file systems
    and, on Linux, on NFS, where it becomes a POSIX lock.)"""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--workdir {path} is not writable: cannot create {lock}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--workdir {path} is in use by another run ({lock_holder(fd)}, {lock}); wait for it to "
                            "end or stop it, or choose another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n").encode())
        yield
    finally:
        os.close(fd)  # (releases the lock)


@contextlib.contextmanager
def claim(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Iterator[pathlib.Path | None]:
    """A run's hold on its directory, for the block (process 0: the others write nothing of their own): create it,
    lock it (`locked`), and unless resuming apply the used-directory rule (`make_room`). Yields where an earlier
    run was moved, or None."""
    run = RunDir(path)
    run.check_writable()
    with locked(run.path):
        yield None if resume else make_room(run.path, overwrite)


# ---------------------------------------------------------------------------------------------- verified steps

def finished_steps(directory: str | os.PathLike) -> list[int]:
    """The finished steps of an orbax CheckpointManager directory, oldest first. (A digits-only name is a finished
    save; an interrupted one is left as N.orbax-checkpoint-tmp*.)"""
    d = pathlib.Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()) if d.is_dir() else []


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: pathlib.Path) -> None:
    """SHA256SUMS of a finished step: every file's SHA-256 in `sha256sum` format (`sha256sum -c SHA256SUMS` in the
    step's directory checks it by hand too), written to a temporary file and renamed."""
    files = sorted(f for f in step_dir.rglob("*") if f.is_file() and f.name != MANIFEST)
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text("".join(f"{_sha256(f)}  {f.relative_to(step_dir).as_posix()}\n" for f in files))
    os.replace(tmp, step_dir / MANIFEST)


def verify_step(step_dir: pathlib.Path) -> None:
    """Check a step's files against its SHA256SUMS: CheckpointReadError naming the first file missing or
    different. A step without one (saved by an older version, or killed between its save and its SHA256SUMS) is
    left to orbax's own checks when it is read."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return
    try:
        entries = [line.split("  ", 1) for line in manifest.read_text().splitlines()]
        if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
            raise ValueError("not lines of SHA-256 and file name")
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{MANIFEST} unreadable: {describe(e)}") from None
    for digest, name in entries:
        f = step_dir / name
        if not f.is_file():
            raise CheckpointReadError(f"{name}: missing")
        if _sha256(f) != digest:
            raise CheckpointReadError(f"{name}: checksum mismatch")


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """absl's logger (orbax's) quiet but for CRITICAL in the block: orbax logs, with its tracebacks, what the
    one-line errors here say (and warns that a step read without its manager has no step-level metadata)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _read_step(directory: pathlib.Path, step: int, target: dict | None) -> tuple[dict, dict]:
    """(tree, meta) of one step, verified, read with a checkpointer of its own (no manager: one that lists the
    directory would read the other steps too, the damaged ones included)."""
    step_dir = directory / str(step)
    verify_step(step_dir)
    with quiet_absl():
        if target is None:
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(step_dir / "state").item_metadata
            here = NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",)), P())
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as reader:
            out = reader.restore(step_dir, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def restore_checkpoint(directory: str | os.PathLike, target: dict | None = None, step: int | None = None
                       ) -> tuple[dict, dict]:
    """(state tree, meta) of checkpoint `step` (default: the newest) under an orbax CheckpointManager directory,
    its files checked first (`verify_step`). Without `target` the tree is restored as saved, replicated on this
    process's devices (the saving run may have had others). A step that fails its checks or that orbax cannot
    read raises CheckpointReadError, in one line."""
    directory = pathlib.Path(directory).absolute()
    if step is None:
        steps = finished_steps(directory)
        if not steps:
            raise UserError(f"{directory}: no checkpoint")
        step = steps[-1]
    try:
        return _read_step(directory, step, target)
    except CheckpointReadError as e:
        raise CheckpointReadError(f"{directory} step {step} is unreadable ({e})") from None
    except Exception as e:  # noqa: BLE001 — orbax's and tensorstore's errors for a damaged step
        raise CheckpointReadError(f"{directory} step {step} is unreadable ({describe(e)})") from None


def restore_readable(directory: str | os.PathLike, target: dict | None = None
                     ) -> tuple[dict, dict, int, list[tuple[int, str]]]:
    """The newest checkpoint under `directory` that reads back: (tree, meta, its step, [(step, why)] of the newer
    ones that did not). CheckpointReadError naming every step and why when none does."""
    directory = pathlib.Path(directory).absolute()
    bad: list[tuple[int, str]] = []
    for step in reversed(finished_steps(directory)):
        try:
            tree, meta = _read_step(directory, step, target)
            return tree, meta, step, bad
        except Exception as e:  # noqa: BLE001 — as in restore_checkpoint
            bad.append((step, str(e) if isinstance(e, CheckpointReadError) else describe(e)))
    if not bad:
        raise UserError(f"{directory}: no checkpoint")
    raise CheckpointReadError(f"no readable checkpoint in {directory}: "
                              + "; ".join(f"step {s} ({why})" for s, why in bad))


def plot_curves(records: Sequence[dict], path: pathlib.Path) -> None:
    """Loss and accuracy (train and validation) per epoch, as a PNG. (A `Figure` of its own, not pyplot: the
    caller's matplotlib backend and open figures, in a notebook say, are left alone.)"""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    ep = [r["epoch"] for r in records]
    fig = Figure(figsize=(11, 4))
    a1, a2 = fig.subplots(1, 2)
    tr = [r for r in records if r.get("train_loss") is not None]
    a1.plot([r["epoch"] for r in tr], [r["train_loss"] for r in tr], "o-", label="train")
    a1.plot(ep, [r["val_loss"] for r in records], "o-", label="validation")
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a2.plot([r["epoch"] for r in tr], [100 * r["train_acc"] for r in tr], "o-", label="train")
    a2.plot(ep, [100 * r["val_acc"] for r in records], "o-", label="validation")
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # (epochs: no 0.25 ticks)
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
