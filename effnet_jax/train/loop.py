"""`train_and_evaluate(cfg)`: the epoch loop as a page of named steps.

    claim_workdir(cfg)      the run directory's lock, held for the run's life; a used directory refused or moved
    setup(cfg)              data, initial weights, optimizer, compiled steps, the run directory's config
    resume_or_begin(trainer)    the train state: fresh (and the accuracy before fine-tuning), or resumed from the
                            newest checkpoint that reads back
    train_epoch(...)        the steps of one epoch; a stop request saves a checkpoint and ends the run
    end_epoch(...)          validation, metrics.jsonl and curves.png, checkpoints/latest and /best

As flax's examples/imagenet, over plain functions. The same code runs on 1..N devices and N processes; how runs
on different layouts compare: docs/devices.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from effnet_jax import data as data_lib
from effnet_jax.data.transform import EvalTransform
from effnet_jax.errors import CheckpointReadError, UserError
from effnet_jax.train import optim, rundir
from effnet_jax.train.build import build_model, initial_variables, load_data
from effnet_jax.train.config import RESUME_MAY_CHANGE, TrainConfig
from effnet_jax.train.mesh import Mesh
from effnet_jax.train.rundir import RunDir, evaluation_variables
from effnet_jax.train.steps import TrainState, create_train_state, evaluate, jit_eval_step, jit_train_step
from effnet_jax.train.stopping import Interrupted, StopRequest

log = logging.getLogger("effnet_jax.train")
PyTree = Any


class Diverged(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept (a lower --lr, --grad-clip)."""


def state_tree(state: TrainState, epoch_sums: dict) -> dict:
    """What a checkpoint holds: the train state and the running sums (loss, correct, count) of the epoch in
    progress, so that a run resumed mid-epoch logs the same epoch metrics as an uninterrupted one."""
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng), "epoch_sums": epoch_sums}
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


# ----------------------------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Trainer:
    """What `setup` prepares for the loop: the data, the initial weights, the optimizer and the compiled steps of
    one run, handed to each of its steps."""
    cfg: TrainConfig
    dir: RunDir
    mesh: Mesh
    ds: Any                      # data.Dataset (in memory or streamed)
    n_train: int
    n_val: int
    steps_per_epoch: int
    variables: PyTree            # the initial weights
    overrides: dict              # create_model overrides the weights need
    model_config: Any            # variants.ModelConfig of the trained model
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    sides: list[int]             # input side of each epoch
    transforms: dict[int, EvalTransform]  # the run's input transform per input side
    eval_fns: dict[int, Any]     # compiled eval step per input side
    streamed: bool
    train_data: Any              # on-device (images, labels), or None when streamed
    val_data: Any                # on-device (images, labels), or the streamed split
    is_main: bool
    t0: float
    step_fns: dict = dataclasses.field(default_factory=dict)  # compiled train steps per (frozen units, side)
    records: list = dataclasses.field(default_factory=list)   # metrics.jsonl so far


@contextlib.contextmanager
def claim_workdir(cfg: TrainConfig) -> Iterator[None]:
    """Process 0 holds the run directory for the run's life (`rundir.claim`: its lock, and the used-directory rule
    of a run without --resume); with several processes the others learn whether it could, so that all stop."""
    with contextlib.ExitStack() as stack:
        failure = moved = None
        if jax.process_index() == 0:
            try:
                moved = stack.enter_context(rundir.claim(cfg.workdir, resume=cfg.resume, overwrite=cfg.overwrite))
            except UserError as e:
                failure = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            if int(multihost_utils.broadcast_one_to_all(np.int32(failure is not None))) and failure is None:
                raise UserError(f"process 0 refused --workdir {cfg.workdir} (its message says why)")
        if failure is not None:
            raise failure
        if moved is not None:
            log.info("--overwrite: the run that was in %s is now in %s", cfg.workdir, moved)
        yield


