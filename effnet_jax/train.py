"""Fine-tuning: config, train/eval steps over a device mesh, the epoch loop, checkpoints, metrics and curves.

Plain functions, as flax's examples/imagenet: `create_train_state`, `train_step`, `eval_step`,
`evaluate`, `train_and_evaluate(cfg)`. The top-level `train.py` only parses flags into a `TrainConfig`.

Data parallelism: one `jax.jit` step over a 1-D mesh `('data',)` of all devices (of all processes). The
dataset lives on the devices as uint8 (replicated); the host sends only the global example indices of each
batch, sharded over the mesh, and the step gathers, augments (per-example RNG keyed by the example index)
and trains. BatchNorm's batch statistics are global reductions, i.e. synchronized. The state is donated.
The same code runs on 1..N devices and N processes. The data order, augmentation and initialization do not
depend on the layout; the order of the float sums over the devices does: with SGD runs on different layouts
agree to rounding, with Adam/AdamW they drift apart (README, "Several devices, processes and hosts").

Work directory: `config.json`, `metrics.jsonl` (one record per epoch, the first being epoch 0: the
accuracy before fine-tuning), `curves.png`, `checkpoints/latest` and `checkpoints/best` (orbax),
`class_names.json`; the last stdout line is a JSON summary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from . import data as data_lib
from . import optim, variants
from .models import EfficientNet, create_model

log = logging.getLogger(__name__)
PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as config.json. Defaults: our recipe (see README)."""
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
    freeze: str | None = None           # None: '6' (top 6 blocks + head, the measured recipe) for pretrained
                                        # weights, 'none' from scratch
    head_init: str = "zero"             # a new classifier: 'zero' (big_vision's; measured better) or 'uniform'
                                        # (torchvision's)
    two_phase: bool = False
    phase1_epochs: int = 0
    phase2_lr_scale: float = 0.1
    ema_decay: float = 0.0
    resolution: int = 96                # training/eval input side; CIFAR's 32 px images are resized to it
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
    resume: bool = False
    checkpoint_every: int = 0           # also save checkpoints/latest every N steps (0: at epoch ends only)
    on_corrupt: str = "error"
    stream: bool | None = None          # read the images from the source as training goes (grain threads) instead
                                        # of holding the decoded dataset on the device; None: when it would take
                                        # more than STREAM_ABOVE_BYTES decoded
    max_train_examples: int | None = None   # for smoke tests and quick looks: a seeded random N of them
    progress: bool = True

    def optim_config(self) -> optim.OptimConfig:
        return optim.OptimConfig(
            optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
            warmup_epochs=min(1.0, self.epochs / 5) if self.warmup_epochs is None else self.warmup_epochs,
            epochs=self.epochs, grad_clip=self.grad_clip, label_smoothing=self.label_smoothing,
            freeze=self.freeze if self.freeze is not None else ("none" if self.init == "scratch" else "6"),
            two_phase=self.two_phase, phase1_epochs=self.phase1_epochs, phase2_lr_scale=self.phase2_lr_scale,
            ema_decay=self.ema_decay, schedule=self.schedule)


def resolution_plan(cfg: TrainConfig) -> list[int]:
    """The input side of each epoch 1..cfg.epochs: `--resolution-schedule 64:2,80:1` with `--resolution 96
    --epochs 6` gives [64, 64, 80, 96, 96, 96]. Cheap low-resolution epochs first, as the progressive
    resizing of fast.ai and EfficientNetV2; validation follows the epoch's side, and the last epoch (whose
    checkpoint `evaluate` reads) is always at `--resolution`."""
    plan: list[int] = []
    for part in filter(None, (p.strip() for p in cfg.resolution_schedule.split(","))):
        try:
            side, n = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"--resolution-schedule {cfg.resolution_schedule!r}: expected SIDE:EPOCHS[,...], "
                             "e.g. 64:2") from None
        if side < 32 or n < 1:
            raise ValueError(f"--resolution-schedule {part!r}: the side must be >= 32 and the epochs >= 1")
        plan += [side] * n
    if len(plan) >= cfg.epochs:
        raise ValueError(f"--resolution-schedule {cfg.resolution_schedule!r} covers {len(plan)} of the "
                         f"{cfg.epochs} epochs; leave at least the last one to --resolution {cfg.resolution}")
    return plan + [cfg.resolution] * (cfg.epochs - len(plan))


