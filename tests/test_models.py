"""The architecture against independent references: torchvision's and the Lite reference's PyTorch models
(built here), the published counts, the rounding formulas, and statistics for stochastic depth."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effnet_jax
from effnet_jax.model import layers, variants
from effnet_jax.kernels import planner
from effnet_jax.model.network import count_flops, count_params, param_shapes, random_variables

torch = pytest.importorskip("torch")
tv_models = pytest.importorskip("torchvision.models")

B_VARIANTS = [f"b{i}" for i in range(8)]
LITE_VARIANTS = [f"lite{i}" for i in range(5)]
V2_VARIANTS = ["v2_s", "v2_m", "v2_l"]
# torchvision's documented parameter counts (EfficientNet_B*_Weights / EfficientNet_V2_*_Weights
# .IMAGENET1K_V1.meta["num_params"])
TORCHVISION_PARAMS = dict(zip(B_VARIANTS + V2_VARIANTS, [5_288_548, 7_794_184, 9_109_994, 12_233_232, 19_341_616,
                                                         30_389_784, 43_040_704, 66_347_960,
                                                         21_458_488, 54_139_356, 118_515_272]))


def _torch_numel(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", B_VARIANTS)
def test_params_and_channels_equal_torchvision(variant):
    tv = getattr(tv_models, f"efficientnet_{variant}")()
    ours = effnet_jax.create_model(variant)
    assert count_params(param_shapes(ours, 64)) == _torch_numel(tv) == TORCHVISION_PARAMS[variant]
    assert ours.config.stem_channels == tv.features[0][0].out_channels
    assert ours.config.head_channels == tv.features[-1][0].out_channels
    # block by block: kernel, stride, channels, SE width, residual, drop-path rate
    tv_blocks = [b for stage in tv.features[1:-1] for b in stage]
    assert len(tv_blocks) == len(ours.config.blocks)
    for ours_b, tv_b in zip(ours.config.blocks, tv_blocks):
        dw = [m for m in tv_b.block.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1][0]
        assert (ours_b.kernel, ours_b.stride, ours_b.expand_channels) == (dw.kernel_size[0], dw.stride[0],
                                                                           dw.in_channels)
        assert ours_b.se_channels == tv_b.block[-2].fc1.out_channels
        assert ours_b.out_channels == tv_b.block[-1][0].out_channels
        assert ours_b.residual == tv_b.use_res_connect
        assert ours_b.drop_path_rate == pytest.approx(tv_b.stochastic_depth.p)
    bn = tv.features[0][1]
    assert (ours.config.bn_epsilon, ours.config.bn_momentum) == (bn.eps, bn.momentum)
    assert ours.config.dropout == tv.classifier[0].p


@pytest.mark.parametrize("variant", V2_VARIANTS)
def test_v2_params_and_blocks_equal_torchvision(variant):
    """EfficientNetV2: counts, and block by block the kind (torchvision's FusedMBConv or MBConv), convs, SE width,
    residual and drop-path rate of torchvision's own model."""
    tv = getattr(tv_models, f"efficientnet_{variant}")()
    weights = getattr(tv_models, f"EfficientNet_{variant.upper()}_Weights").IMAGENET1K_V1
    ours = effnet_jax.create_model(variant)
    assert count_params(param_shapes(ours, 64)) == _torch_numel(tv) == TORCHVISION_PARAMS[variant] \
        == weights.meta["num_params"]
    assert ours.config.stem_channels == tv.features[0][0].out_channels
    assert ours.config.head_channels == tv.features[-1][0].out_channels == 1280
    tv_blocks = [b for stage in tv.features[1:-1] for b in stage]
    assert len(tv_blocks) == len(ours.config.blocks)
    assert ours.config.num_stages == len(tv.features) - 2
    for ours_b, tv_b in zip(ours.config.blocks, tv_blocks):
        convs = [m for m in tv_b.block.modules() if isinstance(m, torch.nn.Conv2d)]
        assert ours_b.fused == (type(tv_b).__name__ == "FusedMBConv")
        if ours_b.fused:  # k×k conv (stride) to the expansion (or straight to the output), [1×1 project]; no SE
            assert (ours_b.kernel, ours_b.stride, ours_b.in_channels) == (convs[0].kernel_size[0], convs[0].stride[0],
                                                                          convs[0].in_channels)
            assert convs[0].groups == 1 and ours_b.se_channels == 0
            assert ours_b.expand_channels == (convs[0].out_channels if len(convs) == 2 else ours_b.in_channels)
        else:
            dw = [m for m in convs if m.groups > 1][0]
            assert (ours_b.kernel, ours_b.stride, ours_b.expand_channels) == (dw.kernel_size[0], dw.stride[0],
                                                                               dw.in_channels)
            assert ours_b.se_channels == tv_b.block[-2].fc1.out_channels == max(1, ours_b.in_channels // 4)
        assert ours_b.out_channels == convs[-1].out_channels
        assert ours_b.residual == tv_b.use_res_connect
        assert ours_b.drop_path_rate == pytest.approx(tv_b.stochastic_depth.p)
    bn = tv.features[0][1]
    assert (ours.config.bn_epsilon, ours.config.bn_momentum) == (bn.eps, bn.momentum) == (1e-3, 0.1)
    assert ours.config.dropout == tv.classifier[0].p
    assert ours.config.resolution == weights.transforms().crop_size[0]


def test_v2_custom_scaling():
    """--width/--depth on V2 (TF EfficientNetV2's rules: round_filters on every channel count, the 1280 head
    included; ceil on repeats); at width = depth = 1 the config is the torchvision table's (tested above)."""
    cfg = variants.model_config("v2_s", width=0.25, depth=0.1)
    # ceil(0.1 * repeats): one block per stage, two in the last (15 repeats); channels round(c / 4) to 8
    assert [b.stage for b in cfg.blocks] == [0, 1, 2, 3, 4, 5, 5]
    assert (cfg.stem_channels, cfg.head_channels) == (8, 320)
    assert [b.out_channels for b in cfg.blocks] == [8, 16, 16, 32, 40, 64, 64]
    assert [b.fused for b in cfg.blocks] == [True] * 3 + [False] * 4
    assert cfg.blocks[0].expand_channels == cfg.blocks[0].in_channels  # expansion 1: the single-conv form
    out = jax.eval_shape(lambda: effnet_jax.create_model("v2_s", 3, width=0.25, depth=0.1).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert set(out["params"]["blocks_0"]) == {"conv", "bn"}
    assert set(out["params"]["blocks_1"]) == {"expand_conv", "expand_bn", "project_conv", "project_bn"}
    assert set(out["params"]["blocks_3"]) == {"expand_conv", "expand_bn", "dw_conv", "dw_bn", "se", "project_conv",
                                              "project_bn"}


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_params_equal_reference(variant):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_pkg.EfficientNet.from_name(f"efficientnet-{variant}")
    ours = effnet_jax.create_model(variant)
    assert count_params(param_shapes(ours, 64)) == _torch_numel(ref)
    assert ours.config.stem_channels == ref._conv_stem.out_channels == 32
    assert ours.config.head_channels == ref._conv_head.out_channels == 1280
    assert len(ours.config.blocks) == len(ref._blocks)
    for ours_b, ref_b in zip(ours.config.blocks, ref._blocks):
        assert ours_b.kernel == ref_b._depthwise_conv.kernel_size[0]
        assert ours_b.stride == ref_b._depthwise_conv.stride[0]
        assert ours_b.out_channels == ref_b._project_conv.out_channels
        assert not ref_b.has_se and ours_b.se_channels == 0
    assert (ours.config.activation, ours.config.padding) == ("relu6", "same")
    assert ours.config.bn_epsilon == ref._bn0.eps and ours.config.bn_momentum == pytest.approx(ref._bn0.momentum)


def test_gflops_equal_torchvision_metadata():
    # torchvision publishes GFLOPS (multiply-adds) at each weight set's crop size (B2: 288 px, not 260)
    for variant in B_VARIANTS + V2_VARIANTS:
        weights = getattr(tv_models, f"EfficientNet_{variant.upper()}_Weights").IMAGENET1K_V1
        crop = weights.transforms().crop_size[0]
        got = count_flops(variants.model_config(variant), resolution=crop) / 1e9
        assert round(got, 3) == weights.meta["_ops"], variant


def test_round_filters_formula():
    # (channels, width) -> expected, from the rule: nearest multiple of 8, +8 if that lost more than 10 %
    assert variants.round_filters(32, 1.0) == 32
    assert variants.round_filters(32, 1.1) == 32   # 35.2 -> 32 (>= 31.68)
    assert variants.round_filters(16, 1.1) == 16   # 17.6 -> 16 (>= 15.84)
    assert variants.round_filters(40, 1.2) == 48   # 48.0
    assert variants.round_filters(24, 1.4) == 32   # 33.6 -> 32
    assert variants.round_filters(112, 1.8) == 200  # 201.6 -> 200
    assert variants.round_filters(4, 1.0) == 8     # never below the divisor
    for c in range(8, 400, 8):
        for w in (1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0):
            r = variants.round_filters(c, w)
            assert r % 8 == 0 and r >= 0.9 * c * w and abs(r - c * w) <= 8
    assert [variants.round_repeats(n, 3.1) for n in (1, 2, 3, 4)] == [4, 7, 10, 13]


def test_phi_formula_matches_paper_bases():
    s = variants.scaling_for_phi(1.0)
    assert (s.width, s.depth) == (pytest.approx(1.1), pytest.approx(1.2))
    # the paper's constraint alpha * beta^2 * gamma^2 ~= 2: each phi step doubles FLOPs
    assert variants.ALPHA * variants.BETA**2 * variants.GAMMA**2 == pytest.approx(2.0, rel=0.05)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="b0.*lite4.*v2_l"):
        effnet_jax.create_model("b9")
    with pytest.raises(TypeError, match="unknown override"):
        effnet_jax.create_model("b0", widht=1.0)


def test_stem_stride_override_for_small_inputs():
    m = effnet_jax.create_model("b0", num_classes=10, stem_stride=1)
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert count_params(shapes) == TORCHVISION_PARAMS["b0"] - 1000 * 1281 + 10 * 1281
    out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 32, 32, 3)), mutable=["intermediates"]), shapes)
    assert out[1]["intermediates"]["head_out"][0].shape == (2, 2, 2, 1280)  # 32 / 16, not / 32


