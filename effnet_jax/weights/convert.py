"""PyTorch EfficientNet state dicts -> Flax variables: one explicit key table per layout.

Three layouts are understood, each by one explicit mapping table built from the `ModelConfig`:

* torchvision (`torchvision.models.efficientnet_b*`, `efficientnet_v2_{s,m,l}`)::

      features.0.0 / features.0.1                stem conv / BN
      features.{s+1}.{j}.block.{k}.0 / .1        conv / BN of layer k of block j in stage s, where the
                                                 layers are [expand], depthwise, SE (fc1, fc2), project
                                                 (MBConv); k×k expand, project (Fused-MBConv); the one
                                                 k×k conv (Fused-MBConv with expansion ratio 1)
      features.{S+1}.0 / .1                      head conv / BN
      classifier.1                               Linear

* lukemelas / EfficientNet-Lite (`efficientnet_pytorch`, `efficientnet_lite_pytorch`)::

      _conv_stem, _bn0, _blocks.{i}._expand_conv/_bn0, _depthwise_conv/_bn1, _se_reduce/_se_expand,
      _project_conv/_bn2, _conv_head, _bn1, _fc

* timm (`timm.create_model('efficientnet_b0' | 'tf_efficientnet_*' | 'tf_efficientnetv2_*')`, the Hub's
  `model.safetensors`)::

      conv_stem, bn1, blocks.{s}.{j}.<layers by block type: `timm_table`>, conv_head, bn2, classifier

Tensors: conv OIHW -> HWIO (a depthwise (C,1,k,k) kernel becomes (k,k,1,C) by the same transpose), 1×1 SE
convs and Linear -> Dense (in, out), BatchNorm weight/bias -> params scale/bias, running_mean/var ->
batch_stats mean/var. Every key of the file must be used and every parameter of the model filled, with
the shape it needs; otherwise the error names the first key that does not fit.

`effnet-convert` (effnet_jax.cli.convert) writes a model directory from a file; `effnet_jax.load` reads them all.
"""

from __future__ import annotations

import logging
from typing import Iterator

import jax
import numpy as np

from effnet_jax.errors import UserError
from effnet_jax.model import variants
from effnet_jax.model.variants import BlockConfig, ModelConfig

log = logging.getLogger(__name__)

# how a tensor is turned into a Flax array
_CONV, _DENSE1X1, _LINEAR, _COPY = "conv", "dense1x1", "linear", "copy"
_TRANSFORMS = {
    _CONV: lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),   # OIHW -> HWIO
    _DENSE1X1: lambda w: np.ascontiguousarray(w[:, :, 0, 0].T),       # (out, in, 1, 1) -> (in, out)
    _LINEAR: lambda w: np.ascontiguousarray(w.T),                      # (out, in) -> (in, out)
    _COPY: lambda w: w,
}

# (torch suffix, collection, flax leaf, transform) for one conv + BN pair, and for BN alone
_BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))

Entry = tuple[str, str, tuple[str, ...], str]  # torch key, collection, flax path, transform


class ConversionError(UserError, ValueError):
    """The state dict does not fit the requested variant / layout."""


def _conv_bn(torch_conv: str, torch_bn: str, flax_conv: tuple[str, ...], flax_bn: tuple[str, ...]
             ) -> Iterator[Entry]:
    yield f"{torch_conv}.weight", "params", flax_conv + ("kernel",), _CONV
    for suffix, coll, leaf in _BN:
        yield f"{torch_bn}.{suffix}", coll, flax_bn + (leaf,), _COPY


def _se(torch_reduce: str, torch_expand: str, block: str) -> Iterator[Entry]:
    for t, f in ((torch_reduce, "reduce"), (torch_expand, "expand")):
        yield f"{t}.weight", "params", (block, "se", f, "kernel"), _DENSE1X1
        yield f"{t}.bias", "params", (block, "se", f, "bias"), _COPY


def blocks_by_stage(cfg: ModelConfig) -> Iterator[tuple[int, int, BlockConfig]]:
    """(flat index i, position j within its stage, block) of each block: the layouts that number blocks by stage."""
    position: dict[int, int] = {}
    for i, b in enumerate(cfg.blocks):
        position[b.stage] = position.get(b.stage, -1) + 1
        yield i, position[b.stage], b