# The user's reference: a torchvision notebook (B0, 32 px, crop pad 4 + flip, Adam 1e-3, batch 64, 25 epochs).
PRESETS: dict[str, dict[str, Any]] = {
    "notebook": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                     label_smoothing=0.0, batch_size=64, epochs=25, resolution=32, crop_padding=4, flip=True,
                     freeze="none", ema_decay=0.0),
}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema: PyTree | None       # {'params', 'batch_stats'} EMA, or None
    rng: jax.Array           # base key; step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------------------------- the model

def normalization(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the inputs: `--input-mean`/`--input-std` when given, else the init weights' preprocessing
    (ImageNet's for B, TF's (x-127)/128 for Lite)."""
    from .weights import weights_entry
    e = weights_entry(cfg.variant)

    def parse(flag: str, text: str | None, default) -> tuple[float, ...]:
        if text is None:
            return tuple(default)
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        positive = flag == "--input-std"
        if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
            raise ValueError(f"{flag} {text!r}: expected three numbers R,G,B for pixels in [0, 1], e.g. "
                             f"{','.join(f'{v:g}' for v in default)}" + (" (all > 0)" if positive else ""))
        return values

    return parse("--input-mean", cfg.input_mean, e.mean), parse("--input-std", cfg.input_std, e.std)


def build_model(cfg: TrainConfig, num_classes: int, frozen_units: int = 0, overrides: dict | None = None
                ) -> EfficientNet:
    kw = dict(overrides or {})
    if cfg.drop_rate is not None:
        kw["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate is not None:
        kw["drop_path_rate"] = cfg.drop_path_rate
    kw.update({k: getattr(cfg, k) for k in ("width", "depth") if getattr(cfg, k) is not None})
    return create_model(cfg.variant, num_classes, dtype=jnp.dtype(cfg.dtype), frozen_units=frozen_units, **kw)


def initial_variables(cfg: TrainConfig, num_classes: int, key: jax.Array) -> tuple[PyTree, dict]:
    """(variables, create_model overrides) for --init: ImageNet weights (new head), a .pth, a previous run /
    converted model directory (its weights, head kept if the class count matches), or scratch."""
    from . import checkpoint, convert
    init = cfg.init
    if init == "scratch":
        model = build_model(cfg, num_classes)
        x = jnp.zeros((1, cfg.resolution, cfg.resolution, 3))
        return jax.jit(lambda k: model.init(k, x, train=False))(key), {}
    overrides: dict = {}
    if init == "imagenet":
        variables = convert.pretrained(cfg.variant)
    elif init.endswith((".pth", ".pt")):
        from .torch_reader import read_torch_state_dict
        sd = read_torch_state_dict(init)
        overrides = convert.layout_overrides(convert.detect_layout(sd), cfg.variant)
        variables = convert.convert_state_dict(sd, cfg.variant, source=init)
    elif (pathlib.Path(init) / "config.json").exists() and (pathlib.Path(init) / "checkpoints").exists():
        prev = json.loads((pathlib.Path(init) / "config.json").read_text())  # a previous run
        state, _ = restore_checkpoint(pathlib.Path(init) / "checkpoints" / "best")
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        overrides = prev.get("model_overrides", {}) | {k: prev[k] for k in ("width", "depth")
                                                       if prev.get(k) is not None}
    elif (pathlib.Path(init) / checkpoint.META_FILE).exists():  # python -m effnet_jax.convert output
        _, variables, meta = checkpoint.load_model(init)
        overrides = meta.get("overrides", {})
    else:
        raise ValueError(f"--init {init!r}: not 'imagenet', 'scratch', a .pth file, a run directory or a "
                         "converted model directory")
    head = variables["params"]["classifier"]
    if head["bias"].shape[0] != num_classes:  # a new head: torchvision's uniform init, or zeros
        from .models import _classifier_init
        shape = (head["kernel"].shape[0], num_classes)
        kernel = jnp.zeros(shape, jnp.float32) if cfg.head_init == "zero" else _classifier_init(key, shape)
        variables["params"]["classifier"] = {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}
        log.info("--init %s: backbone loaded; new %d-class head (%s init; the weights had %d classes)", init,
                 num_classes, cfg.head_init, head["bias"].shape[0])
    return variables, overrides


# ------------------------------------------------------------------------------------------------ the steps

def create_train_state(variables: PyTree, tx: optax.GradientTransformation, cfg: TrainConfig) -> TrainState:
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
    # a copy: the state is donated, and one buffer cannot be donated twice
    ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}) if cfg.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema=ema, rng=jax.random.key(cfg.seed))


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, *,
               model: EfficientNet, tx: optax.GradientTransformation, aug: data_lib.AugmentConfig,
               label_smoothing: float, ema_decay: float, streamed: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on the examples `indices` of the on-device dataset (`images` uint8, `labels`).
    `streamed`: `images`/`labels` are the batch itself, and `indices` its examples' indices (which key each
    example's augmentation, so a streamed run trains exactly as one with the data on the device)."""
    key = jax.random.fold_in(state.rng, state.step)
    images, y = (images, labels) if streamed else (images[indices], labels[indices])
    x = data_lib.augment_batch(jax.random.fold_in(key, 0), images, indices, aug)

    def loss_fn(params):
        logits, new = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                  rngs={"dropout": jax.random.fold_in(key, 1)}, mutable=["batch_stats"])
        return optim.cross_entropy(logits, y, label_smoothing).mean(), (new["batch_stats"], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = state.ema
    if ema is not None:
        ema = optim.ema_update(ema, {"params": params, "batch_stats": batch_stats}, ema_decay, step)
    metrics = {"loss": loss * y.shape[0], "correct": jnp.sum(jnp.argmax(logits, -1) == y),
               "count": jnp.asarray(y.shape[0], jnp.float32)}
    return state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema), metrics


