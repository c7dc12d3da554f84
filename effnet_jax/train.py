"""Fine-tuning: the run's config, and `train_and_evaluate(cfg)`: the epoch loop as a page of named steps.

    claim_workdir(cfg)      the run directory's lock, held for the run's life; a used directory refused or moved
    setup(cfg)              data, initial weights, optimizer, compiled steps, the run directory's config
    start(run)              the train state: fresh (and the accuracy before fine-tuning), or resumed from the
                            newest checkpoint that reads back
    train_epoch(...)        the steps of one epoch; a stop request saves a checkpoint and ends the run
    end_epoch(...)          validation, metrics.jsonl and curves.png, checkpoints/latest and /best

As flax's examples/imagenet, over plain functions: the steps in `steps.py`, the device mesh in `mesh.py`, the
run directory's layout in `rundir.py`, the weights in `loader.py`, the data in `data/`. The top-level `train.py`
only parses flags into a `TrainConfig`, which checks them when it is made.

The same code runs on 1..N devices and N processes. The data order, augmentation and initialization do not
depend on the layout; the order of the float sums over the devices does: with SGD runs on different layouts
agree to rounding, with Adam/AdamW they drift apart (docs/devices.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from . import data as data_lib
from . import optim, rundir, variants
from .errors import CheckpointReadError, ConfigError, UserError
from .loader import load
from .mesh import Mesh
from .models import HEAD_INITS, EfficientNet, create_model
from .preprocess import run_preprocess_config
from .rundir import RunDir, evaluation_variables
from .steps import TrainState, create_train_state, evaluate, jit_eval_step, jit_train_step
from .stopping import Interrupted, StopRequest

log = logging.getLogger(__name__)
PyTree = Any
# with pretrained weights and no --freeze: the top 8 blocks (+ head) train, at 128 px: Lite0 90.3 / 90.9 % (two seeds)
# in 27-28 min on 2 CPU cores, where the top 6 at 96 px gave 88.4 / 89.5 % (benchmarks/results/fine-tuning.md)
DEFAULT_TRAINED_BLOCKS = 8


class Diverged(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept (a lower --lr, --grad-clip)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as config.json. Defaults: our recipe (docs/training.md)."""
    variant: str = "b0"
    dataset: str = "cifar10"
    data_dir: str | None = None
    init: str = "imagenet"              # 'imagenet', 'scratch', a .pth file, or a run / model directory
    workdir: str = "runs/default"
    epochs: int = 4
    batch_size: int = 64                # global
    eval_batch_size: int = 256
    eval_flip: bool = False             # validation (and `evaluate`) averages each image's and its mirror's logits
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float | None = None  # None: min(1, epochs / 5)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    freeze: str | None = None           # None: the top DEFAULT_TRAINED_BLOCKS blocks + head (docs/training.md;
                                        # all of a network with fewer) for pretrained weights, 'none' from scratch
    head_init: str = "zero"             # a new classifier: 'zero' (big_vision's; docs/training.md) or 'uniform'
                                        # (torchvision's)
    two_phase: bool = False
    phase1_epochs: int = 0
    phase2_lr_scale: float = 0.1
    ema_decay: float = 0.0
    resolution: int = 128               # training/eval input side; CIFAR's 32 px images are resized to it
    resolution_schedule: str = ""       # progressive resizing: 'SIDE:EPOCHS,...' trains the first epochs at
                                        # these sides, the rest (at least the last epoch) at `resolution`
    input_mean: str | None = None       # input normalization 'R,G,B' (of pixels in [0, 1]); None: the init
    input_std: str | None = None        # weights' preprocessing (ImageNet's for B, (x - 127) / 128 for Lite)
    crop_padding: int = 4
    flip: bool = True
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    contrast: float = 0.0
    dtype: str = "float32"
    drop_rate: float | None = None      # None: the variant's
    drop_path_rate: float | None = None
    width: float | None = None          # custom compound scaling: these replace the variant's width/depth
    depth: float | None = None          # coefficients (None: the variant's); --init scratch only
    val_fraction: float = 0.1
    seed: int = 0
    resume: bool = False                # continue the run in workdir from its newest readable checkpoint
    overwrite: bool = False             # move a run already in workdir aside (workdir.old-<UTC time>), then start
    checkpoint_every: int = 0           # also save checkpoints/latest every N steps (0: at epoch ends only)
    on_corrupt: str = "error"
    stream: bool | None = None          # read the images from the source as training goes (grain threads) instead
                                        # of holding the decoded dataset on the device; None: when it would take
                                        # more than data.STREAM_ABOVE_BYTES decoded
    max_train_examples: int | None = None   # for smoke tests and quick looks: a seeded random N of them
    progress: bool = True

    def __post_init__(self) -> None:
        """Check the flags here, at the boundary, so that a bad one fails before anything loads."""
        variants.check_resolution(self.resolution)
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"--head-init must be 'uniform' or 'zero', got {self.head_init!r}")
        if (self.width is not None or self.depth is not None) and self.init != "scratch":
            raise ConfigError(f"--width/--depth build a network of another shape than {self.variant}'s: only with "
                              f"--init scratch (--init {self.init}: the weights fix the shape)")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --workdir, --overwrite moves it aside: give one of them")
        model_config = variants.model_config(self.variant, width=self.width, depth=self.depth)  # a known variant
        optim_cfg = self.optim_config(len(model_config.blocks))  # OptimConfig's own checks
        if not os.path.isdir(self.init):  # (a run's or model directory's network may be scaled otherwise)
            for phase in optim.phases(optim_cfg):  # N of --freeze N within the model's blocks
                optim.frozen_units(model_config, phase.freeze)
        for side in set(self.resolution_plan()):
            augment_config(self, *self.normalization(), side)  # AugmentConfig's own checks

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainConfig":
        """The config of a run's config.json (which also holds keys that are not fields: model_overrides, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def default_freeze(self, num_blocks: int | None = None) -> str:
        """`--freeze` when not given: 'none' from scratch; else the top DEFAULT_TRAINED_BLOCKS blocks, or all
        `num_blocks` blocks of a smaller network (a scaled one fine-tuned from its run directory)."""
        if self.init == "scratch":
            return "none"
        return str(DEFAULT_TRAINED_BLOCKS if num_blocks is None else min(DEFAULT_TRAINED_BLOCKS, num_blocks))

    def optim_config(self, num_blocks: int | None = None) -> optim.OptimConfig:
        """The optimizer settings; `num_blocks`: the trained network's block count, for the default `--freeze`."""
        return optim.OptimConfig(
            optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
            warmup_epochs=min(1.0, self.epochs / 5) if self.warmup_epochs is None else self.warmup_epochs,
            epochs=self.epochs, grad_clip=self.grad_clip, label_smoothing=self.label_smoothing,
            freeze=self.freeze if self.freeze is not None else self.default_freeze(num_blocks),
            two_phase=self.two_phase, phase1_epochs=self.phase1_epochs, phase2_lr_scale=self.phase2_lr_scale,
            ema_decay=self.ema_decay, schedule=self.schedule)

    def resolution_plan(self) -> list[int]:
        """The input side of each epoch 1..epochs: `--resolution-schedule 64:2,80:1` with `--resolution 96
        --epochs 6` gives [64, 64, 80, 96, 96, 96]. Cheap low-resolution epochs first, as the progressive
        resizing of fast.ai and EfficientNetV2; validation follows the epoch's side, and the last epoch (whose
        checkpoint `evaluate` reads) is always at `--resolution`."""
        plan: list[int] = []
        for part in filter(None, (p.strip() for p in self.resolution_schedule.split(","))):
            try:
                side, n = (int(v) for v in part.split(":"))
            except ValueError:
                raise ConfigError(f"--resolution-schedule {self.resolution_schedule!r}: expected SIDE:EPOCHS[,...], "
                                  "e.g. 64:2") from None
            if side < variants.MIN_RESOLUTION or n < 1:
                raise ConfigError(f"--resolution-schedule {part!r}: the side must be >= {variants.MIN_RESOLUTION} "
                                  "and the epochs >= 1")
            plan += [side] * n
        if len(plan) >= self.epochs:
            raise ConfigError(f"--resolution-schedule {self.resolution_schedule!r} covers {len(plan)} of the "
                              f"{self.epochs} epochs; leave at least the last one to --resolution {self.resolution}")
        return plan + [self.resolution] * (self.epochs - len(plan))

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std of the inputs: `--input-mean`/`--input-std` when given, else the init weights' preprocessing
        (ImageNet's for B, TF's (x-127)/128 for Lite)."""
        from .weights import weights_entry
        e = weights_entry(self.variant)

        def parse(flag: str, text: str | None, default) -> tuple[float, ...]:
            if text is None:
                return tuple(default)
            try:
                values = tuple(float(v) for v in text.split(","))
            except ValueError:
                values = ()
            positive = flag == "--input-std"
            if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
                raise ConfigError(f"{flag} {text!r}: expected three numbers R,G,B for pixels in [0, 1], e.g. "
                                  f"{','.join(f'{v:g}' for v in default)}" + (" (all > 0)" if positive else ""))
            return values

        return parse("--input-mean", self.input_mean, e.mean), parse("--input-std", self.input_std, e.std)


# The user's reference: a torchvision notebook (B0, 32 px, crop pad 4 + flip, Adam 1e-3, batch 64, 25 epochs).
PRESETS: dict[str, dict[str, Any]] = {
    "notebook": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                     label_smoothing=0.0, batch_size=64, epochs=25, resolution=32, crop_padding=4, flip=True,
                     freeze="none", ema_decay=0.0),
}

# config.json keys that `--resume` may change: the same run maybe moved or respelled (workdir), how long it goes
# (epochs), how often it saves, and where the images are read from (stream), not what they are
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "epochs", "workdir", "checkpoint_every", "stream",
                     "preprocess")  # (derived from resolution, mean and std, which are compared)


def build_model(cfg: TrainConfig, num_classes: int, frozen_units: int = 0, overrides: dict | None = None
                ) -> EfficientNet:
    """The model of `cfg` for `num_classes`: the variant with the weights' `overrides` (a file's layout, a
    previous run's width/depth), cfg's dropout rates, dtype and custom scaling, `frozen_units` BN units in
    inference mode."""
    kw = dict(overrides or {})
    if cfg.drop_rate is not None:
        kw["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    kw.update({k: getattr(cfg, k) for k in ("width", "depth") if getattr(cfg, k) is not None})
    return create_model(cfg.variant, num_classes, dtype=jnp.dtype(cfg.dtype), frozen_units=frozen_units, **kw)


def initial_variables(cfg: TrainConfig, num_classes: int, key: jax.Array) -> tuple[PyTree, dict]:
    """(variables, create_model overrides) for --init (`loader.load`): the weights with a new `num_classes` head
    when theirs differs (`--head-init`, from `key`), or scratch from `key`."""
    scaling = {k: getattr(cfg, k) for k in ("width", "depth") if getattr(cfg, k) is not None}
    loaded = load(cfg.init, cfg.variant, num_classes, head_init=cfg.head_init, key=key, **scaling)
    return loaded.variables, loaded.overrides


def load_data(cfg: TrainConfig) -> data_lib.Dataset:
    """The dataset in memory, or streamed (`--stream`; by default when `data.decoded_bytes` says it would take
    more than `data.STREAM_ABOVE_BYTES`)."""
    log.info("loading %s%s", cfg.dataset, f" from {cfg.data_dir}" if cfg.data_dir else "")
    return data_lib.load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                 on_corrupt=cfg.on_corrupt, progress=cfg.progress and jax.process_index() == 0,
                                 stream=cfg.stream, max_train_examples=cfg.max_train_examples)


def augment_config(cfg: TrainConfig, mean, std, resolution: int | None = None) -> data_lib.AugmentConfig:
    return data_lib.AugmentConfig(crop_padding=cfg.crop_padding, flip=cfg.flip, rotation=cfg.rotation, zoom=cfg.zoom,
                                  translation=cfg.translation, contrast=cfg.contrast,
                                  resolution=cfg.resolution if resolution is None else resolution,
                                  mean=mean, std=std)


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
class Run:
    """What `setup` prepares for the loop."""
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
    augs: dict[int, data_lib.AugmentConfig]
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


def setup(cfg: TrainConfig) -> Run:
    """Load the data and the initial weights, build the optimizer and the eval steps, write config.json and
    class_names.json (a resumed run must match its saved config)."""
    t0 = time.time()
    run_dir, is_main = RunDir(cfg.workdir), jax.process_index() == 0
    mesh = Mesh()
    mesh.check_batch(cfg.batch_size)
    mean, std = cfg.normalization()
    ds = load_data(cfg)
    n_train, n_val = len(ds.train), len(ds.val)
    if n_train + n_val == 0 and ds.test is not None:  # a folder of test/<class>/ only
        raise UserError(f"{ds.source} has no training images, only a test split (test/<class>/); training needs "
                        "train/<class>/ (or <class>/ at the top); to score a run on this test set: python -m "
                        f"effnet_jax.evaluate --workdir RUN --dataset {cfg.dataset}"
                        + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + " --split test")
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"{n_train} training examples are fewer than one batch of {cfg.batch_size}")
    log.info("%s: %d train, %d val, %d classes; %d steps/epoch on %d device(s)", ds.source, n_train, n_val,
             ds.num_classes, steps_per_epoch, mesh.size)

    variables, overrides = initial_variables(cfg, ds.num_classes, jax.random.fold_in(jax.random.key(cfg.seed), 1))
    sides = cfg.resolution_plan()
    augs = {r: augment_config(cfg, mean, std, r) for r in sorted(set(sides))}
    model_config = build_model(cfg, ds.num_classes, overrides=overrides).config
    ocfg = cfg.optim_config(len(model_config.blocks))
    tx = optim.make_optimizer(ocfg, variables["params"], model_config, steps_per_epoch)

    config = dataclasses.asdict(cfg) | {"model_overrides": overrides, "num_classes": ds.num_classes,
                                        "mean": list(mean), "std": list(std),
                                        "preprocess": run_preprocess_config(cfg.resolution, mean, std)}
    if cfg.resume:
        run_dir.check_resume(config, {f.name: f.default for f in dataclasses.fields(TrainConfig)},
                             RESUME_MAY_CHANGE)
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
    eval_fns = {r: jit_eval_step(eval_model, a, cfg.eval_flip, streamed) for r, a in augs.items()}
    return Run(cfg, run_dir, mesh, ds, n_train, n_val, steps_per_epoch, variables, overrides, model_config, tx,
               optim.lr_schedule(ocfg, steps_per_epoch), sides, augs, eval_fns, streamed, train_data, val_data,
               is_main, t0)


ZERO_SUMS = {"loss": ((), jnp.float32), "correct": ((), jnp.int32), "count": ((), jnp.float32)}


def zero_sums(run: Run) -> dict:
    """The running sums of an epoch (loss, correct, count) at zero, on the devices."""
    return run.mesh.replicate({k: jnp.zeros(shape, dtype) for k, (shape, dtype) in ZERO_SUMS.items()})


def _validate(run: Run, state: TrainState, side: int) -> dict:
    weights = evaluation_variables(state.params, state.batch_stats, state.ema)
    return evaluate(weights, run.val_data, run.n_val, run.eval_fns[side], run.mesh, run.cfg.eval_batch_size)


def record(run: Run, rec: dict) -> None:
    """Append an epoch's record to metrics.jsonl (and redraw curves.png)."""
    run.records.append(rec)
    if run.is_main:
        run.dir.write_metrics(run.records)


