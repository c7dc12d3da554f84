"""effnet_jax.train.optim against closed forms and hand-written numpy: schedules, masks on the real parameter names,
freezing, AdamW, two-phase fine-tuning, clipping, loss, metrics, EMA. Optimizer runs use tiny arrays carrying
a real (7-block) model's parameter names; nothing compiles a full EfficientNet."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effnet_jax
from effnet_jax.train import optim
from effnet_jax.model.network import count_params, param_shapes, unit_names
from effnet_jax.train.optim import OptimConfig


def _flat(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def b0():
    """B0 with 10 classes: (config, parameter shapes), via eval_shape."""
    model = effnet_jax.create_model("b0", num_classes=10)
    return model.config, param_shapes(model, 32)["params"]


@pytest.fixture(scope="module")
def tiny():
    """A 7-block model's parameter names over tiny float32 arrays: (config, params)."""
    model = effnet_jax.create_model("b0", num_classes=10, depth=0.1)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=(2, 3) if len(s.shape) > 1 else (3,)),
                                                jnp.float32), param_shapes(model, 32)["params"])
    return model.config, params


def _grads(params, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params)


def _run(tx, params, grads):
    """Apply `tx` for each gradient tree; returns the parameters after every step (first: the initial)."""
    state, update = tx.init(params), jax.jit(tx.update)
    history = [params]
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


# ----------------------------------------------------------------------------------------------- schedule

def _warmup_cosine(t, lr, warmup, total):
    if t < warmup:
        return lr * t / warmup
    if t >= total:
        return 0.0
    return lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_lr_schedule_closed_form():
    cfg = OptimConfig(lr=0.1, warmup_epochs=2, epochs=10)
    sched = optim.lr_schedule(cfg, steps_per_epoch=5)  # warmup 10 steps, 50 in all
    steps = [0, 1, 5, 9, 10, 11, 20, 30, 45, 49, 50, 70]
    expected = [_warmup_cosine(t, 0.1, 10, 50) for t in steps]
    np.testing.assert_allclose([float(sched(t)) for t in steps], expected, rtol=1e-5, atol=1e-9)
    assert float(sched(0)) == 0.0 and float(sched(50)) == 0.0
    # no warmup: the first step uses the peak; fractional warmup epochs are floored to whole steps
    sched = optim.lr_schedule(dataclasses.replace(cfg, warmup_epochs=0), 5)
    np.testing.assert_allclose([float(sched(t)) for t in (0, 25)], [0.1, _warmup_cosine(25, 0.1, 0, 50)],
                               rtol=1e-6)
    sched = optim.lr_schedule(dataclasses.replace(cfg, warmup_epochs=0.5), 5)  # floor(2.5) = 2 steps
    np.testing.assert_allclose([float(sched(t)) for t in (1, 2, 30)],
                               [_warmup_cosine(t, 0.1, 2, 50) for t in (1, 2, 30)], rtol=1e-6)


def test_lr_schedule_two_phase_closed_form():
    cfg = OptimConfig(lr=0.01, warmup_epochs=1, epochs=10, two_phase=True, phase1_epochs=3,
                      phase2_lr_scale=0.1, freeze=2)
    sched = optim.lr_schedule(cfg, steps_per_epoch=4)  # phase 1: steps 0..11, phase 2: steps 12..39
    steps = [0, 2, 4, 7, 11, 12, 13, 16, 20, 39, 40]
    expected = [_warmup_cosine(t, 0.01, 4, 12) if t < 12 else _warmup_cosine(t - 12, 0.001, 4, 28)
                for t in steps]
    np.testing.assert_allclose([float(sched(t)) for t in steps], expected, rtol=1e-5, atol=1e-10)
    assert [(p.start_epoch, p.epochs, p.freeze) for p in optim.phases(cfg)] == [(0, 3, "head-only"), (3, 7, 2)]