def eval_step(variables: PyTree, images: jax.Array, labels: jax.Array, indices: jax.Array, mask: jax.Array, *,
              model: EfficientNet, aug: data_lib.AugmentConfig, flip: bool = False, streamed: bool = False) -> dict:
    """Sums of loss, top-1 and top-5 hits and count over the valid (`mask`) examples of one padded batch.
    `flip`: test-time augmentation, the logits are the mean of the image's and its horizontal mirror's.
    `streamed`: `images`/`labels` are the batch itself (as in `train_step`)."""
    images, y = (images, labels) if streamed else (images[indices], labels[indices])
    x = data_lib.eval_batch(images, aug)
    if flip:
        both = model.apply(variables, jnp.concatenate([x, x[:, :, ::-1]]), train=False)
        logits = (both[:len(x)] + both[len(x):]) / 2
    else:
        logits = model.apply(variables, x, train=False)
    m = mask.astype(jnp.float32)
    return {"loss": jnp.sum(optim.cross_entropy(logits, y) * m),
            "correct": jnp.sum((jnp.argmax(logits, -1) == y) * m),
            "top5": jnp.sum(optim.topk_correct(logits, y, min(5, logits.shape[-1])) * m),
            "count": jnp.sum(m), "logits": logits}


def jit_train_step(model: EfficientNet, tx: optax.GradientTransformation, aug: data_lib.AugmentConfig,
                   label_smoothing: float, ema_decay: float, streamed: bool = False):
    """`train_step` compiled as the trainer runs it, the state donated (argument 0). The benchmarks and the
    sharding test take it from here, so they time and check this very step."""
    return jax.jit(functools.partial(train_step, model=model, tx=tx, aug=aug, label_smoothing=label_smoothing,
                                     ema_decay=ema_decay, streamed=streamed), donate_argnums=0)


def jit_eval_step(model: EfficientNet, aug: data_lib.AugmentConfig, flip: bool = False, streamed: bool = False):
    """`eval_step` compiled as the trainer and `effnet_jax.evaluate` run it."""
    return jax.jit(functools.partial(eval_step, model=model, aug=aug, flip=flip, streamed=streamed))


CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join JAX's multi-controller runtime (`jax.distributed.initialize`) before anything touches a device.

    With any of the arguments: exactly those (the others auto-detected by JAX). Without: JAX's own
    auto-detection where a launcher says there are several processes (SLURM, Open MPI, PMI, a TPU pod slice);
    on a single machine, nothing. On CPU the processes exchange collectives through gloo."""
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    launched = any(int(os.environ.get(v, "1") or 1) > 1 for v in CLUSTER_SIZE_VARS) \
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or launched):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


class Mesh:
    """The 1-D data-parallel mesh and how host arrays go onto it (one process or many)."""

    def __init__(self, devices=None):
        devices = jax.devices() if devices is None else devices
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self.batch = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.size = len(devices)

    def check_batch(self, batch_size: int, what: str = "--batch-size") -> None:
        if batch_size % self.size:
            raise ValueError(f"{what} {batch_size} is not divisible by the {self.size} devices; use a multiple of "
                             f"{self.size}")

    def put_batch(self, global_array: np.ndarray) -> jax.Array:
        """A global batch array (identical on every process) sharded over the mesh: each process contributes
        its slice."""
        return self.put_local(self.local_rows(global_array), global_array.shape)

    @staticmethod
    def local_rows(global_array: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch (all of it with one process)."""
        n = jax.process_count()
        return np.array_split(global_array, n)[jax.process_index()] if n > 1 else global_array

    def put_local(self, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
        """This process's rows (`local_rows`) of a global batch of `global_shape`, sharded over the mesh."""
        return jax.make_array_from_process_local_data(self.batch, local, global_shape)

    def put_stream(self, feed, global_rows: int) -> tuple[jax.Array, jax.Array]:
        """The next (images, labels) of a `data.stream_batches` feed of this process's rows, as global arrays."""
        images, labels = next(feed)
        return (self.put_local(images, (global_rows, *images.shape[1:])),
                self.put_local(labels, (global_rows, *labels.shape[1:])))

    def replicate(self, tree: PyTree) -> PyTree:
        """A copy of `tree` on every device of the mesh. With several processes each one holds the same values
        and builds the global array from them (`device_put` cannot address other processes' devices)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            a = np.asarray(x)
            return jax.make_array_from_callback(a.shape, self.replicated, lambda index: a[index])
        return jax.tree.map(put, tree)


def evaluate(variables: PyTree, split: tuple[jax.Array, jax.Array] | data_lib.StreamSplit, n: int, eval_fn,
             mesh: Mesh, batch_size: int, return_logits: bool = False) -> dict:
    """Loss, top-1, top-5 over all `n` examples of an on-device split (each counted exactly once), or of a
    `StreamSplit` read as it goes (`eval_fn` then compiled with `streamed=True`)."""
    idx, mask = data_lib.eval_batches(n, batch_size)
    streamed = isinstance(split, data_lib.StreamSplit)
    if streamed:
        feed = data_lib.stream_batches(split, [mesh.local_rows(i) for i in idx])
    sums = {"loss": 0.0, "correct": 0.0, "top5": 0.0, "count": 0.0}
    all_logits = []
    for i, m in zip(idx, mask):
        data = mesh.put_stream(feed, len(i)) if streamed else split
        out = eval_fn(variables, *data, mesh.put_batch(i.astype(np.int32)), mesh.put_batch(m))
        for k in sums:
            sums[k] += float(out[k])
        if return_logits:
            all_logits.append(np.asarray(jax.device_get(out["logits"]))[m])
    res = {"loss": sums["loss"] / max(sums["count"], 1), "top1": sums["correct"] / max(sums["count"], 1),
           "top5": sums["top5"] / max(sums["count"], 1), "n": int(sums["count"])}
    if return_logits:
        res["logits"] = np.concatenate(all_logits) if all_logits else np.zeros((0,))
    return res


# ------------------------------------------------------------------------------------------- checkpoints

def _managers(workdir: pathlib.Path) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    ck = workdir.absolute() / "checkpoints"
    latest = ocp.CheckpointManager(ck / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    best = ocp.CheckpointManager(ck / "best", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["val_top1"], best_mode="max"))
    return latest, best


def _state_tree(state: TrainState, epoch_sums: dict) -> dict:
    """What a checkpoint holds: the train state and the running sums (loss, correct, count) of the epoch in
    progress, so that a run resumed mid-epoch logs the same epoch metrics as an uninterrupted one."""
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng), "epoch_sums": epoch_sums}
    if state.ema is not None:
        tree["ema"] = state.ema
    return tree


def restore_checkpoint(directory: pathlib.Path, target: dict | None = None) -> tuple[dict, dict]:
    """(state tree, meta) of the newest checkpoint under an orbax CheckpointManager directory."""
    directory = pathlib.Path(directory).absolute()
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        if target is None:  # as saved, but replicated on this process's devices (the saving run may have had others)
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
        state_args = ocp.args.StandardRestore(target)
        out = mgr.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


# ------------------------------------------------------------------------------------------------ the loop

def _plot_curves(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tr = [r for r in records if r.get("train_loss") is not None]
    a1.plot([r["epoch"] for r in tr], [r["train_loss"] for r in tr], "o-", label="train")
    a1.plot(ep, [r["val_loss"] for r in records], "o-", label="validation")
    a1.set(xlabel="epoch", ylabel="loss", title="Loss")
    a2.plot([r["epoch"] for r in tr], [100 * r["train_acc"] for r in tr], "o-", label="train")
    a2.plot(ep, [100 * r["val_acc"] for r in records], "o-", label="validation")
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after saving checkpoints/latest; `--resume` continues it."""

    def __init__(self, step: int, epoch: int, workdir: pathlib.Path, signum: int | None = None):
        self.exit_code = 128 + (signum or 15)  # the shell's convention for a process ended by that signal
        super().__init__(f"interrupted at step {step} (epoch {epoch}); checkpoint saved in "
                         f"{workdir / 'checkpoints' / 'latest'}; continue with the same flags and --resume")


class StoppedBeforeTraining(BaseException):
    """SIGTERM/SIGINT arrived before the first training step (while the data or the weights load, a tfds download
    retries, ...): there is nothing to save, so the run stops at once. A BaseException, as KeyboardInterrupt, so
    that the loaders' `except Exception` clauses do not take it for a failed read."""

    def __init__(self, signum: int):
        import signal
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} before the first training step; nothing to save")