def start(run: Run) -> tuple[TrainState, int, int, dict]:
    """(state, first epoch, first batch of it, the epoch's sums so far): step 0 and the accuracy before fine-tuning
    (epoch 0 of metrics.jsonl), or where `--resume` left off."""
    cfg = run.cfg
    state = run.mesh.replicate(create_train_state(run.variables, run.tx, cfg.seed, cfg.ema_decay > 0))
    if not cfg.resume:
        pre = _validate(run, state, cfg.resolution)
        record(run, {"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": pre["loss"],
                     "val_acc": pre["top1"], "val_top5": pre["top5"], "img_s": None, "lr": None,
                     "time_s": time.time() - run.t0, "resolution": cfg.resolution})
        log.info("before fine-tuning: val top-1 %.2f%%", 100 * pre["top1"])
        return state, 1, 0, zero_sums(run)
    tree, meta = resume_point(run, state_tree(state, zero_sums(run)))
    state = run.mesh.replicate(state.replace(
        step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
        ema=tree.get("ema"), rng=jax.random.wrap_key_data(tree["rng"])))
    # meta: epochs completed, and batches done of the next one (a mid-epoch checkpoint)
    run.records[:] = run.dir.read_metrics(up_to_epoch=meta["epoch"])
    epoch, batch = meta["epoch"] + 1, meta.get("batches_done", 0)
    log.info("resumed at epoch %d, batch %d (step %d)", epoch, batch, int(state.step))
    return state, epoch, batch, run.mesh.replicate(tree["epoch_sums"])