@pytest.mark.parametrize("kw", [
    {"optimizer": "lamb"}, {"lr": 0.0}, {"epochs": 0}, {"warmup_epochs": 10}, {"momentum": 1.0},
    {"label_smoothing": 1.0}, {"ema_decay": 1.0}, {"grad_clip": -1.0}, {"freeze": "top"}, {"freeze": 0},
    {"freeze": "-3"}, {"two_phase": True, "phase1_epochs": 10}, {"two_phase": True, "phase1_epochs": 0},
    {"two_phase": True, "phase1_epochs": 2, "freeze": "head-only"},
    {"two_phase": True, "phase1_epochs": 2, "warmup_epochs": 2},
])
def test_config_rejects_invalid_settings(kw):
    with pytest.raises(ValueError):
        OptimConfig(**{"epochs": 10, **kw})


# ----------------------------------------------------------------------------------------------- masks

def test_weight_decay_mask_on_b0_names(b0):
    _, shapes = b0
    mask = _flat(optim.weight_decay_mask(shapes))
    decayed = {n for n, m in mask.items() if m}
    assert decayed == {n for n in mask if n.endswith("/kernel")}
    # stem, head, classifier + per block dw, project, SE reduce/expand (4 × 16) + expand (blocks 1..15)
    assert len(decayed) == 3 + 4 * 16 + 15
    for name in ("stem/kernel", "blocks_0/dw_conv/kernel", "blocks_3/expand_conv/kernel",
                 "blocks_3/se/reduce/kernel", "head/kernel", "classifier/kernel"):
        assert mask[name]
    for name in ("blocks_3/dw_bn/scale", "blocks_3/dw_bn/bias", "blocks_3/se/reduce/bias", "stem_bn/scale",
                 "head_bn/bias", "classifier/bias"):
        assert not mask[name]


def _trainable_count(shapes, mask):
    return sum(math.prod(s.shape) for s, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)) if m)


def test_trainable_masks_on_b0(b0):
    config, shapes = b0
    names = _flat(shapes)
    assert all(jax.tree.leaves(optim.trainable_mask(shapes, config, "none")))
    assert _trainable_count(shapes, optim.trainable_mask(shapes, config, "none")) == count_params(shapes)

    head_only = _flat(optim.trainable_mask(shapes, config, "head-only"))
    assert {n for n, m in head_only.items() if m} == {"classifier/kernel", "classifier/bias"}
    assert _trainable_count(shapes, optim.trainable_mask(shapes, config, "head-only")) == 1280 * 10 + 10

    for n in (2, "2"):
        top2 = _flat(optim.trainable_mask(shapes, config, n))
        expected = {"blocks_14", "blocks_15", "head", "head_bn", "classifier"}
        assert {k for k, m in top2.items() if m} == {k for k in names if k.split("/")[0] in expected}

    # the mask trains exactly the units the model's frozen_units leaves in training mode
    assert optim.frozen_units(config, "none") == 0
    assert optim.frozen_units(config, "head-only") == 18
    for n in (1, 2, 7, 16):
        first = optim.frozen_units(config, n)
        assert first == 1 + 16 - n
        trained = {k.split("/")[0].removesuffix("_bn") for k, m in
                   _flat(optim.trainable_mask(shapes, config, n)).items() if m}
        assert trained == set(unit_names(config)[first:]) | {"classifier"}


def test_masks_on_v2_s_names():
    """V2-S's 40 blocks (10 Fused-MBConv, whose parameters are conv/bn or expand_conv/expand_bn/project_conv/
    project_bn, then 30 MBConv): --freeze N counts blocks across both kinds, and weight decay takes the fused
    convs' kernels but not their BN."""
    model = effnet_jax.create_model("v2_s", num_classes=10)
    config, shapes = model.config, param_shapes(model, 32)["params"]
    names = _flat(shapes)
    assert len(config.blocks) == 40 and [b.fused for b in config.blocks].count(True) == 10
    decay = _flat(optim.weight_decay_mask(shapes))
    assert decay["blocks_0/conv/kernel"] and decay["blocks_2/expand_conv/kernel"]
    assert not decay["blocks_0/bn/scale"] and not decay["blocks_2/project_bn/bias"]
    assert optim.frozen_units(config, "head-only") == 42
    top32 = _flat(optim.trainable_mask(shapes, config, 32))  # blocks_8.. (two fused ones) + head + classifier
    expected = {f"blocks_{i}" for i in range(8, 40)} | {"head", "head_bn", "classifier"}
    assert {k for k, m in top32.items() if m} == {k for k in names if k.split("/")[0] in expected}
    assert top32["blocks_8/expand_conv/kernel"] and not top32["blocks_7/expand_conv/kernel"]
    assert not top32["blocks_0/conv/kernel"] and not top32["stem/kernel"]
    assert optim.frozen_units(config, 32) == 1 + 40 - 32


