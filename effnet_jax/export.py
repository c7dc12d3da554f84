"""Export an eval-mode EfficientNet for deployment: ONNX or serialized StableHLO (`jax.export`).

    python -m effnet_jax.export (--workdir RUN_DIR [--which best|latest] | --variant V --init imagenet|PATH.pth|scratch)
        --format onnx|stablehlo --out FILE [--resolution R] [--dtype float32|bfloat16] [--overwrite]

Both artifacts take **one input: a float32 NHWC batch `(batch, R, R, 3)` that is already preprocessed** (resized /
cropped to R x R, scaled to [0, 1], then `(x - mean) / std` per channel), and return float32 logits
`(batch, num_classes)` (no softmax). The batch dimension is dynamic (any size, one file). Normalization is *not*
inside the graph; the metadata says what it is:

    {"format": "onnx"|"stablehlo", "variant", "num_classes", "class_names": [...],
     "input": {"name": "images", "layout": "NHWC", "shape": ["batch", R, R, 3], "dtype": "float32",
               "normalized": true},
     "output": {"name": "logits", "shape": ["batch", num_classes], "dtype": "float32"},
     "preprocess": {"input_size": R, "mean": [..], "std": [..], ...}, "source": ..., "dtype": ...}

`preprocess` holds the fields of `effnet_jax.preprocess.EvalTransform`, so `EvalTransform(**meta["preprocess"])`
rebuilds the transform from either source. For `--init imagenet|PATH.pth` it is the weights' ImageNet eval
transform (`effnet_jax.preprocess.preprocess_config`: resize/crop recipe, interpolation, mean/std; at another
`--resolution` `input_size` is R and (torchvision crop style) `resize_size` keeps its ratio to it); for
`--workdir`, the run's evaluation preprocessing (`effnet_jax.preprocess.run_preprocess_config`, crop style 'run':
the image as the data loader stores it, then `effnet_jax.data.eval_batch`'s bilinear resize to R and the run's
mean/std), the same as `predict --workdir` uses.

* ONNX (opset 17): written by an explicit emitter that walks the architecture (`ModelConfig`): Transpose to NCHW,
  Conv (depthwise = group C; V2's Fused-MBConv: plain k×k Conv), BatchNormalization nodes with the running
  statistics, SiLU = x * Sigmoid(x), ReLU6 = Clip(0, 6), SE = GlobalAveragePool + 1x1 Conv + Sigmoid + Mul,
  TF-'same' padding as explicit (possibly asymmetric) `pads`, Gemm head. The metadata JSON is the model's
  `metadata_props` entry `effnet_jax`; `mean`, `std`, `input_size` and `class_names` (JSON) are also separate
  entries. float32 only.
* StableHLO: `jax.export` of `model.apply(variables, x, train=False)` with the weights embedded as constants and
  the batch a symbolic dimension; depthwise convolutions as XLA grouped convolutions (portable across CPU/GPU/TPU).
  `FILE` holds `Exported.serialize()`; the metadata is `FILE.json`. `load_stablehlo(FILE)` returns
  (callable, metadata). `--dtype bfloat16` computes in bfloat16 (input and logits stay float32).

Errors (unknown variant, missing run directory, bad format, existing `--out` without `--overwrite`, ...) print one
line `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from .errors import UserError, cli
from .variants import check_resolution

FORMATS = ("onnx", "stablehlo")
DTYPES = ("float32", "bfloat16")
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


# ---------------------------------------------------------------------------------------------------- loading

def load_for_export(*, workdir: str | None = None, which: str = "best", variant: str | None = None,
                    init: str | None = None, resolution: int | None = None):
    """(model, variables, metadata) of the eval-mode model to export (`loader.load`; the model computes its
    convolutions as XLA convolutions). `resolution` defaults to the run's (workdir) or the weights' eval input
    size; for the weights' torchvision-style crop, `resize_size` keeps its ratio to it."""
    from .loader import load
    from .rundir import existing_run

    if workdir is not None:
        loaded = load(existing_run(workdir).path, which=which, depthwise_impl="xla", conv_impl="xla")
    else:
        if variant is None and not (init is not None and pathlib.Path(init).is_dir()):
            raise UserError("--variant (or --workdir) is required")
        loaded = load(init or "imagenet", variant, depthwise_impl="xla", conv_impl="xla")
    pre = loaded.preprocess.to_dict()
    r = resolution or pre["input_size"]
    if r != pre["input_size"] and pre["crop_style"] == "torchvision":  # keep the resize / crop ratio
        pre["resize_size"] = max(r, round(pre["resize_size"] * r / pre["input_size"]))
    pre["input_size"] = r
    source = loaded.source if workdir is not None else f"--init {init or 'imagenet'}"
    meta = {"variant": loaded.variant, "num_classes": loaded.model.num_classes,
            "class_names": list(loaded.class_names), "preprocess": pre, "source": source}
    return loaded.model, loaded.variables, meta


