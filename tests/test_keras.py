"""Keras applications' EfficientNet files read without Keras (effnet_jax.weights.keras) compute what Keras computes:
parameter counts and the table's layer order for every supported model, logits of B0 and V2-B0 (random weights,
random BN statistics) through a .weights.h5 and a .keras file, the fine-tuning guide's head (BN folded into the
Dense), and strictness (unknown, missing or misshapen variables, other files)."""

import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

import effnet_jax  # noqa: E402
from effnet_jax.errors import ConfigError, UserError  # noqa: E402
from effnet_jax.model import variants  # noqa: E402
from effnet_jax.model.network import count_params, param_shapes  # noqa: E402
from effnet_jax.weights.keras import (KERAS_APPLICATIONS, ConversionError, _snake, keras_table,  # noqa: E402
                                      read_keras)

APPS = {port.variant: name for name, port in variants.KERAS_MODELS.items()}  # 'b0' -> 'efficientnetb0'
FUNCTIONS = {port.variant: KERAS_APPLICATIONS[name] for name, port in variants.KERAS_MODELS.items()}
RES = 64  # logits match to ~1e-7 at 64 px (measured 5e-8 for B0, 9e-8 for V2-B0): no need for more
# The V1 Normalization's statistics in Keras' ImageNet files: the mean, and the std stored as the variance (the
# extra Rescaling of weights='imagenet' models makes up for it, keras-team/keras TF issue 49930)
KERAS_IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def app(variant):
    return getattr(keras.applications, FUNCTIONS[variant])


def randomize(model, seed):
    """Random weights in place: kernels ~ N(0, 1/fan_in) (Dense 3x, for logits of order 1), biases ~ N(0, 0.1), BN
    gamma ~ U(0.5, 1.5), beta and moving mean ~ N(0, 0.1), moving variance ~ U(0.5, 2); V1's Normalization gets
    Keras' ImageNet statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        cls = type(layer).__name__
        if not ws or isinstance(layer, keras.Model):  # a nested model keeps its weights
            continue
        if cls == "BatchNormalization":
            c = ws[0].shape
            new = [rng.uniform(0.5, 1.5, c), 0.1 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                   rng.uniform(0.5, 2.0, c)]
        elif cls == "Normalization":
            new = [*KERAS_IMAGENET_NORM, ws[2]]
        else:
            k = ws[0]
            fan = k.shape[0] * k.shape[1] if cls == "DepthwiseConv2D" else int(np.prod(k.shape[:-1]))
            gain = 3.0 if cls == "Dense" else 1.0
            new = [gain * rng.standard_normal(k.shape) / np.sqrt(fan)] + [0.1 * rng.standard_normal(w.shape)
                                                                           for w in ws[1:]]
        layer.set_weights([np.asarray(w, ws[i].dtype) for i, w in enumerate(new)])
    return model


def images(seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (2, RES, RES, 3)).astype(np.float32)


def ours(w, x):
    """Our model's output on 0..255 images `x`, fed as x / 255 normalized by the file's mean/std."""
    model = effnet_jax.create_model(w.variant, w.num_classes, **w.overrides)
    x01 = (x / 255.0 - np.asarray(w.mean, np.float32)) / np.asarray(w.std, np.float32)
    return np.asarray(model.apply(w.variables, x01.astype(np.float32), train=False))


def same_variables(a, b):
    import jax

    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


# --- parameter counts and the table, every model -------------------------------------------------------------------

def check_counts_and_order(km, variant):
    """Keras' trainable parameters == ours; the table's layers are in `model.layers`' order (which numbers the h5
    groups)."""
    keras_params = sum(int(np.prod(w.shape)) for w in km.trainable_weights)
    assert count_params(param_shapes(effnet_jax.create_model(variant, km.output_shape[-1]), 64)) == keras_params
    table = keras_table(variants.model_config(variant))
    for kind in ("conv2d", "depthwise_conv2d", "batch_normalization", "dense"):
        want = list(dict.fromkeys(e.layer for e in table if e.kind == kind))
        assert [la.name for la in km.layers if _snake(type(la).__name__) == kind] == want, kind


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b1", "b2", "b3", "b4", "b5", "b6", "b7", "v2_b1", "v2_b2", "v2_b3", "v2_s",
                                     "v2_m", "v2_l"])
def test_param_counts_and_table_slow(variant, tmp_path):
    """`check_counts_and_order` for the models the default run does not build (B0 and V2-B0: in
    `test_logits_equal_keras`); the application's own .weights.h5 (random init) reads with every variable mapped."""
    km = app(variant)(weights=None)
    check_counts_and_order(km, variant)
    path = tmp_path / f"{variant}.weights.h5"
    km.save_weights(path)
    w = read_keras(path, variant)
    assert (w.variant, w.num_classes) == (variant, 1000)
    assert w.overrides["padding"] == "same" and w.overrides["bn_epsilon"] == 1e-3


