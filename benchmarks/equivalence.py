#!/usr/bin/env python3
"""Max |logit difference| between converted effnet_jax models and torchvision (random weights, randomized
BN statistics, fp32, eval mode), built as the conversion tests build them (`effnet_jax.testing`:
`randomized_torchvision`, `save_and_convert`, `jax_stage_outputs`); also float64 PyTorch as the reference, to
separate float32 rounding from mapping errors.

    python benchmarks/equivalence.py b0:224 b1:64 b1:96 b7:64 b7:128 v2_s:64 v2_l:96 v2_l:128
"""

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch

import effnet_jax
from effnet_jax.testing import jax_stage_outputs, randomized_torchvision, save_and_convert, variant_seed


def main(specs):
    rows = []
    for spec in specs:
        variant, res = spec.split(":")
        res = int(res)
        x = np.random.RandomState(0).randn(2, res, res, 3).astype(np.float32)
        m = randomized_torchvision(variant, variant_seed(variant), x)
        with tempfile.TemporaryDirectory() as d:
            variables = save_and_convert(m, pathlib.Path(d), variant)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            t32 = m(xt).numpy()
            t64 = m.double()(xt.double()).numpy()
        _, j, _ = jax_stage_outputs(effnet_jax.create_model(variant), variables, x)
        rows.append({"variant": variant, "resolution": res, "max_abs_logit": float(np.abs(t32).max()),
                     "jax_vs_torch32": float(np.abs(j - t32).max()), "jax_vs_torch64": float(np.abs(j - t64).max()),
                     "torch32_vs_torch64": float(np.abs(t32 - t64).max())})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant @ px | max abs logit | JAX vs torch fp32 | JAX vs torch fp64 | torch fp32 vs fp64 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} @ {r['resolution']} | {r['max_abs_logit']:.2f} | {r['jax_vs_torch32']:.1e} | "
              f"{r['jax_vs_torch64']:.1e} | {r['torch32_vs_torch64']:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["b0:224", "b1:96", "b4:96", "b7:128"])
