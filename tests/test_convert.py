"""The converted JAX model *is* the PyTorch model: forward logits and per-stage activations for B0-B7 and
V2-S/M/L (torchvision, random weights, randomized BN statistics), the real Lite0 ImageNet weights against the
Lite reference model on real images, and one Adam training step (torchvision's B0, V2-S; timm's tf_efficientnet_b0,
tf_efficientnetv2_b0: SAME padding, BN eps 1e-3)."""

import copy
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effnet_jax
from effnet_jax.model import variants
from effnet_jax.testing import (jax_stage_outputs, randomized_timm, randomized_torchvision, save_and_convert,
                                torch_stage_outputs, variant_seed)
from effnet_jax.weights import convert
from effnet_jax.weights.torch_reader import read_torch_state_dict
from helpers import cifar_jpegs

torch = pytest.importorskip("torch")
tv_models = pytest.importorskip("torchvision.models")


# B0 at its native 224 px; the others small to keep CI fast, but not 64 px: there the last stages are 2×2,
# each BN's statistics come from 8 values per channel, and float32 rounding reaches 1e-4..5e-4 in the logits
# (measured, with either depthwise implementation). At 96/128 px it stays at 1e-5..6e-5.
# V2 (40 / 57 / 79 blocks) at 128 px: logits within 1.2e-5 / 2.6e-5 / 4.2e-5 of torch's (measured); at 96 px
# V2-L's reached 1.06e-4, at 64 px V2-S's 1.2e-4.
@pytest.mark.parametrize("variant,resolution", [("b0", 224), ("b1", 96), ("b2", 96), ("b3", 96), ("b4", 96),
                                                ("b5", 128), ("b6", 128), ("b7", 128),
                                                ("v2_s", 128), ("v2_m", 128), ("v2_l", 128)])
def test_forward_equals_torchvision(variant, resolution, tmp_path):
    x = np.random.RandomState(0).randn(2, resolution, resolution, 3).astype(np.float32)
    m = randomized_torchvision(variant, variant_seed(variant), x)
    variables = save_and_convert(m, tmp_path, variant)
    t_outs, t_logits = torch_stage_outputs(m, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    # B0 with the backend's default depthwise implementation; the others with XLA's grouped conv, which runs
    # op by op ~40 % faster here (the implementations agree to 1e-5: tests/test_models.py)
    impl = "auto" if variant == "b0" else "xla"
    j_outs, j_logits, names = jax_stage_outputs(effnet_jax.create_model(variant, depthwise_impl=impl), variables, x)
    for name, t, j in zip(names, t_outs, j_outs):  # a failure names the first stage that differs
        # float32 rounding grows through the stages to ~1e-4 of the activations' range in the deepest ones;
        # a mapping error gives differences of the order of the activations themselves
        scale = max(1.0, float(np.abs(t).max()))
        np.testing.assert_allclose(j, t.transpose(0, 2, 3, 1), atol=3e-4 * scale, err_msg=f"{variant} {name}")
    assert np.abs(t_logits).max() > 0.5  # the comparison is not trivially about zeros
    np.testing.assert_allclose(j_logits, t_logits, atol=1e-4, rtol=0, err_msg=f"{variant} logits")


def test_legacy_format_and_new_head(tmp_path, caplog):
    m = randomized_torchvision("b0", 3, np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32))
    path = tmp_path / "b0_legacy.pth"
    torch.save(m.state_dict(), path, _use_new_zipfile_serialization=False)
    sd = read_torch_state_dict(path)
    with caplog.at_level("INFO"):
        v = convert.convert_state_dict(sd, "b0", num_classes=10, source=str(path))
    assert "new 10-class head" in caplog.text
    assert v["params"]["classifier"]["kernel"].shape == (1280, 10)
    assert not np.any(v["params"]["classifier"]["bias"])
    np.testing.assert_array_equal(v["params"]["stem"]["kernel"], sd["features.0.0.weight"].transpose(2, 3, 1, 0))
    bound = 1 / np.sqrt(10)  # torchvision's Linear init range for the fresh head
    assert np.abs(v["params"]["classifier"]["kernel"]).max() <= bound


