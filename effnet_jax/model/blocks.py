"""The two blocks of the family as the papers draw them: MBConv (EfficientNet) and Fused-MBConv (EfficientNetV2).

The blocks ask the planner (`effnet_jax.kernels.planner`) which form of the depthwise convolution to run; they
never decide it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from effnet_jax.kernels import planner
from effnet_jax.model.layers import BatchNorm, Conv, DepthwiseConv, DropPath, SqueezeExcite, activation
from effnet_jax.model.variants import BlockConfig

Dtype = Any


class MBConv(nn.Module):
    """Inverted residual: [1×1 expand → BN → act] → k×k depthwise → BN → act → [SE] → 1×1 project → BN,
    plus the input (through per-sample stochastic depth) when shape allows. SE's gate is applied by the project
    conv (`Conv`'s `in_scale`), which may fold it into its product instead of writing the gated tensor out."""
    cfg: BlockConfig
    activation: str
    padding: str
    bn_momentum: float
    bn_epsilon: float
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool, stem=None):
        """`stem` (inference only; `EfficientNet` decides, with the planner): (the model's stem kernel, its stride,
        its padding, its BatchNorm module): x is the image, and this block's depthwise kernel computes the stem, its
        BatchNorm and activation in the same pass (a first block without expansion or shortcut)."""
        cfg = self.cfg
        bn = lambda name: BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, name=name)  # noqa: E731
        form = "native" if stem is not None else planner.block_depthwise_form(self, x.shape, train)
        shortcut = x
        # expand: its BatchNorm and activation run in front of the depthwise convolution, which may also compute
        # the expansion itself (or the stem) in the same pass, where the planner says so
        bn_act = expand = expand_conv = None
        if stem is not None:
            expand, expand_conv, bn_act = stem[0], stem[1:3], (stem[3], self.activation)
        elif cfg.expand_channels != cfg.in_channels:
            conv = Conv(cfg.expand_channels, dtype=self.dtype, impl=self.conv_impl, name="expand_conv")
            if planner.fuses_expansion(form, train, x.shape[2]):
                expand = conv(x, kernel_only=True)[0, 0]
            else:
                x = conv(x, inference=not train)
            bn_act = (bn("expand_bn"), self.activation)
        # depthwise -> BN -> act, and SE's pooling
        dw = DepthwiseConv(cfg.kernel, cfg.stride, self.padding, form, self.dtype, name="dw_conv")
        x, pooled = dw(x, inference=not train, bn_act=bn_act, out_bn_act=(bn("dw_bn"), self.activation),
                       pool=bool(cfg.se_channels), expand=expand, expand_conv=expand_conv)
        # SE: its gate is applied by the projection
        gate = SqueezeExcite(cfg.se_channels, "silu", self.dtype, name="se")(x, pooled) \
            if cfg.se_channels else None
        # project -> BN, and the residual
        x = Conv(cfg.out_channels, dtype=self.dtype, impl=self.conv_impl, name="project_conv")(x, gate)
        x = bn("project_bn")(x, not train)
        if cfg.residual:
            x = DropPath(cfg.drop_path_rate, name="drop_path")(x, not train) + shortcut
        return x


class FusedMBConv(nn.Module):
    """EfficientNetV2's Fused-MBConv: k×k (stride) expansion conv → BN → act → 1×1 project → BN, or, when the
    expansion ratio is 1, a single k×k (stride) conv → BN → act; no depthwise conv, no SE. Plus the input
    (through per-sample stochastic depth) when shape allows. torchvision's `FusedMBConv`."""
    cfg: BlockConfig
    activation: str
    padding: str
    bn_momentum: float
    bn_epsilon: float
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        cfg, act = self.cfg, activation(self.activation, train)
        bn = lambda name: BatchNorm(self.bn_momentum, self.bn_epsilon, self.dtype, name=name)  # noqa: E731
        shortcut = x
        if cfg.expand_channels != cfg.in_channels:
            x = Conv(cfg.expand_channels, cfg.kernel, cfg.stride, self.padding, self.dtype, self.conv_impl,
                     name="expand_conv")(x)
            x = act(bn("expand_bn")(x, not train))
            x = Conv(cfg.out_channels, dtype=self.dtype, impl=self.conv_impl, name="project_conv")(x)
            x = bn("project_bn")(x, not train)
        else:
            x = Conv(cfg.out_channels, cfg.kernel, cfg.stride, self.padding, self.dtype, self.conv_impl,
                     name="conv")(x)
            x = act(bn("bn")(x, not train))
        if cfg.residual:
            x = DropPath(cfg.drop_path_rate, name="drop_path")(x, not train) + shortcut
        return x