def setup(cfg: TrainConfig) -> Trainer:
    """Load the data and the initial weights, build the optimizer and the eval steps, write config.json and
    class_names.json (a resumed run must match its saved config)."""
    t0 = time.time()
    run_dir, is_main = RunDir(cfg.workdir), jax.process_index() == 0
    mesh = Mesh()
    mesh.check_batch(cfg.batch_size)
    cfg = cfg.resolved()  # (the normalization written out, as config.json stores it)
    ds = load_data(cfg)
    n_train, n_val = len(ds.train), len(ds.val)
    if n_train + n_val == 0 and ds.test is not None:  # a folder of test/<class>/ only
        raise UserError(f"{ds.source} has no training images, only a test split (test/<class>/); training needs "
                        "train/<class>/ (or <class>/ at the top); to score a run on this test set: "
                        f"effnet-evaluate --workdir RUN --dataset {cfg.dataset}"
                        + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + " --split test")
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"{n_train} training examples are fewer than one batch of {cfg.batch_size}")
    log.info("%s: %d train, %d val, %d classes; %d steps/epoch on %d device(s)", ds.source, n_train, n_val,
             ds.num_classes, steps_per_epoch, mesh.size)

    variables, overrides = initial_variables(cfg, ds.num_classes, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    sides = cfg.resolution_plan()
    transforms = {r: cfg.eval_transform(r) for r in sorted(set(sides))}
    model_config = build_model(cfg, ds.num_classes, overrides=overrides).config
    optim_cfg = cfg.optim_config(len(model_config.blocks))
    tx = optim.make_optimizer(optim_cfg, variables["params"], model_config, steps_per_epoch)

    config = cfg.to_saved(model_overrides=overrides, num_classes=ds.num_classes)
    if cfg.resume:  # (compared with the saved config read into today's layout)
        run_dir.check_resume(config, lambda saved: TrainConfig.from_saved(saved).to_saved(
            **{k: saved[k] for k in ("model_overrides", "num_classes") if k in saved}), RESUME_MAY_CHANGE)
    if is_main:
        run_dir.write_config(config)
        run_dir.write_class_names(ds.class_names)

    streamed = ds.streamed
    if streamed:  # read as it goes
        train_data, val_data = None, ds.val
    else:  # on the device, as uint8
        train_data = mesh.replicate((jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels)))
        val_data = mesh.replicate((jnp.asarray(ds.val.images), jnp.asarray(ds.val.labels)))
    eval_model = build_model(cfg, ds.num_classes, overrides=overrides)
    eval_fns = {r: jit_eval_step(eval_model, t, cfg.eval_flip, streamed) for r, t in transforms.items()}
    return Trainer(cfg, run_dir, mesh, ds, n_train, n_val, steps_per_epoch, variables, overrides, model_config, tx,
               optim.lr_schedule(optim_cfg, steps_per_epoch), sides, transforms, eval_fns, streamed, train_data,
               val_data, is_main, t0)


ZERO_SUMS = {"loss": ((), jnp.float32), "correct": ((), jnp.int32), "count": ((), jnp.float32)}


def zero_sums(trainer: Trainer) -> dict:
    """The running sums of an epoch (loss, correct, count) at zero, on the devices."""
    return trainer.mesh.replicate({k: jnp.zeros(shape, dtype) for k, (shape, dtype) in ZERO_SUMS.items()})


def _validate(trainer: Trainer, state: TrainState, side: int) -> dict:
    weights = evaluation_variables(state.params, state.batch_stats, state.ema)
    return evaluate(weights, trainer.val_data, trainer.n_val, trainer.eval_fns[side], trainer.mesh,
                    trainer.cfg.eval_batch_size)


def append_metrics(trainer: Trainer, rec: dict) -> None:
    """Append an epoch's record to metrics.jsonl (and redraw curves.png)."""
    trainer.records.append(rec)
    if trainer.is_main:
        trainer.dir.write_metrics(trainer.records)


def resume_or_begin(trainer: Trainer) -> tuple[TrainState, int, int, dict]:
    """(state, first epoch, first batch of it, the epoch's sums so far): step 0 and the accuracy before fine-tuning
    (epoch 0 of metrics.jsonl), or where `--resume` left off."""
    cfg = trainer.cfg
    state = trainer.mesh.replicate(create_train_state(trainer.variables, trainer.tx, cfg.seed, cfg.ema_decay > 0))
    if not cfg.resume:
        pre = _validate(trainer, state, cfg.resolution)
        append_metrics(trainer, {"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": pre["loss"],
                     "val_acc": pre["top1"], "val_top5": pre["top5"], "img_s": None, "lr": None,
                     "time_s": time.time() - trainer.t0, "resolution": cfg.resolution})
        log.info("before fine-tuning: val top-1 %.2f%%", 100 * pre["top1"])
        return state, 1, 0, zero_sums(trainer)
    tree, meta = resume_point(trainer, state_tree(state, zero_sums(trainer)))
    state = trainer.mesh.replicate(state.replace(
        step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
        ema=tree.get("ema"), rng=jax.random.wrap_key_data(tree["rng"])))
    # meta: epochs completed, and batches done of the next one (a mid-epoch checkpoint)
    trainer.records[:] = trainer.dir.read_metrics(up_to_epoch=meta["epoch"])
    epoch, batch = meta["epoch"] + 1, meta.get("batches_done", 0)
    log.info("resumed at epoch %d, batch %d (step %d)", epoch, batch, int(state.step))
    return state, epoch, batch, trainer.mesh.replicate(tree["epoch_sums"])


