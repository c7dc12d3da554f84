"""The depthwise convolution for XLA's CPU backend in C++ (`csrc/depthwise.cc`), as JAX operations: forward and
backward with the expansion's BatchNorm and activation fused in front (`forward`, `backward`), and in inference mode
the front of an MBConv block in one pass (`inference`). The shifted sum in XLA re-reads the padded input once per
tap and needs the activation in front written out; these kernels do neither. `model.layers` runs them for
`depthwise_impl='native'`.

Compiled on first use with the system's C++ compiler for this CPU (`$EFFNET_JAX_NATIVE_MARCH` names another target)
into a cache (`cache_dir`); without a compiler 'auto' falls back to the shifted sum, and `EFFNET_JAX_NATIVE=0` turns
the kernels off. The operations are jit-able, reverse-mode differentiable, vmap-able and partitioned over a sharded
batch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from effnet_jax.data.cache import CACHE_ENV_VAR as CACHE_ENV
from effnet_jax.data.cache import cache_root

log = logging.getLogger(__name__)

OPT_OUT = "EFFNET_JAX_NATIVE"
MARCH_ENV = "EFFNET_JAX_NATIVE_MARCH"  # the compiler's -march (default 'native')
FORWARD = "effnet_jax_depthwise_forward"
BACKWARD = "effnet_jax_depthwise_backward"
INFERENCE = "effnet_jax_depthwise_inference"
COMPILE_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """The native kernels could not be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    """Where the compiled kernels are kept: `kernels/` in the project's cache (`data.cache.cache_root()`)."""
    return cache_root() / "kernels"


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _march() -> str:
    """The target the kernels are compiled for, as the compiler's -march: `$EFFNET_JAX_NATIVE_MARCH`, else 'native'
    (this machine's CPU)."""
    return os.environ.get(MARCH_ENV, "").strip() or "native"


def _flags(include: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-I", include]


def build(force: bool = False) -> Path:
    """The compiled library for this machine, built into the cache unless there already (or `force`)."""
    if sys.platform == "win32":
        raise NativeUnavailable("the native CPU kernels are built for Linux and macOS only")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set $CXX, or install g++ or clang++)")
    try:
        source = resources.files("effnet_jax.kernels").joinpath("csrc", "depthwise.cc").read_bytes()
    except OSError as e:
        raise NativeUnavailable(f"effnet_jax/kernels/csrc/depthwise.cc is missing from the installation ({e})"
                                ) from None
    include = jax.ffi.include_dir()
    target = _march()
    key = hashlib.sha256(b"\0".join([source, jax.__version__.encode(), cxx.encode(), _cpu_id().encode(),
                                     " ".join(_flags("")).encode(), f"-march={target}".encode()])).hexdigest()[:20]
    out = cache_dir() / f"depthwise-{key}.so"
    if out.exists() and not force:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "depthwise.cc"
            src.write_bytes(source)
            _compile(cxx, include, src, Path(tmp) / out.name, target)
            os.replace(Path(tmp) / out.name, out)  # atomic: concurrent builds (test workers, processes) land whole
    except OSError as e:
        raise NativeUnavailable(f"cannot write the kernel cache {out.parent} ({e}); set ${CACHE_ENV}") from None
    return out


