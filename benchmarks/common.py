"""What the benchmark scripts share: progress on stderr, the machine, the timer, the trainer's JAX step as
throughput.py and ab.py's workers time it, and torchvision's same model for the PyTorch side.

A module, not a script: the scripts are run as `python benchmarks/X.py`, which puts this folder first on
sys.path, and import it as `import common` (no script imports another).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from effnet_jax import data as data_lib
from effnet_jax.errors import ConfigError
from effnet_jax.kernels import CONV_IMPLS, DEPTHWISE_IMPLS
from effnet_jax.model import variants
from effnet_jax.model.network import random_variables
from effnet_jax.train import optim
from effnet_jax.train.build import build_model
from effnet_jax.train.config import TrainConfig
from effnet_jax.train.mesh import Mesh
from effnet_jax.train.steps import create_train_state, jit_eval_step, jit_train_step

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------ the machine

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_threads() -> int:
    """The cores this process may run on (those JAX's CPU backend uses)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def device_kind(requested: str, compare: str) -> str:
    """'auto' -> 'gpu' if JAX runs on a GPU (and, when comparing, torch sees CUDA), else 'cpu'."""
    if requested != "auto":
        return requested
    gpu = jax.default_backend() == "gpu"
    if gpu and compare == "torch":
        import torch
        gpu = torch.cuda.is_available()
    return "gpu" if gpu else "cpu"


def time_steps(run, warmup: int, steps: int, repeats: int) -> list[float]:
    """Seconds of `run(steps)` (which must end synchronized), `repeats` times, after `run(warmup)`."""
    if warmup:
        run(warmup)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(steps)
        times.append(time.perf_counter() - t)
    return times


# --------------------------------------------------------------------------- the trainer's JAX step, alone

def _impls(value: str) -> list[str]:
    impls = value.split(",")
    if bad := [i for i in impls if i not in DEPTHWISE_IMPLS]:
        raise argparse.ArgumentTypeError(f"{bad} not among {DEPTHWISE_IMPLS}")
    return impls


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that say which step is built: variant, resolution, batch size, mode, dtype, freeze, devices and
    the model's implementation choices (throughput.py's, and what ab.py passes to its workers)."""
    p.add_argument("--variant", default="b0", help="comma list of b0..b7, lite0..lite4, v2_s, v2_m, v2_l, e.g. "
                                                   "b0,b1 or lite0 or v2_s")
    p.add_argument("--resolution", default="32", help="comma list of sides in px, or 'native' (the variant's)")
    p.add_argument("--batch-size", default="64", help="comma list")
    p.add_argument("--mode", default="train", help="train, eval, or train,eval")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="JAX compute dtype (build_model); torch: autocast bf16")
    p.add_argument("--freeze", default="none", help="as train.py: none | head-only | N (top N blocks + head)")
    p.add_argument("--device-kind", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: gpu if jax.default_backend() == 'gpu' and torch.cuda.is_available()")
    p.add_argument("--source-size", type=int, default=32,
                   help="side of the on-device uint8 images the JAX step augments and resizes (CIFAR: 32)")
    p.add_argument("--width", type=float, default=None, help="custom width coefficient (both sides; for tests)")
    p.add_argument("--depth", type=float, default=None, help="custom depth coefficient (both sides; for tests)")
    p.add_argument("--conv-impl", default=None, choices=CONV_IMPLS,
                   help="JAX: 1x1 convolutions and the stem as matrix products or XLA convolutions (create_model)")
    p.add_argument("--depthwise-impl", default=None, type=_impls,
                   help="JAX (create_model): one of auto, native, shift, xla, or a comma list, each timed in this "
                        "run (a row each; torch once); an 'auto' row says which forms the planner picked ('plan')")
    p.add_argument("--devices", default="1", choices=("1", "all"),
                   help="JAX: the step's mesh over one device, or over all of --device-kind's, the batch sharded "
                        "(on a CPU, one device per core: XLA_FLAGS=--xla_force_host_platform_device_count=N)")


def resolve_step_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, compare: str) -> None:
    """Check the step's flags (`p.error` on a bad one, before any compilation) and add the devices:
    `device_kind` resolved, `jax_devices` (the mesh's) and `jax_device` (the first)."""
    unknown = [v for v in args.variant.split(",") if v not in variants.VARIANTS]
    if unknown:
        p.error(f"--variant {unknown[0]!r} is not one of {', '.join(variants.VARIANTS)}")
    args.device_kind = device_kind(args.device_kind, compare)
    args.jax_devices = jax.devices(args.device_kind)[:1 if args.devices == "1" else None]
    args.jax_device = args.jax_devices[0]
    try:  # the trainer's own check
        for b in args.batch_size.split(","):
            Mesh(args.jax_devices).check_batch(int(b))
    except ConfigError as e:
        p.error(str(e))


def side(variant: str, resolution: str) -> int:
    """A `--resolution` value in px: 'native' is the variant's own."""
    return variants.model_config(variant).resolution if resolution == "native" else int(resolution)


def model_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("width", "depth", "conv_impl", "depthwise_impl")
            if getattr(args, k) is not None}


