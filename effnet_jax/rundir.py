"""A fine-tuning run's directory: its layout, and the reading and writing of each part.

    RUN/config.json          the run's TrainConfig, plus model_overrides, num_classes, mean, std, preprocess
    RUN/class_names.json     the class names, in label order
    RUN/metrics.jsonl        one record per epoch; the first (epoch 0) is the accuracy before fine-tuning
    RUN/curves.png           loss and accuracy per epoch
    RUN/summary.json         the run's summary (also the last stdout line of train.py)
    RUN/checkpoints/latest   orbax CheckpointManager: the newest state (epoch ends, --checkpoint-every, a stop)
    RUN/checkpoints/best     orbax CheckpointManager: the state of the best validation top-1

A checkpoint holds the train state as a tree ({'step', 'params', 'batch_stats', 'opt_state', 'rng',
'epoch_sums'} and 'ema' when the run keeps an EMA) and a JSON meta ({'epoch', 'batches_done', 'val_top1'}).
`evaluation_variables` says which weights a run is evaluated with: the EMA when it keeps one.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from .errors import ConfigError, UserError

CONFIG = "config.json"
CLASS_NAMES = "class_names.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_KINDS = ("latest", "best")


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

    def check_resume(self, config: Mapping, defaults: Mapping, ignored: Iterable[str]) -> None:
        """Refuse `--resume` when there is no finished checkpoint, or when the saved config.json differs from
        `config` in a key outside `ignored` (a key the saved run predates counts with its value in `defaults`)."""
        latest = self.checkpoints("latest")
        # (a digits-only name is a finished orbax save; an interrupted one is left as N.orbax-checkpoint-tmp-*)
        if not any(d.name.isdigit() for d in latest.glob("*")):
            raise UserError(f"--resume: no checkpoint in {latest}")
        if not self.file(CONFIG).exists():
            return
        old = self.read_config()
        ignored = set(ignored)
        diff = {k for k in config if k not in ignored and old.get(k, defaults.get(k)) != config[k]}
        if diff:
            raise ConfigError(f"--resume: the run in {self.path} has a different config ({', '.join(sorted(diff))})")

    # ---------------------------------------------------------------------------------------------- checkpoints

    def managers(self) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
        """The (latest, best) orbax managers for saving: one checkpoint each; best by meta 'val_top1'.

        Each has barrier names of its own (`barrier_sync_key_prefix`): with several processes orbax synchronizes
        every save with fixed barrier names, and a save of one manager overlapping the background end of the
        other's (both save at an epoch's end) then waited on the same barrier twice ("Barrier
        ThreadSaveMultiHostValueHolder:set_value_start is already ongoing"), which ended a two-process run."""
        def options(name: str, **kwargs) -> ocp.CheckpointManagerOptions:
            return ocp.CheckpointManagerOptions(
                max_to_keep=1, multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
                **kwargs)
        latest = ocp.CheckpointManager(self.checkpoints("latest").absolute(), options=options("latest"))
        best = ocp.CheckpointManager(self.checkpoints("best").absolute(),
                                     options=options("best", best_fn=lambda m: m["val_top1"], best_mode="max"))
        return latest, best

    @staticmethod
    def save(manager: ocp.CheckpointManager, step: int, tree: dict, meta: dict, **kwargs) -> None:
        """One checkpoint: the state tree and its JSON meta (kwargs: orbax's, e.g. metrics for the best manager)."""
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                     **kwargs)

    def restore(self, which: str, target: dict | None = None) -> tuple[dict, dict]:
        """(state tree, meta) of the newest checkpoint of `which`; see `restore_checkpoint`."""
        return restore_checkpoint(self.checkpoints(which), target)


def existing_run(path: str | os.PathLike, flag: str = "--workdir") -> RunDir:
    """The run directory at `path`, or a UserError naming `flag` when there is none."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory")
    if not RunDir.holds_run(path):
        raise UserError(f"{flag} {path}: not a training run directory (no {CONFIG} and {CHECKPOINTS}/)")
    return RunDir(path)


def restore_checkpoint(directory: str | os.PathLike, target: dict | None = None) -> tuple[dict, dict]:
    """(state tree, meta) of the newest checkpoint under an orbax CheckpointManager directory. Without `target`
    the tree is restored as saved, replicated on this process's devices (the saving run may have had others)."""
    directory = pathlib.Path(directory).absolute()
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise UserError(f"{directory}: no checkpoint")
        if target is None:
            absl = logging.getLogger("absl")  # (which warns that the item has no step-level metadata file)
            level = absl.level
            absl.setLevel(logging.ERROR)
            try:
                with ocp.StandardCheckpointer() as reader:
                    saved = reader.metadata(directory / str(step) / "state").item_metadata
            finally:
                absl.setLevel(level)
            here = NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",)), P())
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


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
