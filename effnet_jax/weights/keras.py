"""Keras applications' EfficientNet files -> Flax variables, read with h5py, zipfile and json (Keras is not imported).

`keras.applications.EfficientNetB0`..`B7` and `EfficientNetV2B0`..`B3`/`S`/`M`/`L` (Keras 3) are saved as
`.weights.h5` (`model.save_weights`) or `.keras` (`model.save`: a zip of config.json, metadata.json and
model.weights.h5). The HDF5 layout, found by writing files with Keras 3.15.1 and reading them back::

    layers/<key>/vars/<i>            variable i of one layer of the model, in the layer's own order:
                                     Conv2D kernel (kh, kw, in, out) [, bias]; DepthwiseConv2D kernel (k, k, C, 1);
                                     BatchNormalization gamma, beta, moving_mean, moving_variance; Dense kernel
                                     (in, out) [, bias]; Normalization mean, variance, count (when they were not
                                     constructor arguments, as in V2-B's: those are in config.json only)
    layers/<key>/vars.attrs['name']  the layer's name (recent Keras 3; older files lack it)
    layers/<key>/layers/...          the layers of a nested model (`base = EfficientNetB0(...)` called as a layer;
                                     its <key> is 'functional')
    optimizer/vars/<i>               the optimizer's state, in a trained model's files: not read
    vars/                            the model's own variables: none (its attribute 'name' is the model's name)

`<key>` is the snake-cased class name made unique by position among the model's `layers`: the n-th
BatchNormalization is `batch_normalization_<n>` (the first `batch_normalization`), whatever its name; Keras itself
loads by this position. Weightless layers (Activation, Add, Rescaling, ...) have empty groups. A group is named
here by config.json (`.keras`, which lists the layers in that order), else by its 'name' attribute, else by its
position in the application's layer order (`keras_table`'s order, that of `model.layers`).

Tensors: Conv2D kernels are HWIO already; DepthwiseConv2D (k, k, C, 1) -> (k, k, 1, C); the 1×1 SE convs
(se_reduce, se_expand) -> Dense (in, out); BatchNormalization gamma/beta -> params scale/bias, moving_mean/variance
-> batch_stats mean/var. Like `convert`, one strict table (`keras_table`) maps every variable, each shape is
checked, and any variable of the file left unused, or any layer this module does not know, is refused by name.

The model: SAME padding (V1's ZeroPadding2D before each stride-2 conv, `correct_pad`, is TF SAME for the static
input size it was built for; built for any size, (k//2 - 1, k//2) = SAME when each stride-2 input is even, e.g. a
side that is a multiple of 32), BN epsilon and momentum from the file (Keras momentum 0.99 is PyTorch's 0.01).
The input layers (Rescaling, Normalization) fold into `mean`/`std` for images scaled to [0, 1]; a head
BatchNormalization folds into the classifier (`_fold_bn`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import re
import zipfile
from typing import NamedTuple

import numpy as np

from effnet_jax.errors import ConfigError
from effnet_jax.model import variants
from effnet_jax.model.variants import ModelConfig
from effnet_jax.weights.convert import ConversionError, blocks_by_stage

__all__ = ["KerasWeights", "KerasEntry", "ConversionError", "keras_table", "read_keras", "KERAS_APPLICATIONS"]

log = logging.getLogger(__name__)

# The Keras application function of each supported model, by the model's name (`variants.KERAS_MODELS`' keys).
KERAS_APPLICATIONS: dict[str, str] = {
    **{f"efficientnetb{i}": f"EfficientNetB{i}" for i in range(8)},
    **{f"efficientnetv2-{s}": f"EfficientNetV2{s.upper()}" for s in ("b0", "b1", "b2", "b3", "s", "m", "l")},
}
_SUPPORTED = ", ".join(KERAS_APPLICATIONS.values())

# The variables of each layer class, in the order Keras saves them (vars/0, vars/1, ...).
_VARS = {"conv2d": ("kernel", "bias"), "depthwise_conv2d": ("kernel",), "dense": ("kernel", "bias"),
         "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
         "normalization": ("mean", "variance", "count")}
_CONTAINERS = ("functional", "sequential")  # a nested model's group key

# Keras' preprocessing constants (keras/src/applications/efficientnet*.py, 3.15.1)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
_NORMALIZATION_EPSILON = 1e-7  # keras.config.epsilon(): Normalization divides by max(sqrt(variance), this)
_KERAS_BN_EPSILON = 1e-3  # BatchNormalization's default
_KERAS_BN_MOMENTUM = {"v1": 0.99, "v2": 0.9}  # Keras convention (running = m * running + (1 - m) * batch)


def _copy(w: np.ndarray) -> np.ndarray:
    return w


def _depthwise(w: np.ndarray) -> np.ndarray:
    """(k, k, C, 1) -> (k, k, 1, C)."""
    if w.ndim != 4 or w.shape[3] != 1:
        raise ValueError("a depthwise kernel (k, k, C, 1)")
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2))


def _dense1x1(w: np.ndarray) -> np.ndarray:
    """A 1×1 Conv2D kernel (1, 1, in, out) -> Dense (in, out)."""
    if w.ndim != 4 or w.shape[:2] != (1, 1):
        raise ValueError("a 1x1 kernel (1, 1, in, out)")
    return np.ascontiguousarray(w[0, 0])


class KerasEntry(NamedTuple):
    """One variable of the Keras model and where it goes in the Flax model."""
    layer: str                 # the Keras layer's name: 'block2a_dwconv'
    kind: str                  # its class, snake-cased as in the h5 keys: 'depthwise_conv2d'
    var: str                   # the variable: one of `_VARS[kind]`
    collection: str            # 'params' or 'batch_stats'
    path: tuple[str, ...]      # the Flax leaf: ('blocks_1', 'dw_conv', 'kernel')
    transform: object          # array -> Flax array

    @property
    def key(self) -> str:
        return f"{self.layer}/{self.var}"


def _conv_bn(conv: str, bn: str, flax_conv: tuple[str, ...], flax_bn: tuple[str, ...], depthwise: bool = False
             ) -> list[KerasEntry]:
    t = [KerasEntry(conv, "depthwise_conv2d" if depthwise else "conv2d", "kernel", "params", flax_conv + ("kernel",),
                    _depthwise if depthwise else _copy)]
    for var, coll, leaf in (("gamma", "params", "scale"), ("beta", "params", "bias"),
                            ("moving_mean", "batch_stats", "mean"), ("moving_variance", "batch_stats", "var")):
        t.append(KerasEntry(bn, "batch_normalization", var, coll, flax_bn + (leaf,), _copy))
    return t


def _family(cfg: ModelConfig) -> str:
    """'v1' (EfficientNetB*) or 'v2' (EfficientNetV2*), or a ConversionError for a model Keras does not have."""
    ports = {p.variant: name for name, p in variants.KERAS_MODELS.items()}
    if cfg.name not in ports:
        raise ConversionError(f"{cfg.name}: Keras applications have no such EfficientNet; supported: {_SUPPORTED}")
    return "v2" if ports[cfg.name].startswith("efficientnetv2") else "v1"


def keras_table(cfg: ModelConfig) -> list[KerasEntry]:
    """The mapping Keras layer/variable -> Flax path for `cfg`, in the Keras application's layer order (that of
    `model.layers`, which numbers the h5 groups). Block j (0-based) of stage s is named `block{s+1}{'abc..'[j]}_`;
    its layers are [expand_conv, expand_bn], dwconv (V2: dwconv2), bn, [se_reduce, se_expand], project_conv,
    project_bn (MBConv); expand_conv (k×k), expand_bn, project_conv (1×1), project_bn (Fused-MBConv); project_conv
    (k×k), project_bn (Fused-MBConv with expansion ratio 1: our conv, bn). The last two entries are the
    application's classifier, Dense 'predictions'."""
    family = _family(cfg)
    t = _conv_bn("stem_conv", "stem_bn", ("stem",), ("stem_bn",))
    for i, j, b in blocks_by_stage(cfg):
        pre, blk = f"block{b.stage + 1}{chr(ord('a') + j)}_", f"blocks_{i}"
        expands = b.expand_channels != b.in_channels
        if b.fused and expands:
            t += _conv_bn(f"{pre}expand_conv", f"{pre}expand_bn", (blk, "expand_conv"), (blk, "expand_bn"))
            t += _conv_bn(f"{pre}project_conv", f"{pre}project_bn", (blk, "project_conv"), (blk, "project_bn"))
            continue
        if b.fused:
            t += _conv_bn(f"{pre}project_conv", f"{pre}project_bn", (blk, "conv"), (blk, "bn"))
            continue
        if expands:
            t += _conv_bn(f"{pre}expand_conv", f"{pre}expand_bn", (blk, "expand_conv"), (blk, "expand_bn"))
        dw = f"{pre}dwconv2" if family == "v2" else f"{pre}dwconv"
        t += _conv_bn(dw, f"{pre}bn", (blk, "dw_conv"), (blk, "dw_bn"), depthwise=True)
        if b.se_channels:
            for keras_name, ours in (("se_reduce", "reduce"), ("se_expand", "expand")):
                t.append(KerasEntry(f"{pre}{keras_name}", "conv2d", "kernel", "params", (blk, "se", ours, "kernel"),
                                    _dense1x1))
                t.append(KerasEntry(f"{pre}{keras_name}", "conv2d", "bias", "params", (blk, "se", ours, "bias"),
                                    _copy))
        t += _conv_bn(f"{pre}project_conv", f"{pre}project_bn", (blk, "project_conv"), (blk, "project_bn"))
    t += _conv_bn("top_conv", "top_bn", ("head",), ("head_bn",))
    t += [KerasEntry("predictions", "dense", "kernel", "params", ("classifier", "kernel"), _copy),
          KerasEntry("predictions", "dense", "bias", "params", ("classifier", "bias"), _copy)]
    return t


