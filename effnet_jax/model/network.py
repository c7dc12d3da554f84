"""The EfficientNet network (Flax Linen) and `create_model`.

Parameter tree (flat block index, as torch's `_blocks.N` / timm's `blocks`)::

    stem/kernel, stem_bn/{scale,bias}
    blocks_i/ [expand_conv/kernel, expand_bn/{scale,bias}], dw_conv/kernel, dw_bn/{scale,bias},     (MBConv)
              [se/{reduce,expand}/{kernel,bias}], project_conv/kernel, project_bn/{scale,bias}
    blocks_i/ expand_conv/kernel (k×k), expand_bn/{scale,bias}, project_conv/kernel, project_bn/...  (Fused-MBConv)
    blocks_i/ conv/kernel (k×k), bn/{scale,bias}                          (Fused-MBConv, expansion ratio 1)
    head/kernel, head_bn/{scale,bias}
    classifier/{kernel,bias}          (absent when num_classes == 0: the model returns pooled features)

Kernels are HWIO (depthwise: (k, k, 1, C)); BN running statistics are batch_stats/<bn>/{mean,var}.

BatchNorm running statistics live in the 'batch_stats' collection. With `mutable=['intermediates']` the
model also returns the output of the stem (`stem_out`), of every stage (`stage0`..`stage6`; V2-S has six) and
of the head (`head_out`), which the weight-conversion tests compare against PyTorch stage by stage.

`python -m effnet_jax.cli.family` prints the family: resolution, parameters, GFLOPs.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effnet_jax.kernels import autotune, planner
from effnet_jax.model import variants
from effnet_jax.model.blocks import Dtype, FusedMBConv, MBConv
from effnet_jax.model.layers import BatchNorm, Conv, activation, conv_padding
from effnet_jax.model.variants import ModelConfig


def unit_names(config: ModelConfig) -> list[str]:
    """The backbone's units in forward order, as top-level parameter names: 'stem', 'blocks_0'.., 'head'.
    (BatchNorm 'stem_bn'/'head_bn' belong to 'stem'/'head'; 'classifier' is not a unit.)"""
    return ["stem"] + [f"blocks_{i}" for i in range(len(config.blocks))] + ["head"]


def unit_of(param_name: str) -> str | None:
    """The unit a top-level parameter name belongs to (None for the classifier)."""
    if param_name == "classifier":
        return None
    return param_name.removesuffix("_bn")


def _classifier_init(key, shape, dtype=jnp.float32):
    """torchvision's head init: uniform(-1/sqrt(num_classes), 1/sqrt(num_classes))."""
    r = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -r, r)


HEAD_INITS = ("zero", "uniform")


