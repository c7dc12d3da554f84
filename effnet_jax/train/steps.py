"""The compiled steps: the train state, one optimizer step, one evaluation batch, and an evaluation pass.

Plain functions, as flax's examples/imagenet: `create_train_state`, `train_step`, `eval_step`, `evaluate`. The
dataset lives on the devices as uint8 (replicated) and the host sends only the global example indices of each
batch, sharded over the mesh; the step gathers, augments (per-example RNG keyed by the example index) and
trains. A streamed dataset sends the batch itself instead, with the same indices, so both train alike.
BatchNorm's batch statistics are global reductions (synchronized over the devices). The state is donated.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from effnet_jax import data as data_lib
from effnet_jax.data.transform import EvalTransform
from effnet_jax.model.network import EfficientNet
from effnet_jax.train import optim
from effnet_jax.train.mesh import Mesh

PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema: PyTree | None       # {'params', 'batch_stats'} EMA, or None
    rng: jax.Array           # base key; step keys are fold_in(rng, step)


def create_train_state(variables: PyTree, tx: optax.GradientTransformation, seed: int, ema: bool = False
                       ) -> TrainState:
    """Step 0: the variables, the optimizer's initial state, the EMA (a copy of the variables) when `ema`, and the
    base key of the step keys (`jax.random.key(seed)`)."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
    # a copy: the state is donated, and one buffer cannot be donated twice
    ema = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}) if ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema=ema, rng=jax.random.key(seed))


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, *,
               model: EfficientNet, tx: optax.GradientTransformation, aug: data_lib.AugmentConfig,
               transform: EvalTransform, label_smoothing: float, ema_decay: float, streamed: bool = False
               ) -> tuple[TrainState, dict]:
    """One optimizer step on the examples `indices` of the on-device dataset (`images` uint8, `labels`): the
    augmentation `aug`, then the run's input transform's device part (its side and normalization).
    `streamed`: `images`/`labels` are the batch itself, and `indices` its examples' indices (which key each
    example's augmentation, so a streamed run trains exactly as one with the data on the device)."""
    key = jax.random.fold_in(state.rng, state.step)
    images, y = (images, labels) if streamed else (images[indices], labels[indices])
    x = transform.on_device(data_lib.augment_batch(jax.random.fold_in(key, 0), images, indices, aug))

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
              model: EfficientNet, transform: EvalTransform, flip: bool = False, streamed: bool = False) -> dict:
    """Sums of loss, top-1 and top-5 hits and count over the valid (`mask`) examples of one padded batch.
    `flip`: test-time augmentation, the logits are the mean of the image's and its horizontal mirror's.
    `streamed`: `images`/`labels` are the batch itself (as in `train_step`)."""
    images, y = (images, labels) if streamed else (images[indices], labels[indices])
    x = transform.on_device(images.astype(jnp.float32) / 255.0)
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
                   transform: EvalTransform, label_smoothing: float, ema_decay: float, streamed: bool = False):
    """`train_step` compiled as the trainer runs it, the state donated (argument 0). The benchmarks and the
    sharding test take it from here, so they time and check this very step."""
    return jax.jit(functools.partial(train_step, model=model, tx=tx, aug=aug, transform=transform,
                                     label_smoothing=label_smoothing, ema_decay=ema_decay, streamed=streamed),
                   donate_argnums=0)


def jit_eval_step(model: EfficientNet, transform: EvalTransform, flip: bool = False, streamed: bool = False):
    """`eval_step` compiled as the trainer and `effnet-evaluate` run it, with the run's `transform`."""
    return jax.jit(functools.partial(eval_step, model=model, transform=transform, flip=flip, streamed=streamed))


def evaluate(variables: PyTree, split: tuple[jax.Array, jax.Array] | data_lib.Split, n: int, eval_fn,
             mesh: Mesh, batch_size: int, return_logits: bool = False) -> dict:
    """Loss, top-1, top-5 over all `n` examples of an on-device split (each counted exactly once), or of a
    streamed `Split` read as it goes (`eval_fn` then compiled with `streamed=True`)."""
    idx, mask = data_lib.eval_batches(n, batch_size)
    streamed = isinstance(split, data_lib.Split)
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