def resume_point(run: Run, target: dict) -> tuple[dict, dict]:
    """(tree, meta) of the newest checkpoints/latest step that reads back (`rundir.restore_readable`). Newer steps
    that do not are moved to checkpoints/set-aside/ with one warning, and so are best steps of epochs the run
    will redo: it saves those step numbers again. None readable: CheckpointReadError, naming each step."""
    latest = run.dir.checkpoints("latest")
    try:
        tree, meta, step, bad = rundir.restore_readable(latest, target)
    except CheckpointReadError as e:
        raise CheckpointReadError(f"--resume: {e}; start afresh with --overwrite (which moves this run aside) or "
                                  "in another --workdir") from None
    redone = [s for s in rundir.finished_steps(run.dir.checkpoints("best")) if s > meta["epoch"]]
    if run.is_main and (bad or redone):
        moved = [run.dir.set_aside("latest", s) for s, _ in bad] + [run.dir.set_aside("best", s) for s in redone]
        what = "; ".join(f"checkpoints/latest step {s} is unreadable ({why})" for s, why in bad)
        log.warning("%s%sresuming from step %d (epoch %d); moved to %s: %s", what, "; " if what else "", step,
                    meta["epoch"], run.dir.checkpoints("latest").parent / rundir.SET_ASIDE,
                    ", ".join(f"{m.parent.name}/{m.name}" for m in moved))
    if jax.process_count() > 1:  # (the others list the directories after the move)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("effnet_jax resume point")
    return tree, meta