def _full_meta(meta: dict, fmt: str, model, resolution: int, dtype: str) -> dict:
    return {"format": fmt, **meta,
            "input": {"name": INPUT_NAME, "layout": "NHWC", "shape": ["batch", resolution, resolution, 3],
                      "dtype": "float32", "normalized": True},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", model.num_classes or model.config.head_channels],
                       "dtype": "float32"},
            "dtype": dtype, "padding": model.config.padding, "effnet_jax_export": 1}


# ---------------------------------------------------------------------------------------------------- ONNX

def to_onnx(model, variables, resolution: int, metadata: dict | None = None):
    """The eval-mode `model` with `variables` as an `onnx.ModelProto`: input 'images' (batch, R, R, 3) float32 NHWC
    normalized, output 'logits' (batch, num_classes); dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .layers import conv_padding

    cfg = model.config
    params = _np_tree(variables["params"])
    stats = _np_tree(variables.get("batch_stats", {}))
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(arr, prefix):
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), n))
        return n

    def node(op, inputs, prefix, **attrs):
        out = name(prefix)
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(x, kernel, size, stride, group=1, bias=None):
        """NCHW conv of `x` (spatial `size`) with an HWIO kernel; returns (output, output size)."""
        k = kernel.shape[0]
        lo, hi = conv_padding(cfg.padding, size, k, stride)
        w = const(np.transpose(kernel, (3, 2, 0, 1)), "w")
        ins = [x, w] + ([const(bias, "b")] if bias is not None else [])
        y = node("Conv", ins, "conv", kernel_shape=[k, k], strides=[stride, stride], pads=[lo, lo, hi, hi],
                 group=group)
        return y, (size + lo + hi - k) // stride + 1

    def bn(x, p, s):
        return node("BatchNormalization", [x, const(p["scale"], "gamma"), const(p["bias"], "beta"),
                                           const(s["mean"], "mean"), const(s["var"], "var")],
                    "bn", epsilon=float(cfg.bn_epsilon))

    def act(x, kind=cfg.activation):
        if kind == "relu6":
            return node("Clip", [x, zero, six], "relu6")
        return node("Mul", [x, node("Sigmoid", [x], "sig")], "silu")

    if cfg.activation == "relu6":
        zero, six = const(np.zeros((), np.float32), "zero"), const(np.full((), 6.0, np.float32), "six")
    x = node("Transpose", [INPUT_NAME], "nchw", perm=[0, 3, 1, 2])
    x, size = conv(x, params["stem"]["kernel"], resolution, cfg.stem_stride)
    x = act(bn(x, params["stem_bn"], stats["stem_bn"]))
    for i, b in enumerate(cfg.blocks):
        p, s = params[f"blocks_{i}"], stats[f"blocks_{i}"]
        shortcut = x
        if b.fused:  # EfficientNetV2's Fused-MBConv: k×k (stride) conv [+ 1×1 project]
            if b.expand_channels != b.in_channels:
                x, size = conv(x, p["expand_conv"]["kernel"], size, b.stride)
                x = act(bn(x, p["expand_bn"], s["expand_bn"]))
                x, _ = conv(x, p["project_conv"]["kernel"], size, 1)
                x = bn(x, p["project_bn"], s["project_bn"])
            else:
                x, size = conv(x, p["conv"]["kernel"], size, b.stride)
                x = act(bn(x, p["bn"], s["bn"]))
            if b.residual:
                x = node("Add", [x, shortcut], "residual")
            continue
        if b.expand_channels != b.in_channels:
            x, _ = conv(x, p["expand_conv"]["kernel"], size, 1)
            x = act(bn(x, p["expand_bn"], s["expand_bn"]))
        x, size = conv(x, p["dw_conv"]["kernel"], size, b.stride, group=b.expand_channels)
        x = act(bn(x, p["dw_bn"], s["dw_bn"]))
        if b.se_channels:
            se = p["se"]
            g = node("GlobalAveragePool", [x], "se_pool")
            g, _ = conv(g, se["reduce"]["kernel"][None, None], 1, 1, bias=se["reduce"]["bias"])
            g, _ = conv(act(g, "silu"), se["expand"]["kernel"][None, None], 1, 1, bias=se["expand"]["bias"])
            x = node("Mul", [x, node("Sigmoid", [g], "se_gate")], "se")
        x, _ = conv(x, p["project_conv"]["kernel"], size, 1)
        x = bn(x, p["project_bn"], s["project_bn"])
        if b.residual:
            x = node("Add", [x, shortcut], "residual")
    x, _ = conv(x, params["head"]["kernel"], size, 1)
    x = act(bn(x, params["head_bn"], stats["head_bn"]))
    x = node("Flatten", [node("GlobalAveragePool", [x], "pool")], "features", axis=1)
    if model.num_classes:
        c = params["classifier"]
        x = node("Gemm", [x, const(c["kernel"], "fc_w"), const(c["bias"], "fc_b")], "fc")
    nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name=OUTPUT_NAME))
    n_out = model.num_classes or cfg.head_channels
    graph = helper.make_graph(
        nodes, f"efficientnet_{metadata.get('variant', '') if metadata else ''}".rstrip("_"),
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", resolution, resolution, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_out])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="effnet_jax")
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime releases of the last two years
    if metadata:
        pre = metadata.get("preprocess", {})
        props = {"effnet_jax": json.dumps(metadata), "class_names": json.dumps(metadata.get("class_names", [])),
                 "mean": json.dumps(pre.get("mean")), "std": json.dumps(pre.get("std")),
                 "input_size": str(pre.get("input_size", resolution))}
        helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    return proto


def _np_tree(tree):
    import jax
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


def onnx_metadata(path: str | os.PathLike) -> dict:
    """The `effnet_jax` metadata JSON of an exported ONNX file."""
    import onnx
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return json.loads({p.key: p.value for p in proto.metadata_props}["effnet_jax"])


# ---------------------------------------------------------------------------------------------------- StableHLO

def to_stablehlo(model, variables, resolution: int):
    """`jax.export.Exported` of the eval-mode model, weights embedded, batch dimension symbolic ('b')."""
    import jax
    import jax.numpy as jnp

    variables = jax.tree_util.tree_map(jnp.asarray, variables)

    def forward(x):
        return model.apply(variables, x, train=False).astype(jnp.float32)

    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, resolution, resolution, 3), jnp.float32)
    return jax.export.export(jax.jit(forward))(spec)


def load_stablehlo(path: str | os.PathLike):
    """(callable, metadata) of a file written by `--format stablehlo`: the callable takes a float32 NHWC batch
    (any batch size, normalized as metadata['preprocess'] says) and returns float32 logits."""
    import jax
    path = pathlib.Path(path)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    meta_path = path.with_name(path.name + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return exported.call, meta


# ---------------------------------------------------------------------------------------------------- export

def export(model, variables, meta: dict, fmt: str, out: str | os.PathLike, resolution: int | None = None,
           dtype: str = "float32") -> dict:
    """Write `model` + `variables` to `out` in `fmt` ('onnx' or 'stablehlo'); returns the metadata written."""
    import jax.numpy as jnp
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    r = check_resolution(int(resolution or meta["preprocess"]["input_size"]))
    meta = dict(meta, preprocess=dict(meta["preprocess"], input_size=r))
    full = _full_meta(meta, fmt, model, r, dtype)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        if dtype != "float32":
            raise UserError("--format onnx exports float32 only (use --dtype float32)")
        proto = to_onnx(model, variables, r, full)
        import onnx
        onnx.save(proto, os.fspath(out))
    else:
        model = model.clone(dtype=jnp.dtype(dtype), depthwise_impl="xla", conv_impl="xla")
        exp = to_stablehlo(model, variables, r)
        out.write_bytes(exp.serialize())
        out.with_name(out.name + ".json").write_text(json.dumps(full, indent=1) + "\n")
    return full


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m effnet_jax.export", description=(
        "Export an eval-mode EfficientNet to ONNX or serialized StableHLO with a dynamic batch dimension."))
    src = p.add_argument_group("model (--workdir, or --variant with --init)")
    src.add_argument("--workdir", default=None, help="a training run directory (effnet_jax.train)")
    src.add_argument("--which", default="best", choices=("best", "latest"), help="the run's checkpoint")
    src.add_argument("--variant", default=None, help="b0..b7, lite0..lite4, v2_s, v2_m, v2_l")
    src.add_argument("--init", default=None,
                     help="'imagenet' (default with --variant), a PyTorch .pth file, a model directory "
                          "(effnet_jax.convert), or 'scratch' (random weights)")
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
