"""EfficientNet's layers as Flax Linen modules (NHWC): `Conv`, `DepthwiseConv`, `BatchNorm`, `SqueezeExcite`,
`DropPath` and `activation`, with the computations they run (XLA's forms, the shifted sum with its hand-written
backward pass, the C++ kernels of `effnet_jax.kernels.native`).

A layer's parameters do not depend on how it is computed: which form a unit runs is the planner's choice
(`effnet_jax.kernels.planner`), not the layer's. `BatchNorm` updates its running statistics as PyTorch does, so a
training step equals PyTorch's.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effnet_jax.kernels import native, planner
from effnet_jax.kernels.planner import (CONV_IMPLS, DEPTHWISE_IMPLS, resolve_conv_impl,  # noqa: F401 (the API)
                                        resolve_depthwise_impl)

Dtype = Any

# torchvision initializes every conv with kaiming_normal(fan_out); for a depthwise kernel fan_out is k*k.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": nn.silu, "relu6": nn.relu6}


def _silu_tanh(x: jax.Array) -> jax.Array:
    """x · sigmoid(x) as x/2 · (1 + tanh(x/2)), the same function."""
    half = 0.5 * x
    return half * (1 + jnp.tanh(half))


def activation(name: str, train: bool) -> Callable[[jax.Array], jax.Array]:
    """The activation `name` ('silu', 'relu6') of a unit that trains (`train`: BatchNorm on batch statistics, the
    backward pass through it) or runs in inference mode (evaluation, the frozen units of a fine-tune).

    In inference mode on XLA's CPU backend (`planner.silu_as_tanh`) SiLU is x/2 · (1 + tanh(x/2)), the same
    function: XLA computes the logistic there with an exponential and a division, tanh with a rational polynomial,
    and the tanh form is the faster. Differentiated it is the slower, so units that train keep `jax.nn.silu`, as
    do other backends (measured: benchmarks/results/speed.md, section 'SiLU through tanh in inference mode; the
    targets and the per-unit tables re-measured (issue 23)')."""
    if name == "silu" and planner.silu_as_tanh(train):
        return _silu_tanh
    return ACTIVATIONS[name]


def conv_padding(mode: str, size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) padding of one spatial dimension.

    'symmetric': (k-1)//2 on both sides, as torchvision's Conv2dNormActivation.
    'same': TensorFlow's SAME — output ceil(size/stride), any odd pixel of padding goes at the end.
    """
    if mode == "symmetric":
        p = (kernel - 1) // 2
        return p, p
    if mode == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    raise ValueError(f"padding must be 'symmetric' or 'same', got {mode!r}")


def _taps(xp: jax.Array, kh: int, kw: int, stride: int, oh: int, ow: int):
    """The k·k strided windows of padded NHWC `xp` that a depthwise kernel tap (i, j) multiplies."""
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                                  (1, stride, stride, 1))


def _tap_sum(xp: jax.Array, kernel: jax.Array, stride: int, oh: int, ow: int) -> jax.Array:
    """sum over taps (i, j) of window(i, j) of `xp` times kernel[i, j]: the depthwise convolution of padded `xp`."""
    out = None
    for i, j, tap in _taps(xp, kernel.shape[0], kernel.shape[1], stride, oh, ow):
        term = tap * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def _pad_hw(x: jax.Array, padding) -> jax.Array:
    return jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution as a sum of k·k shifted multiplies, with a hand-written backward pass.

    Autodiff of the shifted sum gives dx as a sum of k·k *padded* copies of the cotangent (the transpose of
    each slice), which XLA's CPU backend fuses and schedules badly; the backward here computes dx the same
    way as the forward, as a sum of shifted windows of the padded cotangent times the (flipped) kernel taps —
    for stride > 1 phase by phase (`_padded_input_grad`), so that no multiply-add meets a dilation zero
    (what it gains: docs/performance.md). Reverse-mode only (custom_vjp: no jax.jvp / jacfwd through it).
    """
    return _shifted_depthwise_conv_fwd(x, kernel, stride, padding)[0]


def _shifted_depthwise_conv_fwd(x, kernel, stride, padding):
    # the padded input is materialized (optimization_barrier): XLA otherwise rewrites the taps' slices of the pad
    # into reads of x itself, with x's producer (BatchNorm, activation) duplicated into the tap sum and the pad
    xp = lax.optimization_barrier(_pad_hw(x, padding))
    kh, kw = kernel.shape[:2]
    out = _tap_sum(xp, kernel, stride, (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1)
    # where the kernel gradient loops over the stored padded input (`planner.kernel_grad_loops`: windows of at least
    # LOOP_MIN_ELEMENTS), the backward pass keeps this one instead of padding x again; below that size the unrolled
    # sums fuse the pad, and keeping the larger padded copy is the slower (measured: benchmarks/results/speed.md,
    # section 'the depthwise backward keeps the padded input; the targets, B0–B7 at 64 px and the 32 px units
    # re-measured (issue 23)')
    return out, (xp if planner.kernel_grad_loops(out.size) else x, kernel)


def _shifted_depthwise_conv_bwd(stride, padding, residuals, g):
    x_or_xp, kernel = residuals
    (ph, ph_hi), (pw, pw_hi) = padding
    # the forward kept the padded input where the kernel gradient loops (g has the output's size)
    xp = x_or_xp if planner.kernel_grad_loops(g.size) else _pad_hw(x_or_xp, padding)
    h, w = xp.shape[1] - ph - ph_hi, xp.shape[2] - pw - pw_hi
    dk = _kernel_grad(xp, g, kernel.shape[0], kernel.shape[1], stride)
    # only x's unpadded region [pad_low, pad_low + size) of the padded input's cotangent is needed
    dx = _padded_input_grad(g, kernel, stride, *xp.shape[1:3])[:, ph:ph + h, pw:pw + w]
    return dx, dk.astype(kernel.dtype)


def _kernel_grad(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """dk[i, j] = the sum over batch and output positions of window(i, j) of padded `xp` times `g`, (kh, kw, 1, C),
    accumulated in float32 whatever the compute dtype (a bf16 sum over batch × positions loses the small terms).

    One tap per iteration of a loop (`lax.map`) over the materialized `xp`, not k·k reductions side by side:
    unrolled, XLA's CPU backend gives each tap's window a fusion of its own that recomputes whatever produced `xp`
    (BatchNorm and activation of the expansion) and pads it again, k·k times; the loop reads one stored copy.
    The loop runs on windows of at least LOOP_MIN_ELEMENTS (`planner.kernel_grad_loops`); below that its
    per-iteration cost dominates and the unrolled sums are the faster (measured: benchmarks/results/speed.md,
    section 'a profile of the step, the depthwise kernel gradient as a loop, the 1×1 products in 2-D (issue 23)')."""
    n, oh, ow, c = g.shape
    if not planner.kernel_grad_loops(g.size):
        products = [(tap * g).astype(jnp.float32) for _, _, tap in _taps(xp, kh, kw, stride, oh, ow)]
        if planner.kernel_grad_in_one_reduction(kh * kw, stride, oh * ow * c):
            zero = jnp.zeros((), jnp.float32)
            # over positions per sample, then over the batch: a batch-sharded step then reduces one (k·k, N, C) stack
            # across devices, where the variadic reduction over the batch made XLA all-gather each of its k·k sums
            per_sample = lax.reduce(products, [zero] * len(products), lambda a, b: [u + v for u, v in zip(a, b)],
                                    (1, 2))
            return jnp.sum(jnp.stack(per_sample), axis=1).reshape(kh, kw, 1, c)
        return jnp.stack([jnp.sum(p, axis=(0, 1, 2)) for p in products]).reshape(kh, kw, 1, c)

    def tap(t):
        window = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), (n, (oh - 1) * stride + 1, (ow - 1) * stride + 1, c))
        return jnp.sum(window[:, ::stride, ::stride] * g, axis=(0, 1, 2), dtype=jnp.float32)

    return lax.map(tap, jnp.arange(kh * kw)).reshape(kh, kw, 1, c)


def _padded_input_grad(g: jax.Array, kernel: jax.Array, stride: int, hp: int, wp: int) -> jax.Array:
    """The cotangent of the padded input (at least hp × wp) of a stride-s depthwise convolution, by phases.

    Stride 1: dx_padded[a] = sum_i g[a - i] · k[i], a tap sum of g padded by k-1 in front with the flipped
    kernel. Stride s: padded row s·q + r receives g[q - m] · k[r + s·m] only from the taps i = r + s·m
    (i ≡ r mod s), so each of the s² phases (r, t) is that stride-1 form with the sub-kernel k[r::s, t::s],
    and the phases interleave into the result: s² fewer multiply-adds than correlating the zero-dilated g
    with the whole kernel (a quarter of them for the stride-2 blocks, which sit where the activations are
    largest). Needs kernel ≥ stride (every phase has a tap)."""
    kh, kw = kernel.shape[:2]
    n, oh, ow, c = g.shape
    qh, qw = -(-hp // stride), -(-wp // stride)        # rows / columns per phase
    mh, mw = -(-kh // stride), -(-kw // stride)        # the most taps any phase has, per axis
    gp = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (mh - 1, qh - oh, 0), (mw - 1, qw - ow, 0), (0, 0, 0)))
    phases = [[_tap_sum(gp[:, mh - len(range(r, kh, stride)):, mw - len(range(t, kw, stride)):],
                        kernel[r::stride, t::stride][::-1, ::-1], 1, qh, qw)
               for t in range(stride)] for r in range(stride)]
    # (n, qh, s, qw, s, c): padded row s·q + r, column s·p + t
    dxp = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return dxp.reshape(n, qh * stride, qw * stride, c)


shifted_depthwise_conv.defvjp(_shifted_depthwise_conv_fwd, _shifted_depthwise_conv_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   padding: tuple[tuple[int, int], tuple[int, int]], impl: str) -> jax.Array:
    """Depthwise convolution of NHWC `x` with an HWIO kernel of shape (kh, kw, 1, C)."""
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1])
    if impl == "native":
        return native.depthwise_conv(x, kernel, stride, tuple(tuple(p) for p in padding))
    return shifted_depthwise_conv(x, kernel, stride, tuple(tuple(p) for p in padding))