def resume_point(trainer: Trainer, target: dict) -> tuple[dict, dict]:
    """(tree, meta) of the newest checkpoints/latest step that reads back (`rundir.restore_readable`). Newer steps
    that do not are moved to checkpoints/set-aside/ with one warning, and so are best steps of epochs the run
    will redo: it saves those step numbers again. None readable: CheckpointReadError, naming each step."""
    latest = trainer.dir.checkpoints("latest")
    try:
        tree, meta, step, bad = rundir.restore_readable(latest, target)
    except CheckpointReadError as e:
        raise CheckpointReadError(f"--resume: {e}; start afresh with --overwrite (which moves this run aside) or "
                                  "in another --workdir") from None
    redone = [s for s in rundir.finished_steps(trainer.dir.checkpoints("best")) if s > meta["epoch"]]
    if trainer.is_main and (bad or redone):
        moved = ([trainer.dir.set_aside("latest", s) for s, _ in bad]
                 + [trainer.dir.set_aside("best", s) for s in redone])
        what = "; ".join(f"checkpoints/latest step {s} is unreadable ({why})" for s, why in bad)
        log.warning("%s%sresuming from step %d (epoch %d); moved to %s: %s", what, "; " if what else "", step,
                    meta["epoch"], trainer.dir.checkpoints("latest").parent / rundir.SET_ASIDE,
                    ", ".join(f"{m.parent.name}/{m.name}" for m in moved))
    if jax.process_count() > 1:  # (the others list the directories after the move)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("effnet_jax resume point")
    return tree, meta


def save_latest(trainer: Trainer, manager, step: int, state: TrainState, sums: dict, meta: dict) -> None:
    """Save checkpoints/latest (orbax: all processes, written to a temporary directory and renamed when complete),
    unless the epoch's losses so far hold a NaN/inf: then the last good checkpoint stays."""
    loss = float(jax.device_get(sums["loss"]))
    if not math.isfinite(loss):
        raise Diverged(f"the training loss became {loss} before step {step} (epoch {meta['epoch'] + 1}); nothing "
                       f"saved, the last good checkpoint is kept in {trainer.dir.checkpoints('latest')}")
    manager.save(step, state_tree(state, sums), meta)


def train_epoch(trainer: Trainer, state: TrainState, epoch: int, first: int, sums: dict, stop: StopRequest, latest
                ) -> tuple[TrainState, dict, int, float | None]:
    """The steps of `epoch` from batch `first` on: (state, the epoch's sums, the last step, images per second).
    Every 10th step checks the loss; a stop request (or `--checkpoint-every`) saves checkpoints/latest between two
    steps."""
    cfg = trainer.cfg
    phase = [p for p in optim.phases(cfg.optim_config(len(trainer.model_config.blocks))) if p.start_epoch < epoch][-1]
    frozen, side = optim.frozen_units(trainer.model_config, phase.freeze), trainer.sides[epoch - 1]
    if (frozen, side) not in trainer.step_fns:  # one compiled step per freezing phase and input side
        trainer.step_fns[frozen, side] = jit_train_step(
            build_model(cfg, trainer.ds.num_classes, frozen, trainer.overrides), trainer.tx, cfg.augment,
            trainer.transforms[side],
            cfg.label_smoothing, cfg.ema_decay, trainer.streamed)
    step_fn = trainer.step_fns[frozen, side]
    # the data order is a function of (seed, epoch) only: a resumed run skips the batches already done
    batches = data_lib.batch_indices(data_lib.epoch_permutation(trainer.n_train, cfg.seed, epoch), cfg.batch_size)
    if trainer.streamed:  # background threads read this process's rows of the batches ahead
        feed = data_lib.stream_batches(trainer.ds.train, [trainer.mesh.local_rows(b) for b in batches[first:]])
    t_steady, n_steady, step = time.time(), 0, (epoch - 1) * trainer.steps_per_epoch + first
    bar = tqdm(range(first, len(batches)), initial=first, total=len(batches), unit="batch",
               desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and trainer.is_main), dynamic_ncols=True)
    for i in bar:
        data = trainer.mesh.put_stream(feed, len(batches[i])) if trainer.streamed else trainer.train_data
        state, m = step_fn(state, *data, trainer.mesh.put_batch(batches[i].astype(np.int32)))
        sums = jax.tree.map(jnp.add, sums, {k: m[k] for k in sums})
        step = (epoch - 1) * trainer.steps_per_epoch + i + 1  # == state.step, without waiting for it
        if i == first:
            jax.block_until_ready(m)
            t_steady = time.time()  # the speed leaves out the first (compiling) step
        else:
            n_steady += len(batches[i])
        if i % 10 == 0 or i == len(batches) - 1:
            m = jax.device_get(m)
            if not math.isfinite(float(m["loss"])):
                raise Diverged(f"loss is {float(m['loss'])} at step {step} (epoch {epoch}); the last good checkpoint "
                               f"is kept in {trainer.dir.checkpoints('latest')}")
            bar.set_postfix(loss=f"{float(m['loss']) / float(m['count']):.3f}",
                            img_s=f"{n_steady / max(time.time() - t_steady, 1e-9):.0f}")
        if i + 1 < len(batches):  # (the epoch's end saves after the validation: end_epoch)
            stopping = stop.requested(check_all=i % 10 == 0)
            if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_latest(trainer, latest, step, state, sums, {"epoch": epoch - 1, "batches_done": i + 1})
            if stopping:
                raise Interrupted(step, epoch, trainer.dir.checkpoints("latest"), stop.signal)
    bar.close()
    return state, sums, step, n_steady / max(time.time() - t_steady, 1e-9) if n_steady else None


