"""Inference against ONNX Runtime, in one process: our jitted forward (`model.apply`, train=False) against
torchvision's same model exported with `torch.onnx.export` and run by ONNX Runtime's CPU provider (and, for
reference, ONNX Runtime on our own `effnet_jax.model.export` file and torch eager under `inference_mode`). All four on a
ready float batch, random weights, the same threads; the torchvision model and the timer are the other scripts'
(`common.torch_model`, `common.time_steps`).

    python benchmarks/onnx_peer.py --variant b0 --resolution 224 --batch-size 16

Needs the [test] extras and `pip install onnx onnxruntime` (not dependencies of the project). Prints a table, then
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import effnet_jax
from common import cpu_threads, time_steps, torch_model
from effnet_jax.cli.host import with_fast_malloc
from effnet_jax.kernels import autotune
from effnet_jax.model.network import random_variables

VARIANTS = [f"b{i}" for i in range(8)]  # torchvision's B0-B7: torch.onnx.export of its model is the peer


def timed(fn, repeats: int, steps: int) -> list[float]:
    """Seconds per call of `fn` (which must end synchronized): `repeats` means of `steps` calls, after two."""
    return [t / steps for t in time_steps(lambda k: [fn() for _ in range(k)], 2, steps, repeats)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="b0", choices=VARIANTS)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=cpu_threads())
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    n, r = args.batch_size, args.resolution
    x = np.random.default_rng(0).standard_normal((n, r, r, 3), np.float32)

    model = effnet_jax.create_model(args.variant)
    variables = random_variables(model, r)
    with autotune.recording() as plan:
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, jnp.asarray(x)).compile()
    xj = jnp.asarray(x)
    jax_t = timed(lambda: fwd(variables, xj).block_until_ready(), args.repeats, args.steps)

    tm = torch_model(args.variant, num_classes=model.num_classes)[0].eval()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(tm, (xt,), path, input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        xo = xt.numpy()
        ort_t = timed(lambda: sess.run(None, {"x": xo}), args.repeats, args.steps)
        # and ONNX Runtime on our own export of the same architecture and weights (effnet_jax.model.export)
        import onnx
        from effnet_jax.model.export import to_onnx
        ours = os.path.join(tmp, "ours.onnx")
        onnx.save(to_onnx(model, variables, r), ours)
        sess2 = ort.InferenceSession(ours, so, providers=["CPUExecutionProvider"])
        ours_t = timed(lambda: sess2.run(None, {"images": x}), args.repeats, args.steps)
    with torch.inference_mode():
        torch_t = timed(lambda: tm(xt), args.repeats, args.steps)

    img_s = {k: n / statistics.median(t) for k, t in (("jax", jax_t), ("onnxruntime", ort_t),
                                                        ("onnxruntime_our_export", ours_t), ("torch_eager", torch_t))}
    row = {"variant": args.variant, "resolution": r, "batch_size": n, "threads": args.threads,
           "img_s": img_s, "jax_over_ort": img_s["jax"] / img_s["onnxruntime"],
           "jax_over_eager": img_s["jax"] / img_s["torch_eager"],
           "jax_over_ort_our_export": img_s["jax"] / img_s["onnxruntime_our_export"],
           "ort": ort.__version__, "torch": torch.__version__,
           "jax": jax.__version__, "plan": sorted({d.form for d in plan}),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "march": os.environ.get(autotune.MARCH_ENV, "native")}
    print(f"{'':24}{'img/s':>8}")
    for k, v in img_s.items():
        print(f"{k:24}{v:>8.1f}")
    print(f"JAX / ONNX Runtime {row['jax_over_ort']:.2f}x, JAX / torch eager {row['jax_over_eager']:.2f}x")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    with_fast_malloc()  # the allocator train.py and throughput.py run with, for all three peers alike
    main()
