"""Fine-tuning optimization, built from optax: schedule, optimizer, freezing, loss, metrics, parameter EMA.

Everything here is a plain function over pytrees; the trainer calls them with an `OptimConfig`.

* **Parameter names.** Masks are chosen by regular expressions over '/'-joined parameter paths such as
  `blocks_3/dw_bn/scale` or `classifier/kernel` (the convention of big_vision), see `param_names` and
  `regex_mask`. `weight_decay_mask` selects conv/dense kernels; `trainable_mask` selects what a freeze
  setting trains.
* **Freezing.** `freeze` is `'none'`, `'head-only'` (the classifier only) or N, an integer (the top N
  blocks, the head conv + head_bn, and the classifier). Frozen parameters get `optax.set_to_zero()` inside
  an `optax.multi_transform`, so they stay bit-for-bit unchanged and carry no optimizer state; gradient
  clipping and weight decay see the trainable parameters only. `frozen_units(config, freeze)` is the
  model's `frozen_units`, which keeps the BatchNorm of frozen units in inference mode.
* **Schedule.** One rule: linear warmup from 0 to the peak learning rate over `warmup_epochs` (floored to
  whole steps), then a cosine decay to exactly 0 at the end of the phase
  (`optax.warmup_cosine_decay_schedule`, end value 0);
  `warmup_epochs=0` starts at the peak. `schedule='constant'` keeps the peak after the warmup instead (the
  reference notebook's plain Adam).
* **Two phases** (`two_phase=True`, as the Keras fine-tuning example): phase 1 (`phase1_epochs`) trains
  the classifier only ('head-only') at `lr`; phase 2 (the remaining `epochs - phase1_epochs`) trains what
  `freeze` leaves trainable at `lr * phase2_lr_scale`. Each phase is its own optimizer — its own warmup
  and cosine, its own Adam moments and step count — started fresh at the phase's first step, as
  recompiling the Keras model with a new optimizer does: the phases are chained
  `optax.transforms.conditionally_transform`s, of which exactly one runs at each step while the others
  pass the updates through untouched. So during phase 1 the phase-2 parameters do not move and the
  phase-2 optimizer state stays at its initial value (zero moments, count 0); it does not see phase-1
  gradients. The classifier, trained in both phases, restarts with fresh moments in phase 2.
  `phases(cfg)` tells the trainer which `freeze` (hence which `frozen_units`) each phase uses.
* **Optimizers.** 'adamw': decoupled weight decay (`optax.adamw`, scaled by the learning rate);
  'adam', 'sgd', 'rmsprop': L2 weight decay added to the gradient before the optimizer (as PyTorch's
  `weight_decay` argument). 'sgd' uses Nesterov momentum `momentum` (plain SGD when 0); 'rmsprop' uses
  optax's decay 0.9 and eps 1e-8 with momentum `momentum`. Weight decay spares BN scales/biases and biases.
* **EMA** of the parameters (not of gradients): `ema_update`, with the decay warmed up as
  `tf.train.ExponentialMovingAverage(num_updates=step)` does in the TF EfficientNet reference:
  min(decay, (1 + step) / (10 + step)).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from effnet_jax.errors import ConfigError
from effnet_jax.model.network import unit_names, unit_of
from effnet_jax.model.variants import ModelConfig

__all__ = [
    "OPTIMIZERS", "OptimConfig", "Phase", "phases", "lr_schedule",
    "param_names", "regex_mask", "weight_decay_mask", "trainable_mask", "frozen_units",
    "make_optimizer", "cross_entropy", "topk_correct", "accuracy", "ema_decay_at", "ema_update",
]

PyTree = Any
Freeze = str | int
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
WEIGHT_DECAY_PATTERN = r"(?:.*/)?kernel"  # conv (incl. depthwise) and dense kernels; no scale, no bias


def _parse_freeze(freeze: Freeze) -> Freeze:
    """'none' | 'head-only' | N >= 1 (an int or a decimal string)."""
    if freeze in ("none", "head-only"):
        return freeze
    try:
        n = int(freeze)
    except (TypeError, ValueError):
        raise ConfigError(f"freeze must be 'none', 'head-only' or a number of blocks N, got {freeze!r}") from None
    if isinstance(freeze, float) or n < 1:
        raise ConfigError(f"freeze=N needs an integer N >= 1 (use 'head-only' to train the classifier only), "
                         f"got {freeze!r}")
    return n


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The trainer's optimization flags. `epochs` counts all epochs, both phases included."""
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    epochs: int = 10
    grad_clip: float = 0.0          # maximum global gradient norm; 0 = off
    momentum: float = 0.9           # sgd / rmsprop
    label_smoothing: float = 0.0
    freeze: Freeze = "none"         # 'none', 'head-only' or N (top N blocks + head + classifier)
    two_phase: bool = False
    phase1_epochs: int = 0          # two-phase: epochs of classifier-only training
    phase2_lr_scale: float = 0.1    # two-phase: phase-2 peak lr = lr * phase2_lr_scale
    ema_decay: float = 0.0          # 0 = off
    schedule: str = "cosine"        # 'cosine' (warmup + cosine to 0) or 'constant' (warmup, then lr)

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", _parse_freeze(self.freeze))  # parsed once, here
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        checks = {
            "lr > 0": self.lr > 0, "weight_decay >= 0": self.weight_decay >= 0,
            "epochs >= 1": self.epochs >= 1, "warmup_epochs >= 0": self.warmup_epochs >= 0,
            "grad_clip >= 0": self.grad_clip >= 0, "0 <= momentum < 1": 0 <= self.momentum < 1,
            "0 <= label_smoothing < 1": 0 <= self.label_smoothing < 1,
            "0 <= ema_decay < 1": 0 <= self.ema_decay < 1,
        }
        if self.two_phase:
            checks.update({"0 < phase1_epochs < epochs": 0 < self.phase1_epochs < self.epochs,
                           "phase2_lr_scale > 0": self.phase2_lr_scale > 0})
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ConfigError(f"invalid OptimConfig: {', '.join(failed)} does not hold")
        if self.two_phase and self.freeze == "head-only":
            raise ConfigError("two_phase needs a phase-2 freeze of 'none' or N, got 'head-only'")
        for phase in phases(self):
            if self.warmup_epochs >= phase.epochs:
                raise ConfigError(f"warmup_epochs={self.warmup_epochs} must be shorter than every phase "
                                 f"(a phase of {phase.epochs} epochs)")


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training with one set of trainable parameters and one schedule."""
    start_epoch: int
    epochs: int
    freeze: Freeze
    lr: float  # peak learning rate


def phases(cfg: OptimConfig) -> tuple[Phase, ...]:
    """The training phases: one, or (classifier only, then `freeze`) for two-phase fine-tuning."""
    freeze = cfg.freeze  # (parsed by OptimConfig)
    if not cfg.two_phase:
        return (Phase(0, cfg.epochs, freeze, cfg.lr),)
    return (Phase(0, cfg.phase1_epochs, "head-only", cfg.lr),
            Phase(cfg.phase1_epochs, cfg.epochs - cfg.phase1_epochs, freeze, cfg.lr * cfg.phase2_lr_scale))


def _phase_schedule(cfg: OptimConfig, phase: Phase, steps_per_epoch: int) -> optax.Schedule:
    """Warmup from 0 to `phase.lr` over floor(warmup_epochs · steps_per_epoch) steps, then cosine to 0 at
    the phase's end; counted from the phase's first step."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":  # the reference notebook's plain Adam
        return optax.join_schedules([optax.linear_schedule(0.0, phase.lr, warmup), optax.constant_schedule(phase.lr)],
                                    [warmup]) if warmup else optax.constant_schedule(phase.lr)
    return optax.warmup_cosine_decay_schedule(  # floor: warmup_epochs < phase.epochs leaves a decay
        init_value=0.0, peak_value=phase.lr, warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
        decay_steps=phase.epochs * steps_per_epoch, end_value=0.0)


