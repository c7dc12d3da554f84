"""An eval-mode EfficientNet as a deployable artifact: ONNX (opset 17) or serialized StableHLO (`jax.export`).

Both take one input, a float32 NHWC batch `(batch, R, R, 3)` already preprocessed, and return float32 logits; the
batch dimension is dynamic. The metadata (`full_metadata`) carries the preprocessing as `EvalTransform` fields,
so `EvalTransform(**meta["preprocess"])` rebuilds it. The ONNX graph is written by an explicit emitter that walks
the `ModelConfig`. What each format holds and how to run it: docs/export.md. The command: `effnet-export`.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from effnet_jax.data.transform import EvalTransform
from effnet_jax.errors import UserError
from effnet_jax.model.variants import check_resolution

FORMATS = ("onnx", "stablehlo")
DTYPES = ("float32", "bfloat16")
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def full_metadata(meta: dict, fmt: str, model, resolution: int, dtype: str) -> dict:
    """The metadata an artifact carries: `meta` (variant, classes, preprocessing, source) and its input and
    output."""
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

    from effnet_jax.model.layers import conv_padding

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
    meta = dict(meta, preprocess=EvalTransform(**meta["preprocess"]).at(r).to_dict())
    full = full_metadata(meta, fmt, model, r, dtype)
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