def save_latest(run: Run, manager, step: int, state: TrainState, sums: dict, meta: dict) -> None:
    """Save checkpoints/latest (orbax: all processes, written to a temporary directory and renamed when complete),
    unless the epoch's losses so far hold a NaN/inf: then the last good checkpoint stays."""
    loss = float(jax.device_get(sums["loss"]))
    if not math.isfinite(loss):
        raise Diverged(f"the training loss became {loss} before step {step} (epoch {meta['epoch'] + 1}); nothing "
                       f"saved, the last good checkpoint is kept in {run.dir.checkpoints('latest')}")
    manager.save(step, state_tree(state, sums), meta)


def train_epoch(run: Run, state: TrainState, epoch: int, first: int, sums: dict, stop: StopRequest, latest
                ) -> tuple[TrainState, dict, int, float | None]:
    """The steps of `epoch` from batch `first` on: (state, the epoch's sums, the last step, img/s). Every 10th
    step checks the loss; a stop request (or `--checkpoint-every`) saves checkpoints/latest between two steps."""
    cfg = run.cfg
    phase = [p for p in optim.phases(cfg.optim_config(len(run.model_config.blocks))) if p.start_epoch < epoch][-1]
    fu, side = optim.frozen_units(run.model_config, phase.freeze), run.sides[epoch - 1]
    if (fu, side) not in run.step_fns:  # one compiled step per freezing phase and input side
        run.step_fns[fu, side] = jit_train_step(build_model(cfg, run.ds.num_classes, fu, run.overrides), run.tx,
                                                run.augs[side], cfg.label_smoothing, cfg.ema_decay, run.streamed)
    step_fn = run.step_fns[fu, side]
    # the data order is a function of (seed, epoch) only: a resumed run skips the batches already done
    batches = data_lib.batch_indices(data_lib.epoch_permutation(run.n_train, cfg.seed, epoch), cfg.batch_size)
    if run.streamed:  # background threads read this process's rows of the batches ahead
        feed = data_lib.stream_batches(run.ds.train, [run.mesh.local_rows(b) for b in batches[first:]])
    t_steady, n_steady, step = time.time(), 0, (epoch - 1) * run.steps_per_epoch + first
    bar = tqdm(range(first, len(batches)), initial=first, total=len(batches), unit="batch",
               desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and run.is_main), dynamic_ncols=True)
    for i in bar:
        data = run.mesh.put_stream(feed, len(batches[i])) if run.streamed else run.train_data
        state, m = step_fn(state, *data, run.mesh.put_batch(batches[i].astype(np.int32)))
        sums = jax.tree.map(jnp.add, sums, {k: m[k] for k in sums})
        step = (epoch - 1) * run.steps_per_epoch + i + 1  # == state.step, without waiting for it
        if i == first:
            jax.block_until_ready(m)
            t_steady = time.time()  # img/s leaves out the first (compiling) step
        else:
            n_steady += len(batches[i])
        if i % 10 == 0 or i == len(batches) - 1:
            m = jax.device_get(m)
            if not math.isfinite(float(m["loss"])):
                raise Diverged(f"loss is {float(m['loss'])} at step {step} (epoch {epoch}); the last good checkpoint "
                               f"is kept in {run.dir.checkpoints('latest')}")
            bar.set_postfix(loss=f"{float(m['loss']) / float(m['count']):.3f}",
                            img_s=f"{n_steady / max(time.time() - t_steady, 1e-9):.0f}")
        if i + 1 < len(batches):  # (the epoch's end saves after the validation: end_epoch)
            stopping = stop.requested(check_all=i % 10 == 0)
            if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                save_latest(run, latest, step, state, sums, {"epoch": epoch - 1, "batches_done": i + 1})
            if stopping:
                raise Interrupted(step, epoch, run.dir.checkpoints("latest"), stop.signal)
    bar.close()
    return state, sums, step, n_steady / max(time.time() - t_steady, 1e-9) if n_steady else None