def lr_schedule(cfg: OptimConfig, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each global step (0-based: the lr of the step's update). Two phases: the
    phase schedules joined at the phase-2 start (`optax.join_schedules`). 0 after the last step."""
    ps = phases(cfg)
    schedules = [_phase_schedule(cfg, p, steps_per_epoch) for p in ps]
    if len(schedules) == 1:
        return schedules[0]
    return optax.join_schedules(schedules, [p.start_epoch * steps_per_epoch for p in ps[1:]])


def param_names(params: PyTree) -> PyTree:
    """The tree of '/'-joined parameter paths, e.g. 'blocks_3/dw_bn/scale'."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)


def regex_mask(params: PyTree, pattern: str) -> PyTree:
    """True where the parameter's path matches `pattern` in full (`re.fullmatch`)."""
    regex = re.compile(pattern)
    return jax.tree.map(lambda name: regex.fullmatch(name) is not None, param_names(params))


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for conv/dense kernels (stem, expand, depthwise, SE, project, head, classifier); False for
    BatchNorm scales/biases and all biases."""
    return regex_mask(params, WEIGHT_DECAY_PATTERN)


def frozen_units(config: ModelConfig, freeze: Freeze) -> int:
    """The model's `frozen_units` for a freeze setting: how many leading units of `unit_names(config)`
    (stem, blocks_0.., head) are frozen. 'none' → 0; 'head-only' → all; N → 1 + num_blocks − N."""
    freeze = _parse_freeze(freeze)
    num_blocks = len(config.blocks)
    if freeze == "none":
        return 0
    if freeze == "head-only":
        return num_blocks + 2
    if freeze > num_blocks:
        raise ConfigError(f"freeze={freeze}: this model has {num_blocks} blocks, N must be in 1..{num_blocks} "
                         f"(use 'none' to train everything)")
    return 1 + num_blocks - freeze


def trainable_mask(params: Mapping[str, PyTree], config: ModelConfig, freeze: Freeze) -> PyTree:
    """True for the parameters `freeze` trains: all ('none'), the classifier ('head-only'), or the top N
    blocks + head + head_bn + classifier (N). `params` is the 'params' collection of the model."""
    units = unit_names(config)
    first_trained = frozen_units(config, freeze)

    def trained(top: str) -> bool:
        unit = unit_of(top)
        if unit is None:
            return True
        if unit not in units:
            raise ValueError(f"parameter {top!r} belongs to no unit of this model ({units[0]}..{units[-1]}); "
                             f"pass the 'params' collection of a model built from this config")
        return units.index(unit) >= first_trained

    names = [top for top in params if trained(top)]
    if not names:
        raise ConfigError(f"freeze={freeze!r} leaves nothing to train (a model without classifier?)")
    return regex_mask(params, "(?:" + "|".join(map(re.escape, names)) + ")/.*")


def _optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clipping (if on), weight decay and the update rule, for the trainable parameters."""
    if cfg.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    else:
        momentum = cfg.momentum or None
        rule = {"adam": lambda: optax.adam(schedule),
                "sgd": lambda: optax.sgd(schedule, momentum=momentum, nesterov=momentum is not None),
                "rmsprop": lambda: optax.rmsprop(schedule, momentum=momentum)}[cfg.optimizer]()
        tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask), rule) \
            if cfg.weight_decay else rule
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip else tx