# --- logits against Keras -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def b0_files(tmp_path_factory):
    """A randomized EfficientNetB0 (10 classes, logits), its files and its outputs on `images()`."""
    d = tmp_path_factory.mktemp("keras_b0")
    km = randomize(keras.applications.EfficientNetB0(weights=None, input_shape=(RES, RES, 3), classes=10,
                                                     classifier_activation=None), 0)
    km.save_weights(d / "b0.weights.h5")
    km.save(d / "b0.keras")
    return d, np.asarray(km.predict(images(), verbose=0)), km


@pytest.mark.parametrize("variant", ["b0", "v2_b0"])
def test_logits_equal_keras(variant, b0_files, tmp_path):
    """Max abs logit difference <= 1e-5 (the logits are of order 1; measured 5e-8 / 9e-8), through both files; the
    parameter count and the layer order of the model (`check_counts_and_order`)."""
    if variant == "b0":
        d, want, km = b0_files
    else:
        d = tmp_path
        km = randomize(keras.applications.EfficientNetV2B0(weights=None, input_shape=(RES, RES, 3), classes=10,
                                                           classifier_activation=None), 0)
        km.save_weights(d / f"{variant}.weights.h5")
        km.save(d / f"{variant}.keras")
        want = np.asarray(km.predict(images(), verbose=0))
    check_counts_and_order(km, variant)
    assert np.abs(want).max() > 0.5
    for name, arg in ((f"{variant}.weights.h5", variant), (f"{variant}.keras", None)):
        w = read_keras(d / name, arg)
        assert (w.variant, w.num_classes, w.keras_name) == (variant, 10, APPS[variant])
        np.testing.assert_allclose(ours(w, images()), want, atol=1e-5, rtol=0, err_msg=name)
    assert w.resolution == RES
    if variant == "b0":  # Rescaling(1/255) then Normalization(mean, variance) of the file: std = sqrt(variance)
        np.testing.assert_allclose(w.mean, KERAS_IMAGENET_NORM[0], rtol=1e-6)
        np.testing.assert_allclose(w.std, np.sqrt(KERAS_IMAGENET_NORM[1]), rtol=1e-6)
        assert w.overrides == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.01}
    else:  # fixed ImageNet mean / std
        np.testing.assert_allclose(w.mean, (0.485, 0.456, 0.406), rtol=1e-6)
        np.testing.assert_allclose(w.std, (0.229, 0.224, 0.225), rtol=1e-6)
        assert w.overrides == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.1}


def test_guide_head_folds_batchnorm(tmp_path, monkeypatch, caplog):
    """keras.io's fine-tuning guide: EfficientNetB0(include_top=False, input_tensor=inputs, weights='imagenet')
    -> GlobalAveragePooling2D -> BatchNormalization -> Dropout -> Dense(softmax, name='pred'). The ImageNet download
    is stubbed (weights randomized instead); what matters is the extra Rescaling(1/sqrt(std)) such a model has."""
    from keras.src.applications import efficientnet

    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: "stub")
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, *a, **k: None)
    inputs = keras.layers.Input(shape=(RES, RES, 3))
    base = keras.applications.EfficientNetB0(include_top=False, input_tensor=inputs, weights="imagenet")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.2, name="top_dropout")(x)
    outputs = keras.layers.Dense(7, activation="softmax", name="pred")(x)
    km = randomize(keras.Model(inputs, outputs, name="EfficientNet"), 2)
    km.save(tmp_path / "guide.keras")
    km.save_weights(tmp_path / "guide.weights.h5")
    probs = np.asarray(km.predict(images(), verbose=0))
    for name, arg in (("guide.keras", None), ("guide.weights.h5", "b0")):
        with caplog.at_level("INFO"):
            w = read_keras(tmp_path / name, arg)
        assert (w.variant, w.num_classes) == ("b0", 7)
        assert "folded into Dense 'pred'" in w.source and "folded" in caplog.text
        logits = ours(w, images())
        p = np.exp(logits - logits.max(-1, keepdims=True))
        np.testing.assert_allclose(p / p.sum(-1, keepdims=True), probs, atol=1e-6, rtol=0, err_msg=name)
        # Normalization(mean, variance=std) then 1/sqrt(std): the ImageNet mean and std
        np.testing.assert_allclose(w.mean, KERAS_IMAGENET_NORM[0], rtol=1e-6)
        np.testing.assert_allclose(w.std, KERAS_IMAGENET_NORM[1], rtol=1e-6)