def jax_setup(variant: str, resolution: int, batch_size: int, args) -> dict:
    """The trainer's pieces for one (variant, resolution, batch size): config, model, optimizer, data (random
    uint8 images of `--source-size` on the device, host index batches); `args.depthwise_impl` one form or None."""
    cfg = TrainConfig(variant=variant, init="scratch", resolution=resolution, batch_size=batch_size,
                      freeze=args.freeze, dtype=args.dtype, seed=0, progress=False)
    overrides = model_overrides(args)
    base = build_model(cfg, NUM_CLASSES, overrides=overrides)
    fu = optim.frozen_units(base.config, args.freeze)
    n_data = max(4 * batch_size, 256)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_data, args.source_size, args.source_size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n_data).astype(np.int32)
    mesh = Mesh(args.jax_devices)
    return dict(cfg=cfg, overrides=overrides, base=base, fu=fu, mesh=mesh, n_data=n_data,
                name=f"{variant}_{resolution}_{batch_size}",
                arrays=mesh.replicate((jnp.asarray(images), jnp.asarray(labels))),
                aug=cfg.augment, transform=cfg.eval_transform(),
                variables=random_variables(base, resolution),
                batches=data_lib.batch_indices(data_lib.epoch_permutation(n_data, 0, 1), batch_size))


