"""The C++ depthwise kernels (`effnet_jax.kernels.native`, `depthwise_impl='native'`) against torch, and how they are
built, found, refused and partitioned."""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnet_jax.model import layers
from effnet_jax.kernels import native

torch = pytest.importorskip("torch")
F = torch.nn.functional
REPO = Path(__file__).resolve().parents[1]

# skipped only where no C++ compiler is found; with one, a kernel that does not build fails the tests (where 'auto'
# would fall back to the shifted sum, and the rest of the suite pass without the kernels)
pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler found")

# channels: 6 (the kernels' one-channel-at-a-time tail), 40 (two 16-wide blocks and an 8-wide one)
SHAPES = [(3, 1, 9, 6), (3, 2, 9, 40), (5, 2, 10, 40), (5, 1, 7, 6), (3, 2, 8, 24)]


def _torch_depthwise(x_nhwc, w_hwio, stride, pads):
    c = x_nhwc.shape[-1]
    xt = F.pad(x_nhwc.permute(0, 3, 1, 2), (*pads[1], *pads[0]))
    return F.conv2d(xt, w_hwio.permute(3, 2, 0, 1), stride=stride, groups=c).permute(0, 2, 3, 1)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("kernel,stride,size,channels", SHAPES)
def test_native_depthwise_and_its_gradients_equal_torch(padding, kernel, stride, size, channels):
    """Output and gradients (of sum(sin(y))) against torch in float64."""
    rng = np.random.RandomState(kernel * 10 + stride + size + channels)
    x = rng.randn(2, size, size + 1, channels).astype(np.float32)
    w = rng.randn(kernel, kernel, 1, channels).astype(np.float32)
    pads = tuple(layers.conv_padding(padding, s, kernel, stride) for s in x.shape[1:3])
    y, vjp = jax.vjp(lambda a, b: layers.depthwise_conv(a, b, stride, pads, "native"), jnp.asarray(x), jnp.asarray(w))
    gx, gw = vjp(jnp.cos(y))
    xt, wt = (torch.from_numpy(a).double().requires_grad_() for a in (x, w))
    ref = _torch_depthwise(xt, wt, stride, pads)
    torch.sin(ref).sum().backward()
    np.testing.assert_allclose(y, ref.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, xt.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gw, wt.grad.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["silu", "relu6"])
@pytest.mark.parametrize("kernel,stride,size,channels", SHAPES)
def test_fused_batchnorm_activation_depthwise_equals_torch(act, kernel, stride, size, channels):
    """`layers.bn_act_depthwise_conv`: the depthwise convolution of act(BatchNorm(z)) in training mode, against
    torch's BatchNorm2d (train) -> activation -> grouped conv in float64: output, batch statistics and every
    gradient. (torch's own float32 gradients of scale and bias are up to 4e-5 from float64 on these shapes.)"""
    rng = np.random.RandomState(kernel + stride * 7 + size + channels)
    z = (rng.randn(3, size, size, channels) * 2 + 0.5).astype(np.float32)
    gamma = (1 + 0.3 * rng.randn(channels)).astype(np.float32)
    beta = (0.5 * rng.randn(channels)).astype(np.float32)
    w = rng.randn(kernel, kernel, 1, channels).astype(np.float32)
    pads = tuple(layers.conv_padding("same", s, kernel, stride) for s in z.shape[1:3])
    (y, mean, var), vjp = jax.vjp(lambda *a: layers.bn_act_depthwise_conv(*a, 1e-3, act, stride, pads),
                                  *map(jnp.asarray, (z, gamma, beta, w)))
    grads = vjp((jnp.cos(y), jnp.zeros_like(mean), jnp.zeros_like(var)))
    zt, gt, bt, wt = (torch.from_numpy(a).double().requires_grad_() for a in (z, gamma, beta, w))
    a = F.batch_norm(zt.permute(0, 3, 1, 2), None, None, gt, bt, training=True, eps=1e-3).permute(0, 2, 3, 1)
    ref = _torch_depthwise(F.silu(a) if act == "silu" else F.relu6(a), wt, stride, pads)
    torch.sin(ref).sum().backward()
    np.testing.assert_allclose(y, ref.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mean, z.astype(np.float64).mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(var, z.astype(np.float64).var(axis=(0, 1, 2)), rtol=1e-6)
    for name, g, t in zip(("z", "scale", "bias", "kernel"), grads, (zt, gt, bt, wt)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=1e-4, rtol=1e-5, err_msg=name)


# (kernel, stride, size, channels, expansion's input channels or None): channels 72 = one 64-wide group of the
# expansion + 8; 101 = 64 + two 16-wide blocks + 5 single channels; widths 7 and 11 leave 1 and 5 pixels after the
# expansion's 6-pixel tiles; 5x5 on 7 px has no position whose taps all lie inside
# A tuple in place of the input channels: a stem in front, (input channels, kernel, stride, padding)
INFERENCE_SHAPES = [(3, 1, 7, 72, 5), (5, 2, 11, 101, 17), (3, 2, 9, 40, None), (5, 1, 7, 6, None), (3, 1, 12, 24, 3),
                    (3, 1, 15, 32, (3, 3, 2, "symmetric")), (3, 2, 16, 40, (3, 3, 2, "same")),
                    (5, 1, 9, 16, (2, 3, 1, "same"))]


def _running_bn(rng, c):
    """A BatchNorm's running mean and variance, scale and bias, away from the identity."""
    return ((rng.randn(c) * 0.5).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32),
            (1 + 0.3 * rng.randn(c)).astype(np.float32), (0.5 * rng.randn(c)).astype(np.float32))


