#!/usr/bin/env python3
"""Where the time goes: each unit of the network timed alone, our JAX layers against torchvision's same unit.

The whole-step comparison (`throughput.py`) says how far apart the two frameworks are; this says where. For
every unit in forward order (stem conv+BN+act, every MBConv / Fused-MBConv block, head conv+BN+act; pooling
and the classifier are negligible and left out) and, inside every MBConv block, for its depthwise convolution
alone, it times on the unit's real input shape:

* train: forward in training mode (batch statistics, stochastic depth) + backward to the parameters and the
  input (the stem: parameters only, as in the network). JAX: `jax.vjp` of the unit's `apply`, jitted;
  torch: `unit(x).backward(g)` with the parameters' gradients reset each step.
* eval: forward in inference mode (JAX `train=False`, jitted; torch `eval()` + `inference_mode`).

JAX units are this library's modules (`effnet_jax.model.blocks.MBConv` / `FusedMBConv`, `effnet_jax.model.layers`), with
the `depthwise_impl` the model uses by default ('auto' on CPU: the C++ kernels; in inference mode an MBConv unit runs
its expansion, depthwise convolution, BatchNorms, activations and SE pooling as one kernel pass, and the depthwise
columns, which time the convolution alone, the shifted sum that a bare convolution gets there; the stem is timed
alone, though in the network's inference mode the first block's kernel computes it); torch's are the modules of
torchvision's `efficientnet_bX` / `efficientnet_v2_X` (random weights, same shapes: `common.torch_model`). Inputs are
the unit's input in the JAX network (random image, random fan-in-scaled weights), cotangents random normal.

The sum over units is the network without the optimizer, the data and any fusion across units; set next to
the whole step from `throughput.py` it shows what is lost or won *between* units. Timing as in
`throughput.py`, with the same timer (`common.time_steps`: `--warmup` steps, then the median of `--repeats`
timings of `--steps` steps, synchronized).

    python benchmarks/blocks.py --variant b0 --resolution 224 --batch-size 16
    python benchmarks/blocks.py --variant b0 --resolution 32 --batch-size 64 --depthwise-impl xla

Prints a table, then one JSON line: {"rows": [...], "totals": {...}, ...}. Torchvision's B0–B7 and V2-S/M/L only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import cpu_name, cpu_threads, log, time_steps, torch_model
from effnet_jax.cli.host import with_fast_malloc
from effnet_jax.model.layers import (DEPTHWISE_IMPLS, BatchNorm, Conv, activation, conv_padding, depthwise_conv,
                                     resolve_depthwise_impl)
from effnet_jax.model.blocks import FusedMBConv, MBConv
from effnet_jax.model.network import create_model, random_variables, unit_names


class ConvBNAct(nn.Module):
    """The stem or the head of `EfficientNet`: conv → BN → activation, parameters named as in the network."""
    prefix: str
    features: int
    kernel: int
    stride: int
    padding: str
    activation: str
    bn_momentum: float
    bn_epsilon: float

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel, self.stride, self.padding, name=self.prefix)(x, inference=not train)
        x = BatchNorm(self.bn_momentum, self.bn_epsilon, name=self.prefix + "_bn")(x, not train)
        return activation(self.activation, train)(x)


def jax_units(model, variables: dict) -> list[tuple[str, nn.Module, dict]]:
    """(name, module, its variables) for stem, blocks_0.., head, in forward order."""
    cfg = model.config
    common = dict(activation=cfg.activation, bn_momentum=cfg.bn_momentum, bn_epsilon=cfg.bn_epsilon)

    def subset(*names):
        return {col: {n: variables[col][n] for n in names if n in variables[col]} for col in variables}

    units = [("stem", ConvBNAct("stem", cfg.stem_channels, 3, cfg.stem_stride, cfg.padding, **common),
              subset("stem", "stem_bn"))]
    for i, block in enumerate(cfg.blocks):
        if block.fused:
            mb = FusedMBConv(block, cfg.activation, cfg.padding, cfg.bn_momentum, cfg.bn_epsilon)
        else:
            mb = MBConv(block, cfg.activation, cfg.padding, cfg.bn_momentum, cfg.bn_epsilon, model.depthwise_impl)
        units.append((f"blocks_{i}", mb, {col: variables[col][f"blocks_{i}"] for col in variables}))
    units.append(("head", ConvBNAct("head", cfg.head_channels, 1, 1, cfg.padding, **common),
                  subset("head", "head_bn")))
    assert [u[0] for u in units] == unit_names(cfg)
    return units


def jax_unit_steps(module: nn.Module, variables: dict, x: jax.Array, input_grad: bool):
    """(train, eval, params): the unit's jitted train step (vjp to params [and input]; BN batch statistics,
    stochastic depth) and eval forward, as functions of (params, x[, g]), and its parameters."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    key = jax.random.key(0)

    @jax.jit
    def train(params, x, g):
        def f(p, x):
            return module.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})
        if input_grad:
            out, vjp, upd = jax.vjp(f, params, x, has_aux=True)
        else:
            out, vjp, upd = jax.vjp(lambda p: f(p, x), params, has_aux=True)
        return vjp(g), upd

    @jax.jit
    def evaluate(params, x):
        return module.apply({"params": params, "batch_stats": stats}, x, train=False)

    return train, evaluate, params