class StopRequest:
    """Catches SIGTERM and SIGINT (main thread only). Before `start_training()` a signal raises
    `StoppedBeforeTraining` at once (nothing to save yet); from then on the loop saves a checkpoint and stops
    between two steps; a second signal acts as usual. With several processes the decision is taken together
    (`requested(check_all=True)` gathers every process's flag) so that all save the same step."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal
        if self.signal is not None:  # the second one: as without us
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal = signum
        if not self.training:
            raise StoppedBeforeTraining(signum)
        log.warning("%s received: saving a checkpoint after this step, then stopping (again to stop at once)",
                    signal.Signals(signum).name)

    def start_training(self) -> None:
        """From here on a signal saves a checkpoint after the current step instead of stopping at once."""
        self.training = True
        log.info("training: SIGTERM or Ctrl-C now saves a checkpoint after the current step, then stops")

    def requested(self, check_all: bool) -> bool:
        if jax.process_count() == 1:
            return self.signal is not None
        if not check_all:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))

    def __exit__(self, *exc) -> None:
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_writable(workdir: pathlib.Path) -> None:
    """A clear error now rather than a traceback from orbax or matplotlib after the first epoch."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--workdir {workdir} is not writable: {e.strerror or e}") from None


STREAM_ABOVE_BYTES = 4 << 30  # --stream's default: datasets whose decoded uint8 images take more are streamed


def load_data(cfg: TrainConfig) -> data_lib.Dataset | data_lib.StreamDataset:
    """The dataset in memory, or streamed (`--stream`; by default when `data.decoded_bytes` says it would take
    more than STREAM_ABOVE_BYTES)."""
    log.info("loading %s%s", cfg.dataset, f" from {cfg.data_dir}" if cfg.data_dir else "")
    stream, why = cfg.stream, ""
    if stream is None:
        size = data_lib.decoded_bytes(cfg.dataset, cfg.data_dir)
        stream = size is not None and size > STREAM_ABOVE_BYTES
        if stream:
            why = (f"about {size / 2**30:.1f} GiB decoded, more than {STREAM_ABOVE_BYTES / 2**30:.1f} GiB: streamed "
                   "(--no-stream loads it anyway)")
            log.info("%s: %s", cfg.dataset, why)
    if stream:
        if cfg.on_corrupt != "error":
            raise ValueError("--on-corrupt skip needs the whole dataset decoded first; it does not go with --stream"
                             + (f" ({cfg.dataset}: {why})" if why else ""))
        ds = data_lib.open_stream(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    else:
        ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                   on_corrupt=cfg.on_corrupt, progress=cfg.progress and jax.process_index() == 0)
    if cfg.max_train_examples is not None:
        ds = dataclasses.replace(ds, train=ds.train.sample(cfg.max_train_examples, cfg.seed))
    return ds


