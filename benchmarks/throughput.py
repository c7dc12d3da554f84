#!/usr/bin/env python3
"""Training / inference throughput: our jitted JAX step against torchvision's same model, in one process.

JAX side: the trainer's own step, `effnet_jax.train.steps.jit_train_step` (state donated) exactly as
`train_and_evaluate` builds it (model from `build_model`, optimizer from `optim.make_optimizer` with the
project's default AdamW recipe and `--freeze`, the model's `frozen_units` for it, the config's augmentation and input
transform), fed an on-device uint8 dataset (random CIFAR-sized images, `--source-size`) and host index batches put on
the mesh each step, as training does (one device; `--devices all`: every device of the kind, the batch sharded over
them, as `train.py` and `effnet_jax.cli.evaluate` use them): so a step includes the gather, the on-device augmentation
(crop + flip + resize to `--resolution`), forward, backward, BN update and the optimizer. Eval:
`effnet_jax.train.steps.jit_eval_step` (resize + normalize + forward + metrics) on an index batch.

PyTorch side: torchvision's `efficientnet_bX` / `efficientnet_v2_X(weights=None, num_classes=10)` (for Lite: the
`efficientnet_lite_pytorch` package, when installed), on a ready float batch of the same size (no data
work: the comparison is conservative for JAX); train step = forward + CrossEntropyLoss(label_smoothing 0.1)
+ backward + AdamW step (lr 3e-3, wd 1e-4) over the same trainable parameters (`--freeze`: the frozen units
get requires_grad=False and BatchNorm in eval mode, as the JAX model's frozen units); eval =
`torch.inference_mode()` forward. Eager, then `torch.compile` (failures are reported as null with the
reason; `--no-torch-compile` skips it: it compiles slowly on a CPU, see docs/performance.md).

Timing: compile (JAX: `jit(...).lower(...).compile()`, reported as `compile_s`), `--warmup` steps, then
`--repeats` timings of `--steps` steps each, ending in `block_until_ready` / `cuda.synchronize`; img/s is
batch * steps / the median. torch threads = the cores JAX's CPU backend uses (`--threads` to change).
Random weights (fan-in scaled): throughput does not depend on their values.

Comma lists sweep: one row per (variant, resolution, batch size, mode). Progress goes to stderr; stdout gets
a table, then one JSON line per row (the last line is the last row: with one combination, its result).
`gflops` is forward multiply-accumulates per image at that resolution (`effnet_jax.model.network.count_flops`,
torchvision's "GFLOPS" convention). `peak_rss_mb` is the process's peak resident memory so far (both
frameworks, all rows before); on a GPU, `jax_peak_mb` / `torch_peak_mb` are the devices' peak allocations.

    python benchmarks/throughput.py --variant b0 --resolution 32 --batch-size 64 --mode train
    python benchmarks/throughput.py --variant b0 --resolution 224 --batch-size 16 --mode eval
    python benchmarks/throughput.py --variant b0,b1,b2,b3,b4,b5,b6,b7 --resolution 64 --batch-size 16 \\
        --mode train,eval --no-torch-compile          # img/s against GFLOPs
    python benchmarks/throughput.py --variant b0 --resolution 96 --batch-size 8,16,32,64,128 --mode train
    python benchmarks/throughput.py --variant lite0 --resolution 96 --freeze 6 --compare none
    taskset -c 0 python benchmarks/throughput.py --variant b0 --resolution 224 --batch-size 16 --mode train \
        --compare none --repeats 1 --steps 3 --profile /tmp/prof   # where the JAX step's time goes

On a CPU, `--devices all` with `XLA_FLAGS=--xla_force_host_platform_device_count=N` runs the JAX step as N XLA
devices in one process, one per core, each on its share of the batch (docs/performance.md: faster for inference,
slower for training on a 2-core CPU):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/throughput.py --variant b0 \
        --resolution 224 --batch-size 16 --mode eval --devices all

`--profile DIR`: after the timing, `--steps` more JAX steps run under `jax.profiler` (a perfetto trace per row in
DIR/<variant>_<px>_<batch>_<mode>/); the XLA operations' times in it, summed by kind (the HLO instruction's name
without its number: `ynn_fusion` = YNNPACK dots and reductions, `dot` = Eigen's, `multiply_pad_fusion` = an
elementwise chain ending in a pad, ...) per step, are printed after the table and stored in the row as `profile`.
On one core (`taskset -c 0`) they add up to the step; on several, operations overlap. Which instruction a name
is: the compiled HLO, `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`.

The step itself (`common.jax_setup`, `common.jax_runner`), the flags that choose it, the timer and torchvision's
model (`common.torch_model`) are in benchmarks/common.py, shared with the other scripts: ab.py's workers build
and time the same step without importing this script.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import itertools
import json
import math
import os
import re
import resource
import time
from typing import Any

import jax
import numpy as np

import common
from common import NUM_CLASSES, log, time_steps
from effnet_jax.cli.host import with_fast_malloc
from effnet_jax.kernels import autotune
from effnet_jax.model.network import count_flops

PROFILE_ROWS = 20  # kinds printed per profile (the row's JSON has all)


# XLA's CPU operations in a trace are named as their HLO instructions (`ynn_fusion.75`, `dot`); a `while` contains
# its body's operations, which the trace times themselves
_HLO_NAME = re.compile(r"([a-z][a-z0-9_\-]*?)(\.\d+)?")
_CONTAINERS = {"while", "conditional", "call"}


def thunk_profile(trace_file: str, steps: int) -> list[tuple[str, float, float]]:
    """(kind, calls per step, ms per step) of the XLA operations in a `jax.profiler` perfetto trace of `steps`
    steps, summed by instruction name without its number, slowest first."""
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    ms: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for e in events:
        m = _HLO_NAME.fullmatch(e.get("name", "")) if e.get("ph") == "X" else None
        if m and m.group(1) not in _CONTAINERS:
            ms[m.group(1)] += e.get("dur", 0) / 1e3 / steps
            calls[m.group(1)] += 1
    return sorted(((k, calls[k] / steps, v) for k, v in ms.items()), key=lambda r: -r[2])


def profile_steps(run, args, name: str) -> list[tuple[str, float, float]]:
    """`run(args.steps)` under `jax.profiler` into args.profile/name; its `thunk_profile`."""
    out = os.path.join(args.profile, name)
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    try:
        run(args.steps)
    finally:
        jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    return thunk_profile(traces[-1], args.steps)


def timed(run, args, name: str) -> dict:
    """The timings of `run` (`time_steps`), then, with --profile, a profile of `--steps` more steps."""
    out = {"times": time_steps(run, args.warmup, args.steps, args.repeats)}
    if args.profile:
        out["profile"] = profile_steps(run, args, name)
    return out


def jax_timed(s: dict, args, mode: str) -> dict:
    run, compile_s = common.jax_runner(s, mode)
    return {**timed(run, args, f"{s['name']}_{mode}"), "compile_s": compile_s}


def rounds_of_turns(runs: list, steps: list[int], rounds: int, settle: int = 1) -> list[list[float]]:
    """Seconds of `steps[i]` steps of each of `runs`, timed in turns: `rounds` rounds, each timing every run once, in
    order and then in reverse order (A B C, C B A, ...), each turn after `settle` untimed steps (the first step
    after another computation's turn runs slower: caches, thread wake-up). times[i][r] is run i in round r, so a
    slow moment falls on the neighbouring turns alike and the ratio of two runs in one round mostly cancels it."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for i in order:
            if settle:
                runs[i](settle)
            t = time.perf_counter()
            runs[i](steps[i])
            times[i].append(time.perf_counter() - t)
    return times


# -------------------------------------------------------------------------------------------------- torch side

def torch_bench(variant: str, resolution: int, batch_size: int, mode: str, frozen_units: int, args) -> dict:
    import torch
    dev = torch.device(args.torch_device)
    model, units = common.torch_model(variant, width=args.width, depth=args.depth)
    train_mode = common.torch_freeze(model, units, frozen_units)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    x = torch.randn(batch_size, 3, resolution, resolution, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=dev)
    autocast = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-4)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def runner(m):
        if mode == "train":
            train_mode()

            def run(n):
                for _ in range(n):
                    with autocast():
                        loss = crit(m(x).float(), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sync()
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"torch train loss {loss.item()}")
        else:
            model.eval()

            def run(n):
                with torch.inference_mode(), autocast():
                    for _ in range(n):
                        m(x)
                sync()
        return run

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {"eager_times": time_steps(runner(model), args.warmup, args.steps, args.repeats)}
    out["compile_times"] = out["compile_s"] = out["compile_error"] = None
    if args.torch_compile:
        try:
            run = runner(torch.compile(model))
            t = time.perf_counter()
            run(2)  # compiles (also the backward graph in train mode)
            out["compile_s"] = time.perf_counter() - t
            out["compile_times"] = time_steps(run, args.warmup, args.steps, args.repeats)
        except Exception as e:  # noqa: BLE001 -- report, do not stop the benchmark
            out["compile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log(f"torch.compile failed: {out['compile_error']}")
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -------------------------------------------------------------------------------------------------------- main

def img_s(batch_size: int, steps: int, times: list[float] | None) -> float | None:
    return None if not times else batch_size * steps / float(np.median(times))


def row_head(variant: str, resolution: int, batch_size: int, mode: str, s: dict, args) -> dict[str, Any]:
    """A row's configuration fields, and the torch fields empty."""
    return {"variant": variant, "resolution": resolution, "batch_size": batch_size, "mode": mode,
            "dtype": args.dtype, "freeze": args.freeze, "device": args.device_kind, "devices": len(args.jax_devices),
            "gflops": count_flops(s["base"].config, NUM_CLASSES, resolution) / 1e9,
            "torch_img_s": None, "torch_compile_img_s": None, "torch_compile_s": None, "torch_compile_error": None,
            "ratio": None, "ratio_compiled": None}


def bench_row(variant: str, resolution: int, batch_size: int, mode: str, s: dict, args) -> dict:
    log(f"{variant} {resolution}px batch {batch_size} {mode}: JAX ...")
    j = jax_timed(s, args, mode)
    row = row_head(variant, resolution, batch_size, mode, s, args)
    row.update(jax_img_s=img_s(batch_size, args.steps, j["times"]), compile_s=j["compile_s"],
               jax_step_ms=1e3 * float(np.median(j["times"])) / args.steps)
    if args.width is not None or args.depth is not None:
        row.update(width=args.width, depth=args.depth)
    if "profile" in j:
        row["profile"] = j["profile"]
    if args.compare == "torch":
        log(f"{variant} {resolution}px batch {batch_size} {mode}: torch ...")
        t = torch_bench(variant, resolution, batch_size, mode, s["fu"] if mode == "train" else 0, args)
        row["torch_img_s"] = img_s(batch_size, args.steps, t["eager_times"])
        row["torch_compile_img_s"] = img_s(batch_size, args.steps, t["compile_times"])
        row["torch_compile_s"], row["torch_compile_error"] = t["compile_s"], t["compile_error"]
        if not args.torch_compile:
            row["torch_compile_error"] = "skipped (--no-torch-compile)"
        row["ratio"] = row["jax_img_s"] / row["torch_img_s"]
        if row["torch_compile_img_s"]:
            row["ratio_compiled"] = row["jax_img_s"] / row["torch_compile_img_s"]
        if "peak_mb" in t:
            row["torch_peak_mb"] = t["peak_mb"]
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device_kind == "gpu":
        stats = args.jax_device.memory_stats() or {}
        row["jax_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20 or None  # (process lifetime: no reset)
    row["threads"] = args.threads
    return row


def forms_in_rounds(variant: str, resolution: int, batch_size: int, mode: str, args) -> list[dict]:
    """`--rounds`: every `--depthwise-impl` form's step compiled first, then timed in turns (`rounds_of_turns`);
    a row per form, its `times` its turns, and `vs`: for each other form, the median over rounds of this form's
    img/s over that form's in the same round."""
    forms, runs, compile_s, plans, steps = args.depthwise_impl or ["auto"], [], [], [], []
    for impl in forms:
        a = argparse.Namespace(**{**vars(args), "depthwise_impl": impl, "compare": "none"})
        log(f"{variant} {resolution}px batch {batch_size} {mode} ({impl}): compiling ...")
        with autotune.recording() as plan:
            setup = common.jax_setup(variant, resolution, batch_size, a)
            run, c = common.jax_runner(setup, mode)
        run(max(args.warmup, 1))
        t = time.perf_counter()
        run(1)
        steps.append(max(1, round(args.turn_s / (time.perf_counter() - t))) if args.turn_s else args.steps)
        runs.append(run)
        compile_s.append(c)
        plans.append(dict(collections.Counter(d.form for d in plan)) or None)
    log(f"{variant} {resolution}px batch {batch_size} {mode}: {args.rounds} rounds of {', '.join(forms)}")
    times = rounds_of_turns(runs, steps, args.rounds)
    rate = [[batch_size * steps[i] / t for t in times[i]] for i in range(len(forms))]  # img/s of each turn
    rows = []
    for i, impl in enumerate(forms):
        vs = {f: float(np.median([a / b for a, b in zip(rate[i], rate[j])])) for j, f in enumerate(forms) if j != i}
        rows.append({**row_head(variant, resolution, batch_size, mode, setup, args), "depthwise_impl": impl,
                     "plan": plans[i], "jax_img_s": float(np.median(rate[i])), "compile_s": compile_s[i],
                     "jax_step_ms": 1e3 * batch_size / float(np.median(rate[i])), "rounds": args.rounds,
                     "steps_per_turn": steps[i], "times": times[i], "turn_img_s": rate[i], "vs": vs,
                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        log(json.dumps(rows[-1]))
    return rows


def print_table(rows: list[dict]) -> None:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    print(f"{'variant':<8}{'px':>5}{'batch':>6}{'mode':>6}{'depthwise':>10}{'GFLOPs':>8}{'JAX img/s':>11}"
          f"{'torch img/s':>12}{'compiled':>10}{'JAX/torch':>10}{'JAX compile s':>14}{'peak MB':>9}")
    for r in rows:
        print(f"{r['variant']:<8}{r['resolution']:>5}{r['batch_size']:>6}{r['mode']:>6}{r['depthwise_impl']:>10}"
              f"{r['gflops']:>8.3f}{f(r['jax_img_s'], '.1f'):>11}{f(r['torch_img_s'], '.1f'):>12}"
              f"{f(r['torch_compile_img_s'], '.1f'):>10}{f(r['ratio'], '.2f'):>10}{r['compile_s']:>14.1f}"
              f"{r['peak_rss_mb']:>9.0f}")
        if r.get("plan"):
            print(f"{'':<8}plan: {r['plan']}")
    errors = {r["torch_compile_error"] for r in rows if r["torch_compile_error"]}
    for e in sorted(errors):
        print(f"torch.compile: {e}")
    for r in rows:
        if "profile" in r:
            total = sum(ms for _, _, ms in r["profile"])
            print(f"\nJAX {r['mode']} step, {r['variant']} {r['resolution']} px batch {r['batch_size']}: XLA operations, "
                  f"{total:.1f} ms per step in all (step {r['jax_step_ms']:.1f} ms)")
            print(f"{'kind':<36}{'calls':>7}{'ms/step':>10}{'share':>7}")
            for kind, n, ms in r["profile"][:PROFILE_ROWS]:
                print(f"{kind:<36}{n:>7.0f}{ms:>10.1f}{ms / total:>7.0%}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_step_arguments(p)
    p.add_argument("--compare", default="torch", choices=("torch", "none"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing (after compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores, "
                   "which JAX's CPU backend uses)")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    p.add_argument("--channels-last", action="store_true", help="torch: channels_last model and input")
    p.add_argument("--rounds", type=int, default=0, metavar="R",
                   help="time the --depthwise-impl forms against each other: compile every one, then R rounds "
                        "of one turn of each (A B C, C B A, ...); each row's 'vs' holds the median per-round ratio "
                        "of img/s against each other form. JAX only (no torch)")
    p.add_argument("--turn-s", type=float, default=0.0, metavar="S",
                   help="with --rounds: each form's turn takes about S seconds (its steps per turn from one "
                        "timed step after the warm-up); default: --steps steps")
    p.add_argument("--profile", default=None, metavar="DIR", help="also trace --steps JAX steps into DIR and print "
                   "where their time goes, by XLA operation kind (run under `taskset -c 0` for times that add up)")
    args = p.parse_args(argv)
    common.resolve_step_arguments(p, args, args.compare)
    args.torch_device = "cuda" if args.device_kind == "gpu" else "cpu"
    args.threads = args.threads or common.cpu_threads()
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.compare == "torch":
        import torch
        torch.set_num_threads(args.threads)
    modes = args.mode.split(",")
    if set(modes) - {"train", "eval"}:
        raise SystemExit(f"--mode must be train, eval or train,eval, got {args.mode!r}")
    rows = []
    for variant in args.variant.split(","):
        for res, bs in itertools.product(args.resolution.split(","), args.batch_size.split(",")):
            resolution = common.side(variant, res)
            if args.rounds:
                for mode in modes:
                    rows += forms_in_rounds(variant, resolution, int(bs), mode, args)
                continue
            for i, impl in enumerate(args.depthwise_impl or [None]):
                a = argparse.Namespace(**{**vars(args), "depthwise_impl": impl,
                                          "compare": args.compare if i == 0 else "none"})
                s = common.jax_setup(variant, resolution, int(bs), a)
                for mode in modes:
                    with autotune.recording() as plan:
                        rows.append(bench_row(variant, resolution, int(bs), mode, s, a))
                    rows[-1]["depthwise_impl"] = impl or "auto"
                    rows[-1]["plan"] = dict(collections.Counter(d.form for d in plan)) or None
                    log(json.dumps(rows[-1]))
                del s
    log(f"jax {jax.__version__} ({len(args.jax_devices)} × {args.jax_device.platform}: {args.jax_device.device_kind}), "
        f"{common.cpu_name()}, {common.cpu_threads()} usable cores")
    print_table(rows)
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    with_fast_malloc()  # both frameworks run in this process with the allocator train.py uses
    main()