def _matmul_2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """NHWC `x` times a (Cin, Cout) matrix, as the product of the (N·H·W, Cin) matrix: so the weight gradient is a
    plain 2-D transposed-operand product. Written on the 4-D array, its gradient's contraction over (N, H, W) made
    XLA's CPU backend write every such output gradient again transposed first (measured: benchmarks/results/speed.md,
    section 'a profile of the step, the depthwise kernel gradient as a loop, the 1×1 products in 2-D (issue 23)')."""
    return jnp.matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _scaled_matmul(x: jax.Array, scale: jax.Array, w: jax.Array) -> jax.Array:
    """(x · scale[n]) @ w as one product per sample with that sample's scaled weights, (N, H·W, Cin) times
    (N, Cin, Cout): the scaled activations are never written out, and the gradient needs no pass over them either."""
    n, h, width, c = x.shape
    scaled_w = scale[:, :, None] * w[None]
    return jnp.einsum("npc,ncd->npd", x.reshape(n, h * width, c), scaled_w).reshape(n, h, width, w.shape[-1])


def _tap_products(xp: jax.Array, kernel: jax.Array, stride: int, oh: int, ow: int) -> jax.Array:
    """The k×k convolution of padded `xp` as one elementwise sum of kh·kw·Cin terms, window(i, j)[..., c] times the
    kernel row kernel[i, j, c]: XLA fuses it, with what follows (BatchNorm, activation, the next pad), into one pass
    that writes the output once. For few input channels (the stem's 27 terms) and no gradient: autodiff of it would
    reduce the output's cotangent once per term."""
    out = None
    for i, j, tap in _taps(xp, kernel.shape[0], kernel.shape[1], stride, oh, ow):
        for c in range(kernel.shape[2]):
            term = tap[..., c:c + 1] * kernel[i, j, c]
            out = term if out is None else out + term
    return out


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding, impl: str, in_scale: jax.Array | None = None,
         inference: bool = False) -> jax.Array:
    """Convolution (groups=1) of NHWC `x` with an HWIO kernel, in the form `kernels.conv_form` picks for `impl`
    ('xla': `lax.conv_general_dilated`; 'dot': the same sums as a matrix product or a fused sum of products where
    XLA's CPU backend runs that faster, its dots going to the GEMM library and its convolutions to Eigen's spatial
    convolution). `inference` (no gradient will be taken: evaluation, a frozen unit) only picks the computation:
    the result is the same sums, and differentiable either way.

    `in_scale` (N, Cin), optional: per-sample factors of x's channels (squeeze-excitation's gate); the result is the
    convolution of x · in_scale, with the factors folded into per-sample 1×1 weights (`_scaled_matmul`) where the
    planner says so, else applied to x first."""
    kh, kw, cin, cout = kernel.shape
    form = planner.conv_form(impl, kernel.shape, stride, padding, x.shape, in_scale is not None, inference)
    if form == "scaled_matmul":
        return _scaled_matmul(x, in_scale, kernel[0, 0])
    if in_scale is not None:
        x = x * in_scale[:, None, None, :]
    if form == "matmul":
        return _matmul_2d(x, kernel[0, 0])
    if form in ("tap_products", "patches"):
        xp = _pad_hw(x, padding)
        oh = (xp.shape[1] - kh) // stride + 1
        ow = (xp.shape[2] - kw) // stride + 1
        if form == "tap_products":
            # the stem, and the narrow 1×1 expansions (`planner.conv_form`): the output written once, by the pass
            # that applies BatchNorm and the activation and pads it, where the patches or the GEMM write it and that
            # pass reads it back (measured: benchmarks/results/speed.md, section '`benchmarks/ab.py`; the stem and
            # the first expansion as fused sums in inference mode; the small kernel gradients in one pass (issue 23)')
            return _tap_products(xp, kernel, stride, oh, ow)
        patches = jnp.concatenate([tap for _, _, tap in _taps(xp, kh, kw, stride, oh, ow)], axis=-1)
        return _matmul_2d(patches, kernel.reshape(kh * kw * cin, cout))
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """Bias-free k×k convolution (groups=1) with symmetric or SAME padding; parameter 'kernel' (HWIO). `impl`
    ('auto': 'dot' on CPU, 'xla' elsewhere) chooses the computation (`conv`), not the parameters."""
    features: int
    kernel: int = 1
    stride: int = 1
    padding: str = "symmetric"
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, in_scale=None, inference: bool = False, kernel_only: bool = False):
        """`in_scale` (N, Cin), optional: convolve x times these per-sample channel factors (`conv`). `inference`:
        no gradient will be taken through this call (evaluation, a frozen unit), so `conv` may pick a form that is
        faster without its backward pass; the numbers are the same sums either way. `kernel_only`: return the
        kernel for a consumer that computes the convolution itself (x: only its channel count is used)."""
        k = self.param("kernel", conv_init, (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
        if kernel_only:
            return k
        pads = tuple(conv_padding(self.padding, s, self.kernel, self.stride) for s in x.shape[1:3])
        if in_scale is not None:
            in_scale = in_scale.astype(self.dtype)
        return conv(x.astype(self.dtype), k.astype(self.dtype), self.stride, pads, resolve_conv_impl(self.impl),
                    in_scale, inference)


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W with PyTorch's running-statistics update.

    `momentum` is PyTorch's (running = (1 - m) * running + m * batch), and running_var is updated with the
    unbiased batch variance, as `torch.nn.BatchNorm2d` does; normalization uses the biased one. Statistics are
    computed in float32. In a jitted, batch-sharded step the reductions are global, so this is synchronized BN.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool, fuse: Callable | None = None, fold: bool = False):
        """`fuse(x, scale, bias, epsilon) -> (out, batch mean, biased batch variance)`, in training only: a consumer
        that applies this normalization itself (`bn_act_depthwise_conv`); its `out` is returned. `fold`: return the
        inference-mode normalization instead of applying it, (running mean, multiplier, bias) with
        y = (x - mean) * multiplier + bias, for a consumer that applies it itself (x: only its channel count is
        used)."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if fold:
            return ra_mean.value, lax.rsqrt(ra_var.value + self.epsilon) * scale, bias
        xf = x.astype(jnp.float32)
        if use_running_average:
            mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((xf - ra_mean.value) * mul + bias).astype(self.dtype)
        y, mean, var = (fuse or batch_norm_train)(xf, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x.size // c
            m = self.momentum
            ra_mean.value = (1 - m) * ra_mean.value + m * mean
            ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        return y.astype(self.dtype)


class DepthwiseConv(nn.Module):
    """Depthwise k×k convolution; `impl` chooses the computation, not the parameters."""
    kernel: int
    stride: int = 1
    padding: str = "symmetric"
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, inference: bool = False, bn_act: tuple[BatchNorm, str] | None = None,
                 out_bn_act: tuple[BatchNorm, str] | None = None, pool: bool = False, expand=None,
                 expand_conv=None):
        """`inference`: no gradient will be taken through this call (as `Conv`'s): 'auto' picks by it.
        `bn_act` (a BatchNorm module, an activation name): x is that BatchNorm's input, and the convolution's input
        is activation(BatchNorm(x)), with batch statistics unless `inference`. With the 'native' form in training
        the three run as one operation (`bn_act_depthwise_conv`), which never writes the activation out.

        `out_bn_act` (a BatchNorm module, an activation name): the output is activation(BatchNorm(convolution)),
        and the call returns (output, its mean over positions (N, C) if `pool` else None). In inference mode the
        'native' form runs all of it, both BatchNorms folded, as one pass (`fused_depthwise_inference`).

        `expand` (Cin, C), with `bn_act` and `out_bn_act` in inference mode and the 'native' form only: x has Cin
        channels and `bn_act`'s BatchNorm normalizes x @ expand (a 1×1 expansion, computed in the same pass); or
        an HWIO kernel (k, k, Cin, C) with `expand_conv` = (stride, padding): the convolution of x by it (the
        stem, in front of a first block without expansion)."""
        c = x.shape[-1] if expand is None else expand.shape[-1]
        k = self.param("kernel", nn.initializers.normal(math.sqrt(2.0 / (self.kernel * self.kernel))),
                       (self.kernel, self.kernel, 1, c), jnp.float32)
        if out_bn_act is not None:
            return self._with_output_bn_act(x, k, inference, bn_act, out_bn_act, pool, expand, expand_conv)
        if expand is not None:
            raise ValueError("DepthwiseConv: `expand` needs `out_bn_act`")
        return self._conv(x, k, inference, bn_act)

    def _pads(self, hw):
        return tuple(conv_padding(self.padding, s, self.kernel, self.stride) for s in hw)

    def _conv(self, x, k, inference, bn_act):
        pads = self._pads(x.shape[1:3])
        impl = resolve_depthwise_impl(self.impl, self.dtype, inference)
        if bn_act is not None:
            bn, act = bn_act
            if impl == "native" and not inference:
                return bn(x, False, fuse=lambda z, scale, bias, epsilon: bn_act_depthwise_conv(
                    z, scale, bias, k, epsilon, act, self.stride, pads))
            x = activation(act, not inference)(bn(x, inference))
        return depthwise_conv(x.astype(self.dtype), k.astype(self.dtype), self.stride, pads, impl)

    def _with_output_bn_act(self, x, k, inference, bn_act, out_bn_act, pool, expand, expand_conv):
        out_bn, out_act = out_bn_act
        impl = resolve_depthwise_impl(self.impl, self.dtype, inference, output_fused=True)
        if impl == "native" and inference:
            # (the folds read only the channel count of their argument: k's last dimension is C)
            in_affine, act = (bn_act[0](k, True, fold=True), bn_act[1]) if bn_act else (None, None)
            hw = x.shape[1:3]
            if expand_conv is not None:  # the size of the expansion's output, the convolution's input
                hw = tuple((s + sum(p) - expand.shape[0]) // expand_conv[0] + 1 for s, p in zip(hw, expand_conv[1]))
            return fused_depthwise_inference(x.astype(jnp.float32), expand, in_affine, k, out_bn(k, True, fold=True),
                                             act, out_act, self.stride, self._pads(hw), pool, expand_conv)
        if expand is not None:
            raise ValueError("DepthwiseConv: `expand` runs in inference mode with the 'native' form only")
        y = self._conv(x, k, inference, bn_act)
        y = activation(out_act, not inference)(out_bn(y, inference))
        return y, (jnp.mean(y.astype(jnp.float32), axis=(1, 2)) if pool else None)


def _depthwise_inference_reference(z, expand, in_affine, kernel, out_affine, act, out_act, stride, padding, pool,
                                   expand_conv):
    """`fused_depthwise_inference` in XLA's operations (the shifted sum): its derivative."""
    if expand_conv is not None:
        z = lax.conv_general_dilated(z, expand, (expand_conv[0],) * 2, expand_conv[1],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    elif expand is not None:
        z = _matmul_2d(z, expand)
    x = z if act is None else activation(act, False)((z - in_affine[0]) * in_affine[1] + in_affine[2])
    y = shifted_depthwise_conv(x, kernel, stride, padding)
    y = activation(out_act, False)((y - out_affine[0]) * out_affine[1] + out_affine[2])
    return y, (jnp.mean(y, axis=(1, 2)) if pool else None)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def fused_depthwise_inference(z, expand, in_affine, kernel, out_affine, act, out_act, stride, padding, pool,
                              expand_conv=None):
    """out_act(BN_out(depthwise_conv(act(BN_in(z)), kernel))) with both BatchNorms in inference mode, each given
    folded as (mean, multiplier, bias) (`BatchNorm(fold=True)`; `in_affine` None with `act` None: the convolution
    of z itself), and, with `pool`, the output's mean over positions (squeeze-excitation's): (y, mean or None).
    `expand` (Cin, C) or None: z is x @ expand for the given x (N, H, W, Cin), a 1×1 expansion; or an HWIO kernel
    (k, k, Cin, C) with `expand_conv` = (stride, padding): z is that convolution of x (the stem).
    One pass of the C++ kernel (`native.inference`): z (or x) read once, y written once, the pooled sums taken on the
    way; BN_out's multiplier rides in the kernel, BN_in's in the expansion. Differentiable (through the shifted
    sum's operations)."""
    mean, mul, bias = out_affine
    out = (kernel * mul, bias - mean * mul, stride, padding, act, out_act)
    if expand is not None:
        in_mean, in_mul, in_bias = in_affine
        geometry = (expand.shape[0], *expand_conv) if expand_conv is not None else None  # None: 1×1
        y, sums = native.inference(z, None, None, in_bias - in_mean * in_mul, *out,
                                   expand=(expand * in_mul).reshape(-1, in_mul.shape[0]), expand_geometry=geometry)
    else:
        y, sums = native.inference(z, *(in_affine or native._identity_affine(z)), *out)
    return y, (sums / (y.shape[1] * y.shape[2]) if pool else None)


def _fused_depthwise_inference_fwd(z, expand, in_affine, kernel, out_affine, act, out_act, stride, padding, pool,
                                   expand_conv):
    out = fused_depthwise_inference(z, expand, in_affine, kernel, out_affine, act, out_act, stride, padding, pool,
                                    expand_conv)
    return out, (z, expand, in_affine, kernel, out_affine)


def _fused_depthwise_inference_bwd(act, out_act, stride, padding, pool, expand_conv, residuals, cotangents):
    _, vjp = jax.vjp(lambda *a: _depthwise_inference_reference(*a, act, out_act, stride, padding, pool, expand_conv),
                     *residuals)
    return vjp(cotangents)


fused_depthwise_inference.defvjp(_fused_depthwise_inference_fwd, _fused_depthwise_inference_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BatchNorm of NHWC `x` with its own batch statistics: (y, batch mean, biased batch variance). The statistics
    carry no gradient (they only feed the running averages); y's gradient is the closed form below."""
    y, mean, var = _bn_train(x, scale, bias, epsilon)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def _bn_stats(x, scale, epsilon):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return mean, var, lax.rsqrt(var + epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_train(x, scale, bias, epsilon):
    mean, var, rstd = _bn_stats(x, scale, epsilon)
    return (x - mean) * (rstd * scale) + bias, mean, var


def _bn_train_fwd(x, scale, bias, epsilon):
    mean, var, rstd = _bn_stats(x, scale, epsilon)
    return ((x - mean) * (rstd * scale) + bias, mean, var), (x, mean, rstd, scale)


def _bn_train_bwd(epsilon, residuals, cotangents):
    """The textbook BatchNorm backward pass, written out: two reductions over g (one fused pass with x) and one
    elementwise pass, where autodiff of the forward pass left XLA's CPU backend more passes over the activations.
    The statistics' cotangents are zero (`batch_norm_train` stops their gradient)."""
    x, mean, rstd, scale = residuals
    g = cotangents[0]
    xhat = (x - mean) * rstd
    dbias = jnp.sum(g, axis=(0, 1, 2))
    dscale = jnp.sum(g * xhat, axis=(0, 1, 2))
    return _bn_input_grad(g, xhat, rstd, scale, dbias, dscale), dscale, dbias


def _bn_input_grad(g, xhat, rstd, scale, dbias, dscale):
    """BatchNorm's input gradient from the output's (g), given g's sums over the batch: dbias = sum(g), dscale =
    sum(g * xhat)."""
    n = g.shape[0] * g.shape[1] * g.shape[2]
    return (scale * rstd / n) * (n * g - dbias - xhat * dscale)


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def bn_act_depthwise_conv(z: jax.Array, scale: jax.Array, bias: jax.Array, kernel: jax.Array, epsilon: float,
                          act: str, stride: int, padding) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The depthwise convolution of act(BatchNorm(z)), z's own batch statistics (training), by the C++ kernels of
    `effnet_jax.kernels.native`, which never write act(BatchNorm(z)) out: (y, the batch mean, the biased batch
    variance), as `batch_norm_train`. z float32 NHWC; `act` 'silu' or 'relu6'. The gradients of z, scale, bias and
    kernel are those of `batch_norm_train`, the activation and the convolution composed. Reverse-mode only."""
    return _bn_act_depthwise_conv_fwd(z, scale, bias, kernel, epsilon, act, stride, padding)[0]


def _bn_act_depthwise_conv_fwd(z, scale, bias, kernel, epsilon, act, stride, padding):
    mean, var, rstd = _bn_stats(z, scale, epsilon)
    y = native.forward(z, mean, rstd * scale, bias, kernel, stride, padding, act)
    return (y, lax.stop_gradient(mean), lax.stop_gradient(var)), (z, scale, bias, kernel, mean, rstd)


def _bn_act_depthwise_conv_bwd(epsilon, act, stride, padding, residuals, cotangents):
    z, scale, bias, kernel, mean, rstd = residuals
    # g: the gradient of the BatchNorm output (through the activation), with its two sums over the batch
    g, dk, dbias, g_zc_sum = native.backward(z, mean, rstd * scale, bias, kernel, cotangents[0], stride, padding, act)
    dscale = g_zc_sum * rstd
    dz = _bn_input_grad(g, (z - mean) * rstd, rstd, scale, dbias, dscale)
    return dz, dscale, dbias, dk


bn_act_depthwise_conv.defvjp(_bn_act_depthwise_conv_fwd, _bn_act_depthwise_conv_bwd)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation's (N, C) gate, sigmoid(W2 silu(W1 mean_hw(x) + b1) + b2), with 1×1-conv weights stored as
    Dense kernels. The block's output is x * gate; the consumer applies it (`Conv`'s `in_scale`, which can fold it
    into its product instead of writing x * gate out)."""
    se_channels: int
    activation: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, pooled=None):
        """`pooled`: x's mean over positions (N, C), when the producer of x has it already."""
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)) if pooled is None else pooled
        s = s.astype(self.dtype)
        s = nn.Dense(self.se_channels, kernel_init=conv_init, dtype=self.dtype, name="reduce")(s)
        s = ACTIVATIONS[self.activation](s)
        return nn.sigmoid(nn.Dense(x.shape[-1], kernel_init=conv_init, dtype=self.dtype, name="expand")(s))


class DropPath(nn.Module):
    """Per-sample stochastic depth: in training each sample's residual branch is dropped with probability
    `rate` and survivors are scaled by 1/(1-rate); identity in evaluation. Uses the 'dropout' RNG stream."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))
