"""`effnet-export`: a run's or a weight file's eval-mode model as ONNX or StableHLO (`effnet_jax.model.export`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from effnet_jax.errors import UserError, cli
from effnet_jax.model.export import DTYPES, FORMATS, export
from effnet_jax.model.variants import check_resolution


def load_for_export(*, workdir: str | None = None, which: str = "best", variant: str | None = None,
                    init: str | None = None, resolution: int | None = None):
    """(model, variables, metadata) of the eval-mode model to export (`loader.load`; the model computes its
    convolutions as XLA convolutions). `resolution` defaults to the run's (workdir) or the weights' eval input
    size; for the weights' torchvision-style crop, `resize_size` keeps its ratio to it."""
    from effnet_jax.loader import load, names_its_variant
    from effnet_jax.train.rundir import existing_run

    if workdir is not None:
        loaded = load(existing_run(workdir).path, which=which, depthwise_impl="xla", conv_impl="xla")
    else:
        if variant is None and not (init is not None and names_its_variant(init)):
            raise UserError("--variant (or --workdir) is required")
        loaded = load(init or "imagenet", variant, depthwise_impl="xla", conv_impl="xla")
    pre = loaded.preprocess.at(resolution or loaded.preprocess.input_size).to_dict()
    source = loaded.source if workdir is not None else f"--init {init or 'imagenet'}"
    meta = {"variant": loaded.variant, "num_classes": loaded.model.num_classes,
            "class_names": list(loaded.class_names), "preprocess": pre, "source": source}
    return loaded.model, loaded.variables, meta


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="effnet-export", description=(
        "Export an eval-mode EfficientNet to ONNX or serialized StableHLO with a dynamic batch dimension."))
    src = p.add_argument_group("model (--workdir, or --variant with --init)")
    src.add_argument("--workdir", default=None, help="a training run directory (effnet-train)")
    src.add_argument("--which", default="best", choices=("best", "latest"), help="the run's checkpoint")
    src.add_argument("--variant", default=None, help="b0..b7, lite0..lite4, v2_s, v2_m, v2_l, v2_b0..v2_b3")
    src.add_argument("--init", default=None,
                     help="'imagenet' (default with --variant), hf-hub:timm/NAME, a .pth, .safetensors, .keras or "
                          ".weights.h5 file, a model directory (effnet-convert) or timm directory, or 'scratch' "
                          "(random weights)")
    p.add_argument("--format", required=True, help="onnx or stablehlo")
    p.add_argument("--out", required=True, help="output file (stablehlo: metadata in OUT.json)")
    p.add_argument("--resolution", type=int, default=None, help="input side R (default: the run's / weights')")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, or bfloat16 (stablehlo only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.format == "onnx" and args.dtype != "float32":
        raise UserError("--format onnx exports float32 only (use --dtype float32)")
    if args.workdir is not None and (args.variant is not None or args.init is not None):
        raise UserError("--workdir excludes --variant and --init")
    if args.resolution is not None:
        check_resolution(args.resolution)
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    model, variables, meta = load_for_export(workdir=args.workdir, which=args.which, variant=args.variant,
                                             init=args.init, resolution=args.resolution)
    full = export(model, variables, meta, args.format, args.out, args.resolution, args.dtype)
    summary = {"out": os.fspath(args.out), "format": args.format, "variant": full["variant"],
               "input": full["input"]["shape"], "num_classes": full["num_classes"],
               "bytes": os.path.getsize(args.out), "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
