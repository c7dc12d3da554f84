"""Every choice of computational form, in one place: which depthwise form (C++ kernels, shifted sum, XLA's grouped
convolution) and which convolution form (matrix product, patches, tap products, XLA's convolution) a unit runs,
from (unit, mode, backend, dtype, machine). The blocks in `model.blocks` and `model.layers` ask; they never decide.

Off XLA's CPU backend 'auto' is XLA's own forms. On CPU an MBConv block's depthwise form is measured on the machine
as the whole block (`autotune`), else the fixed rule (`fixed_depthwise_form`); the other choices are the fixed
thresholds below.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from effnet_jax.kernels import autotune, native

Dtype = Any

DEPTHWISE_IMPLS = ("auto", "native", "shift", "xla")
CONV_IMPLS = ("auto", "dot", "xla")

# 'dot' computes a k×k convolution as patches times a matrix only while a patch has at most this many values (the
# stem's 3 input channels: 27 values per pixel); wider k×k convolutions stay convolutions.
PATCH_DOT_MAX_DEPTH = 64
# in inference mode the C++ kernel computes an MBConv block's 1×1 expansion itself (`fused_depthwise_inference`)
# where the block's input rows are at least this wide: it multiplies one row at a time, a few pixels to a tile, and
# on narrower rows XLA's GEMM over the whole batch is the faster (measured: benchmarks/results/speed.md, section
# 'inference: the front of each MBConv block as one pass of the C++ kernel (issue 23)')
FUSED_EXPANSION_MIN_WIDTH = 12
# in inference mode a 1×1 convolution of at most this many input channels is a fused sum of products (`conv`); with
# more (B0's 24-channel expansions) the GEMM is the faster (measured: benchmarks/results/speed.md, section
# '`benchmarks/ab.py`; the stem and the first expansion as fused sums in inference mode; the small kernel gradients
# in one pass (issue 23)')
POINTWISE_SUM_MAX_DEPTH = 16
# the shifted sum's kernel gradient: windows (batch × output positions × channels) of at least this many elements
# loop over the taps of the stored padded input (`layers._kernel_grad`); smaller ones are unrolled (measured:
# benchmarks/results/speed.md, section 'a profile of the step, the depthwise kernel gradient as a loop, the 1×1
# products in 2-D (issue 23)')
LOOP_MIN_ELEMENTS = 1 << 19


def _checked(name: str, impl: str, choices: tuple[str, ...]) -> str:
    if impl not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {impl!r}")
    return impl


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def resolve_depthwise_impl(impl: str, dtype: Dtype = jnp.float32, inference: bool = False,
                           output_fused: bool = False) -> str:
    """The depthwise form of a bare `DepthwiseConv` (no planner measurement: a unit that is not a whole block).
    'auto' on XLA's CPU backend: the C++ kernels where they build (float32), but in inference mode only where they
    also run what follows the convolution (`output_fused`), since XLA fuses the shifted sum with the BatchNorm and
    activation on either side and the bare kernels are the slower there (measured: benchmarks/results/speed.md,
    section 'inference: the front of each MBConv block as one pass of the C++ kernel (issue 23)'); else the shifted
    sum. Elsewhere XLA's grouped convolution. An explicit 'native' that cannot run raises."""
    _checked("depthwise_impl", impl, DEPTHWISE_IMPLS)
    if impl == "native":
        native.require()
        if jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"depthwise_impl='native' computes in float32 only, not {jnp.dtype(dtype).name}")
        return impl
    if impl != "auto":
        return impl
    if not on_cpu():
        return "xla"
    fits = (not inference or output_fused) and jnp.dtype(dtype) == jnp.float32
    return "native" if fits and native.available() else "shift"


def depthwise_candidates(dtype: Dtype) -> tuple[str, ...]:
    """The depthwise forms a block can run on CPU here: the kernels where they build (float32), the shifted sum,
    XLA's grouped convolution."""
    kernels = ("native",) if jnp.dtype(dtype) == jnp.float32 and native.available() else ()
    return (*kernels, "shift", "xla")


def fixed_depthwise_form(dtype: Dtype) -> str:
    """The CPU form without measuring (`EFFNET_JAX_AUTOTUNE=0`, initialization): the C++ kernels where they build,
    else the shifted sum."""
    return depthwise_candidates(dtype)[0]


def block_depthwise_form(block, x_shape: tuple[int, ...], train: bool) -> str:
    """The depthwise form of MBConv `block` (an unbound or bound `models.MBConv`) on input of `x_shape`, in training
    (`train`) or inference mode: its explicit `depthwise_impl`, XLA's off CPU, else the fastest form measured on this
    machine for this block's configuration, shape, mode and dtype (`autotune.choose`, cached), or the fixed rule."""
    impl = block.depthwise_impl
    if impl != "auto":
        return resolve_depthwise_impl(impl, block.dtype)
    if not on_cpu():
        return "xla"
    candidates = depthwise_candidates(block.dtype)
    fixed = candidates[0]
    if block.scope is not None and block.is_initializing():
        return fixed  # the form does not change the parameters; nothing worth measuring at init's dummy shape
    unit = autotune.Unit("mbconv", _block_signature(block), tuple(x_shape), "train" if train else "inference",
                         jnp.dtype(block.dtype).name)
    return autotune.choose(unit, candidates, fixed, lambda form: autotune.time_module(
        block.clone(parent=None, depthwise_impl=form, name=None), x_shape, train), name=block.name)