@pytest.mark.parametrize("kernel,stride,size,channels,cin,act", [
    (*shape, act) for shape in INFERENCE_SHAPES for act in ("silu", "relu6", None)
    if act or shape[-1] is None])  # an expansion comes with its BatchNorm and activation
def test_fused_inference_equals_torch(kernel, stride, size, channels, cin, act):
    """`layers.fused_depthwise_inference` (one pass of the C++ kernel in inference mode): [x @ expand, or the stem's
    convolution of x ->] BatchNorm -> act -> depthwise -> BatchNorm -> act, both BatchNorms with running statistics,
    and the output's mean over positions, against torch in float64; and its gradients (through the shifted sum)
    against torch's."""
    rng = np.random.RandomState(kernel + stride * 7 + size + channels)
    stem = cin if isinstance(cin, tuple) else None
    x = (rng.randn(2, size, size + 1, stem[0] if stem else cin or channels) * 2 + 0.5).astype(np.float32)
    expand_conv, hw = None, x.shape[1:3]
    if stem:
        in_c, ek, es, mode = stem
        expand = (rng.randn(ek, ek, in_c, channels) / np.sqrt(ek * ek * in_c)).astype(np.float32)
        epads = tuple(layers.conv_padding(mode, s, ek, es) for s in hw)
        expand_conv, hw = (es, epads), tuple((s + sum(p) - ek) // es + 1 for s, p in zip(hw, epads))
    else:
        expand = (rng.randn(cin, channels) / np.sqrt(cin)).astype(np.float32) if cin else None
    bn_in, bn_out = _running_bn(rng, channels), _running_bn(rng, channels)
    w = rng.randn(kernel, kernel, 1, channels).astype(np.float32)
    pads = tuple(layers.conv_padding("same", s, kernel, stride) for s in hw)
    eps = 1e-3

    def fold(mean, var, gamma, beta):  # what BatchNorm(fold=True) returns
        return mean, gamma / jnp.sqrt(var + eps), beta

    out_act = "relu6" if act == "relu6" else "silu"
    args = (jnp.asarray(x), None if expand is None else jnp.asarray(expand), [jnp.asarray(a) for a in bn_in],
            jnp.asarray(w), [jnp.asarray(a) for a in bn_out])
    f = lambda x, e, bi, w, bo: layers.fused_depthwise_inference(  # noqa: E731
        x, e, fold(*bi) if act else None, w, fold(*bo), act, out_act, stride, pads, True, expand_conv)
    (y, pooled), vjp = jax.vjp(f, *args)
    grads = vjp((jnp.cos(y), jnp.ones_like(pooled)))

    tensors = [torch.from_numpy(a).double().requires_grad_() for a in (x, *(() if expand is None else (expand,)),
                                                                          *bn_in, w, *bn_out)]
    xt, et = tensors[0], (tensors[1] if expand is not None else None)
    bit, wt, bot = tensors[-9:-5], tensors[-5], tensors[-4:]
    acts = {"silu": F.silu, "relu6": F.relu6}

    def bn(t, mean, var, gamma, beta):
        return (t - mean) / torch.sqrt(var + eps) * gamma + beta

    if stem:
        z = F.conv2d(F.pad(xt.permute(0, 3, 1, 2), (*expand_conv[1][1], *expand_conv[1][0])), et.permute(3, 2, 0, 1),
                     stride=expand_conv[0]).permute(0, 2, 3, 1)
    else:
        z = xt @ et if et is not None else xt
    a = acts[act](bn(z, *bit)) if act else z
    ref = acts[out_act](bn(_torch_depthwise(a, wt, stride, pads), *bot))
    (torch.sin(ref).sum() + ref.mean(dim=(1, 2)).sum()).backward()
    np.testing.assert_allclose(y, ref.detach().numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(pooled, ref.detach().mean(dim=(1, 2)).numpy(), atol=1e-5, rtol=1e-5)
    flat = jax.tree_util.tree_leaves(grads)
    assert len(flat) == len(tensors)
    for g, t in zip(flat, tensors):  # float32 sums over the positions: to 2e-5 of the gradient's largest entry
        want = t.grad if t.grad is not None else torch.zeros_like(t)  # act None: the input BatchNorm is unused
        np.testing.assert_allclose(g, want.numpy(), atol=2e-5 * float(want.abs().max()) + 1e-6, rtol=1e-5)


def test_auto_picks_native_for_units_that_train_in_float32():
    assert layers.resolve_depthwise_impl("auto") == "native"
    assert layers.resolve_depthwise_impl("auto", inference=True) == "shift"  # XLA fuses it with its neighbours
    # in inference mode, with what follows it (BatchNorm, activation, SE's pooling) and what precedes it (the
    # expansion) in the same pass
    assert layers.resolve_depthwise_impl("auto", inference=True, output_fused=True) == "native"
    assert layers.resolve_depthwise_impl("auto", jnp.bfloat16) == "shift"
    with pytest.raises(ValueError, match="float32 only"):
        layers.resolve_depthwise_impl("native", jnp.bfloat16)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=600)


def test_built_once_into_the_cache_then_reused(tmp_path):
    code = """
        import json, os
        from effnet_jax.kernels import native
        first = native.build()
        mtime = first.stat().st_mtime_ns
        print(json.dumps({"path": str(first), "again": str(native.build()), "same_file": native.build().stat()
                          .st_mtime_ns == mtime, "available": native.available()}))
    """
    r = _python(code, EFFNET_JAX_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["path"]).parent == tmp_path / "cache" / "kernels" and Path(out["path"]).is_file()
    assert out["again"] == out["path"] and out["same_file"] and out["available"]
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()] == [Path(out["path"]).name]  # no temporary left


