"""What a `TrainConfig` builds: its model, its dataset, its initial weights."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

from effnet_jax import data as data_lib
from effnet_jax.loader import load
from effnet_jax.model.network import EfficientNet, create_model
from effnet_jax.train.config import TrainConfig

log = logging.getLogger("effnet_jax.train")
PyTree = Any


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