def first_block_form(block, image_shape: tuple[int, ...], stem_shape: tuple[int, ...],
                     build: Callable[[str], Callable[[], object]]) -> str:
    """The depthwise form of the first MBConv `block` in inference mode, on the stem's output of `stem_shape`.
    Where its kernel may compute the stem too (`fuses_stem`), the candidates are timed as the stem and the block
    together (`build(form)` runs both, the stem fused with the kernels), since never writing the stem's output is
    the kernels' gain there and the block alone does not show it; else as any block."""
    candidates = depthwise_candidates(block.dtype)
    if (block.depthwise_impl != "auto" or not on_cpu() or candidates[0] != "native"
            or not fuses_stem("native", False, block.cfg, False)):
        return block_depthwise_form(block, stem_shape, False)
    unit = autotune.Unit("stem+mbconv", f"{_block_signature(block)} stem>{'x'.join(map(str, stem_shape[1:]))}",
                         tuple(image_shape), "inference", jnp.dtype(block.dtype).name)
    return autotune.choose(unit, candidates, candidates[0], build, name=block.name)


def _block_signature(block) -> str:
    c = block.cfg
    return (f"k{c.kernel} s{c.stride} {c.in_channels}>{c.expand_channels}>{c.out_channels} se{c.se_channels} "
            f"res{int(c.residual)} dp{c.drop_path_rate > 0:d} {block.activation} {block.padding}")


def fuses_expansion(form: str, train: bool, width: int) -> bool:
    """Whether the depthwise kernel computes the block's 1×1 expansion too (inference, the kernels, rows wide
    enough for its tiles)."""
    return form == "native" and not train and width >= FUSED_EXPANSION_MIN_WIDTH


def fuses_stem(block_form: str, trains: bool, first_block, keeping_intermediates: bool) -> bool:
    """Whether the first block's depthwise kernel computes the stem too (its output never written out): in
    inference, with the kernels, a first block without expansion or shortcut, no intermediates kept."""
    return (block_form == "native" and not trains and not first_block.fused and not first_block.residual
            and first_block.expand_channels == first_block.in_channels and not keeping_intermediates)


def resolve_conv_impl(impl: str) -> str:
    """'auto': 'dot' (`conv_form`'s matrix forms) on XLA's CPU backend, whose dots go to its GEMM library and
    convolutions to Eigen's slower spatial convolution; 'xla' elsewhere."""
    _checked("conv_impl", impl, CONV_IMPLS)
    if impl == "auto":
        return "dot" if on_cpu() else "xla"
    return impl


def conv_form(impl: str, kernel_shape: tuple[int, ...], stride: int, padding, x_shape: tuple[int, ...],
              scaled: bool, inference: bool) -> str:
    """How `layers.conv` computes a convolution (groups=1) under `impl` ('dot' or 'xla'):

    * 'scaled_matmul': a 1×1 one of x · per-sample channel factors (`scaled`: SE's gate) as one product per sample
      with scaled weights, where the map has at least as many positions as x has channels (the early blocks);
    * 'tap_products': a 1×1 one in inference of at most POINTWISE_SUM_MAX_DEPTH input channels, or a k×k one of at
      most PATCH_DOT_MAX_DEPTH values per patch in inference: one fused elementwise sum, its output written once;
    * 'matmul': other 1×1 stride-1 ones, `x @ kernel[0, 0]`;
    * 'patches': k×k ones with small patches, in training: patches × the reshaped kernel;
    * 'xla': `lax.conv_general_dilated` (other shapes, and impl 'xla')."""
    kh, kw, cin, _ = kernel_shape
    if impl != "dot":
        return "xla"
    pointwise = kh == kw == 1 and stride == 1 and not any(any(p) for p in padding)
    if pointwise and scaled and x_shape[1] * x_shape[2] >= cin:
        return "scaled_matmul"
    if pointwise:
        return "tap_products" if inference and cin <= POINTWISE_SUM_MAX_DEPTH else "matmul"
    if kh * kw * cin <= PATCH_DOT_MAX_DEPTH:
        return "tap_products" if inference else "patches"
    return "xla"


def silu_as_tanh(train: bool) -> bool:
    """Whether SiLU is computed as x/2 · (1 + tanh(x/2)) (`layers.activation`): in inference mode on XLA's CPU
    backend, where the logistic is an exponential and a division and tanh a rational polynomial; differentiated,
    that form is slower than autodiff of `jax.nn.silu` (measured: benchmarks/results/speed.md, section 'SiLU through
    tanh in inference mode; the targets and the per-unit tables re-measured (issue 23)')."""
    return not train and on_cpu()


def kernel_grad_loops(window_size: int) -> bool:
    """Whether the shifted sum's kernel gradient loops over the taps of the stored padded input
    (`layers._kernel_grad`): windows of at least LOOP_MIN_ELEMENTS elements. Its forward pass keeps that padded
    input for the backward exactly then."""
    return window_size >= LOOP_MIN_ELEMENTS


def kernel_grad_in_one_reduction(taps: int, stride: int, sample_size: int) -> bool:
    """Whether the unrolled kernel gradient sums its k·k products in one variadic reduction (one pass over g and the
    padded input, k·k accumulators) rather than k·k reductions (a pass each): for kernels of at least 25 taps (5×5),
    and for stride-1 ones where a sample (map × channels) has fewer than 2¹⁵ elements; the k·k reductions are the
    faster for 3×3 kernels on larger samples and with stride 2 (measured: benchmarks/results/speed.md, section
    '`benchmarks/ab.py`; the stem and the first expansion as fused sums in inference mode; the small kernel gradients
    in one pass (issue 23)')."""
    return taps >= 25 or (stride == 1 and sample_size < 1 << 15)