def time_jax(fn, *args, warmup, steps, repeats) -> tuple[float, float]:
    """(median seconds per step, compile seconds) of jitted `fn(*args)`."""
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t

    def run(n):
        jax.block_until_ready([compiled(*args) for _ in range(n)])
    return float(np.median(time_steps(run, warmup, steps, repeats))) / steps, compile_s


def time_torch(unit, shape_nhwc, mode: str, input_grad: bool, *, warmup, steps, repeats
               ) -> tuple[float, tuple[int, ...]]:
    """(median seconds per step, output shape as NHWC) of torch `unit` on a random input of `shape_nhwc`."""
    import torch
    n, h, w, c = shape_nhwc
    x = torch.randn(n, c, h, w, requires_grad=mode == "train" and input_grad)
    params = list(unit.parameters())
    if mode == "train":
        unit.train()
        g = None

        def run(k):
            nonlocal g
            for _ in range(k):
                for p in params:
                    p.grad = None
                x.grad = None
                out = unit(x)
                if g is None:
                    g = torch.randn_like(out)
                out.backward(g)
    else:
        unit.eval()

        def run(k):
            with torch.inference_mode():
                for _ in range(k):
                    unit(x)
    seconds = float(np.median(time_steps(run, warmup, steps, repeats))) / steps
    with torch.no_grad():
        out = unit.eval()(x)
    return seconds, (out.shape[0], *out.shape[2:], out.shape[1])


def depthwise_rows(block_cfg, in_hw: tuple[int, int], batch: int, padding: str, impls: dict[str, str], t: dict):
    """JAX `depthwise_conv` vs torch `conv2d(groups=C)` alone, train (fwd+bwd to x and kernel) and eval, each in
    its form of `impls` ('train', 'eval')."""
    import torch
    c, k, s = block_cfg.expand_channels, block_cfg.kernel, block_cfg.stride
    pads = tuple(conv_padding(padding, size, k, s) for size in in_hw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *in_hw, c), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, c), np.float32) / k)
    fwd = jax.jit(lambda x, kern: depthwise_conv(x, kern, s, pads, impls["eval"]))
    out_shape = jax.eval_shape(fwd, x, kernel).shape
    g = jnp.asarray(rng.standard_normal(out_shape, np.float32))
    train = jax.jit(lambda x, kern, g: jax.vjp(lambda a, b: depthwise_conv(a, b, s, pads, impls["train"]), x,
                                               kern)[1](g))
    jt, _ = time_jax(train, x, kernel, g, **t)
    je, _ = time_jax(fwd, x, kernel, **t)

    (pt, pb), (pl, pr) = pads
    if (pt, pl) != (pb, pr):
        raise ValueError(f"torchvision pads symmetrically; got {pads}")
    conv = torch.nn.Conv2d(c, c, k, s, padding=(pt, pl), groups=c, bias=False)  # as torchvision's block
    tt, t_shape = time_torch(conv, (batch, *in_hw, c), "train", True, **t)
    te, _ = time_torch(conv, (batch, *in_hw, c), "eval", True, **t)
    if t_shape != out_shape:
        raise AssertionError(f"depthwise output shapes differ: JAX {out_shape}, torch {t_shape}")
    return {"dw_jax_train_ms": 1e3 * jt, "dw_torch_train_ms": 1e3 * tt,
            "dw_jax_eval_ms": 1e3 * je, "dw_torch_eval_ms": 1e3 * te}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="b0", help="b0..b7, v2_s, v2_m, v2_l (torchvision's models)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--depthwise-impl", default="auto", choices=DEPTHWISE_IMPLS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-depthwise", dest="depthwise", action="store_false",
                   help="skip the depthwise-alone columns")
    p.add_argument("--width", type=float, default=None, help="custom width coefficient (both sides; for tests)")
    p.add_argument("--depth", type=float, default=None, help="custom depth coefficient (both sides; for tests)")
    args = p.parse_args(argv)
    if args.variant.startswith("lite"):
        p.error("torchvision has no Lite models; blocks.py compares B0-B7")
    return args