def augment_config(cfg: TrainConfig, mean, std, resolution: int | None = None) -> data_lib.AugmentConfig:
    return data_lib.AugmentConfig(crop_padding=cfg.crop_padding, flip=cfg.flip, rotation=cfg.rotation, zoom=cfg.zoom,
                                  translation=cfg.translation, contrast=cfg.contrast,
                                  resolution=cfg.resolution if resolution is None else resolution,
                                  mean=mean, std=std)


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Run the fine-tune described by `cfg`; returns the summary (also printed as the last stdout line).
    SIGTERM/SIGINT before the first training step raise `StoppedBeforeTraining` at once (nothing to save); from the
    first step on they stop the run after the current step with a checkpoint (`Interrupted`)."""
    with StopRequest() as stop:
        return _train_and_evaluate(cfg, stop)


def _train_and_evaluate(cfg: TrainConfig, stop: StopRequest) -> dict:
    t0 = time.time()
    workdir = pathlib.Path(cfg.workdir)
    is_main = jax.process_index() == 0
    mesh = Mesh()
    mesh.check_batch(cfg.batch_size)
    if cfg.head_init not in ("uniform", "zero"):
        raise ValueError(f"--head-init must be 'uniform' or 'zero', got {cfg.head_init!r}")
    if cfg.resolution < 32:
        raise ValueError(f"--resolution {cfg.resolution} is too small: EfficientNet downsamples by 32; use >= 32")
    variants.model_config(cfg.variant)  # unknown variant -> ValueError listing names
    if (cfg.width is not None or cfg.depth is not None) and cfg.init != "scratch":
        raise ValueError(f"--width/--depth build a network of another shape than {cfg.variant}'s: only with "
                         f"--init scratch (--init {cfg.init}: the weights fix the shape)")
    ocfg = cfg.optim_config()
    sides = resolution_plan(cfg)
    mean, std = normalization(cfg)

    if is_main:
        check_writable(workdir)
    ds = load_data(cfg)
    n_train, n_val = len(ds.train), len(ds.val)
    if n_train + n_val == 0 and ds.test is not None:  # a folder of test/<class>/ only
        raise ValueError(f"{ds.source} has no training images, only a test split (test/<class>/); training needs "
                         "train/<class>/ (or <class>/ at the top); to score a run on this test set: python -m "
                         f"effnet_jax.evaluate --workdir RUN --dataset {cfg.dataset}"
                         + (f" --data-dir {cfg.data_dir}" if cfg.data_dir else "") + " --split test")
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training examples are fewer than one batch of {cfg.batch_size}")
    log.info("%s: %d train, %d val, %d classes; %d steps/epoch on %d device(s)", ds.source, n_train, n_val,
             ds.num_classes, steps_per_epoch, mesh.size)

    key = jax.random.key(cfg.seed)
    variables, overrides = initial_variables(cfg, ds.num_classes, jax.random.fold_in(key, 1))
    augs = {r: augment_config(cfg, mean, std, r) for r in sorted(set(sides))}
    mcfg = build_model(cfg, ds.num_classes, overrides=overrides).config
    tx = optim.make_optimizer(ocfg, variables["params"], mcfg, steps_per_epoch)
    schedule = optim.lr_schedule(ocfg, steps_per_epoch)

    if is_main:
        saved = dataclasses.asdict(cfg) | {"model_overrides": overrides, "num_classes": ds.num_classes,
                                           "mean": list(mean), "std": list(std)}
        if cfg.resume and not any(d.name.isdigit() for d in (workdir / "checkpoints" / "latest").glob("*")):
            # (a digits-only name is a finished orbax save; an interrupted one is left as N.orbax-checkpoint-tmp-*)
            raise FileNotFoundError(f"--resume: no checkpoint in {workdir / 'checkpoints' / 'latest'}")
        if cfg.resume and (workdir / "config.json").exists():
            old = json.loads((workdir / "config.json").read_text())
            # workdir: the same run, maybe moved or respelled; stream: where the images are read, not what they are
            ignored = ("resume", "progress", "epochs", "workdir", "checkpoint_every", "stream")
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # (keys added since that run)
            diff = {k for k in saved if k not in ignored and old.get(k, defaults.get(k)) != saved[k]}
            if diff:
                raise ValueError(f"--resume: the run in {workdir} has a different config ({', '.join(sorted(diff))})")
        (workdir / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
        (workdir / "class_names.json").write_text(json.dumps(list(ds.class_names)) + "\n")

    streamed = isinstance(ds, data_lib.StreamDataset)
    if streamed:  # read as it goes
        train_arrays, val_data = None, ds.val
    else:  # on the device, as uint8
        train_arrays = mesh.replicate((jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels)))
        val_data = mesh.replicate((jnp.asarray(ds.val.images), jnp.asarray(ds.val.labels)))
    state = mesh.replicate(create_train_state(variables, tx, cfg))
    zero_sums = mesh.replicate({"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
                                "count": jnp.zeros((), jnp.float32)})
    latest_mgr, best_mgr = _managers(workdir)
    records: list[dict] = []
    start_epoch, start_batch, start_sums = 1, 0, zero_sums
    if cfg.resume:
        if latest_mgr.latest_step() is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {workdir / 'checkpoints' / 'latest'}")
        tree, meta = restore_checkpoint(workdir / "checkpoints" / "latest", _state_tree(state, zero_sums))
        state = mesh.replicate(state.replace(
            step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
            ema=tree.get("ema"), rng=jax.random.wrap_key_data(tree["rng"])))
        # meta: epochs completed, and batches done of the next one (a mid-epoch checkpoint)
        start_epoch, start_batch = meta["epoch"] + 1, meta.get("batches_done", 0)
        start_sums = mesh.replicate(tree["epoch_sums"])
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["epoch"] <= meta["epoch"]]
        log.info("resumed at epoch %d, batch %d (step %d)", start_epoch, start_batch, int(state.step))

    eval_model = build_model(cfg, ds.num_classes, overrides=overrides)
    eval_fns = {r: jit_eval_step(eval_model, a, cfg.eval_flip, streamed) for r, a in augs.items()}
    eval_vars = lambda s: s.ema if s.ema is not None else {"params": s.params, "batch_stats": s.batch_stats}  # noqa

    def write_metrics(rec):
        records.append(rec)
        if is_main:
            with open(workdir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            _plot_curves(records, workdir / "curves.png")

    def save_latest(step: int, state: TrainState, sums: dict, meta: dict) -> None:
        """Save checkpoints/latest (orbax: all processes, written to a temporary directory and renamed when
        complete), unless the epoch's losses so far hold a NaN/inf: then the last good checkpoint stays."""
        loss = float(jax.device_get(sums["loss"]))
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} before step {step} (epoch "
                                     f"{meta['epoch'] + 1}); nothing saved, the last good checkpoint is kept in "
                                     f"{workdir / 'checkpoints' / 'latest'}")
        latest_mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state, sums)),
                                                      meta=ocp.args.JsonSave(meta)))

    if start_epoch == 1 and start_batch == 0:  # the notebook's "pre-finetune" accuracy
        pre = evaluate(eval_vars(state), val_data, n_val, eval_fns[cfg.resolution], mesh, cfg.eval_batch_size)
        write_metrics({"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": pre["loss"],
                       "val_acc": pre["top1"], "val_top5": pre["top5"], "img_s": None, "lr": None,
                       "time_s": time.time() - t0, "resolution": cfg.resolution})
        log.info("before fine-tuning: val top-1 %.2f%%", 100 * pre["top1"])

    step_fns: dict[tuple[int, int], Any] = {}
    with latest_mgr, best_mgr:  # (closing the managers waits for their saves)
        stop.start_training()
        for epoch in range(start_epoch, cfg.epochs + 1):
            phase = [p for p in optim.phases(ocfg) if p.start_epoch < epoch][-1]
            fu, side = optim.frozen_units(mcfg, phase.freeze), sides[epoch - 1]
            if (fu, side) not in step_fns:  # one compiled step per freezing phase and input side
                step_fns[fu, side] = jit_train_step(build_model(cfg, ds.num_classes, fu, overrides), tx, augs[side],
                                                    cfg.label_smoothing, cfg.ema_decay, streamed)
            step_fn = step_fns[fu, side]
            # the data order is a function of (seed, epoch) only: a resumed run skips the batches already done
            batches = data_lib.batch_indices(data_lib.epoch_permutation(n_train, cfg.seed, epoch), cfg.batch_size)
            first = start_batch if epoch == start_epoch else 0
            if streamed:  # background threads read this process's rows of the batches ahead
                feed = data_lib.stream_batches(ds.train, [mesh.local_rows(b) for b in batches[first:]])
            sums = start_sums if epoch == start_epoch else zero_sums  # summed on device, read once per epoch
            t_epoch, t_steady, n_steady = time.time(), time.time(), 0
            bar = tqdm(range(first, len(batches)), initial=first, total=len(batches), unit="batch",
                       desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and is_main), dynamic_ncols=True)
            for i in bar:
                data = mesh.put_stream(feed, len(batches[i])) if streamed else train_arrays
                state, m = step_fn(state, *data, mesh.put_batch(batches[i].astype(np.int32)))
                sums = jax.tree.map(jnp.add, sums, {k: m[k] for k in sums})
                step = (epoch - 1) * steps_per_epoch + i + 1  # == state.step, without waiting for it
                if i == first:
                    jax.block_until_ready(m)
                    t_steady = time.time()  # img/s leaves out the first (compiling) step
                else:
                    n_steady += len(batches[i])
                if i % 10 == 0 or i == len(batches) - 1:
                    m = jax.device_get(m)
                    if not math.isfinite(float(m["loss"])):
                        raise FloatingPointError(
                            f"loss is {float(m['loss'])} at step {step} (epoch {epoch}); the last good checkpoint "
                            f"is kept in {workdir / 'checkpoints' / 'latest'}")
                    bar.set_postfix(loss=f"{float(m['loss']) / float(m['count']):.3f}",
                                    img_s=f"{n_steady / max(time.time() - t_steady, 1e-9):.0f}")
                if i + 1 < len(batches):  # (the epoch's end saves below, after the validation)
                    stopping = stop.requested(check_all=i % 10 == 0)
                    if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                        save_latest(step, state, sums, {"epoch": epoch - 1, "batches_done": i + 1})
                    if stopping:
                        raise Interrupted(step, epoch, workdir, stop.signal)
            bar.close()
            sums = jax.device_get(sums)
            img_s = n_steady / max(time.time() - t_steady, 1e-9) if n_steady else None
            val = evaluate(eval_vars(state), val_data, n_val, eval_fns[side], mesh, cfg.eval_batch_size)
            rec = {"epoch": epoch, "train_loss": float(sums["loss"] / sums["count"]),
                   "train_acc": float(sums["correct"] / sums["count"]),
                   "val_loss": val["loss"], "val_acc": val["top1"], "val_top5": val["top5"], "img_s": img_s,
                   "lr": float(schedule(step - 1)), "time_s": time.time() - t0, "resolution": side}
            write_metrics(rec)
            log.info("epoch %d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.0f img/s | %.0f s", epoch,
                     rec["train_loss"], 100 * rec["train_acc"], rec["val_loss"], 100 * rec["val_acc"], img_s or 0,
                     time.time() - t_epoch)
            meta = {"epoch": epoch, "val_top1": val["top1"]}
            save_latest(step, state, zero_sums, meta)
            if side == cfg.resolution:  # (the best checkpoint is evaluated at --resolution)
                best_mgr.save(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_state_tree(state, zero_sums)), meta=ocp.args.JsonSave(meta)),
                    metrics={"val_top1": val["top1"]})
            if epoch < cfg.epochs and stop.requested(check_all=True):
                raise Interrupted(step, epoch, workdir, stop.signal)
    trained = [r for r in records if r["epoch"] > 0]
    summary = {"variant": cfg.variant, "dataset": cfg.dataset, "init": cfg.init,
               "pre_finetune_val_acc": records[0]["val_acc"] if records and records[0]["epoch"] == 0 else None,
               "final_val_acc": trained[-1]["val_acc"] if trained else None,
               "best_val_acc": max((r["val_acc"] for r in trained), default=None),
               "epochs": cfg.epochs, "n_train": n_train, "n_val": n_val, "time_s": round(time.time() - t0, 1),
               "workdir": str(workdir)}
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
