"""`python -m effnet_jax.kernels plan --variant b0 --resolution 224 --mode eval`: which form each unit of a model
gets on this machine, and the timings behind it (measured now where the plan has no entry yet)."""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp

from effnet_jax.kernels import autotune, native


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m effnet_jax.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print (measuring where needed) the plan of a model's units")
    plan.add_argument("--variant", default="b0")
    plan.add_argument("--resolution", type=int, default=None, help="input side in px (default: the variant's)")
    plan.add_argument("--batch", type=int, default=16)
    plan.add_argument("--mode", choices=("eval", "train"), default="eval")
    plan.add_argument("--freeze", default="none",
                      help="train mode: 'none', 'head-only' or N (the top N blocks train; the others run in inference "
                           "mode, as train.py's --freeze)")
    plan.add_argument("--stem-stride", type=int, default=None, help="as train.py's (1 for 32 px inputs)")
    plan.add_argument("--remeasure", action="store_true", help="measure again, replacing the cached entries")
    return p


def plan(args) -> list[autotune.Decision]:
    from effnet_jax import create_model
    from effnet_jax.model.network import random_variables
    from effnet_jax.train import optim

    overrides = {"stem_stride": args.stem_stride} if args.stem_stride else {}
    model = create_model(args.variant, **overrides)
    if args.mode == "train":
        model = model.clone(frozen_units=optim.frozen_units(model.config, args.freeze))
    res = args.resolution or model.config.resolution
    variables = random_variables(model, res)
    x = jax.ShapeDtypeStruct((args.batch, res, res, 3), jnp.float32)

    def loss(params, x):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(0)})
        return jnp.mean(logits)

    with autotune.recording(args.remeasure) as decisions:
        if args.mode == "train":
            jax.eval_shape(jax.grad(loss), variables["params"], x)
        else:
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return decisions


def _table(decisions: list[autotune.Decision]) -> str:
    forms = sorted({f for d in decisions for f in (d.ms or {})}, key=("native", "shift", "xla").index)
    rows = [["unit", "input", "mode", "form", *(f"{f} ms" for f in forms), "from"]]
    for d in decisions:
        ms = d.ms or {}
        rows.append([d.name or "-", "x".join(map(str, d.unit.shape)), d.unit.mode, d.form,
                     *(("inf" if math.isinf(ms[f]) else f"{ms[f]:.2f}") if f in ms else "" for f in forms), d.source])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if jax.default_backend() != "cpu":
        print(f"backend {jax.default_backend()}: 'auto' is XLA's own forms there; nothing is measured")
        return 0
    t0 = time.perf_counter()
    decisions = plan(args)
    m = autotune.machine()
    kernels = native.form() if native.available() else None
    print(f"CPU: {m['cpu']}; kernels: {kernels or 'not available'}; jax {m['jax']}; "
          f"XLA_FLAGS={m['xla_flags'] or '(none)'}")
    print(f"plan: {autotune.plan_path(m)}" + ("" if autotune.enabled() else f" (not used: {autotune.OPT_OUT}=0)"))
    print(_table(decisions))
    measured = sum(d.source == "measured" for d in decisions)
    print(f"{len(decisions)} units, {measured} measured now, in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