# Weightless layers of the applications' backbones, by name suffix (stem_*, top_*, block*_*)
_WEIGHTLESS_BACKBONE = re.compile(r"(stem_conv_pad|stem_activation|top_activation|block\d+[a-z]_(expand_activation|"
                                  r"activation|dwconv_pad|se_squeeze|se_reshape|se_excite|project_activation|drop|add))")


@dataclasses.dataclass(frozen=True)
class KerasWeights:
    """A Keras EfficientNet file, read: `create_model(variant, num_classes, **overrides).apply(variables, x)` on
    images x in [0, 1] normalized as (x - mean) / std computes the Keras model's output on the same images in
    0..255 — as logits: a Dense head with a softmax (or any other activation) is loaded without it."""
    variant: str
    overrides: dict            # create_model kwargs: padding='same', bn_epsilon, bn_momentum (PyTorch convention)
    variables: dict            # {'params', 'batch_stats'} of numpy float32 arrays
    num_classes: int           # 0: the file has no classifier (the model returns pooled features)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int | None     # the input size the .keras model was built for, when fixed and square
    keras_name: str            # the Keras model's name ('efficientnetb0', or the user's model's)
    source: str                # one line: what was read, and what was folded


@dataclasses.dataclass
class _Layer:
    """One layer of the file: its name (None when unknown), class (snake-cased), h5 group and config."""
    name: str | None
    kind: str
    group: str                      # h5 group path ('layers/conv2d_3'), '' when the file has none for it
    arrays: tuple[str, ...] = ()    # dataset paths of its variables, in order
    config: dict | None = None      # its config.json entry's 'config' (.keras)
    inputs: tuple[str, ...] = ()    # the layers it is called on, in its container (.keras)

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.group or self.kind})" if self.name else repr(self.group or self.kind)