def test_nested_base_and_no_top(b0_files, tmp_path):
    """`base(inputs)` -> GAP -> Dense around a nested base model (its layers under layers/functional/ in the h5),
    and the application without its top (num_classes 0: pooled features), read as the B0 files' backbone."""
    d, _, _ = b0_files
    full = keras.models.load_model(d / "b0.keras")
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(RES, RES, 3))
    for layer, same in zip(base.layers, full.layers):  # the same layers, in the same order, less the top
        layer.set_weights(same.get_weights())
    inputs = keras.layers.Input(shape=(RES, RES, 3))
    outputs = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(base(inputs)))
    nested = randomize(keras.Model(inputs, outputs), 3)  # the Dense only: `base` is one layer here
    nested.save(tmp_path / "nested.keras")
    nested.save_weights(tmp_path / "nested.weights.h5")
    want = np.asarray(nested.predict(images(), verbose=0))
    for name, arg in (("nested.keras", None), ("nested.weights.h5", "b0")):
        w = read_keras(tmp_path / name, arg)
        assert w.num_classes == 5
        np.testing.assert_allclose(ours(w, images()), want, atol=1e-5, rtol=0, err_msg=name)
    base.save(tmp_path / "notop.keras")
    w = read_keras(tmp_path / "notop.keras")
    assert w.num_classes == 0 and "classifier" not in w.variables["params"]
    features = np.asarray(base.predict(images(), verbose=0)).mean(axis=(1, 2))
    np.testing.assert_allclose(ours(w, images()), features, atol=1e-5, rtol=0)


# --- strictness and errors ----------------------------------------------------------------------------------------

def edited(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def test_unknown_variable_is_refused_by_name(b0_files, tmp_path):
    d, _, _ = b0_files
    bias = edited(d / "b0.weights.h5", tmp_path / "bias.weights.h5",
                  lambda f: f.create_dataset("layers/conv2d/vars/1", data=np.zeros(32, np.float32)))
    with pytest.raises(ConversionError, match=r"unexpected variable 'layers/conv2d/vars/1' \(layer 'stem_conv'"):
        read_keras(bias, "b0")
    layer = edited(d / "b0.weights.h5", tmp_path / "layer.weights.h5",
                   lambda f: f.create_dataset("layers/my_scale/vars/0", data=np.ones(3, np.float32)))
    with pytest.raises(ConversionError, match=r"unknown layer .layers/my_scale."):
        read_keras(layer, "b0")


def test_missing_or_misshapen_variable_is_refused_by_name(b0_files, tmp_path):
    d, _, _ = b0_files
    missing = edited(d / "b0.weights.h5", tmp_path / "missing.weights.h5",
                     lambda f: f.__delitem__("layers/batch_normalization_5/vars/3"))
    with pytest.raises(ConversionError, match=r"missing variable 'block2a_project_bn/moving_variance'"):
        read_keras(missing, "b0")

    def reshape(f):
        del f["layers/depthwise_conv2d_3/vars/0"]
        f.create_dataset("layers/depthwise_conv2d_3/vars/0", data=np.zeros((3, 3, 144, 1), np.float32))

    with pytest.raises(ConversionError, match=r"'block3a_dwconv/kernel' has shape \(3, 3, 1, 144\)"):
        read_keras(edited(d / "b0.weights.h5", tmp_path / "shape.weights.h5", reshape), "b0")
    with pytest.raises(ConversionError, match=r"missing layer 'block1b_dwconv'"):  # a B0 file read as B1
        read_keras(d / "b0.weights.h5", "b1")


def test_bare_weights_need_a_variant_and_files_must_be_keras(b0_files, tmp_path):
    d, _, _ = b0_files
    with pytest.raises(ConfigError, match=r"pass --variant.*EfficientNetB0.*EfficientNetV2L"):
        read_keras(d / "b0.weights.h5")
    with pytest.raises(ConfigError, match=r"'b0'.*not 'b1'"):
        read_keras(d / "b0.keras", "b1")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ConversionError, match="neither an HDF5"):
        read_keras(tmp_path / "text.h5", "b0")
    for name in ("b0.weights.h5", "b0.keras"):
        data = (d / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ConversionError, match="truncated or corrupt") as e:
            read_keras(tmp_path / name, "b0" if name.endswith(".h5") else None)
        assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_file_without_layer_names_reads_by_position(b0_files, tmp_path):
    """Older Keras 3 files have no 'name' attributes: the groups are named by position, as Keras loads them."""
    d, _, _ = b0_files

    def strip(f):
        f.visititems(lambda name, obj: obj.attrs.__delitem__("name") if "name" in obj.attrs else None)

    plain = edited(d / "b0.weights.h5", tmp_path / "plain.weights.h5", strip)
    same_variables(read_keras(plain, "b0").variables, read_keras(d / "b0.weights.h5", "b0").variables)