def test_without_a_compiler_or_cache_auto_falls_back_and_native_says_why(tmp_path):
    code = """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from effnet_jax.kernels import native
        from effnet_jax.model import layers
        print("auto:", layers.resolve_depthwise_impl("auto"))
        try:
            layers.resolve_depthwise_impl("native")
        except native.NativeUnavailable as e:
            print("native:", e)
    """
    r = _python(code, EFFNET_JAX_CACHE=str(tmp_path / "cache"), CXX=str(tmp_path / "no-such-compiler"))
    assert r.returncode == 0, r.stderr
    assert "auto: shift" in r.stdout
    assert "native: compiling with" in r.stdout and "no-such-compiler" in r.stdout
    assert r.stderr.count("native CPU depthwise kernel is unavailable") == 1, r.stderr
    (tmp_path / "a-file").write_text("")
    unwritable = _python(code, EFFNET_JAX_CACHE=str(tmp_path / "a-file" / "cache"))
    assert unwritable.returncode == 0, unwritable.stderr
    assert "auto: shift" in unwritable.stdout and "native: cannot write the kernel cache" in unwritable.stdout
    off = _python("from effnet_jax.model import layers; print(layers.resolve_depthwise_impl('auto'))",
                  EFFNET_JAX_NATIVE="0")
    assert off.returncode == 0 and off.stdout.strip() == "shift" and "unavailable" not in off.stderr


