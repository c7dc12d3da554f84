#!/usr/bin/env python3
"""Time the two depthwise implementations ('shift', 'xla') inside a whole model: jitted train step
(forward + backward + BN update) and eval forward, after compilation, median of repeats.

    python benchmarks/depthwise_impl.py --variant b0 --resolution 32 --batch-size 64

This is the measurement behind `depthwise_impl='auto'` (shift on CPU). Prints a table and a JSON line.
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import effnet_jax
from effnet_jax.model.network import random_variables


def bench(variant, impl, res, bs, repeats):
    model = effnet_jax.create_model(variant, num_classes=10, depthwise_impl=impl)
    variables = jax.tree.map(jnp.asarray, random_variables(model, res))
    x = jnp.asarray(np.random.RandomState(0).randn(bs, res, res, 3), jnp.float32)
    y = jnp.arange(bs) % 10

    def loss(p, b):
        logits, new = model.apply({"params": p, "batch_stats": b}, x, train=True,
                                  rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    train = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ev = jax.jit(lambda v, x: model.apply(v, x))
    out = {}
    for name, fn, args in (("train", train, (variables["params"], variables["batch_stats"])),
                           ("eval", ev, (variables, x))):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[f"{name}_compile_s"] = time.perf_counter() - t
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t)
        out[f"{name}_img_s"] = bs / float(np.median(ts))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="b0")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    res = {impl: bench(a.variant, impl, a.resolution, a.batch_size, a.repeats) for impl in ("shift", "xla")}
    print(f"{'impl':<6}{'train img/s':>13}{'eval img/s':>12}{'compile train s':>17}")
    for impl, r in res.items():
        print(f"{impl:<6}{r['train_img_s']:>13.1f}{r['eval_img_s']:>12.1f}{r['train_compile_s']:>17.1f}")
    print(json.dumps({"variant": a.variant, "resolution": a.resolution, "batch_size": a.batch_size,
                      "backend": jax.default_backend(), "jax": jax.__version__, "machine": platform.processor(),
                      "results": res,
                      "train_ratio_shift_over_xla": res["shift"]["train_img_s"] / res["xla"]["train_img_s"],
                      "eval_ratio_shift_over_xla": res["shift"]["eval_img_s"] / res["xla"]["eval_img_s"]}))


if __name__ == "__main__":
    main()