def jax_train_runner(s: dict):
    """(run, compile_s): the trainer's compiled step on `s`; `run(n)` takes n steps, synchronized."""
    cfg, mesh = s["cfg"], s["mesh"]
    tx = optim.make_optimizer(cfg.optim_config(), s["variables"]["params"], s["base"].config,
                              s["n_data"] // cfg.batch_size)
    step_fn = jit_train_step(build_model(cfg, NUM_CLASSES, s["fu"], s["overrides"]), tx, s["aug"], s["transform"],
                             cfg.label_smoothing, cfg.ema_decay)
    state = mesh.replicate(create_train_state(s["variables"], tx, cfg.seed, cfg.ema_decay > 0))
    batches = s["batches"]
    t = time.perf_counter()
    compiled = step_fn.lower(state, *s["arrays"], mesh.put_batch(batches[0])).compile()
    compile_s = time.perf_counter() - t
    box = {"state": state, "i": 0}

    def run(n):
        st, m = box["state"], None
        for _ in range(n):
            st, m = compiled(st, *s["arrays"], mesh.put_batch(batches[box["i"] % len(batches)]))
            box["i"] += 1
        jax.block_until_ready((st, m))
        box["state"] = st
        loss = float(m["loss"]) / float(m["count"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"JAX train loss {loss}")

    return run, compile_s


def jax_eval_runner(s: dict):
    """(run, compile_s): the evaluation step on `s`; `run(n)` evaluates n batches, synchronized."""
    cfg, mesh = s["cfg"], s["mesh"]
    fn = jit_eval_step(build_model(cfg, NUM_CLASSES, overrides=s["overrides"]), s["transform"])
    variables = mesh.replicate(jax.tree.map(jnp.asarray, s["variables"]))
    idx = [mesh.put_batch(b) for b in s["batches"]]
    mask = mesh.put_batch(np.ones(cfg.batch_size, bool))
    t = time.perf_counter()
    compiled = fn.lower(variables, *s["arrays"], idx[0], mask).compile()
    compile_s = time.perf_counter() - t

    def run(n):
        out = [compiled(variables, *s["arrays"], idx[i % len(idx)], mask) for i in range(n)]
        jax.block_until_ready(out)

    return run, compile_s


def jax_runner(s: dict, mode: str):
    """(run, compile_s) of the train or the eval step on `s` (`jax_train_runner`, `jax_eval_runner`)."""
    return (jax_train_runner if mode == "train" else jax_eval_runner)(s)


# ------------------------------------------------------------------------------- torchvision's same model

def torch_model(variant: str, num_classes: int = NUM_CLASSES, width: float | None = None,
                depth: float | None = None):
    """(model, units): torchvision's EfficientNet-B or -V2 (or the efficientnet_lite_pytorch Lite model) with
    random weights and a `num_classes` head; `units` = [stem, block 0, ..., head conv], the order of
    `effnet_jax.model.network.unit_names`, for freezing the first N as `frozen_units` does. V2 with `width`/`depth`:
    torchvision's V2 stage table with channels (and the 1280 head) rounded by `_make_divisible(c * width, 8)`
    and repeats by ceil(n * depth), as `effnet_jax.model.variants.model_config` scales V2 (torchvision's V2
    builders take no multipliers)."""
    import torch.nn as nn
    if variant.startswith("lite"):
        from efficientnet_lite_pytorch import EfficientNet  # ImportError: use --compare none
        kw = {k: v for k, v in (("width_coefficient", width), ("depth_coefficient", depth)) if v is not None}
        m = EfficientNet.from_name(f"efficientnet-{variant}", num_classes=num_classes, **kw)
        return m, [nn.ModuleList([m._conv_stem, m._bn0]), *m._blocks, nn.ModuleList([m._conv_head, m._bn1])]
    from torchvision.models import efficientnet as tv
    if width is None and depth is None:
        m = getattr(tv, f"efficientnet_{variant}")(weights=None, num_classes=num_classes)
    elif variant in variants.V2_SCALING:
        import copy
        w, d = width or 1.0, depth or 1.0
        setting, last = tv._efficientnet_conf(f"efficientnet_{variant}")
        scaled = []
        for cnf in setting:
            c = copy.copy(cnf)
            c.input_channels = tv._make_divisible(cnf.input_channels * w, 8)
            c.out_channels = tv._make_divisible(cnf.out_channels * w, 8)
            c.num_layers = int(math.ceil(cnf.num_layers * d))
            scaled.append(c)
        m = tv.EfficientNet(scaled, variants.V2_SCALING[variant].dropout, num_classes=num_classes,
                            last_channel=tv._make_divisible(last * w, 8),
                            norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3))
    else:
        sc = variants.COMPOUND_SCALING[variant]
        setting, last = tv._efficientnet_conf(f"efficientnet_{variant}", width_mult=width or sc.width,
                                              depth_mult=depth or sc.depth)
        m = tv.EfficientNet(setting, sc.dropout, num_classes=num_classes, last_channel=last)
    blocks = [b for stage in m.features[1:-1] for b in stage]
    return m, [m.features[0], *blocks, m.features[-1]]


def torch_freeze(model, units, frozen_units: int):
    """requires_grad=False for the first `frozen_units` units; returns a function that puts the model in
    train mode with those units' BatchNorm in eval mode (as the JAX model's `frozen_units`)."""
    for u in units[:frozen_units]:
        for p in u.parameters():
            p.requires_grad_(False)

    def train_mode():
        model.train()
        for u in units[:frozen_units]:
            u.eval()
    return train_mode
