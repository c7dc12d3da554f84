"""Kernels outside XLA for its CPU backend: the depthwise convolution, forward and backward, in C++.

XLA's CPU backend runs the depthwise convolution slowest of all of EfficientNet's units (its grouped convolution
several times slower than the shifted sum of `layers.shifted_depthwise_conv`, which in turn re-reads the padded
input once per tap). `native/depthwise.cc` walks the image row by row instead, each output summed over its taps in
a register, and computes the backward pass's input and kernel gradients in one pass over each sample (figures:
docs/performance.md). `layers.depthwise_conv` uses it for `depthwise_impl='native'`, which 'auto' picks on CPU for
float32 when it builds.

It is compiled on first use, not at install: with the system's C++ compiler (`$CXX`, else c++, g++ or clang++)
against the XLA FFI headers that jaxlib ships (`jax.ffi.include_dir()`), for this machine's CPU (`-march=native`),
into a cache keyed by the source, jaxlib's version, the compiler and the CPU (`$EFFNET_JAX_CACHE`, else
`$XDG_CACHE_HOME/effnet_jax`, else ~/.cache/effnet_jax), in about 4 s. Without a compiler, 'auto' falls back to the
shifted sum with one warning naming what failed; `EFFNET_JAX_NATIVE=0` turns the kernels off.

The operations (`depthwise_conv`) are ordinary JAX functions of NHWC float32 arrays: differentiable (custom VJP),
jit-able, vmap-able (sequentially), and batch-partitioned when the batch is sharded over several devices
(`custom_partitioning`: each device runs the kernel on its own samples).
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

log = logging.getLogger(__name__)

OPT_OUT = "EFFNET_JAX_NATIVE"
CACHE_ENV = "EFFNET_JAX_CACHE"
FORWARD = "effnet_jax_depthwise_forward"
BACKWARD = "effnet_jax_depthwise_backward"
COMPILE_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """The native kernels could not be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "effnet_jax"


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


def _flags(include: str) -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-I", include]


def build(force: bool = False) -> Path:
    """The compiled library for this machine, built into the cache unless there already (or `force`)."""
    if sys.platform == "win32":
        raise NativeUnavailable("the native CPU kernels are built for Linux and macOS only")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set $CXX, or install g++ or clang++)")
    source = resources.files("effnet_jax").joinpath("native", "depthwise.cc").read_bytes()
    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([source, jax.__version__.encode(), cxx.encode(), _cpu_id().encode(),
                                     " ".join(_flags("")).encode()])).hexdigest()[:20]
    out = cache_dir() / f"depthwise-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "depthwise.cc"
        src.write_bytes(source)
        lib = Path(tmp) / out.name
        errors = []
        # -march=native where the compiler knows it (GCC, Clang on x86 and recent Arm), else its default target
        for arch in (["-march=native"], []):
            try:
                done = subprocess.run([cxx, *arch, *_flags(include), str(src), "-o", str(lib)], capture_output=True,
                                      text=True, timeout=COMPILE_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NativeUnavailable(f"compiling with {cxx} failed: {e}") from None
            if done.returncode == 0:
                break
            errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
        else:
            raise NativeUnavailable(f"{cxx} could not compile effnet_jax/native/depthwise.cc: {errors[-1][0]}")
        os.replace(lib, out)  # atomic: concurrent builds (test workers, processes of one run) each land whole
    return out


@functools.cache
def _load() -> None:
    """Build (or find in the cache), load and register the kernels, once per process."""
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in ((FORWARD, lib.EffnetDepthwiseForward), (BACKWARD, lib.EffnetDepthwiseBackward)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


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
                    "slower. Set %s=0 to silence this.", e, OPT_OUT)
        return False
    return True


def require() -> None:
    """Raise NativeUnavailable with the reason when the kernels cannot run here (an explicit 'native')."""
    if jax.default_backend() != "cpu":
        raise NativeUnavailable(f"the native depthwise kernel runs on CPU only, not on {jax.default_backend()}")
    _load()


def _attrs(stride: int, padding) -> dict:
    return dict(stride=np.int64(stride), pad_h=np.int64(padding[0][0]), pad_w=np.int64(padding[1][0]))


def _out_hw(x_shape, k_shape, stride: int, padding) -> tuple[int, int]:
    return tuple((x_shape[1 + a] + sum(padding[a]) - k_shape[a]) // stride + 1 for a in (0, 1))


def _forward_call(x, kernel, stride, padding):
    oh, ow = _out_hw(x.shape, kernel.shape, stride, padding)
    out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, x.shape[3]), x.dtype)
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(x, kernel, **_attrs(stride, padding))


def _backward_call(x, kernel, g, stride, padding):
    """(dx, the kernel gradient of each sample (N, kh, kw, C))."""
    kh, kw, _, c = kernel.shape
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((x.shape[0], kh, kw, c), x.dtype))
    return jax.ffi.ffi_call(BACKWARD, outs, vmap_method="sequential")(x, kernel, g, **_attrs(stride, padding))


def _batch_sharded(call, n_out: int, n_in: int):
    """`call(*arrays, stride, padding)` partitioned over the batch: inputs and outputs with a batch dimension keep
    its sharding (the kernel, `n_in`'s second argument, is replicated), every other dimension is whole."""
    op = custom_partitioning(call, static_argnums=(n_in, n_in + 1))

    def batch_axis(arg_shapes):
        spec = getattr(arg_shapes[0].sharding, "spec", None)
        return spec[0] if spec else None

    def out_shardings(mesh, axis):
        s = NamedSharding(mesh, PartitionSpec(axis))
        return s if n_out == 1 else (s,) * n_out

    def infer(stride, padding, mesh, arg_shapes, result_shape):
        return out_shardings(mesh, batch_axis(arg_shapes))

    def partition(stride, padding, mesh, arg_shapes, result_shape):
        axis = batch_axis(arg_shapes)
        ins = tuple(NamedSharding(mesh, PartitionSpec() if i == 1 else PartitionSpec(axis)) for i in range(n_in))
        return mesh, lambda *arrays: call(*arrays, stride, padding), out_shardings(mesh, axis), ins

    # x: n h w c, kernel: i j o c, cotangent: n p q c; only the batch n may stay sharded
    operands = ["n h w c", "i j o c", "n p q c"][:n_in]
    results = "n p q c" if n_out == 1 else "n h w c, n i j c"
    op.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule=f"{', '.join(operands)} -> {results}",
                     need_replication_factors=("h", "w", "i", "j", "o", "p", "q", "c"))
    return op


_forward = _batch_sharded(_forward_call, 1, 2)
_backward = _batch_sharded(_backward_call, 2, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """Depthwise convolution of NHWC float32 `x` with a (kh, kw, 1, C) kernel, `padding` ((top, bottom), (left,
    right)) explicit: the numbers of `layers.shifted_depthwise_conv`, by the C++ kernels. Reverse-mode only."""
    return _forward(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding):
    return _forward(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, residuals, g):
    x, kernel = residuals
    dx, dk_per_sample = _backward(x, kernel, g, stride, padding)
    return dx, jnp.sum(dk_per_sample, axis=0)[:, :, None, :].astype(kernel.dtype)


depthwise_conv.defvjp(_fwd, _bwd)
