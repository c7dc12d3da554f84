"""The run's config: `TrainConfig`, every flag of `effnet-train` with its help text, saved as config.json.

Each field's `metadata["help"]` is its flag's help; the augmentation settings are one field, `augment` (an
`effnet_jax.data.AugmentConfig`), whose fields are flags too. `TrainConfig.from_saved` reads every config.json
layout this project has written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

from effnet_jax.data.augment import AugmentConfig
from effnet_jax.data.transform import EvalTransform, run_eval_transform
from effnet_jax.errors import ConfigError
from effnet_jax.model import variants
from effnet_jax.model.network import HEAD_INITS
from effnet_jax.train import optim
from effnet_jax.weights.published import weights_entry

# with pretrained weights and no --freeze: the top 8 blocks (+ head) train; why 8: docs/training.md
DEFAULT_TRAINED_BLOCKS = 8


def option(default: Any, help: str, **metadata) -> Any:
    """A config field with this default and its flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def option_made_by(factory: Callable[[], Any], help: str) -> Any:
    """A config field whose default `factory()` makes (a nested config), and its help text."""
    return dataclasses.field(default_factory=factory, metadata={"help": help})


def _rgb(flag: str, value, positive: bool) -> tuple[float, float, float] | None:
    """'R,G,B' (a flag) or a sequence (config.json) -> three floats; None stays None."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        example = "0.247,0.243,0.261" if positive else "0.4914,0.4822,0.4465"
        raise ConfigError(f"{flag} {value!r}: expected three numbers R,G,B for pixels in [0, 1], e.g. {example}"
                          + (" (all > 0)" if positive else ""))
    return values


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as config.json. Defaults: our recipe (docs/training.md)."""
    variant: str = option("b0", "b0..b7, lite0..lite4, v2_s, v2_m, v2_l, v2_b0..v2_b3; when --init names its own (a "
                          "Hub repo, a timm checkpoint, a .keras file), that one")
    dataset: str = option("cifar10", "tfds name (cifar10, cifar100, svhn_cropped, tf_flowers, ...) or folder:PATH")
    data_dir: str | None = option(None, "tfds data dir, or the CIFAR python tarball / an image folder or .tar.gz")
    init: str = option("imagenet", "imagenet | scratch | hf-hub:timm/NAME | PATH.pth | PATH.safetensors | "
                       "PATH.keras | PATH.weights.h5 | DIR (a previous run, a converted model, a timm checkpoint)")
    workdir: str = option("runs/default", "where config, metrics.jsonl, curves.png and checkpoints go")
    epochs: int = option(4, "")
    batch_size: int = option(64, "global batch size")
    eval_batch_size: int = option(256, "")
    eval_flip: bool = option(False, "test-time augmentation for the validation numbers: average each image's and "
                             "its mirror's logits (one more forward pass per image)")
    optimizer: str = option("adamw", " | ".join(sorted(optim.OPTIMIZERS, key="adamw".__ne__)))
    lr: float = option(3e-3, "peak learning rate")
    weight_decay: float = option(1e-4, "")
    schedule: str = option("cosine", "cosine (warmup + cosine decay to 0) | constant")
    warmup_epochs: float | None = option(None, "default: min(1, epochs / 5)")
    label_smoothing: float = option(0.1, "")
    grad_clip: float = option(0.0, "global gradient norm clip, 0 = off")
    freeze: str | None = option(None, "none | head-only | N (train only the top N blocks + head); default: "
                                f"{DEFAULT_TRAINED_BLOCKS} with pretrained weights (all blocks of a smaller "
                                "network), none from scratch")
    head_init: str = option("zero", "a new classifier's init: zero (big_vision's) | uniform (torchvision's)")
    two_phase: bool = option(False, "first --phase1-epochs head-only, then --freeze at lr * --phase2-lr-scale")
    phase1_epochs: int = option(0, "")
    phase2_lr_scale: float = option(0.1, "")
    ema_decay: float = option(0.0, "parameter EMA, 0 = off")
    resolution: int = option(128, "input side after augmentation, training and evaluation (32 px CIFAR images "
                             "are resized to it)")
    resolution_schedule: str = option("", "progressive resizing: SIDE:EPOCHS[,...] trains the first epochs at "
                                      "smaller sides (e.g. 64:2), the rest at --resolution")
    input_mean: tuple[float, float, float] | None = option(
        None, "input normalization R,G,B for pixels in [0, 1], e.g. 0.4914,0.4822,0.4465; default: the init "
        "weights' (ImageNet's for B0-B7 and V2-S/M, 0.5 for V2-L, 0.498 for Lite)", flag_type=str)
    input_std: tuple[float, float, float] | None = option(None, "as --input-mean, e.g. 0.247,0.243,0.261",
                                                          flag_type=str)
    augment: AugmentConfig = option_made_by(AugmentConfig, "the training augmentation (its fields are flags)")
    dtype: str = option("float32", "compute dtype: float32 | bfloat16")
    drop_rate: float | None = option(None, "classifier dropout; default: the variant's")
    drop_path_rate: float | None = option(None, "stochastic depth; default: the variant's")
    width: float | None = option(None, "custom compound scaling: replaces the variant's width coefficient "
                                 "(channels, rounded to 8) in a network built from scratch; --init scratch only")
    depth: float | None = option(None, "custom compound scaling: replaces the variant's depth coefficient (block "
                                 "repeats, rounded up); --init scratch only")
    val_fraction: float = option(0.1, "seeded, stratified validation split of the training data")
    seed: int = option(0, "")
    resume: bool = option(False, "continue the run in --workdir (the same flags) from its newest checkpoint that "
                          "reads back")
    overwrite: bool = option(False, "when --workdir holds a run, move it aside to WORKDIR.old-<UTC time> and "
                             "start afresh (without it, a --workdir holding a run is refused)")
    checkpoint_every: int = option(0, "also save checkpoints/latest every N steps (0: at epoch ends only)")
    on_corrupt: str = option("error", "an undecodable image: error | skip")
    stream: bool | None = option(None, "read the images from the source as training goes (grain threads decode "
                                 "the next batches) instead of holding the decoded dataset in memory and on the "
                                 "device: for datasets larger than memory; same results as without. Default: "
                                 "streamed when the decoded images would exceed data.STREAM_ABOVE_BYTES")
    max_train_examples: int | None = option(None, "use only N training examples, a seeded random subset (smoke "
                                            "tests, quick looks)")
    progress: bool = option(True, "progress bars")

    def __post_init__(self) -> None:
        """Check the flags here, at the boundary, so that a bad one fails before anything loads."""
        object.__setattr__(self, "input_mean", _rgb("--input-mean", self.input_mean, positive=False))
        object.__setattr__(self, "input_std", _rgb("--input-std", self.input_std, positive=True))
        if isinstance(self.augment, dict):  # (from config.json)
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
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
        self.resolution_plan()  # the schedule's own checks

    @classmethod
    def from_flat(cls, values: dict) -> "TrainConfig":
        """A config from flag names (`effnet-train`'s flags, a preset): the augmentation's go into `augment`."""
        aug_names = {f.name for f in dataclasses.fields(AugmentConfig)}
        aug = {k: values[k] for k in values if k in aug_names}
        rest = {k: v for k, v in values.items() if k not in aug_names}
        base = rest.pop("augment", None) or AugmentConfig()
        if isinstance(base, dict):
            base = AugmentConfig(**base)
        return cls(**rest, augment=dataclasses.replace(base, **aug))

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainConfig":
        """The config of a run's config.json, of this layout or an earlier one (the augmentation's fields at the
        top level; the normalization as `mean`/`std`), which also holds keys that are not fields."""
        names = {f.name for f in dataclasses.fields(cls)} | {f.name for f in dataclasses.fields(AugmentConfig)}
        values = {k: v for k, v in saved.items() if k in names}
        for field, old in (("input_mean", "mean"), ("input_std", "std")):
            if values.get(field) is None and old in saved:
                values[field] = saved[old]
        return cls.from_flat(values)

    def to_saved(self, **extras) -> dict:
        """config.json's content: the resolved config's fields, as JSON reads them back, and `extras`."""
        return json.loads(json.dumps(dataclasses.asdict(self.resolved()) | extras))

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
        e = weights_entry(self.variant)
        return (tuple(e.mean) if self.input_mean is None else self.input_mean,
                tuple(e.std) if self.input_std is None else self.input_std)

    def resolved(self) -> "TrainConfig":
        """This config with the normalization written out (what config.json stores)."""
        mean, std = self.normalization()
        return dataclasses.replace(self, input_mean=mean, input_std=std)

    def eval_transform(self, resolution: int | None = None) -> EvalTransform:
        """The run's evaluation transform at `resolution` (default: `--resolution`): the one function through
        which validation, `evaluate`, `predict` and `export` preprocess a run's images (crop style 'run')."""
        mean, std = self.normalization()
        return run_eval_transform(self.resolution if resolution is None else resolution, mean, std)


# The user's reference: a torchvision notebook (B0, 32 px, crop pad 4 + flip, Adam 1e-3, batch 64, 25 epochs).
PRESETS: dict[str, dict[str, Any]] = {
    "notebook": dict(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                     label_smoothing=0.0, batch_size=64, epochs=25, resolution=32, crop_padding=4, flip=True,
                     freeze="none", ema_decay=0.0),
}

# config.json keys that `--resume` may change: the same run maybe moved or respelled (workdir), how long it goes
# (epochs), how often it saves, and where the images are read from (stream), not what they are
RESUME_MAY_CHANGE = ("resume", "overwrite", "progress", "epochs", "workdir", "checkpoint_every", "stream")