def end_epoch(trainer: Trainer, state: TrainState, epoch: int, step: int, sums: dict, img_s: float | None,
              t_epoch: float, latest, best) -> None:
    """Validate, append the epoch's record, save checkpoints/latest and (at --resolution) checkpoints/best."""
    side = trainer.sides[epoch - 1]
    sums = jax.device_get(sums)
    val = _validate(trainer, state, side)
    rec = {"epoch": epoch, "train_loss": float(sums["loss"] / sums["count"]),
           "train_acc": float(sums["correct"] / sums["count"]),
           "val_loss": val["loss"], "val_acc": val["top1"], "val_top5": val["top5"], "img_s": img_s,
           "lr": float(trainer.schedule(step - 1)), "time_s": time.time() - trainer.t0, "resolution": side}
    append_metrics(trainer, rec)
    log.info("epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.0f img/s | %.0f s", epoch,
             rec["train_loss"], 100 * rec["train_acc"], rec["val_loss"], 100 * rec["val_acc"], img_s or 0,
             time.time() - t_epoch)
    meta = {"epoch": epoch, "val_top1": val["top1"]}
    save_latest(trainer, latest, step, state, zero_sums(trainer), meta)
    if side == trainer.cfg.resolution:  # (the best checkpoint is evaluated at --resolution)
        best.save(epoch, state_tree(state, zero_sums(trainer)), meta, metrics={"val_top1": val["top1"]})


def summarize(trainer: Trainer) -> dict:
    trained = [r for r in trainer.records if r["epoch"] > 0]
    cfg = trainer.cfg
    summary = {"variant": cfg.variant, "dataset": cfg.dataset, "init": cfg.init,
               "pre_finetune_val_acc": (trainer.records[0]["val_acc"]
                                        if trainer.records and trainer.records[0]["epoch"] == 0 else None),
               "final_val_acc": trained[-1]["val_acc"] if trained else None,
               "best_val_acc": max((r["val_acc"] for r in trained), default=None),
               "epochs": cfg.epochs, "n_train": trainer.n_train, "n_val": trainer.n_val,
               "time_s": round(time.time() - trainer.t0, 1), "workdir": str(trainer.dir.path)}
    if trainer.is_main:
        trainer.dir.write_summary(summary)
    return summary


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Run the fine-tune described by `cfg`; returns the summary (also printed as the last stdout line).
    SIGTERM/SIGINT before the first training step raise `StoppedBeforeTraining` at once (nothing to save); from the
    first step on they stop the run after the current step with a checkpoint (`Interrupted`). The run holds its
    directory's lock throughout (`claim_workdir`); a save that fails raises `rundir.CheckpointSaveError`."""
    with StopRequest() as stop, claim_workdir(cfg):
        trainer = setup(cfg)
        state, first_epoch, first_batch, sums = resume_or_begin(trainer)
        latest, best = trainer.dir.managers()
        with latest, best:  # (closing the savers waits for their saves and writes their SHA256SUMS)
            stop.start_training()
            for epoch in range(first_epoch, cfg.epochs + 1):
                t_epoch = time.time()
                first = first_batch if epoch == first_epoch else 0
                sums = sums if epoch == first_epoch else zero_sums(trainer)
                state, sums, step, img_s = train_epoch(trainer, state, epoch, first, sums, stop, latest)
                end_epoch(trainer, state, epoch, step, sums, img_s, t_epoch, latest, best)
                if epoch < cfg.epochs and stop.requested(check_all=True):
                    raise Interrupted(step, epoch, trainer.dir.checkpoints("latest"), stop.signal)
        return summarize(trainer)