def test_batch_sharded_step_runs_the_kernels_on_each_devices_samples():
    """Two CPU devices, the batch sharded: each device's kernel call sees its 4 of the 8 samples (custom
    partitioning), not all 8 gathered, and the gradients equal one device's."""
    code = """
        import json, re
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from effnet_jax.model import layers
        rng = np.random.RandomState(0)
        z, w = rng.randn(8, 12, 12, 32).astype(np.float32), rng.randn(3, 3, 1, 32).astype(np.float32)
        scale, bias = np.ones(32, np.float32), np.zeros(32, np.float32)
        pads = ((1, 1), (1, 1))
        def loss(z, scale, bias, w):
            y = layers.bn_act_depthwise_conv(z, scale, bias, w, 1e-3, "silu", 1, pads)[0]
            return jnp.sum(jnp.sin(layers.depthwise_conv(y, w, 1, pads, "native")))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        one = grad(z, scale, bias, w)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        zs = jax.device_put(z, NamedSharding(mesh, P("data")))
        rep = lambda a: jax.device_put(a, NamedSharding(mesh, P()))
        two = grad(zs, rep(scale), rep(bias), rep(w))
        hlo = grad.lower(zs, rep(scale), rep(bias), rep(w)).compile().as_text()
        batches = {int(m.group(1)) for line in hlo.splitlines() if 'custom_call_target="effnet_jax_depthwise' in line
                   for m in [re.search(r"= \\(?f32\\[(\\d+),", line)]}
        print(json.dumps({"devices": jax.device_count(), "kernel_batches": sorted(batches),
                          "rel_diff": max(float(np.max(np.abs(a - b)) / np.max(np.abs(a))) for a, b in zip(one, two)),
                          "dz_sharding": str(two[0].sharding.spec)}))
    """
    r = _python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["kernel_batches"] == [4], out   # each device: its half of the batch
    assert out["rel_diff"] < 3e-5, out         # the sums' order differs: shift's two-device step differs as much
    assert out["dz_sharding"] == "P('data',)", out


def test_batch_sharded_inference_runs_the_kernel_on_each_devices_samples():
    """The inference kernel (with the expansion) on two CPU devices, the batch sharded: each device's call sees 4
    of the 8 samples, and the output and pooled means equal one device's."""
    code = """
        import json, re
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from effnet_jax.model import layers
        rng = np.random.RandomState(0)
        x, e = rng.randn(8, 12, 12, 16).astype(np.float32), (rng.randn(16, 96) / 4).astype(np.float32)
        w = rng.randn(3, 3, 1, 96).astype(np.float32)
        affine = (np.zeros(96, np.float32), np.ones(96, np.float32), np.zeros(96, np.float32))
        f = jax.jit(lambda x, e, w, a: layers.fused_depthwise_inference(x, e, a, w, a, "silu", "silu", 2,
                                                                        ((0, 1), (0, 1)), True))
        one = f(x, e, w, affine)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        rep = lambda a: jax.device_put(a, NamedSharding(mesh, P()))
        args = (xs, rep(e), rep(w), jax.tree.map(rep, affine))
        two = f(*args)
        hlo = f.lower(*args).compile().as_text()
        batches = {int(m.group(1)) for line in hlo.splitlines() if 'custom_call_target="effnet_jax_depthwise' in line
                   for m in [re.search(r"= \\(?f32\\[(\\d+),", line)]}
        print(json.dumps({"kernel_batches": sorted(batches), "out_sharding": str(two[0].sharding.spec),
                          "diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))}))
    """
    r = _python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kernel_batches"] == [4], out
    assert out["out_sharding"] == "P('data',)", out
    assert out["diff"] == 0.0, out  # each sample's numbers are computed the same way on either device