def test_backbone_only_gives_torchvision_pooled_features(tmp_path):
    """num_classes=0: the converted backbone without a classifier, for create_model(variant, 0)."""
    x = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    m = randomized_torchvision("b0", 5, x)
    v = save_and_convert(m, tmp_path, "b0", num_classes=0)
    assert "classifier" not in v["params"]
    with torch.no_grad():
        t = torch.flatten(m.avgpool(m.features(torch.from_numpy(x).permute(0, 3, 1, 2))), 1).numpy()
    j = np.asarray(jax.jit(functools.partial(effnet_jax.create_model("b0", 0).apply, train=False))(v, x))
    assert j.shape == (2, 1280)
    # the same float32 tolerance as the deepest stages in test_forward_equals_torchvision
    np.testing.assert_allclose(j, t, atol=3e-4 * max(1.0, float(np.abs(t).max())), rtol=0)


def test_wrong_variant_names_the_key(tmp_path):
    sd = {k: v.numpy() for k, v in tv_models.efficientnet_b0().state_dict().items()}
    with pytest.raises(convert.ConversionError, match=r"features\.0\.0\.weight.*\(32, 3, 3, 3\).*b3"):
        convert.convert_state_dict(sd, "b3")
    with pytest.raises(convert.ConversionError, match=r"unexpected key 'features\.1\.1\.block"):
        convert.convert_state_dict({k: v.numpy() for k, v in tv_models.efficientnet_b1().state_dict().items()},
                                   "b0")
    with pytest.raises(convert.ConversionError, match="known layout"):
        convert.convert_state_dict({"foo.weight": np.zeros(3)}, "b0")
    # V2: the same stem width (24), but V2-M's first stage has a third block that V2-S's file lacks
    v2_s = {k: v.numpy() for k, v in tv_models.efficientnet_v2_s().state_dict().items()}
    with pytest.raises(convert.ConversionError, match=r"missing key 'features\.1\.2\.block\.0\.0\.weight' for v2_m"):
        convert.convert_state_dict(v2_s, "v2_m")