def new_classifier(key: jax.Array, features: int, num_classes: int, init: str = "uniform") -> dict:
    """The variables {'kernel', 'bias'} of a fresh classifier head (`Dense(features -> num_classes)`): 'uniform'
    is torchvision's init (kernel ~ U(-1/sqrt(num_classes), 1/sqrt(num_classes)), drawn from `key`), 'zero'
    big_vision's (all zeros); the bias is zero in both."""
    if init not in HEAD_INITS:
        raise ValueError(f"the head init must be one of {', '.join(HEAD_INITS)}, got {init!r}")
    shape = (features, num_classes)
    kernel = jnp.zeros(shape, jnp.float32) if init == "zero" else _classifier_init(key, shape)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNet-Lite / EfficientNetV2. Inputs NHWC float, normalized as the weights expect."""
    config: ModelConfig
    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    # Fine-tuning: the first `frozen_units` of `unit_names(config)` (stem, blocks_0.., head) keep their
    # BatchNorm in inference mode even when train=True (their parameters are frozen by the optimizer).
    frozen_units: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg = self.config
        trains = lambda unit: train and unit >= self.frozen_units  # noqa: E731
        x = x.astype(self.dtype)
        x, fused_stem, first_impl = self._stem(x, trains)
        for i, block in enumerate(cfg.blocks):
            if block.fused:
                x = FusedMBConv(block, cfg.activation, cfg.padding, cfg.bn_momentum, cfg.bn_epsilon, self.dtype,
                                self.conv_impl, name=f"blocks_{i}")(x, trains(i + 1))
            else:
                x = self._block(i, first_impl if i == 0 else None, name=f"blocks_{i}")(
                    x, trains(i + 1), fused_stem if i == 0 else None)
            if i + 1 == len(cfg.blocks) or cfg.blocks[i + 1].stage != block.stage:
                self.sow("intermediates", f"stage{block.stage}", x)
        x = Conv(cfg.head_channels, dtype=self.dtype, impl=self.conv_impl, name="head")(x)
        x = self._bn_act("head_bn", trains(len(cfg.blocks) + 1), x)
        self.sow("intermediates", "head_out", x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, kernel_init=_classifier_init, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)

    def _bn(self, name: str) -> BatchNorm:
        return BatchNorm(self.config.bn_momentum, self.config.bn_epsilon, self.dtype, name=name)

    def _bn_act(self, name: str, trains: bool, x):
        """BatchNorm, then the activation, of a unit that trains or runs in inference mode."""
        return activation(self.config.activation, trains)(self._bn(name)(x, not trains))

    def _stem(self, x, trains):
        """The stem, its BatchNorm and activation: (their output, None, the first block's depthwise form); or, in
        inference mode, where the planner picks the kernels for the first block and no intermediates are kept, (the
        image, the `stem` argument of `MBConv`, 'native'): the first block's depthwise kernel then computes the stem
        itself, its output never written. The form is the one the planner chose with the stem (None: the block's
        own choice)."""
        cfg = self.config
        stem = Conv(cfg.stem_channels, 3, cfg.stem_stride, cfg.padding, self.dtype, self.conv_impl, name="stem")
        first_form = None
        if not (cfg.blocks[0].fused or trains(1) or self.is_mutable_collection("intermediates")
                or self.is_initializing()):
            stem_out = (x.shape[0], *(-(-s // cfg.stem_stride) for s in x.shape[1:3]), cfg.stem_channels)
            first_form = planner.first_block_form(
                self._block(0, parent=None, name="blocks_0"), x.shape, stem_out,
                lambda form: autotune.time_module(
                    _StemAndFirstBlock(**{**self._field_values(), "depthwise_impl": form}), x.shape, False))
        if first_form and planner.fuses_stem(first_form, trains(1), cfg.blocks[0], False):
            pads = tuple(conv_padding(cfg.padding, s, 3, cfg.stem_stride) for s in x.shape[1:3])
            return x, (stem(x, kernel_only=True), cfg.stem_stride, pads, self._bn("stem_bn")), first_form
        x = stem(x, inference=not trains(0))
        x = self._bn_act("stem_bn", trains(0), x)
        self.sow("intermediates", "stem_out", x)
        return x, None, first_form

    def _field_values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EfficientNet)
                if f.init and f.name not in ("parent", "name")}

    def _block(self, i: int, depthwise_impl: str | None = None, **kw) -> MBConv:
        cfg = self.config
        return MBConv(cfg.blocks[i], cfg.activation, cfg.padding, cfg.bn_momentum, cfg.bn_epsilon,
                      depthwise_impl or self.depthwise_impl, self.dtype, self.conv_impl, **kw)


class _StemAndFirstBlock(EfficientNet):
    """The planner's unit for a first block whose kernel may compute the stem (`planner.first_block_form`): the
    stem and `blocks_0` of the network, in inference mode, run as the network runs them with `depthwise_impl`."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x, fused_stem, _ = self._stem(x.astype(self.dtype), lambda unit: False)
        return self._block(0, name="blocks_0")(x, False, fused_stem)


_CONFIG_OVERRIDES = ("drop_rate", "drop_path_rate", "stem_stride", "padding", "width", "depth", "resolution",
                     "bn_epsilon", "bn_momentum")
_MODULE_OVERRIDES = ("dtype", "depthwise_impl", "conv_impl", "frozen_units")


def create_model(variant: str, num_classes: int = 1000, **overrides) -> EfficientNet:
    """Build an EfficientNet ('b0'..'b7'), EfficientNet-Lite ('lite0'..'lite4') or EfficientNetV2 ('v2_s',
    'v2_m', 'v2_l').

    Overrides: `dtype` (compute dtype, e.g. jnp.bfloat16; parameters stay float32), `depthwise_impl`
    ('auto', 'shift', 'xla'), `conv_impl` ('auto', 'dot', 'xla': 1×1 convolutions and the stem as matrix
    products or as XLA convolutions; `layers.conv`), `frozen_units` (BN of the first N units of `unit_names`
    stays in inference mode in training), `drop_rate` (classifier dropout), `drop_path_rate` (stochastic depth of the
    last block), `stem_stride` (1 for small inputs such as CIFAR's 32 px), `padding` ('symmetric' or
    'same'), `width`/`depth`/`resolution` (custom compound scaling), `bn_epsilon`/`bn_momentum` (PyTorch
    convention). `num_classes=0` returns pooled features.
    """
    unknown = set(overrides) - set(_CONFIG_OVERRIDES) - set(_MODULE_OVERRIDES)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: "
                        f"{', '.join(_CONFIG_OVERRIDES + _MODULE_OVERRIDES)}")
    kw = {k: overrides[k] for k in ("width", "depth", "drop_path_rate") if overrides.get(k) is not None}
    cfg = variants.model_config(variant, **kw)
    replace = {"dropout": overrides.get("drop_rate")}
    replace.update({k: overrides.get(k) for k in ("stem_stride", "padding", "resolution", "bn_epsilon",
                                                     "bn_momentum")})
    cfg = dataclasses.replace(cfg, **{k: v for k, v in replace.items() if v is not None})
    if cfg.padding not in ("symmetric", "same"):
        raise ValueError(f"padding must be 'symmetric' or 'same', got {cfg.padding!r}")
    module = {k: overrides[k] for k in _MODULE_OVERRIDES if overrides.get(k) is not None}
    return EfficientNet(cfg, num_classes=num_classes, **module)