def end_epoch(run: Run, state: TrainState, epoch: int, step: int, sums: dict, img_s: float | None, t_epoch: float,
              latest, best) -> None:
    """Validate, append the epoch's record, save checkpoints/latest and (at --resolution) checkpoints/best."""
    side = run.sides[epoch - 1]
    sums = jax.device_get(sums)
    val = _validate(run, state, side)
    rec = {"epoch": epoch, "train_loss": float(sums["loss"] / sums["count"]),
           "train_acc": float(sums["correct"] / sums["count"]),
           "val_loss": val["loss"], "val_acc": val["top1"], "val_top5": val["top5"], "img_s": img_s,
           "lr": float(run.schedule(step - 1)), "time_s": time.time() - run.t0, "resolution": side}
    record(run, rec)
    log.info("epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.0f img/s | %.0f s", epoch,
             rec["train_loss"], 100 * rec["train_acc"], rec["val_loss"], 100 * rec["val_acc"], img_s or 0,
             time.time() - t_epoch)
    meta = {"epoch": epoch, "val_top1": val["top1"]}
    save_latest(run, latest, step, state, zero_sums(run), meta)
    if side == run.cfg.resolution:  # (the best checkpoint is evaluated at --resolution)
        best.save(epoch, state_tree(state, zero_sums(run)), meta, metrics={"val_top1": val["top1"]})