@dataclasses.dataclass
class _Container:
    """A model of the file: the top one (group '') or one nested in it (group 'layers/functional')."""
    group: str
    name: str | None
    kind: str                       # 'functional' or 'sequential'
    layers: list[_Layer]
    output: str | None = None       # the output layer's name (.keras)

    def by_name(self) -> dict[str, _Layer]:
        return {layer.name: layer for layer in self.layers if layer.name}


def _snake(class_name: str) -> str:
    """Keras' `naming.to_snake_case` (the h5 group keys)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _kind_of_key(key: str) -> str:
    return re.sub(r"_\d+$", "", key)


def _fail(source: str, message: str) -> ConversionError:
    return ConversionError(f"{source}: {message}")


# --- reading the file -------------------------------------------------------------------------------------------

def _open(path: pathlib.Path):
    """(h5py.File, config.json dict or None, Keras version or None, 'weights.h5' or 'keras') of a file."""
    import h5py

    source = str(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise _fail(source, f"cannot read: {e.strerror or e}") from None
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if "model.weights.h5" not in names:
                    raise _fail(source, "a zip without model.weights.h5: not a .keras file (sharded weights, "
                                        "model.weights.json, are not supported)")
                config = json.loads(z.read("config.json")) if "config.json" in names else None
                meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
                data = z.read("model.weights.h5")
        except ConversionError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise _fail(source, f"truncated or corrupt .keras (zip) file ({type(e).__name__}: {e})") from None
        if config is None:
            raise _fail(source, "a zip without config.json: not a .keras file")
        try:
            return h5py.File(io.BytesIO(data), "r"), config, meta.get("keras_version"), "keras"
        except OSError as e:
            raise _fail(source, f"model.weights.h5 in the .keras file is truncated or corrupt ({e})") from None
    if magic != b"\x89HDF\r\n\x1a\n":
        raise _fail(source, "neither an HDF5 (.weights.h5) nor a zip (.keras) file")
    try:
        return h5py.File(path, "r"), None, None, "weights.h5"
    except OSError as e:
        raise _fail(source, f"truncated or corrupt HDF5 file ({e})") from None


def _h5_containers(h5, source: str) -> list[_Container]:
    """The models of an h5 file as groups: [top, nested...]; layers named by their 'name' attribute (or None)."""
    import h5py

    if "layers" not in h5:
        if "model_weights" in h5 or "layer_names" in h5.attrs:
            raise _fail(source, "a Keras 2 / tf.keras HDF5 file (model_weights / layer_names); load it in Keras 3 "
                                "and save it again with model.save_weights('x.weights.h5') or model.save('x.keras')")
        raise _fail(source, f"not a Keras 3 weights file: no 'layers' group (top-level keys: {sorted(h5)[:8]})")
    extra = sorted(set(h5) - {"layers", "vars", "optimizer"})
    if extra:
        raise _fail(source, f"unknown top-level group {extra[0]!r}")

    out: list[_Container] = []

    def walk(group_path: str, kind: str) -> None:
        top = h5[group_path] if group_path else h5
        name = top["vars"].attrs.get("name") if "vars" in top else None
        container = _Container(group_path, _str(name), kind, [])
        out.append(container)
        for key in top["layers"]:
            g = top["layers"][key]
            path = f"{group_path}/layers/{key}".lstrip("/")
            if not isinstance(g, h5py.Group):
                raise _fail(source, f"unexpected dataset {path!r}")
            layer_kind = _kind_of_key(key)
            if "layers" in g and layer_kind in _CONTAINERS:
                walk(path, layer_kind)
            vars_ = g["vars"] if "vars" in g else None
            arrays: list[str] = []  # vars/0, vars/1, ... up to the first gap (the rest: unexpected variables)
            while vars_ is not None and isinstance(vars_.get(str(len(arrays))), h5py.Dataset):
                arrays.append(f"{path}/vars/{len(arrays)}")
            layer_name = _str(vars_.attrs.get("name")) if vars_ is not None else None
            container.layers.append(_Layer(layer_name, layer_kind, path, tuple(arrays)))

    walk("", "functional")
    return out


def _str(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _history(node) -> list[str]:
    """The names of the layers whose outputs a config.json inbound node takes (its keras_history entries)."""
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            return [node["config"]["keras_history"][0]]
        return [n for v in node.values() for n in _history(v)]
    if isinstance(node, list):
        return [n for v in node for n in _history(v)]
    return []


def _config_containers(config: dict, h5_containers: list[_Container], source: str) -> list[_Container]:
    """The models of a .keras file from config.json, each layer given the h5 group its position names (checked
    against the group's 'name' attribute where the file has one)."""
    h5_groups = {layer.group: layer for c in h5_containers for layer in c.layers}
    out: list[_Container] = []

    def walk(entry: dict, group_path: str) -> None:
        cls, conf = entry.get("class_name"), entry.get("config") or {}
        if cls not in ("Functional", "Sequential", "Model"):
            raise _fail(source, f"the model is a {cls!r}; only Functional and Sequential models are read")
        kind = "sequential" if cls == "Sequential" else "functional"
        container = _Container(group_path, conf.get("name"), kind, [])
        out.append(container)
        counts: dict[str, int] = {}
        previous: str | None = None
        for item in conf.get("layers", []):
            item_cls, item_conf = item.get("class_name", ""), item.get("config") or {}
            name = item.get("name") or item_conf.get("name")
            if kind == "sequential" and item_cls == "InputLayer":
                continue  # not in a Sequential's `layers`
            key = _snake(item_cls)
            n = counts[key] = counts.get(key, -1) + 1
            group = f"{group_path}/layers/{key}{'' if n == 0 else f'_{n}'}".lstrip("/")
            h5_layer = h5_groups.get(group)
            if h5_layer is not None and h5_layer.name is not None and h5_layer.name != name:
                raise _fail(source, f"config.json and model.weights.h5 disagree: {group!r} is {h5_layer.name!r} in "
                                    f"the weights, {name!r} in the config")
            if kind == "sequential":
                inputs = (previous,) if previous else ()
            else:
                inputs = tuple(dict.fromkeys(_history(item.get("inbound_nodes", []))))
                if len(item.get("inbound_nodes", [])) > 1:
                    raise _fail(source, f"layer {name!r} is called more than once (a shared layer)")
            layer = _Layer(name, key, group, h5_layer.arrays if h5_layer else (), item_conf, inputs)
            container.layers.append(layer)
            previous = name
            if key in _CONTAINERS:
                if group_path:
                    raise _fail(source, f"model {name!r} is nested two levels deep; only one level is read")
                walk(item, group)
        if kind == "sequential":
            container.output = previous
        else:
            outs = conf.get("output_layers")
            outs = [outs] if outs and isinstance(outs[0], str) else outs or []
            if len(outs) != 1:
                raise _fail(source, f"model {container.name!r} has {len(outs)} outputs; one is read")
            container.output = outs[0][0]

    walk(config, "")
    return out


# --- the model's structure --------------------------------------------------------------------------------------

def _variant_from_config(containers: list[_Container], source: str) -> str:
    """The variant of a .keras model: by a model's name ('efficientnetb0', the application's; also a nested one),
    else by its layers (a model built on `EfficientNetB0(input_tensor=...)` has the backbone's layers, not its
    name): the variant whose table names exactly the file's backbone layers, with its stem and head widths."""
    names = {c.name for c in containers} | {layer.name for c in containers for layer in c.layers}
    by_name = [variants.KERAS_MODELS[n].variant for n in sorted(n for n in names if n in variants.KERAS_MODELS)]
    if len(set(by_name)) > 1:
        raise _fail(source, f"the file holds more than one Keras EfficientNet ({', '.join(sorted(set(by_name)))})")
    if by_name:
        return by_name[0]
    layers = {layer.name: layer for c in containers for layer in c.layers if layer.name}
    backbone = {n for n, layer in layers.items() if layer.arrays and re.match(r"(stem|top|block\d+[a-z])_", n)}
    for port in variants.KERAS_MODELS.values():
        if port.variant not in variants.VARIANTS:
            continue
        cfg = variants.model_config(port.variant)
        table = keras_table(cfg)
        if {e.layer for e in table[:-2]} == backbone and (layers["top_conv"].config or {}).get("filters") \
                == cfg.head_channels and (layers["stem_conv"].config or {}).get("filters") == cfg.stem_channels:
            return port.variant
    raise _fail(source, f"not a Keras EfficientNet: no model named like one ({', '.join(KERAS_APPLICATIONS)}) and "
                        f"no backbone of one; supported: {_SUPPORTED}")


def _chain(container: _Container, start: str, forward: bool, source: str) -> list[_Layer]:
    """The layers after `start` up to the container's output (forward) or before it from the input, in forward
    order: a straight chain, each layer with one input and one consumer, as the input and head layers are."""
    layers = container.by_name()
    consumers: dict[str, list[str]] = {}
    for layer in container.layers:
        for i in layer.inputs:
            consumers.setdefault(i, []).append(layer.name)
    chain, cur = [], start
    while True:
        nxt = consumers.get(cur, []) if forward else list(layers[cur].inputs)
        if not nxt:
            break
        if len(nxt) > 1:
            raise _fail(source, f"layer {cur!r} {'feeds' if forward else 'takes'} {len(nxt)} layers "
                                f"({', '.join(map(repr, nxt))}); only a straight chain of input and head layers is "
                                "read")
        cur = nxt[0]
        chain.append(layers[cur])
    if forward and cur != container.output:
        raise _fail(source, f"layer {cur!r} is not the model's output {container.output!r}")
    return chain if forward else chain[::-1]


def _affine_of(layers: list[_Layer], h5, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with model input = a * pixels + b per channel, of the Rescaling / Normalization layers, in order."""
    a, b = np.ones(3), np.zeros(3)
    for layer in layers:
        conf = layer.config or {}
        if layer.kind == "rescaling":
            scale = _value(conf.get("scale", 1.0), layer, source)
            offset = _value(conf.get("offset", 0.0), layer, source)
            a, b = a * scale, b * scale + offset
        elif layer.kind == "normalization":
            if conf.get("invert"):
                raise _fail(source, f"Normalization {layer.label} has invert=True; not an input normalization")
            if conf.get("mean") is not None:
                mean, var = _value(conf["mean"], layer, source), _value(conf["variance"], layer, source)
            elif len(layer.arrays) >= 2:
                mean, var = (_value(_read(h5, p, source), layer, source) for p in layer.arrays[:2])
            else:
                raise _fail(source, f"Normalization {layer.label}: no mean/variance in the config or the weights")
            d = np.maximum(np.sqrt(var), _NORMALIZATION_EPSILON)
            a, b = a / d, (b - mean) / d
        else:
            raise _fail(source, f"unknown layer {layer.label} before the stem: only Rescaling and Normalization are "
                                "read as input preprocessing")
    return a, b


def _value(v, layer: _Layer, source: str) -> np.ndarray:
    """A config's scalar / list / serialized numpy array (or a variable) as a float64 vector of the 3 channels."""
    if isinstance(v, dict):  # serialize_keras_object of a numpy array
        v = (v.get("config") or {}).get("value", v.get("value"))
    try:
        arr = np.asarray(v, np.float64).reshape(-1)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.size not in (1, 3):
        raise _fail(source, f"{layer.kind} layer {layer.label}: {v!r} is not one value or one per RGB channel")
    return np.broadcast_to(arr, (3,)).copy()


def _read(h5, path: str, source: str) -> np.ndarray:
    try:
        return np.asarray(h5[path][()])
    except (OSError, KeyError, ValueError) as e:
        raise _fail(source, f"cannot read {path!r}: truncated or corrupt ({e})") from None


# --- read_keras ---------------------------------------------------------------------------------------------------

def read_keras(path: str | os.PathLike, variant: str | None = None) -> KerasWeights:
    """Read a Keras EfficientNet `.keras` or `.weights.h5` file into our model's variables (see the module docs).

    `.keras`: the variant comes from config.json (the model's name, or its layers); a `variant` that disagrees is a
    ConfigError. A bare `.weights.h5` needs `variant` ('b0', 'v2_s', ...), and is read as the Keras application
    builds that model (its input layers; its head from the variables found: a Dense, a BatchNormalization before
    it). Heads: the application's top (Dense 'predictions'), none (include_top=False: num_classes 0), or
    GlobalAveragePooling2D -> [BatchNormalization] -> [Dropout] -> Dense, also around a nested base model; the
    Dense is loaded as logits whatever its activation (softmax: Keras outputs probabilities, we logits), and a
    BatchNormalization folds into it exactly. Anything else is a ConversionError naming it.
    """
    path = pathlib.Path(path)
    source = str(path)
    h5, config, keras_version, fmt = _open(path)
    with h5:
        try:
            return _read_file(h5, config, keras_version, fmt, variant, source)
        except OSError as e:  # h5py: a group or dataset that cannot be read
            raise _fail(source, f"truncated or corrupt HDF5 data ({e})") from None


def _read_file(h5, config: dict | None, keras_version: str | None, fmt: str, variant: str | None,
               source: str) -> KerasWeights:
    """The variant (config.json's, or `variant`), then `_read_model`."""
    h5_models = _h5_containers(h5, source)
    if config is not None:
        containers = _config_containers(config, h5_models, source)
        found = _variant_from_config(containers, source)
        if variant is not None and variant.lower() != found:
            raise ConfigError(f"{source} is an EfficientNet {found!r} (config.json), not {variant!r}")
        variant = found
    elif variant is None:
        raise ConfigError(f"{source}: a bare .weights.h5 does not say which model it holds; pass --variant "
                          f"(Keras models supported: {_SUPPORTED} = variants "
                          f"{', '.join(p.variant for p in variants.KERAS_MODELS.values())})")
    else:
        containers = h5_models
    return _read_model(h5, containers, variant.lower(), config, keras_version, fmt, source)


def _read_model(h5, containers: list[_Container], variant: str, config: dict | None, keras_version: str | None,
                fmt: str, source: str) -> KerasWeights:
    from effnet_jax.model.network import create_model, param_shapes

    cfg = variants.model_config(variant)
    table = keras_table(cfg)
    family = _family(cfg)
    backbone_names = {e.layer for e in table[:-2]}
    if config is None and not any(layer.name for c in containers for layer in c.layers):
        _name_by_position(containers, table)

    # the container holding the backbone; pre/post: the layers before its stem and after its top
    homes = [c for c in containers if "stem_conv" in c.by_name()]
    if len(homes) != 1:
        raise _fail(source, f"no layer 'stem_conv' of a Keras {variant} ({len(homes)} models have one)")
    home, top = homes[0], containers[0]
    first = "stem_conv_pad" if family == "v1" else "stem_conv"
    if config is not None:
        if first not in home.by_name():
            raise _fail(source, f"missing layer {first!r} of a Keras {variant}")
        pre, post = _chain(home, first, False, source), _chain(home, "top_activation", True, source)
        if home is not top:
            nested = next(layer for layer in top.layers if layer.group == home.group)
            pre = _chain(top, nested.name, False, source) + pre
            post = post + _chain(top, nested.name, True, source)
        pre = [layer for layer in pre if layer.kind != "input_layer"]
        a, b = _affine_of(pre, h5, source)
        notes = [] if pre else ["no input preprocessing layers: mean/std assume the Keras model took 0..255 pixels"]
        if family == "v1" and any(layer.kind == "input_layer" and None in ((layer.config or {}).get("batch_shape")
                                                                           or [None, None])[1:3]
                                  for layer in home.layers):
            notes.append("built for any input size: Keras' stride-2 padding equals SAME for sides that are "
                         "multiples of 32")
    else:
        pre, post, a, b, notes = _bare_structure(h5, containers, home, family, variant, backbone_names, table,
                                                 source)

    # BN settings of the backbone (.keras: its config; else the application's)
    eps, momentum = _bn_settings(home, backbone_names, family, source)
    overrides = {"padding": "same", "bn_epsilon": eps, "bn_momentum": round(1.0 - momentum, 10)}

    # the head: [pool] [BN] [dropout] [dense] [activation]
    pooled, head_bn, dense, activation = _parse_head(post, source)
    classes = 0
    if dense is not None:
        if not pooled:
            raise _fail(source, f"Dense {dense.label} is applied to the feature map without global average pooling")
        if not dense.arrays:
            raise _fail(source, f"missing variable {dense.name or dense.group}/kernel (Dense)")
        classes = int(h5[dense.arrays[0]].shape[-1])

    model = create_model(variant, classes, **overrides)
    shapes = param_shapes(model, 64)
    out: dict = {"params": {}, "batch_stats": {}}
    used: set[str] = set()
    layers = home.by_name()
    for e in table:
        if e.layer == "predictions":
            continue
        value = _take(h5, layers, e, used, variant, source)
        _store(out, shapes, e, value, source, e.key)

    folded = ""
    if dense is not None:
        kernel, bias = _dense_arrays(h5, dense, used, source)
        if head_bn is not None:
            kernel, bias = _fold_bn(kernel, bias, _bn_arrays(h5, head_bn, used, source), source)
            folded = f"; head BatchNormalization {head_bn.name or head_bn.group!r} folded into Dense " \
                     f"{dense.name or dense.group!r}"
        for leaf, value in (("kernel", kernel), ("bias", bias)):
            e = KerasEntry(dense.name or dense.group, "dense", leaf, "params", ("classifier", leaf), _copy)
            _store(out, shapes, e, value, source, e.key)
        if activation not in (None, "linear"):
            notes.append(f"Dense {dense.name!r} loaded without its {activation}: the model outputs logits")
    elif head_bn is not None:
        raise _fail(source, f"BatchNormalization {head_bn.label} after the backbone without a Dense head")
    else:
        notes.append("no classifier: the model returns pooled features")
    for layer in pre:  # Normalization's variables (mean, variance, count) went into mean/std
        if layer.kind == "normalization":
            used.update(layer.arrays)

    _check_all_used(h5, containers, used, source)
    _check_known_layers(containers, home, backbone_names, pre, post, source)

    # model input = a * pixel + b with pixel = 255 * x01, = (x01 - mean) / std
    std, mean = 1.0 / (255.0 * a), -b / (255.0 * a)
    keras_name = top.name or ""
    optimizer = "; optimizer state ignored" if "optimizer" in h5 else ""
    what = f"Keras {keras_version} .keras file" if fmt == "keras" else "Keras .weights.h5 file"
    line = (f"{what}, model {keras_name!r}, read as EfficientNet {variant} with {classes} classes{folded}{optimizer}"
            + "".join(f"; {n}" for n in notes))
    log.info("%s: %s", source, line)
    return KerasWeights(variant=variant, overrides=overrides, variables=out, num_classes=classes,
                        mean=tuple(float(v) + 0.0 for v in mean), std=tuple(float(v) for v in std),
                        resolution=_input_side(config) if config is not None else None,
                        keras_name=keras_name, source=f"{source}: {line}")


def _name_by_position(containers: list[_Container], table: list[KerasEntry]) -> None:
    """Name the weighted backbone layers of a file without 'name' attributes (older Keras 3) as Keras loads them:
    the n-th group of a class (conv2d_<n>) is the n-th layer of that class in the application's order."""
    home = containers[1] if len(containers) > 1 else containers[0]
    order: dict[str, list[str]] = {}
    for e in table[:-2]:
        names = order.setdefault(e.kind, [])
        if not names or names[-1] != e.layer:
            names.append(e.layer)
    for layer in home.layers:
        n = re.fullmatch(r".*?(?:_(\d+))?", layer.group.rsplit("/", 1)[-1]).group(1)
        names = order.get(layer.kind, [])
        if int(n or 0) < len(names):
            layer.name = names[int(n or 0)]


_HEAD_ORDER = {"global_average_pooling2d": 0, "global_max_pooling2d": 0, "batch_normalization": 1, "dropout": 2,
               "dense": 3}
_BACKBONE_WEIGHTLESS_KINDS = ("activation", "add", "multiply", "reshape", "zero_padding2d", "dropout",
                              "global_average_pooling2d", "input_layer", "rescaling", "normalization")


def _bare_structure(h5, containers: list[_Container], home: _Container, family: str, variant: str,
                    backbone: set[str], table: list[KerasEntry], source: str):
    """(input layers, head layers, a, b, notes) of a .weights.h5 (no config.json): the application's input layers
    for `family`, recognized by their groups, and the head from the layers found, in the order GAP, BN, Dropout,
    Dense (the only one read)."""
    notes: list[str] = []
    records_weightless = any(not layer.arrays for layer in home.layers)
    outer = [layer for c in containers if c is not home for layer in c.layers if layer.group != home.group]
    for layer in outer:
        if layer.kind in ("rescaling", "normalization"):
            raise _fail(source, f"{layer.kind} layer {layer.label} outside the base model: its settings are in "
                                "config.json only; save the model with model.save('x.keras')")
    rescalings = [layer for layer in home.layers if layer.kind == "rescaling"]
    norms = [layer for layer in home.layers if layer.kind == "normalization"]
    if len(rescalings) > 2 - (family == "v2") or len(norms) > 1 or (family == "v2" and norms and not rescalings):
        raise _fail(source, f"{len(rescalings)} Rescaling and {len(norms)} Normalization layers: not the input "
                            f"layers of a Keras {variant}; save the model with model.save('x.keras')")
    if not records_weightless and not rescalings:  # a Keras that writes no groups for weightless layers
        rescalings = [_Layer("rescaling", "rescaling", "")]
        notes.append("the file records no weightless layers: the application's input layers assumed")
    pre: list[_Layer] = []
    if family == "v1":
        if not rescalings or not norms or len(norms[0].arrays) < 2:
            raise _fail(source, f"missing input layer {'normalization' if rescalings else 'rescaling'!r} of a Keras "
                                f"{variant} (V1 models always have Rescaling(1/255) and Normalization)")
        pre = [dataclasses.replace(rescalings[0], config={"scale": 1 / 255}), norms[0]]
        if len(rescalings) == 2:  # built with weights='imagenet': also divides by sqrt(std)
            scale = [1 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB]
            pre.append(dataclasses.replace(rescalings[1], config={"scale": scale}))
    elif rescalings and variant.startswith("v2_b"):
        norm = norms[0] if norms else _Layer("normalization", "normalization", "")
        pre = [dataclasses.replace(rescalings[0], config={"scale": 1 / 255}),
               dataclasses.replace(norm, config={"mean": list(IMAGENET_MEAN),
                                                 "variance": [s * s for s in IMAGENET_STDDEV_RGB]})]
    elif rescalings:
        pre = [dataclasses.replace(rescalings[0], config={"scale": 1 / 128, "offset": -1.0})]
    else:
        notes.append("no input preprocessing layers (include_preprocessing=False): mean/std assume the Keras model "
                     "took 0..255 pixels")
    a, b = _affine_of(pre, h5, source)

    se_pools = sum(1 for e in table if e.layer.endswith("se_reduce") and e.var == "kernel")
    unnamed_pools = [layer for layer in home.layers if layer.kind == "global_average_pooling2d" and not layer.name]
    head = []
    for c in containers:
        for layer in c.layers:
            if layer.name in backbone or (layer.name and _WEIGHTLESS_BACKBONE.fullmatch(layer.name)):
                continue
            if layer.kind in ("input_layer", "rescaling", "normalization") or layer.group == home.group:
                continue
            if not layer.name and c is home and layer.kind in _BACKBONE_WEIGHTLESS_KINDS and not (
                    layer.kind == "global_average_pooling2d" and unnamed_pools.index(layer) >= se_pools):
                continue  # a backbone layer of a file without names
            head.append(layer)
    head.sort(key=lambda layer: _HEAD_ORDER.get(layer.kind, -1))
    if any(layer.kind == "dense" for layer in head):
        notes.append("the Dense is loaded as logits (a .weights.h5 does not record its activation)")
    return pre, head, a, b, notes


def _bn_settings(home: _Container, backbone: set[str], family: str, source: str) -> tuple[float, float]:
    """(epsilon, Keras momentum) of the backbone's BatchNormalizations: the config's (one value for all), else the
    application's."""
    found = {((layer.config or {}).get("epsilon", _KERAS_BN_EPSILON), (layer.config or {}).get("momentum"))
             for layer in home.layers if layer.name in backbone and layer.kind == "batch_normalization"
             and layer.config is not None}
    if len(found) > 1:
        raise _fail(source, f"the backbone's BatchNormalizations differ in (epsilon, momentum): {sorted(found)}; "
                            "one setting is read")
    eps, momentum = found.pop() if found else (_KERAS_BN_EPSILON, None)
    return float(eps), float(_KERAS_BN_MOMENTUM[family] if momentum is None else momentum)


def _parse_head(post: list[_Layer], source: str):
    """(pooled, BatchNormalization or None, Dense or None, the Dense's activation) of the layers after the backbone:
    [GlobalAveragePooling2D] [BatchNormalization] [Dropout...] [Dense] [Activation / Softmax]."""
    pooled, bn, dense, activation = False, None, None, None
    for layer in post:
        conf, k = layer.config or {}, layer.kind
        if k == "dropout":
            continue
        if k == "global_average_pooling2d" and not pooled:
            if conf.get("keepdims"):
                raise _fail(source, f"GlobalAveragePooling2D {layer.label} has keepdims=True; not read")
            pooled = True
        elif k == "batch_normalization" and pooled and bn is None and dense is None:
            bn = layer
        elif k == "dense" and pooled and dense is None:
            dense, activation = layer, conf.get("activation")
        elif k in ("activation", "softmax") and dense is not None and activation in (None, "linear"):
            activation = conf.get("activation", "softmax")
        elif k == "global_max_pooling2d":
            raise _fail(source, f"GlobalMaxPooling2D {layer.label}: our model averages (pooling='avg')")
        else:
            raise _fail(source, f"unknown layer {layer.label} ({k}) in the head: only [GlobalAveragePooling2D] -> "
                                "[BatchNormalization] -> [Dropout] -> [Dense] is read")
    return pooled, bn, dense, activation


def _take(h5, layers: dict[str, _Layer], e: KerasEntry, used: set[str], variant: str, source: str) -> np.ndarray:
    """The Flax array of table entry `e`, from the file."""
    layer = layers.get(e.layer)
    if layer is None:
        raise _fail(source, f"missing layer {e.layer!r} ({e.kind}) of a Keras {variant}: is this file for another "
                            "model?")
    if layer.kind != e.kind:
        raise _fail(source, f"layer {e.layer!r} is a {layer.kind}, not the {e.kind} of a Keras {variant}")
    i = _VARS[e.kind].index(e.var)
    if i >= len(layer.arrays):
        raise _fail(source, f"missing variable {e.key!r} ({layer.group}/vars/{i})")
    raw = _read(h5, layer.arrays[i], source)
    used.add(layer.arrays[i])
    try:
        return e.transform(raw)
    except ValueError as err:
        raise _fail(source, f"{e.key!r} has shape {raw.shape}, not {err}") from None


def _store(out: dict, shapes: dict, e: KerasEntry, value: np.ndarray, source: str, key: str) -> None:
    want = shapes[e.collection]
    for p in e.path:
        want = want[p]
    if tuple(value.shape) != tuple(want.shape):
        raise _fail(source, f"{key!r} has shape {tuple(value.shape)} (as ours), but {'/'.join(e.path)} needs "
                            f"{tuple(want.shape)}: is this file for another model?")
    node = out[e.collection]
    for p in e.path[:-1]:
        node = node.setdefault(p, {})
    node[e.path[-1]] = np.asarray(value, np.float32)


def _dense_arrays(h5, dense: _Layer, used: set[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    kernel = _read(h5, dense.arrays[0], source).astype(np.float64)
    if kernel.ndim != 2:
        raise _fail(source, f"Dense {dense.label} kernel has shape {kernel.shape}, not (features, classes)")
    use_bias = (dense.config or {}).get("use_bias", len(dense.arrays) > 1)
    if len(dense.arrays) != 1 + bool(use_bias):
        raise _fail(source, f"Dense {dense.label} has {len(dense.arrays)} variables, not kernel"
                            f"{', bias' if use_bias else ''}")
    bias = _read(h5, dense.arrays[1], source).astype(np.float64) if use_bias else np.zeros(kernel.shape[1])
    used.update(dense.arrays)
    return kernel, bias


def _bn_arrays(h5, bn: _Layer, used: set[str], source: str):
    """(gamma, beta, moving_mean, moving_variance, epsilon) of a BatchNormalization (scale=False: gamma 1, ...)."""
    conf = bn.config or {}
    scale, center = conf.get("scale", True), conf.get("center", True)
    n = 2 + bool(scale) + bool(center)
    if len(bn.arrays) != n:
        raise _fail(source, f"BatchNormalization {bn.label} has {len(bn.arrays)} variables, not {n}")
    arrays = [_read(h5, p, source).astype(np.float64).reshape(-1) for p in bn.arrays]
    used.update(bn.arrays)
    gamma = arrays.pop(0) if scale else np.ones_like(arrays[-1])
    beta = arrays.pop(0) if center else np.zeros_like(arrays[-1])
    return gamma, beta, arrays[0], arrays[1], float(conf.get("epsilon", _KERAS_BN_EPSILON))


def _fold_bn(kernel: np.ndarray, bias: np.ndarray, bn, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense(BN(x)) as one Dense: BN in inference is x * s + t (s = gamma / sqrt(var + eps), t = beta - mean * s),
    so the kernel becomes s[:, None] * kernel and the bias t @ kernel + bias (exact, in float64)."""
    gamma, beta, mean, var, eps = bn
    if gamma.shape[0] != kernel.shape[0]:
        raise _fail(source, f"the head BatchNormalization has {gamma.shape[0]} features, the Dense {kernel.shape[0]}")
    s = gamma / np.sqrt(var + eps)
    return s[:, None] * kernel, (beta - mean * s) @ kernel + bias


def _check_all_used(h5, containers: list[_Container], used: set[str], source: str) -> None:
    """Every variable of the file (but the optimizer's) was read, else a ConversionError naming the first other."""
    import h5py

    labels = {p: layer.label for c in containers for layer in c.layers for p in layer.arrays}
    extra: list[str] = []
    h5.visititems(lambda name, obj: extra.append(name) if isinstance(obj, h5py.Dataset) and name not in used
                  and not name.startswith("optimizer/") else None)
    if extra:
        where = f" (layer {labels[extra[0]]})" if extra[0] in labels else ""
        raise _fail(source, f"unexpected variable {extra[0]!r}{where} ({len(extra)} unused): not part of the "
                            "model read here")


def _check_known_layers(containers: list[_Container], home: _Container, backbone: set[str], pre: list[_Layer],
                        post: list[_Layer], source: str) -> None:
    """Every layer of the file is the backbone's, an input or head layer read, an input layer or the nested base
    model; else a ConversionError naming it (a weightless layer can still change what the model computes)."""
    read = {layer.group for layer in pre + post if layer.group}
    for c in containers:
        for layer in c.layers:
            if layer.name in backbone or layer.group in read or layer.kind == "input_layer":
                continue
            if layer.name and _WEIGHTLESS_BACKBONE.fullmatch(layer.name) or layer.group == home.group:
                continue
            if not layer.name and c is home and layer.kind in _BACKBONE_WEIGHTLESS_KINDS:
                continue
            raise _fail(source, f"unknown layer {layer.label} ({layer.kind}): not part of a Keras EfficientNet nor "
                                "of a head read here")


def _input_side(config: dict) -> int | None:
    """The square input size config.json fixes (the top model's InputLayer), else None."""
    conf = config.get("config") or {}
    shapes = [(item.get("config") or {}).get("batch_shape") for item in conf.get("layers", [])
              if item.get("class_name") == "InputLayer"] + [conf.get("build_input_shape")]
    for shape in shapes:
        if shape and len(shape) == 4:
            h, w = shape[1], shape[2]
            return h if isinstance(h, int) and h == w else None
    return None