def main(argv=None) -> dict:
    import torch
    args = parse_args(argv)
    threads = cpu_threads()
    torch.set_num_threads(threads)
    overrides = {k: getattr(args, k) for k in ("width", "depth") if getattr(args, k) is not None}
    model = create_model(args.variant, 10, depthwise_impl=args.depthwise_impl, **overrides)
    # the forms the model's units take: 'auto' on CPU is 'native' where a unit trains, 'shift' in inference mode
    impls = {"train": resolve_depthwise_impl(args.depthwise_impl),
             "eval": resolve_depthwise_impl(args.depthwise_impl, inference=True)}
    r, n = args.resolution, args.batch_size
    variables = jax.tree.map(jnp.asarray, random_variables(model, r))
    _, t_units = torch_model(args.variant, width=args.width, depth=args.depth)
    t = dict(warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, r, r, 3), np.float32))
    rows: list[dict[str, Any]] = []
    for i, ((name, module, unit_vars), t_unit) in enumerate(zip(jax_units(model, variables), t_units)):
        log(f"{name} {tuple(x.shape)} ...")
        train, evaluate, params = jax_unit_steps(module, unit_vars, x, input_grad=i > 0)
        y = evaluate(params, x)
        g = jnp.asarray(np.random.default_rng(i).standard_normal(y.shape, np.float32))
        jt, jc = time_jax(train, params, x, g, **t)
        je, _ = time_jax(evaluate, params, x, **t)
        tt, _ = time_torch(t_unit, x.shape, "train", i > 0, **t)
        te, t_shape = time_torch(t_unit, x.shape, "eval", i > 0, **t)
        if t_shape != y.shape:
            raise AssertionError(f"{name}: output shapes differ: JAX {y.shape}, torch {t_shape}")
        row = {"unit": name, "in_shape": list(x.shape), "out_shape": list(y.shape),
               "jax_train_ms": 1e3 * jt, "torch_train_ms": 1e3 * tt, "jax_eval_ms": 1e3 * je,
               "torch_eval_ms": 1e3 * te, "jax_compile_s": jc}
        if args.depthwise and name.startswith("blocks_") and not model.config.blocks[i - 1].fused:
            row.update(depthwise_rows(model.config.blocks[i - 1], tuple(x.shape[1:3]), n, model.config.padding,
                                      impls, t))
        rows.append(row)
        log(json.dumps(row))
        x = y
    keys = [k for k in rows[1] if k.endswith("_ms")]
    totals = {k: sum(row.get(k, 0.0) for row in rows) for k in keys}
    result = {"variant": args.variant, "resolution": r, "batch_size": n, "depthwise_impl": impls,
              "threads": threads, "rows": rows, "totals": totals,
              "train_ratio": totals["torch_train_ms"] / totals["jax_train_ms"],
              "eval_ratio": totals["torch_eval_ms"] / totals["jax_eval_ms"],
              "versions": {"jax": jax.__version__, "torch": torch.__version__, "cpu": cpu_name()}}
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(res: dict) -> None:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{b / a:.2f}"
    print(f"{res['variant']} {res['resolution']} px, batch {res['batch_size']}, depthwise {res['depthwise_impl']}, "
          f"{res['threads']} threads; ms per step; ratio = torch time / JAX time (> 1: JAX faster)")
    print(f"{'unit':<10}{'input (NHWC)':>20}{'train JAX':>10}{'torch':>8}{'ratio':>7}{'eval JAX':>10}{'torch':>8}"
          f"{'ratio':>7}{'dw train JAX':>13}{'torch':>8}{'dw eval JAX':>12}{'torch':>8}")
    for row in [*res["rows"], {"unit": "sum", "in_shape": "", **res["totals"]}]:
        shape = "×".join(map(str, row["in_shape"])) if row["in_shape"] else ""
        print(f"{row['unit']:<10}{shape:>20}{f(row['jax_train_ms']):>10}{f(row['torch_train_ms']):>8}"
              f"{ratio(row['jax_train_ms'], row['torch_train_ms']):>7}{f(row['jax_eval_ms']):>10}"
              f"{f(row['torch_eval_ms']):>8}{ratio(row['jax_eval_ms'], row['torch_eval_ms']):>7}"
              f"{f(row.get('dw_jax_train_ms')):>13}{f(row.get('dw_torch_train_ms')):>8}"
              f"{f(row.get('dw_jax_eval_ms')):>12}{f(row.get('dw_torch_eval_ms')):>8}")


if __name__ == "__main__":
    with_fast_malloc()
    main()