@pytest.mark.parametrize("dk_loop", [False, True], ids=["dk-unrolled", "dk-loop"])
@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("kernel,stride,size", [(3, 1, 9), (3, 2, 9), (5, 2, 10), (5, 1, 7), (3, 2, 8)])
def test_depthwise_impls_agree_with_torch(padding, kernel, stride, size, dk_loop, monkeypatch):
    # 'shift' computes its kernel gradient unrolled on small windows and as a loop over the taps on large ones,
    # where the backward pass keeps the forward's padded input (planner.LOOP_MIN_ELEMENTS): both forms, on these
    # small shapes; unrolled, the 3×3 stride-2 cases sum tap by tap, the others in one pass
    # (planner.kernel_grad_in_one_reduction)
    monkeypatch.setattr(planner, "LOOP_MIN_ELEMENTS", 0 if dk_loop else 1 << 62)
    rng = np.random.RandomState(kernel * 10 + stride + size)
    x = rng.randn(2, size, size + 1, 6).astype(np.float32)
    w = rng.randn(kernel, kernel, 1, 6).astype(np.float32)
    pads = tuple(layers.conv_padding(padding, s, kernel, stride) for s in x.shape[1:3])
    outs = {impl: np.asarray(layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride, pads, impl))
            for impl in ("shift", "xla")}
    # independent reference: torch's grouped conv on explicitly padded input
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (*pads[1], *pads[0]))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w).permute(3, 2, 0, 1), stride=stride, groups=6)
    ref = ref.permute(0, 2, 3, 1).numpy()
    for impl, out in outs.items():
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=impl)
    # gradients ('shift' has a hand-written backward pass) against torch autograd of the same loss
    grads = {impl: jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.depthwise_conv(a, b, stride, pads, impl))),
                            argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w)) for impl in ("shift", "xla")}
    xg = torch.from_numpy(x).requires_grad_()
    wg = torch.from_numpy(w).requires_grad_()
    xt = torch.nn.functional.pad(xg.permute(0, 3, 1, 2), (*pads[1], *pads[0]))
    y = torch.nn.functional.conv2d(xt, wg.permute(3, 2, 0, 1), stride=stride, groups=6)
    torch.sin(y).sum().backward()
    for impl, (gx, gw) in grads.items():
        np.testing.assert_allclose(gx, xg.grad.numpy(), atol=1e-5, rtol=1e-5, err_msg=impl)
        np.testing.assert_allclose(gw, wg.grad.numpy(), atol=1e-5, rtol=1e-5, err_msg=impl)
    for a, b in zip(grads["shift"], grads["xla"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,cin,padding,size", [
    (1, 1, 16, "symmetric", 9),   # expand / project / head: x @ kernel[0, 0]; inference: 16 products summed
    (3, 2, 3, "symmetric", 17),   # the stem: patches x matrix; inference: the sum of 27 tap products
    (3, 2, 3, "same", 16),        # the Lite / TF stem
    (3, 1, 32, "symmetric", 8),   # too deep for patches: stays a convolution
])
def test_conv_impls_agree_with_torch(kernel, stride, cin, padding, size):
    rng = np.random.RandomState(kernel * 10 + stride + cin)
    x = rng.randn(2, size, size + 1, cin).astype(np.float32)
    w = rng.randn(kernel, kernel, cin, 8).astype(np.float32)
    pads = tuple(layers.conv_padding(padding, s, kernel, stride) for s in x.shape[1:3])

    def loss(impl, inference):
        return lambda a, b: jnp.sum(jnp.sin(layers.conv(a, b, stride, pads, impl, inference=inference)))

    xg, wg = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    xt = torch.nn.functional.pad(xg.permute(0, 3, 1, 2), (*pads[1], *pads[0]))
    y = torch.nn.functional.conv2d(xt, wg.permute(3, 2, 0, 1), stride=stride)
    torch.sin(y).sum().backward()
    # `inference` only picks the computation (the stem's 27 tap products, the 16-channel 1×1's 16 products summed):
    # the same values, and its gradients are still right (autodiff of the sum), only not what a trained unit should run
    for impl, inference in itertools.product(("dot", "xla"), (False, True)):
        msg = f"{impl}, inference={inference}"
        out = layers.conv(jnp.asarray(x), jnp.asarray(w), stride, pads, impl, inference=inference)
        np.testing.assert_allclose(out, y.detach().permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4, err_msg=msg)
        gx, gw = jax.grad(loss(impl, inference), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
        np.testing.assert_allclose(gx, xg.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=msg)
        np.testing.assert_allclose(gw, wg.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=msg)
    assert layers.resolve_conv_impl("auto") == ("dot" if jax.default_backend() == "cpu" else "xla")


@pytest.mark.parametrize("size,cin", [(6, 16), (3, 16)], ids=["folded", "scaled-first"])
def test_gated_pointwise_conv_agrees_with_torch(size, cin):
    # squeeze-excitation's gate applied by the project conv (`conv(..., in_scale=gate)`): impl 'dot' folds it into
    # per-sample weights where H·W >= Cin (6×7 >= 16) and scales x first otherwise (3×4 < 16); both against torch's
    # conv2d of x * gate, with the gradients of x, the gate and the kernel
    rng = np.random.RandomState(size)
    x = rng.randn(3, size, size + 1, cin).astype(np.float32)
    gate = rng.rand(3, cin).astype(np.float32)
    w = rng.randn(1, 1, cin, 8).astype(np.float32)
    pads = ((0, 0), (0, 0))
    xg, sg, wg = (torch.from_numpy(a).requires_grad_() for a in (x, gate, w))
    y = torch.nn.functional.conv2d((xg * sg[:, None, None, :]).permute(0, 3, 1, 2), wg.permute(3, 2, 0, 1))
    torch.sin(y).sum().backward()
    for impl in ("dot", "xla"):
        f = lambda a, s, b: layers.conv(a, b, 1, pads, impl, in_scale=s)  # noqa: E731
        out = f(jnp.asarray(x), jnp.asarray(gate), jnp.asarray(w))
        np.testing.assert_allclose(out, y.detach().permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=1e-4, err_msg=impl)
        grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(
            jnp.asarray(x), jnp.asarray(gate), jnp.asarray(w))
        for g, ref in zip(grads, (xg, sg, wg)):
            np.testing.assert_allclose(g, ref.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize("train", [False, True])
def test_silu_and_its_gradient_equal_torch(train):
    # both forms (in inference mode on CPU x/2 · (1 + tanh(x/2))) against torch's SiLU, over the range activations
    # take and the saturated tails
    x = np.concatenate([np.linspace(-30, 30, 6001), [-1e4, -100.0, -20.0, 20.0, 100.0, 1e4],
                        np.random.RandomState(0).randn(4096) * 4]).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.silu(xt)
    yt.sum().backward()
    y, vjp = jax.vjp(layers.activation("silu", train), jnp.asarray(x))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=2e-6, rtol=2e-6)
    np.testing.assert_allclose(vjp(jnp.ones_like(y))[0], xt.grad.numpy(), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_activation_form_by_backend_and_mode(backend, monkeypatch):
    # the tanh form of SiLU only on CPU and only in inference mode; training and other backends keep jax.nn.silu
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers.activation("silu", True) is nn.silu
    assert layers.activation("silu", False) is (layers._silu_tanh if backend == "cpu" else nn.silu)
    assert layers.activation("relu6", False) is layers.activation("relu6", True) is nn.relu6


def test_same_padding_is_tensorflows():
    # TF SAME: out = ceil(in / s), pad_total = max((out-1)*s + k - in, 0), extra pixel at the end
    assert layers.conv_padding("same", 224, 3, 2) == (0, 1)
    assert layers.conv_padding("same", 225, 3, 2) == (1, 1)
    assert layers.conv_padding("same", 112, 5, 2) == (1, 2)
    assert layers.conv_padding("same", 14, 5, 1) == (2, 2)
    assert layers.conv_padding("symmetric", 224, 5, 2) == (2, 2)


def test_batchnorm_matches_torch_train_step():
    rng = np.random.RandomState(0)
    x = rng.randn(4, 5, 3, 7).astype(np.float32) * 3 + 1
    bn_t = torch.nn.BatchNorm2d(7, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        bn_t.running_mean.copy_(torch.from_numpy(rng.randn(7).astype(np.float32)))
        bn_t.running_var.copy_(torch.from_numpy(rng.rand(7).astype(np.float32) + 0.5))
        bn_t.weight.copy_(torch.from_numpy(rng.randn(7).astype(np.float32)))
    bn = layers.BatchNorm(momentum=0.01, epsilon=1e-3)
    v = {"params": {"scale": bn_t.weight.detach().numpy(), "bias": bn_t.bias.detach().numpy()},
         "batch_stats": {"mean": bn_t.running_mean.numpy().copy(), "var": bn_t.running_var.numpy().copy()}}
    bn_t.train()
    ref = bn_t(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    out, new = bn.apply(v, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["mean"], bn_t.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["var"], bn_t.running_var.numpy(), atol=1e-6)  # unbiased
    bn_t.eval()
    ref_eval = bn_t(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    out_eval = bn.apply({"params": v["params"], "batch_stats": new["batch_stats"]}, jnp.asarray(x),
                        use_running_average=True)
    np.testing.assert_allclose(out_eval, ref_eval, atol=1e-5)


def test_drop_path_statistics():
    rate, n = 0.3, 20_000
    x = jnp.ones((n, 2, 2, 3))
    dp = layers.DropPath(rate)
    assert dp.apply({}, x, deterministic=True) is x  # identity in eval
    y = np.asarray(dp.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    per_sample = y.reshape(n, -1)
    assert np.all(per_sample == per_sample[:, :1])  # the whole sample is dropped or kept
    kept = per_sample[:, 0] != 0
    np.testing.assert_allclose(per_sample[kept, 0], 1 / (1 - rate), rtol=1e-6)  # survivors rescaled
    # kept count ~ Binomial(n, 0.7): within 5 standard deviations
    assert abs(kept.sum() - n * (1 - rate)) < 5 * math.sqrt(n * rate * (1 - rate))
    # unbiased: the mean over samples stays ~1
    assert abs(per_sample.mean() - 1.0) < 5 * math.sqrt(rate / (1 - rate) / n)


def _loss(model, x, y, key):
    def f(params, batch_stats):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                rngs={"dropout": key}, mutable=["batch_stats"])
        return -jnp.mean(jnp.sum(nn.log_softmax(logits) * jax.nn.one_hot(y, logits.shape[-1]), -1))
    return f


LOWER_SLOW = ("b7", "v2_m", "v2_l")  # the largest graphs: 8-14 s of tracing each


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in LOWER_SLOW else v
                                     for v in B_VARIANTS + LITE_VARIANTS + V2_VARIANTS])
def test_jit_grad_lowers_for_every_variant(variant):
    """Tracing + lowering of jit(grad(loss)) for every variant (shapes, dtypes, differentiability; B7, V2-M and
    V2-L with `-m slow`); the compiled run of each is in the slow suite; Lite0's below, B0's in test_convert's
    Adam-step test."""
    model = effnet_jax.create_model(variant, num_classes=10, depthwise_impl="xla")  # fewer ops: faster tracing
    shapes = param_shapes(model, 32)
    x, y = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    lowered = jax.jit(jax.grad(_loss(model, x, y, jax.random.key(0)))).lower(shapes["params"],
                                                                            shapes["batch_stats"])
    out = jax.tree_util.tree_leaves(lowered.out_info)
    assert [o.shape for o in out] == [p.shape for p in jax.tree_util.tree_leaves(shapes["params"])]


def _run_jit_grad(variant, dtype=jnp.float32):
    model = effnet_jax.create_model(variant, num_classes=10, dtype=dtype)
    variables = random_variables(model, 32)
    x = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3), jnp.float32)
    y = jnp.arange(4) % 10
    grads = jax.jit(jax.grad(_loss(model, x, y, jax.random.key(0))))(variables["params"], variables["batch_stats"])
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    return grads


def test_jit_grad_runs():
    _run_jit_grad("lite0")


@pytest.mark.slow
@pytest.mark.parametrize("variant", [v for v in B_VARIANTS + LITE_VARIANTS + V2_VARIANTS if v != "lite0"])
def test_jit_grad_runs_every_variant(variant):
    _run_jit_grad(variant)


def test_bfloat16_compute_keeps_float32_params():
    model32 = effnet_jax.create_model("lite0", num_classes=10)
    model16 = effnet_jax.create_model("lite0", num_classes=10, dtype=jnp.bfloat16)
    variables = random_variables(model32, 32)
    x = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3), jnp.float32)
    y32, y16 = jax.jit(lambda v, x: (model32.apply(v, x), model16.apply(v, x)))(variables, x)
    assert y16.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(param_shapes(model16, 32)))
    # bf16 keeps ~3 significant digits: logits agree to a few percent of their range
    assert float(jnp.abs(y16 - y32).max()) < 0.05 * float(jnp.abs(y32).max())