def _compile(cxx: str, include: str, src: Path, lib: Path, target: str) -> None:
    error = ""
    # -march=native where the compiler knows it (GCC, Clang on x86 and recent Arm), else its default target; a
    # target named in $EFFNET_JAX_NATIVE_MARCH, or the error
    for arch in ([f"-march={target}"], []) if target == "native" else ([f"-march={target}"],):
        try:
            done = subprocess.run([cxx, *arch, *_flags(include), str(src), "-o", str(lib)], capture_output=True,
                                  text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeUnavailable(f"compiling with {cxx} failed: {e}") from None
        if done.returncode == 0:
            return
        lines = done.stderr.strip().splitlines()
        error = next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {done.returncode}")
    asked = "" if target == "native" else f" for -march={target} (${MARCH_ENV})"
    raise NativeUnavailable(f"{cxx} could not compile effnet_jax/kernels/csrc/depthwise.cc{asked}: {error.strip()}")


@functools.cache
def _load() -> tuple[ctypes.CDLL, str]:
    """Build (or find in the cache), load and register the kernels, once per process: (the library, its -march)."""
    target = _march()
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in ((FORWARD, lib.EffnetDepthwiseForward), (BACKWARD, lib.EffnetDepthwiseBackward),
                         (INFERENCE, lib.EffnetDepthwiseInference)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib, target


def form() -> dict:
    """The form of the loaded kernels (built and loaded first): {'march': the -march they were built for ('native'
    unless `$EFFNET_JAX_NATIVE_MARCH` says otherwise), 'lanes': floats per vector, 'tile': the expansion's register
    tile as (pixels, vectors)}, as the library reports them. (Where the compiler refuses -march=native, 'native' is
    its default target: 'lanes' says what that is.)"""
    lib, target = _load()
    values = (ctypes.c_int * 3)()
    lib.EffnetKernelForm(values)
    return {"march": target, "lanes": values[0], "tile": (values[1], values[2])}


@functools.cache
def available() -> bool:
    """Whether the native kernels run here: XLA's CPU backend, not turned off, built and loaded. The first call
    builds them (seconds; then cached on disk); a failure is logged once, as a warning with the reason."""
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if jax.default_backend() != "cpu":
        return False
    try:
        _load()
    except (NativeUnavailable, OSError, AttributeError) as e:
        log.warning("effnet_jax: the native CPU depthwise kernel is unavailable (%s); using the XLA form, which is "
                    "slower. $CXX names the C++ compiler, $%s a writable cache directory; %s=0 silences this.",
                    e, CACHE_ENV, OPT_OUT)
        return False
    return True


def require() -> None:
    """Raise NativeUnavailable with the reason when the kernels cannot run here (an explicit 'native')."""
    if jax.default_backend() != "cpu":
        raise NativeUnavailable(f"the native depthwise kernel runs on CPU only, not on {jax.default_backend()}")
    _load()


_ACT_CODES = {None: 0, "silu": 1, "relu6": 2}  # csrc/depthwise.cc's Act


def _attrs(stride: int, padding, act: str | None) -> dict:
    return dict(stride=np.int64(stride), pad_h=np.int64(padding[0][0]), pad_w=np.int64(padding[1][0]),
                act=np.int64(_ACT_CODES[act]))


_NO_EXPANSION = (1, 1, ((0, 0), (0, 0)))


def _inference_ffi(z, mean, scale, bias, kernel, out_bias, expand, stride, padding, spec):
    act, out_act, (expand_k, expand_stride, expand_pads) = spec
    # the depthwise input's size (the expansion's output)
    hw = tuple((z.shape[1 + a] + sum(expand_pads[a]) - expand_k) // expand_stride + 1 for a in (0, 1))
    oh, ow = _out_hw((None, *hw), kernel.shape, stride, padding)
    n, c = z.shape[0], kernel.shape[3]
    outs = (jax.ShapeDtypeStruct((n, oh, ow, c), z.dtype), jax.ShapeDtypeStruct((n, c), z.dtype))
    geometry = dict(expand_k=expand_k, expand_stride=expand_stride, expand_pad_top=expand_pads[0][0],
                    expand_pad_bottom=expand_pads[0][1], expand_pad_left=expand_pads[1][0],
                    expand_pad_right=expand_pads[1][1])
    return jax.ffi.ffi_call(INFERENCE, outs)(z, mean, scale, bias, kernel, out_bias, expand,
                                             **_attrs(stride, padding, act), out_act=np.int64(_ACT_CODES[out_act]),
                                             **{k: np.int64(v) for k, v in geometry.items()})


def _inference_call(z, mean, scale, bias, kernel, out_bias, stride, padding, spec):
    """(act_out(the depthwise convolution of act((z - mean) * scale + bias) + out_bias), its sums over positions
    (N, C)); `spec` = (act, act_out, _NO_EXPANSION)."""
    return _inference_ffi(z, mean, scale, bias, kernel, out_bias, jnp.zeros((0, z.shape[3]), z.dtype), stride,
                          padding, spec)


def _expand_inference_call(x, expand, bias, kernel, out_bias, stride, padding, spec):
    """`_inference_call` of z = conv(x, expand) with mean 0 and scale 1: the expansion computed in the kernel, row
    by row, never written out; `spec` = (act, act_out, (k, stride, padding) of the expansion, whose weights
    `expand` are its HWIO kernel as a (k·k·Cin, C) matrix: 1×1 for MBConv's expansion, k×k for the stem)."""
    c = expand.shape[1]
    return _inference_ffi(x, jnp.zeros((c,), x.dtype), jnp.ones((c,), x.dtype), bias, kernel, out_bias, expand,
                          stride, padding, spec)


def _out_hw(x_shape, k_shape, stride: int, padding) -> tuple[int, int]:
    return tuple((x_shape[1 + a] + sum(padding[a]) - k_shape[a]) // stride + 1 for a in (0, 1))


def _forward_call(z, mean, scale, bias, kernel, stride, padding, act):
    """The depthwise convolution of act((z - mean) * scale + bias), or of z itself (`act` None; mean, scale, bias
    then unused, any (C,) arrays)."""
    oh, ow = _out_hw(z.shape, kernel.shape, stride, padding)
    out = jax.ShapeDtypeStruct((z.shape[0], oh, ow, z.shape[3]), z.dtype)
    return jax.ffi.ffi_call(FORWARD, out)(z, mean, scale, bias, kernel, **_attrs(stride, padding, act))


def _backward_call(z, mean, scale, bias, kernel, g, stride, padding, act):
    """(the gradient of x, or with `act` of the BatchNorm output; each sample's kernel gradient (N, kh, kw, C);
    with `act`, each sample's sums of that gradient and of it times (z - mean), (N, C) each)."""
    n, kh, kw, c = z.shape[0], *kernel.shape[:2], kernel.shape[3]
    outs = (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct((n, kh, kw, c), z.dtype),
            jax.ShapeDtypeStruct((n, c), z.dtype), jax.ShapeDtypeStruct((n, c), z.dtype))
    return jax.ffi.ffi_call(BACKWARD, outs)(z, mean, scale, bias, kernel, g, **_attrs(stride, padding, act))


def _batch_sharded(call, operands: list[str], results: list[str]):
    """`call(*arrays, stride, padding, act)` partitioned over the batch: arrays with a batch dimension (factor 'n' in
    `operands`, `results`: their dimensions as Shardy factors) keep its sharding, every other one is replicated."""
    op = custom_partitioning(call, static_argnums=tuple(range(len(operands), len(operands) + 3)))

    def batch_axis(arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", None)
        return spec[0] if spec else None

    def shardings(mesh, axis, dims):
        return tuple(NamedSharding(mesh, PartitionSpec(axis) if d.startswith("n ") else PartitionSpec())
                     for d in dims)

    def infer(stride, padding, act, mesh, arg_shapes, result_shape):
        out = shardings(mesh, batch_axis(arg_shapes), results)
        return out[0] if len(results) == 1 else out

    def partition(stride, padding, act, mesh, arg_shapes, result_shape):
        axis = batch_axis(arg_shapes)
        out = shardings(mesh, axis, results)
        return (mesh, lambda *arrays: call(*arrays, stride, padding, act), out[0] if len(results) == 1 else out,
                shardings(mesh, axis, operands))

    # only the batch 'n' may stay sharded: a spatial shard would need its neighbours' rows, a channel shard the rest
    # of the kernel gradient's sums
    rule = f"{', '.join(operands)} -> {', '.join(results)}"
    factors = list(dict.fromkeys(f for dims in operands + results for f in dims.split()))  # Shardy wants this order
    op.def_partition(infer_sharding_from_operands=infer, partition=partition, sharding_rule=rule,
                     need_replication_factors=tuple(f for f in factors if f != "n"))
    return op


_X, _C, _K, _Y = "n h w c", "c", "i j o c", "n p q c"
_forward = _batch_sharded(_forward_call, [_X, _C, _C, _C, _K], [_Y])
_backward = _batch_sharded(_backward_call, [_X, _C, _C, _C, _K, _Y], [_X, "n i j c", "n c", "n c"])
_inference = _batch_sharded(_inference_call, [_X, _C, _C, _C, _K, _C], [_Y, "n c"])
_expand_inference = _batch_sharded(_expand_inference_call, ["n a b d", "e c", _C, _K, _C], [_Y, "n c"])


def _arrays_only(op, *static):
    """op(*arrays, *static) as a function of the arrays, which vmap maps one call per element (custom_partitioning
    has no batching rule of its own)."""
    return jax.custom_batching.sequential_vmap(lambda *arrays: op(*arrays, *static))


def forward(z, mean, scale, bias, kernel, stride: int, padding, act: str | None):
    """`_forward_call`, the kernels built and registered first, partitioned over a sharded batch."""
    require()
    return _arrays_only(_forward, stride, padding, act)(z, mean, scale, bias, kernel)


def backward(z, mean, scale, bias, kernel, g, stride: int, padding, act: str | None):
    """`_backward_call`, the kernels built and registered first, partitioned over a sharded batch, its per-sample
    outputs summed over the batch: (dx or the BatchNorm output's gradient, the kernel gradient (kh, kw, 1, C), and
    with `act` that gradient's sum and its sum times (z - mean), (C,) each)."""
    require()
    dx, *per_sample = _arrays_only(_backward, stride, padding, act)(z, mean, scale, bias, kernel, g)
    dk, sums, zc_sums = (jnp.sum(a, axis=0) for a in per_sample)
    return dx, dk[:, :, None, :].astype(kernel.dtype), sums, zc_sums


def inference(z, mean, scale, bias, kernel, out_bias, stride: int, padding, act: str | None, out_act: str | None,
              expand=None, expand_geometry=None):
    """`_inference_call`, the kernels built and registered first, partitioned over a sharded batch: (y, y's sums over
    positions (N, C)). With `expand` (k·k·Cin, C): `_expand_inference_call` of x = z, `expand_geometry` = (k,
    stride, ((top, bottom), (left, right))) of that convolution, None for a 1×1 one (mean, scale unused: the caller
    folds the BatchNorm into `expand` and `bias`). No derivative (`layers.fused_depthwise_inference` has one)."""
    require()
    if expand is not None:
        return _arrays_only(_expand_inference, stride, padding, (act, out_act, expand_geometry or _NO_EXPANSION))(
            z, expand, bias, kernel, out_bias)
    return _arrays_only(_inference, stride, padding, (act, out_act, _NO_EXPANSION))(
        z, mean, scale, bias, kernel, out_bias)


def _identity_affine(x):
    c = x.shape[-1]
    return jnp.zeros((c,), x.dtype), jnp.ones((c,), x.dtype), jnp.zeros((c,), x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution of NHWC float32 `x` with a (kh, kw, 1, C) kernel, `padding` ((top, bottom), (left,
    right)) explicit: the numbers of `layers.shifted_depthwise_conv`, by the C++ kernels. Reverse-mode only."""
    return forward(x, *_identity_affine(x), kernel, stride, padding, None)


def _depthwise_conv_fwd(x, kernel, stride, padding):
    return depthwise_conv(x, kernel, stride, padding), (x, kernel)


def _depthwise_conv_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    dx, dk, _, _ = backward(x, *_identity_affine(x), kernel, g, stride, padding, None)
    return dx, dk


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)