def summarize(run: Run) -> dict:
    trained = [r for r in run.records if r["epoch"] > 0]
    cfg = run.cfg
    summary = {"variant": cfg.variant, "dataset": cfg.dataset, "init": cfg.init,
               "pre_finetune_val_acc": run.records[0]["val_acc"] if run.records and run.records[0]["epoch"] == 0
               else None,
               "final_val_acc": trained[-1]["val_acc"] if trained else None,
               "best_val_acc": max((r["val_acc"] for r in trained), default=None),
               "epochs": cfg.epochs, "n_train": run.n_train, "n_val": run.n_val,
               "time_s": round(time.time() - run.t0, 1), "workdir": str(run.dir.path)}
    if run.is_main:
        run.dir.write_summary(summary)
    return summary


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Run the fine-tune described by `cfg`; returns the summary (also printed as the last stdout line).
    SIGTERM/SIGINT before the first training step raise `StoppedBeforeTraining` at once (nothing to save); from the
    first step on they stop the run after the current step with a checkpoint (`Interrupted`). The run holds its
    directory's lock throughout (`claim_workdir`); a save that fails raises `rundir.CheckpointSaveError`."""
    with StopRequest() as stop, claim_workdir(cfg):
        run = setup(cfg)
        state, first_epoch, first_batch, sums = start(run)
        latest, best = run.dir.managers()
        with latest, best:  # (closing the savers waits for their saves and writes their SHA256SUMS)
            stop.start_training()
            for epoch in range(first_epoch, cfg.epochs + 1):
                t_epoch = time.time()
                first = first_batch if epoch == first_epoch else 0
                sums = sums if epoch == first_epoch else zero_sums(run)
                state, sums, step, img_s = train_epoch(run, state, epoch, first, sums, stop, latest)
                end_epoch(run, state, epoch, step, sums, img_s, t_epoch, latest, best)
                if epoch < cfg.epochs and stop.requested(check_all=True):
                    raise Interrupted(step, epoch, run.dir.checkpoints("latest"), stop.signal)
        return summarize(run)