@pytest.mark.parametrize("freeze", [0, 17, "x", 1.5])
def test_freeze_n_is_validated(b0, freeze):
    config, shapes = b0
    with pytest.raises(ValueError, match="freeze"):
        optim.trainable_mask(shapes, config, freeze)


def test_head_only_without_classifier_is_an_error(b0):
    config, shapes = b0
    features_only = {k: v for k, v in shapes.items() if k != "classifier"}
    with pytest.raises(ValueError, match="nothing to train"):
        optim.trainable_mask(features_only, config, "head-only")


def test_frozen_params_carry_no_optimizer_state(b0):
    config, shapes = b0
    tx = optim.make_optimizer(OptimConfig(optimizer="adam", freeze="head-only"), shapes, config, 10)
    state = jax.eval_shape(tx.init, shapes)
    floats = [s for s in jax.tree.leaves(state) if jnp.issubdtype(s.dtype, jnp.floating)]
    assert sum(math.prod(s.shape) for s in floats) == 2 * (1280 * 10 + 10)  # Adam mu and nu


# ----------------------------------------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_frozen_params_unchanged_trainable_params_move(tiny, name):
    config, params = tiny
    cfg = OptimConfig(optimizer=name, lr=0.1, weight_decay=0.1, warmup_epochs=1, epochs=3, grad_clip=1.0,
                      freeze=2)
    tx = optim.make_optimizer(cfg, params, config, steps_per_epoch=2)
    history = _run(tx, params, [_grads(params, s) for s in range(4)])
    before, after = _flat(history[0]), _flat(history[-1])
    trained = {"blocks_5", "blocks_6", "head", "head_bn", "classifier"}
    assert {n.split("/")[0] for n in before} - trained  # some parameters are frozen
    for n in before:
        if n.split("/")[0] in trained:
            assert np.all(np.asarray(before[n]) != np.asarray(after[n])), n
        else:
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)