def make_optimizer(cfg: OptimConfig, params: Mapping[str, PyTree], model_config: ModelConfig,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer for `params` (arrays or `jax.ShapeDtypeStruct`s; only names and structure are used).

    Per phase: `optax.multi_transform` of the optimizer (clipping, weight decay, schedule) on the
    trainable parameters and `optax.set_to_zero()` on the frozen ones. Two phases: a chain of one such
    optimizer per phase, each run only during its steps (`conditionally_transform`, identity otherwise),
    so every phase starts with a fresh state. Its step counter counts all `update` calls.
    """
    ps = phases(cfg)
    txs = []
    for phase in ps:
        labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, model_config,
                                                                                   phase.freeze))
        tx = _optimizer(cfg, _phase_schedule(cfg, phase, steps_per_epoch))
        txs.append(optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels))
    if len(txs) == 1:
        return txs[0]
    bounds = [p.start_epoch * steps_per_epoch for p in ps] + [math.inf]
    return optax.chain(*(optax.transforms.conditionally_transform(tx, _step_in(lo, hi))
                         for tx, lo, hi in zip(txs, bounds, bounds[1:])))


def _step_in(lo: int, hi: float) -> Callable[[jax.Array], jax.Array]:
    return lambda step: (step >= lo) & (step < hi)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (float32) against integer `labels`, the targets smoothed to
    (1 − a)·one_hot + a/num_classes (`optax.smooth_labels`). Shape: logits.shape[:-1]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int = 5) -> jax.Array:
    """Per-example 1.0 where the label is among the top-k logits (fewer than k classes score strictly
    higher; ties count in the label's favour), else 0.0. Sum it over (padded) batches."""
    true = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    return (jnp.sum(logits > true, axis=-1) < k).astype(jnp.float32)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy of the batch (a scalar)."""
    return jnp.mean(topk_correct(logits, labels, 1))


def ema_decay_at(decay: float, step: int | jax.Array) -> jax.Array:
    """The warmed-up EMA decay after `step` optimizer updates (1 for the first):
    min(decay, (1 + step) / (10 + step)), as tf.train.ExponentialMovingAverage(num_updates=step)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params: PyTree, params: PyTree, decay: float, step: int | jax.Array) -> PyTree:
    """One EMA step of the parameters (any pytree, e.g. also batch_stats), pure:
    ema ← d·ema + (1 − d)·params with d = `ema_decay_at(decay, step)`; `step` counts the optimizer
    updates applied so far (call after each update; start from ema_params = the initial params)."""
    d = ema_decay_at(decay, step)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)