def test_num_classes_zero_returns_features():
    model = effnet_jax.create_model("lite0", num_classes=0)
    shapes = param_shapes(model, 32)
    assert "classifier" not in shapes["params"]
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 32, 32, 3))), shapes)
    assert out.shape == (3, 1280)


def test_shift_depthwise_bf16_gradients_track_float32():
    # the hand-written backward accumulates the kernel gradient in float32: in bf16 compute it must stay within
    # bf16 rounding of the float32 (XLA grouped-conv autodiff) gradient, summed over 2·32·32 positions
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 32, 32, 8).astype(np.float32))
    w = jnp.asarray(rng.randn(3, 3, 1, 8).astype(np.float32))
    pads = ((1, 1), (1, 1))

    def grads(impl, dtype):
        f = lambda a, b: jnp.sum(layers.depthwise_conv(a.astype(dtype), b.astype(dtype), 1, pads, impl)
                                 .astype(jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(x, w)

    gx, gw = grads("shift", jnp.bfloat16)
    rx, rw = grads("xla", jnp.float32)
    np.testing.assert_allclose(gw, rw, rtol=2e-2, atol=2e-2 * float(jnp.abs(rw).max()))
    np.testing.assert_allclose(gx, rx, rtol=5e-2, atol=2e-2 * float(jnp.abs(rx).max()))