def _cifar_images(cifar_tar, n_per_class=2):
    """Real CIFAR-10 training JPEGs from the `cifar_tar` archive: the first `n_per_class` of each class (PIL, RGB)."""
    from PIL import Image
    images, counts = [], {}
    for cls, _, jpeg in cifar_jpegs(cifar_tar):
        if counts.get(cls, 0) < n_per_class:
            counts[cls] = counts.get(cls, 0) + 1
            images.append(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        if len(counts) == 10 and all(c >= n_per_class for c in counts.values()):
            break
    return images


def test_lite0_imagenet_weights_equal_reference(cifar_tar):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from effnet_jax.weights.published import weights_file
    from PIL import Image

    path = weights_file("lite0")
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    variables = effnet_jax.pretrained("lite0")
    images = _cifar_images(cifar_tar, n_per_class=1)  # 10 real images, one per class
    x = np.stack([np.asarray(im.resize((224, 224), Image.BICUBIC), np.float32) for im in images])
    x = (x - 127.0) / 128.0  # the Lite weights' normalization (see effnet_jax/weights/published.py)
    with torch.no_grad():
        t_logits = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    j_logits = np.asarray(jax.jit(effnet_jax.create_model("lite0").apply)(variables, jnp.asarray(x)))
    np.testing.assert_allclose(j_logits, t_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.argsort(-j_logits, 1)[:, :5], np.argsort(-t_logits, 1)[:, :5])


def _torch_adam_step(m, x_nchw, y, lr, eps):
    """One Adam step of torch model `m` (in its own dtype): (loss, its gradients and buffers as a state dict)."""
    opt = torch.optim.Adam(m.parameters(), lr=lr, eps=eps)
    loss = torch.nn.functional.cross_entropy(m(x_nchw.to(next(m.parameters()).dtype)), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    grads = {k: v.double().numpy() for k, v in m.state_dict().items()}
    grads.update({k: p.grad.double().numpy() for k, p in m.named_parameters()})
    opt.step()
    return loss.item(), grads


@pytest.mark.parametrize("source,name", [("torchvision", "b0"), ("torchvision", "v2_s"), ("timm", "tf_efficientnet_b0"),
                                         ("timm", "tf_efficientnetv2_b0")])
def test_adam_training_step_equals_pytorch(source, name, tmp_path):
    """One Adam step from identical weights and batch, train-mode BN, dropout and drop-path off: equal loss,
    gradients, updated parameters and updated BN running statistics, against the same torch model's step in
    float64 (the exact one) and, for the loss and BN statistics, its float32 step.

    Float64, not torch's float32, is the reference of the updated parameters: torch's own float32 step drifts with
    the CPU's vector unit. On AVX2 (AMD Zen 3, or `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`) V2-S's
    blocks_11 depthwise kernel came out 2.70e-05 off the float64 step in torch's float32, ours 3.7–4.0e-06 (with
    XLA restricted to AVX2 too, and on AVX-512); on AVX-512 both sides are within 5.4e-06 of it
    (benchmarks/results/equivalence.md, 2026-12-07). Our bound stays 1e-5; only its reference changed.

    Adam's eps is 1e-2 in both frameworks, not 1e-8. Adam's first step is lr * g / (|g| + eps), about
    lr * sign(g): where |g| is not far above float32 rounding its sign is arbitrary, in either framework.
    Such gradients exist: some are exactly zero in exact arithmetic (the BN bias of a block whose output feeds
    only a 1×1 conv and a train-mode BN, which subtracts any constant), and the depthwise kernels' gradients,
    sums over the whole batch of values up to ~30 here, carry ~1e-5 of absolute rounding (measured: the same
    against torch in float64). With eps=1e-8 either effect gives ±lr = 1e-3 differences; eps=1e-2 bounds them
    by lr * 1e-5 / eps = 1e-6. The gradients themselves are compared too, directly."""
    res, n, classes, lr, eps = 64, 8, 10, 1e-3, 1e-2
    rng = np.random.RandomState(1)
    x = rng.randn(n, res, res, 3).astype(np.float32)
    y = rng.randint(0, classes, n)
    if source == "timm":  # (timm's model: dropout and drop-path off; SAME padding, BN eps 1e-3 for the tf_ ports)
        pytest.importorskip("timm")
        m = randomized_timm(name, 7, x, num_classes=classes)
        variant, overrides = variants.TIMM_MODELS[name].variant, variants.TIMM_MODELS[name].overrides()
    else:
        m = randomized_torchvision(name, 7, x, num_classes=classes)
        for mod in m.modules():
            if hasattr(mod, "stochastic_depth"):
                mod.stochastic_depth.p = 0.0
        m.classifier[0].p = 0.0
        variant, overrides = name, {}
    variables = save_and_convert(m, tmp_path, variant)

    m.train()
    m64 = copy.deepcopy(m).double()
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    loss_64, grads_64 = _torch_adam_step(m64, x_t, y, lr, eps)
    loss_t, _ = _torch_adam_step(m, x_t, y, lr, eps)
    grads_t = convert.convert_state_dict(grads_64, variant)["params"]

    model = effnet_jax.create_model(variant, classes, drop_rate=0.0, drop_path_rate=0.0, **overrides)

    def loss_fn(params, batch_stats):
        logits, new = model.apply({"params": params, "batch_stats": batch_stats}, jnp.asarray(x), train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(), new

    tx = optax.adam(lr, eps=eps)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    (loss_j, new_state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params,
                                                                                    variables["batch_stats"])
    params = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(params, grads)

    # torch's float32 loss is itself up to ~1e-5 off the float64 one (v2_s: +9.5e-6), so a float32 loss as accurate
    # but off the other way could differ from torch's by up to twice that
    assert abs(float(loss_j) - loss_64) <= 1e-5
    assert abs(float(loss_j) - loss_t) <= 2e-5
    gmax = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_t))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_t)):
        np.testing.assert_allclose(np.asarray(a), b, atol=3e-5 * gmax, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
    exact = save_and_convert(m64, tmp_path, variant)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max()), params,
                                   exact["params"])
    worst = max(jax.tree_util.tree_leaves_with_path(diffs), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, (f"largest parameter difference from torch's float64 step {worst[1]:.2e} at "
                              f"{jax.tree_util.keystr(worst[0])}")
    # BN running statistics: torch's unbiased running_var update, matched (torch's float32 step)
    after = save_and_convert(m, tmp_path, variant)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new_state["batch_stats"]),
                            jax.tree_util.tree_leaves(after["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