def test_adamw_matches_numpy(tiny):
    config, params = tiny
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    cfg = OptimConfig(optimizer="adamw", lr=lr, weight_decay=wd, epochs=4)
    tx = optim.make_optimizer(cfg, params, config, steps_per_epoch=5)
    grads = [_grads(params, s) for s in range(3)]
    got = _flat(_run(tx, params, grads)[-1])

    for name, p in _flat(params).items():
        p = np.asarray(p, np.float64)
        m = v = np.zeros_like(p)
        for t, g in enumerate(_flat(gr)[name] for gr in grads):
            g = np.asarray(g, np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
            decay = wd * p if name.endswith("/kernel") else 0.0
            p = p - _warmup_cosine(t, lr, 0, 20) * (mhat / (np.sqrt(vhat) + eps) + decay)
        # atol: float32 rounding of params ~1 (updates are ~1e-2 per step, the decay ~1e-3)
        np.testing.assert_allclose(got[name], p, rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_phase(tiny):
    """Phase 1 moves only the classifier; phase 2 starts a fresh optimizer at lr × scale: its first
    Adam step is -lr2 · g / (|g| + eps), whatever gradients phase 1 saw."""
    config, params = tiny
    lr, scale, eps = 0.01, 0.1, 1e-8
    cfg = OptimConfig(optimizer="adam", lr=lr, epochs=4, two_phase=True, phase1_epochs=2, phase2_lr_scale=scale,
                      freeze=1)
    tx = optim.make_optimizer(cfg, params, config, steps_per_epoch=2)  # phase 1: steps 0..3
    grads = [_grads(params, s, scale=100.0 if s < 4 else 1.0) for s in range(5)]
    history = [_flat(p) for p in _run(tx, params, grads)]
    start, end1, after = history[0], history[4], history[5]
    g0, g4 = _flat(grads[0]), _flat(grads[4])

    for n in start:
        if n.startswith("classifier/"):
            np.testing.assert_allclose(history[1][n] - start[n], -lr * g0[n] / (np.abs(g0[n]) + eps), rtol=1e-4)
            assert np.all(end1[n] != start[n])
        else:
            np.testing.assert_array_equal(end1[n], start[n], err_msg=n)

    phase2 = {"blocks_6", "head", "head_bn", "classifier"}
    for n in start:
        step = np.asarray(after[n]) - np.asarray(end1[n])
        if n.split("/")[0] in phase2:
            np.testing.assert_allclose(step, -lr * scale * g4[n] / (np.abs(g4[n]) + eps), rtol=1e-4, err_msg=n)
        else:
            np.testing.assert_array_equal(step, 0.0, err_msg=n)


def test_gradient_clipping_over_trainable_params(tiny):
    config, params = tiny
    cfg = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, epochs=4, grad_clip=1.0,
                      freeze="head-only")
    tx = optim.make_optimizer(cfg, params, config, steps_per_epoch=5)
    for scale in (3.0, 0.01):
        grads = _grads(params, 7, scale)
        g = {n: np.asarray(v, np.float64) for n, v in _flat(grads).items() if n.startswith("classifier/")}
        norm = np.sqrt(sum(np.sum(v * v) for v in g.values()))
        assert (norm > 1.0) == (scale > 1.0)
        start, end = (_flat(p) for p in _run(tx, params, [grads]))
        for n, gn in g.items():
            np.testing.assert_allclose(end[n] - start[n], -0.1 * gn * min(1.0, 1.0 / norm), rtol=1e-5,
                                       atol=5e-7)  # float32 rounding of params ~1


# ----------------------------------------------------------------------------------------------- loss, metrics

def test_cross_entropy_with_label_smoothing_by_hand():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
    labels = np.array([0, 2])
    log_z = np.log(np.exp(logits).sum(axis=1))
    log_p = logits - log_z[:, None]
    a, k = 0.1, 3
    expected = [-((1 - a) * log_p[i, labels[i]] + a / k * log_p[i].sum()) for i in range(2)]
    np.testing.assert_allclose(optim.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), a), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(optim.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                               [log_z[0] - 2.0, log_z[1] + 1.0], rtol=1e-6)


def test_accuracy_and_topk():
    logits = jnp.array([[0.1, 0.9, 0.3, 0.2], [0.8, 0.1, 0.6, 0.7], [0.1, 0.2, 0.3, 0.4]])
    labels = jnp.array([1, 2, 0])
    np.testing.assert_array_equal(optim.topk_correct(logits, labels, 1), [1, 0, 0])
    np.testing.assert_array_equal(optim.topk_correct(logits, labels, 3), [1, 1, 0])
    np.testing.assert_array_equal(optim.topk_correct(logits, labels, 4), [1, 1, 1])
    np.testing.assert_allclose(optim.accuracy(logits, labels), 1 / 3)


# ----------------------------------------------------------------------------------------------- EMA

def test_ema_matches_numpy_recurrence():
    rng = np.random.default_rng(3)
    seq = [{"a": rng.normal(size=(2, 3)), "b": {"c": rng.normal(size=4)}} for _ in range(13)]
    decay = 0.5  # the warmup (1 + t) / (10 + t) reaches 0.5 at t = 8
    ema = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), seq[0])
    expected = jax.tree.map(np.copy, seq[0])
    for t in range(1, 13):
        ema = optim.ema_update(ema, jax.tree.map(jnp.asarray, seq[t]), decay, t)
        d = min(decay, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, seq[t])
        assert float(optim.ema_decay_at(decay, t)) == pytest.approx(d)
    jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-5), ema, expected)
    assert ema["a"].dtype == jnp.float32