def test_vmap_maps_one_call_per_element():
    """Per-example gradients (vmap over grad) with the kernels equal those of the shifted sum."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 16))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 16))
    pads = ((1, 1), (1, 1))
    grads = {impl: jax.jit(jax.vmap(jax.grad(
        lambda a, impl=impl: jnp.sum(jnp.sin(layers.depthwise_conv(a, k, 2, pads, impl))))))(x)
        for impl in ("native", "shift")}
    np.testing.assert_allclose(grads["native"], grads["shift"], atol=1e-5)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for ln in f if ln.startswith(("flags", "Features")) for w in ln.split(":", 1)[1].split()}
    except OSError:
        return set()


_GENERIC = {"x86_64": "x86-64", "aarch64": "armv8-a", "arm64": "armv8-a"}.get(platform.machine())
# (march, the lanes its form computes in, the CPU flags it needs)
FORMS = [("x86-64-v4", 16, {"avx512f"}), ("x86-64-v3", 8, {"avx2", "fma"}), (_GENERIC, 4, set())]

# In each form: forward and backward of the fused BatchNorm + activation + depthwise convolution (channels 24, 40,
# 21: whole vectors, narrower blocks, single channels), and the inference pass with the 1×1 expansion (widths 13 to
# 18: the expansion's pixel tiles and their remainders; channels 20 to 120: its tile groups, the 64-wide ones of the
# 16-lane form included, the tile of the blocks left, the narrower ones) and its pooled sums, against the shifted
# sum and XLA's operations.
FORM_CHECK = """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from effnet_jax.kernels import native
    from effnet_jax.model import layers
    print(json.dumps(native.form()))
    rng = np.random.RandomState(0)
    acts = {"silu": jax.nn.silu, "relu6": jax.nn.relu6}
    close = lambda a, b, atol, msg: np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=msg)

    def with_grads(f, *args):
        y, vjp = jax.vjp(f, *args)
        return (y, *vjp(jnp.cos(y)))

    # jitted: op by op, the shapes' many small compilations would take longer than the checks
    with_grads = jax.jit(with_grads, static_argnums=0)
    inference = jax.jit(layers.fused_depthwise_inference, static_argnums=(5, 6, 7, 8, 9))
    reference = jax.jit(layers._depthwise_inference_reference, static_argnums=(5, 6, 7, 8, 9, 10))

    for k, s, size, c, act in [(3, 1, 12, 24, "silu"), (5, 2, 13, 40, "relu6"), (3, 2, 14, 21, "silu")]:
        z = (rng.randn(2, size, size, c) * 2 + 0.5).astype(np.float32)
        gamma, beta = (1 + 0.3 * rng.randn(c)).astype(np.float32), (0.5 * rng.randn(c)).astype(np.float32)
        w = rng.randn(k, k, 1, c).astype(np.float32)
        pads = tuple(layers.conv_padding("same", size, k, s) for _ in range(2))
        got = with_grads(lambda *a: layers.bn_act_depthwise_conv(*a, 1e-3, act, s, pads)[0], z, gamma, beta, w)
        want = with_grads(lambda z, g, b, w: layers.shifted_depthwise_conv(
            acts[act](layers.batch_norm_train(z, g, b, 1e-3)[0]), w, s, pads), z, gamma, beta, w)
        for what, g, ref in zip(("y", "dz", "dscale", "dbias", "dkernel"), got, want):
            close(g, ref, 1e-5 if what == "y" else 1e-4, f"train {what}, {k}x{k} /{s}, {size} px, {c} channels")
    for k, s, size, c, cin, act in [(3, 1, 12, 24, 8, "silu"), (5, 2, 16, 40, 16, "relu6"), (3, 1, 17, 20, 6, "silu"),
                                   (3, 2, 14, 72, 24, "silu"), (5, 1, 15, 120, 40, "relu6")]:
        x = (rng.randn(2, size, size + 1, cin) * 2 + 0.5).astype(np.float32)
        e = (rng.randn(cin, c) / np.sqrt(cin)).astype(np.float32)
        bn = lambda: ((rng.randn(c) * 0.5).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32),
                      (0.5 * rng.randn(c)).astype(np.float32))  # folded: (mean, multiplier, bias)
        w, bn_in, bn_out = rng.randn(k, k, 1, c).astype(np.float32), bn(), bn()
        pads = tuple(layers.conv_padding("same", n, k, s) for n in x.shape[1:3])
        args = (x, e, bn_in, w, bn_out, act, act, s, pads, True)
        got, want = inference(*args), reference(*args, None)
        where = f"{k}x{k} /{s}, {size} px, {cin} -> {c} channels"
        close(got[0], want[0], 2e-5, f"inference y, {where}")
        close(got[1], want[1], 1e-5, f"inference pooled, {where}")
"""


@pytest.mark.parametrize("march,lanes,needs", [
    pytest.param(m, lanes, needs, id=f"{m}", marks=pytest.mark.skipif(
        m is None or not needs <= _cpu_flags(), reason=f"this CPU cannot run the {lanes}-lane form ({m})"))
    for m, lanes, needs in FORMS])
def test_every_form_this_cpu_runs_equals_the_shifted_sum(tmp_path, march, lanes, needs):
    """Each form of the kernels ($EFFNET_JAX_NATIVE_MARCH: AVX-512's 16 lanes, AVX2's 8, the generic 4) reports its
    lanes through `native.form()` and computes the numbers of the shifted sum: training's forward and backward, and
    the inference pass with the expansion."""
    r = _python(FORM_CHECK, EFFNET_JAX_NATIVE_MARCH=march, EFFNET_JAX_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stdout[:200] + r.stderr[-4000:]
    form = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith('{"march"')))
    assert form["march"] == march and form["lanes"] == lanes, form