def count_params(variables_or_shapes) -> int:
    """Number of trainable parameters (the 'params' collection; BN running statistics excluded)."""
    params = variables_or_shapes.get("params", variables_or_shapes)
    return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def param_shapes(model: EfficientNet, resolution: int | None = None):
    """Shapes of `model`'s variables, without allocating or compiling anything."""
    r = resolution or model.config.resolution
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, r, r, 3)), train=False))


def random_variables(model: EfficientNet, resolution: int | None = None, seed: int = 0) -> dict:
    """Variables of `model` with random values drawn in numpy, without compiling anything: kernels ~ N(0, 1/fan_in),
    BN scale ~ U(0.5, 1.5), bias and running mean ~ N(0, 0.01), running var ~ U(0.5, 2): activations stay O(1)
    through every block, and BN's statistics are not the identity (which would hide a mistake in folding them).
    Host (numpy float32) arrays: each use makes its own device copy, so a donated train state cannot delete another
    user's variables. For `export --init scratch`, the benchmarks' models and the tests."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1])) or 1
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, param_shapes(model, resolution))


def count_flops(config: ModelConfig, num_classes: int = 1000, resolution: int | None = None) -> float:
    """Multiply-accumulates of one forward pass of one image at `resolution` (default: native), counting
    convolutions, SE and the classifier — the convention of torchvision's published 'GFLOPS'."""
    def out(size, k, s):
        lo, hi = conv_padding(config.padding, size, k, s)
        return (size + lo + hi - k) // s + 1

    h = resolution or config.resolution
    h = out(h, 3, config.stem_stride)
    macs = h * h * 9 * 3 * config.stem_channels
    for b in config.blocks:
        if b.fused:  # k×k (stride) conv in -> expand (or -> out when there is no expansion), [1×1 project]
            h = out(h, b.kernel, b.stride)
            if b.expand_channels != b.in_channels:
                macs += h * h * b.kernel * b.kernel * b.in_channels * b.expand_channels
                macs += h * h * b.expand_channels * b.out_channels
            else:
                macs += h * h * b.kernel * b.kernel * b.in_channels * b.out_channels
            continue
        if b.expand_channels != b.in_channels:
            macs += h * h * b.in_channels * b.expand_channels
        h = out(h, b.kernel, b.stride)
        macs += h * h * b.kernel * b.kernel * b.expand_channels
        macs += 2 * b.expand_channels * b.se_channels
        macs += h * h * b.expand_channels * b.out_channels
    macs += h * h * config.blocks[-1].out_channels * config.head_channels
    macs += config.head_channels * num_classes
    return float(macs)