# --- through the loader and the trainer, without Keras, TensorFlow or torch ------------------------------------------

def test_files_load_in_a_process_without_keras_tensorflow_or_torch(b0_files, tmp_path):
    """A fresh interpreter in which importing keras, tensorflow, torch or timm fails: `effnet_jax.load` reads the
    .keras and .weights.h5 files and a timm checkpoint, and the logits are Keras'."""
    import subprocess
    import sys

    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf
    save_for_hf(timm.create_model("tf_efficientnet_lite0", num_classes=4), tmp_path / "timm", safe_serialization=True)
    d, want, _ = b0_files
    np.save(tmp_path / "x.npy", images())
    code = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('keras', 'tensorflow', 'torch', 'timm', 'torchvision'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Refuse())
import numpy as np, jax
import effnet_jax
x = np.load({str(tmp_path / 'x.npy')!r})
for path, variant in (({str(d / 'b0.keras')!r}, None), ({str(d / 'b0.weights.h5')!r}, 'b0')):
    l = effnet_jax.load(path, variant)
    x01 = (x / 255.0 - np.asarray(l.preprocess.mean, np.float32)) / np.asarray(l.preprocess.std, np.float32)
    np.save(path + '.out.npy', np.asarray(jax.jit(l.model.apply)(l.variables, x01.astype(np.float32))))
t = effnet_jax.load({str(tmp_path / 'timm')!r})
assert t.variant == 'lite0' and t.model.num_classes == 4
bad = [m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'torch', 'timm')]
assert not bad, bad
print('OK')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
    for name in ("b0.keras", "b0.weights.h5"):
        np.testing.assert_allclose(np.load(d / f"{name}.out.npy"), want, atol=1e-5, rtol=0, err_msg=name)


def test_the_guide_model_fine_tunes_from_its_keras_file(tmp_path):
    """The Keras guide's model (EfficientNetB0 base, pooling -> BN -> dropout -> Dense(3, softmax)) saved as .keras:
    `train.py --init model.keras` takes the variant and normalization from the file, keeps its 3-class head, trains
    an epoch, and `evaluate` reproduces the logged validation."""
    import json

    from effnet_jax.cli import evaluate as evaluate_cli
    from helpers import last_json, load_train_cli, run_main, write_noise_folder

    inputs = keras.layers.Input(shape=(32, 32, 3))
    base = keras.applications.EfficientNetB0(include_top=False, input_tensor=inputs, weights=None)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.2, name="top_dropout")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="pred")(x)
    keras.Model(inputs, outputs, name="EfficientNet").save(tmp_path / "guide.keras")
    images = write_noise_folder(tmp_path / "images")
    work = tmp_path / "work"
    argv = ["--init", tmp_path / "guide.keras", "--dataset", f"folder:{images}", "--epochs", 1, "--resolution", 32,
            "--batch-size", 4, "--eval-batch-size", 16, "--val-fraction", 0.25, "--no-progress", "--workdir", work]
    rc, out, err = run_main(load_train_cli("effnet_jax_train_cli_keras").main, argv)
    assert rc == 0, err
    summary = last_json(out)
    config = json.loads((work / "config.json").read_text())
    assert summary["variant"] == "b0" and config["num_classes"] == 3
    assert config["model_overrides"] == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.01}
    assert "backbone loaded; new" not in err  # the file's own 3-class head
    rc, out, err = run_main(evaluate_cli.main, ["--workdir", work])
    assert rc == 0, err
    assert last_json(out)["top1"] == summary["best_val_acc"]