def torchvision_table(cfg: ModelConfig) -> list[Entry]:
    """The mapping torchvision key -> Flax path for `cfg`."""
    t = list(_conv_bn("features.0.0", "features.0.1", ("stem",), ("stem_bn",)))
    for i, j, b in blocks_by_stage(cfg):
        pre, blk, k = f"features.{b.stage + 1}.{j}.block", f"blocks_{i}", 0
        if b.fused:  # torchvision's FusedMBConv: block.0 = k×k conv (expansion, or the whole block), block.1 = project
            if b.expand_channels != b.in_channels:
                t += _conv_bn(f"{pre}.0.0", f"{pre}.0.1", (blk, "expand_conv"), (blk, "expand_bn"))
                t += _conv_bn(f"{pre}.1.0", f"{pre}.1.1", (blk, "project_conv"), (blk, "project_bn"))
            else:
                t += _conv_bn(f"{pre}.0.0", f"{pre}.0.1", (blk, "conv"), (blk, "bn"))
            continue
        if b.expand_channels != b.in_channels:
            t += _conv_bn(f"{pre}.0.0", f"{pre}.0.1", (blk, "expand_conv"), (blk, "expand_bn"))
            k = 1
        t += _conv_bn(f"{pre}.{k}.0", f"{pre}.{k}.1", (blk, "dw_conv"), (blk, "dw_bn"))
        if b.se_channels:
            t += _se(f"{pre}.{k + 1}.fc1", f"{pre}.{k + 1}.fc2", blk)
            k += 1
        t += _conv_bn(f"{pre}.{k + 1}.0", f"{pre}.{k + 1}.1", (blk, "project_conv"), (blk, "project_bn"))
    last = cfg.num_stages + 1
    t += _conv_bn(f"features.{last}.0", f"features.{last}.1", ("head",), ("head_bn",))
    t += [("classifier.1.weight", "params", ("classifier", "kernel"), _LINEAR),
          ("classifier.1.bias", "params", ("classifier", "bias"), _COPY)]
    return t


def lukemelas_table(cfg: ModelConfig) -> list[Entry]:
    """The mapping lukemelas/Lite key -> Flax path for `cfg` (B and Lite models; that layout has no V2)."""
    if any(b.fused for b in cfg.blocks):
        raise ConversionError(f"{cfg.name}: the lukemelas/Lite layout has no EfficientNetV2 models; use a "
                              "torchvision file")
    t = list(_conv_bn("_conv_stem", "_bn0", ("stem",), ("stem_bn",)))
    for i, b in enumerate(cfg.blocks):
        pre, blk = f"_blocks.{i}", f"blocks_{i}"
        if b.expand_channels != b.in_channels:
            t += _conv_bn(f"{pre}._expand_conv", f"{pre}._bn0", (blk, "expand_conv"), (blk, "expand_bn"))
        t += _conv_bn(f"{pre}._depthwise_conv", f"{pre}._bn1", (blk, "dw_conv"), (blk, "dw_bn"))
        if b.se_channels:
            t += _se(f"{pre}._se_reduce", f"{pre}._se_expand", blk)
        t += _conv_bn(f"{pre}._project_conv", f"{pre}._bn2", (blk, "project_conv"), (blk, "project_bn"))
    t += _conv_bn("_conv_head", "_bn1", ("head",), ("head_bn",))
    t += [("_fc.weight", "params", ("classifier", "kernel"), _LINEAR),
          ("_fc.bias", "params", ("classifier", "bias"), _COPY)]
    return t


def timm_table(cfg: ModelConfig) -> list[Entry]:
    """The mapping timm key -> Flax path for `cfg` (timm's `EfficientNet`: its own B-models and the tf_* ports).
    timm numbers blocks by stage (`blocks.{s}.{j}`) and names a block's layers by its type: `DepthwiseSeparable`
    (conv_dw, bn1, [se], conv_pw, bn2), `InvertedResidual` (conv_pw, bn1, conv_dw, bn2, [se], conv_pwl, bn3),
    `EdgeResidual` (conv_exp, bn1, conv_pwl, bn2: Fused-MBConv) and `ConvBnAct` (conv, bn1: Fused-MBConv with
    expansion ratio 1)."""
    t = list(_conv_bn("conv_stem", "bn1", ("stem",), ("stem_bn",)))
    for i, j, b in blocks_by_stage(cfg):
        pre, blk = f"blocks.{b.stage}.{j}", f"blocks_{i}"
        expands = b.expand_channels != b.in_channels
        if b.fused and expands:
            t += _conv_bn(f"{pre}.conv_exp", f"{pre}.bn1", (blk, "expand_conv"), (blk, "expand_bn"))
            t += _conv_bn(f"{pre}.conv_pwl", f"{pre}.bn2", (blk, "project_conv"), (blk, "project_bn"))
        elif b.fused:
            t += _conv_bn(f"{pre}.conv", f"{pre}.bn1", (blk, "conv"), (blk, "bn"))
        elif expands:
            t += _conv_bn(f"{pre}.conv_pw", f"{pre}.bn1", (blk, "expand_conv"), (blk, "expand_bn"))
            t += _conv_bn(f"{pre}.conv_dw", f"{pre}.bn2", (blk, "dw_conv"), (blk, "dw_bn"))
            if b.se_channels:
                t += _se(f"{pre}.se.conv_reduce", f"{pre}.se.conv_expand", blk)
            t += _conv_bn(f"{pre}.conv_pwl", f"{pre}.bn3", (blk, "project_conv"), (blk, "project_bn"))
        else:
            t += _conv_bn(f"{pre}.conv_dw", f"{pre}.bn1", (blk, "dw_conv"), (blk, "dw_bn"))
            if b.se_channels:
                t += _se(f"{pre}.se.conv_reduce", f"{pre}.se.conv_expand", blk)
            t += _conv_bn(f"{pre}.conv_pw", f"{pre}.bn2", (blk, "project_conv"), (blk, "project_bn"))
    t += _conv_bn("conv_head", "bn2", ("head",), ("head_bn",))
    t += [("classifier.weight", "params", ("classifier", "kernel"), _LINEAR),
          ("classifier.bias", "params", ("classifier", "bias"), _COPY)]
    return t


LAYOUTS = {"torchvision": ("features.0.0.weight", torchvision_table),
           "lukemelas": ("_conv_stem.weight", lukemelas_table),
           "timm": ("conv_stem.weight", timm_table)}


def detect_layout(state_dict: dict[str, np.ndarray]) -> str:
    for name, (marker, _) in LAYOUTS.items():
        if marker in state_dict:
            return name
    raise ConversionError("not an EfficientNet state dict in a known layout (torchvision 'features.0.0.weight', "
                          f"lukemelas/Lite '_conv_stem.weight' or timm 'conv_stem.weight'); first keys: "
                          f"{list(state_dict)[:5]}")


def layout_overrides(layout: str, variant: str) -> dict:
    """`create_model` overrides that make the Flax model compute what the file's PyTorch model computes.
    torchvision pads symmetrically; lukemelas B-models were ported from TF (SAME padding, BN eps 1e-3);
    Lite configs are TF-style already."""
    if layout == "lukemelas" and not variant.startswith("lite"):
        return {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.01}
    return {}


def convert_state_dict(state_dict: dict[str, np.ndarray], variant: str, num_classes: int | None = None,
                       rng: jax.Array | None = None, source: str = "state dict", layout: str | None = None,
                       overrides: dict | None = None) -> dict:
    """Map a torchvision or lukemelas/Lite state dict onto `create_model(variant, num_classes)`'s variables.

    `num_classes=None` keeps the file's classifier. Any other number loads the backbone and initializes a
    fresh head (torchvision's init, from `rng`, default key 0) — the transfer fine-tune's starting point.
    `num_classes=0` loads the backbone alone, for `create_model(variant, 0)` (pooled features).
    `layout`: the file's layout when the caller has already run `detect_layout`. `overrides`: the model's
    `create_model` overrides when the layout does not imply them (a timm port's, `variants.Port.overrides`).
    """
    from effnet_jax.model.network import create_model, new_classifier, param_shapes

    layout = detect_layout(state_dict) if layout is None else layout
    table = LAYOUTS[layout][1](variants.model_config(variant))
    file_classes = int(state_dict[table[-1][0]].shape[0]) if table[-1][0] in state_dict else None
    classes = file_classes if num_classes is None else num_classes
    if classes is None:
        raise ConversionError(f"{source}: no classifier in the file; pass num_classes")
    model = create_model(variant, classes, **(layout_overrides(layout, variant) if overrides is None else overrides))
    shapes = param_shapes(model, 64)
    new_head = classes != file_classes

    out: dict = {"params": {}, "batch_stats": {}}
    used = set()
    for key, coll, path, how in table:
        if new_head and path[0] == "classifier":
            continue
        if key not in state_dict:
            raise ConversionError(f"{source}: missing key {key!r} for {variant} ({layout} layout): is this file "
                                  f"for another variant?")
        value = _TRANSFORMS[how](np.asarray(state_dict[key]))
        want = shapes[coll]
        for p in path:
            want = want[p]
        if tuple(value.shape) != tuple(want.shape):
            raise ConversionError(f"{source}: {key!r} has shape {tuple(state_dict[key].shape)}, which does not fit "
                                  f"{variant} ({'/'.join(path)} needs {tuple(want.shape)} after transposing): is "
                                  f"this file for another variant?")
        node = out[coll]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value.astype(np.float32)
        used.add(key)
    extra = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
             and not (new_head and k in (table[-2][0], table[-1][0]))]
    if extra:
        raise ConversionError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unused) for {variant}: is this "
                              f"file for another variant?")
    if new_head and classes > 0:
        features = shapes["params"]["classifier"]["kernel"].shape[0]
        head = new_classifier(jax.random.key(0) if rng is None else rng, features, classes, "uniform")
        out["params"]["classifier"] = {k: np.asarray(v) for k, v in head.items()}
        log.info("%s: backbone loaded; new %d-class head initialized (the file has %s classes)", source, classes,
                 file_classes)
    elif new_head:
        log.info("%s: backbone loaded without its classifier (num_classes=0: pooled features)", source)
    return out
