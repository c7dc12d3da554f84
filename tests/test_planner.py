"""The planner (`effnet_jax.kernels`): it keeps the fastest measured form, caches the plan per machine and kernel
source, measures again when the plan file is damaged or foreign, and its switches work. The suite runs with
`EFFNET_JAX_AUTOTUNE=0` (conftest.py); these tests turn measuring on where they need it."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import effnet_jax
from effnet_jax.kernels import native
from effnet_jax.kernels import autotune, planner
from effnet_jax.kernels.__main__ import main as plan_main

UNIT = autotune.Unit("mbconv", "k3 s1 16>96>24 test", (2, 8, 8, 16), "train", "float32")
FORMS = ("native", "shift", "xla")


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Measuring on, into a cache of the test's own, with an empty in-process memo."""
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv(autotune.OPT_OUT, "1")
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(autotune, "_announced", False)
    return tmp_path


def fake_build(seconds: dict[str, float], calls: list[str]):
    """Candidates that take `seconds[form]` per call; `calls` lists each form built."""
    def build(form):
        calls.append(form)
        return lambda: time.sleep(seconds[form])
    return build


def test_keeps_the_fastest_of_a_table_of_timings_and_caches_it(tuning):
    calls = []
    build = fake_build({"native": 0.03, "shift": 0.01, "xla": 0.06}, calls)
    assert autotune.choose(UNIT, FORMS, "native", build) == "shift"
    assert sorted(calls) == sorted(FORMS)
    entry = json.loads(autotune.plan_path().read_text())["units"][UNIT.key]
    assert entry["form"] == "shift"
    assert entry["ms"]["shift"] < entry["ms"]["native"] < entry["ms"]["xla"]
    assert 9 <= entry["ms"]["shift"] <= 30  # 10 ms each: the timings are real
    # a new process (empty memo) reads the plan file and measures nothing
    autotune._memo.clear()
    with autotune.recording() as decisions:
        assert autotune.choose(UNIT, FORMS, "native", fake_build({}, calls)) == "shift"
    assert len(calls) == 3 and decisions[0].source == "cached"


def test_an_entry_that_lacks_a_candidate_is_measured_again(tuning, monkeypatch):
    """A unit cached while the kernels were off (timings of shift and xla only) is measured again once they are on;
    one cached with every form serves a run with fewer (the fastest of those), measuring nothing."""
    table = {"native": 1.0, "shift": 2.0, "xla": 3.0}
    measured = []

    def time_candidates(candidates, build):
        measured.append(tuple(candidates))
        return {f: table[f] for f in candidates}
    monkeypatch.setattr(autotune, "_time_candidates", time_candidates)
    assert autotune.choose(UNIT, ("shift", "xla"), "shift", None) == "shift"
    autotune._memo.clear()
    assert autotune.choose(UNIT, FORMS, "native", None) == "native"
    assert measured == [("shift", "xla"), FORMS]
    autotune._memo.clear()
    table["shift"] = 0.5  # (not measured again: the cached 2.0 stands)
    assert autotune.choose(UNIT, ("shift", "xla"), "shift", None) == "shift"
    assert autotune.choose(UNIT, ("native", "xla"), "native", None) == "native"
    assert len(measured) == 2


def test_candidates_are_timed_in_turns_and_a_far_slower_one_runs_once(tuning):
    """After each candidate's first call, the close ones run in alternating turns, at least MIN_ROUNDS calls each
    (a slow moment of a shared CPU then falls on both, not on one); one whose first call was over SLOWER_CUTOFF×
    the fastest runs no more."""
    order = []

    def build(form):
        def run():
            order.append(form)
            time.sleep({"native": 0.004, "shift": 0.005, "xla": 0.05}[form])
        return run
    ms = autotune._time_candidates(FORMS, build)
    assert min(ms, key=ms.get) == "native" and ms["xla"] >= 50
    assert order[:3] == list(FORMS) and order.count("xla") == 1
    turns = order[3:]
    assert set(turns) == {"native", "shift"} and turns.count("native") == turns.count("shift") >= autotune.MIN_ROUNDS
    assert all(turns[i:i + 3] not in (["native"] * 3, ["shift"] * 3) for i in range(len(turns)))


def test_picks_by_timing_whatever_the_order(tuning, monkeypatch):
    table = {"native": 5.0, "shift": 7.5, "xla": 1.25}
    monkeypatch.setattr(autotune, "_time_candidates", lambda candidates, build: {f: table[f] for f in candidates})
    assert autotune.choose(UNIT, FORMS, "native", None) == "xla"
    assert autotune.choose(autotune.Unit("mbconv", "other", (1,), "inference", "float32"), ("native", "shift"),
                           "shift", None) == "native"


def test_the_fixed_form_stays_unless_another_beats_it_by_more_than_the_tie():
    assert autotune.fastest({"native": 1.04, "shift": 1.0, "xla": 9.0}, "native") == "native"
    assert autotune.fastest({"native": 1.06, "shift": 1.0, "xla": 9.0}, "native") == "shift"
    assert autotune.fastest({"native": 1.0, "shift": 0.96}, "shift") == "shift"
    assert autotune.fastest({"shift": 1.04, "xla": 1.0}, "native") == "xla"  # the fixed form is not a candidate


def test_a_form_that_fails_is_not_chosen(tuning):
    def build(form):
        if form == "native":
            raise RuntimeError("no compiler")
        return lambda: time.sleep(0.002)
    assert autotune.choose(UNIT, FORMS, "native", build) in ("shift", "xla")


def test_the_cache_key_changes_with_the_kernel_source(tuning, monkeypatch):
    before = autotune.plan_path()
    calls = []
    autotune.choose(UNIT, FORMS, "native", fake_build(dict.fromkeys(FORMS, 0.001), calls))
    monkeypatch.setattr(autotune, "kernel_source_hash", lambda: "0123456789abcdef")
    assert autotune.plan_path() != before
    autotune.choose(UNIT, FORMS, "native", fake_build(dict.fromkeys(FORMS, 0.001), calls))
    assert len(calls) == 6  # measured again for the new source
    # the real hash follows the packaged source
    monkeypatch.undo()
    assert autotune.machine()["kernels"] == autotune.kernel_source_hash() != "0123456789abcdef"


@pytest.mark.parametrize("damage", ["truncated", "foreign", "garbage"])
def test_a_damaged_or_foreign_plan_file_is_measured_again(tuning, damage, caplog):
    calls = []
    autotune.choose(UNIT, FORMS, "native", fake_build({"native": 0.001, "shift": 0.004, "xla": 0.004}, calls))
    path = autotune.plan_path()
    text = path.read_text()
    data = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "foreign":
        data["machine"]["cpu_id"] = "another"
        data["units"][UNIT.key]["form"] = "xla"  # a plan made elsewhere is not trusted
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(b"\x00\xff" * 10)
    autotune._memo.clear()
    assert autotune.choose(UNIT, FORMS, "native", fake_build({"native": 0.001, "shift": 0.004, "xla": 0.004},
                                                             calls)) == "native"
    assert len(calls) == 6
    assert "measuring again" in caplog.text
    assert json.loads(path.read_text())["units"][UNIT.key]["form"] == "native"  # rewritten whole


def test_autotune_off_keeps_the_fixed_rule(tuning, monkeypatch):
    monkeypatch.setenv(autotune.OPT_OUT, "0")
    assert autotune.choose(UNIT, FORMS, "native", lambda form: pytest.fail("measured")) == "native"
    assert not autotune.plan_path().exists()


def test_native_off_leaves_the_kernels_out_of_the_candidates():
    """`EFFNET_JAX_NATIVE=0` (read once per process, as `native.available` caches it): a process of its own."""
    code = ("import jax.numpy as jnp; from effnet_jax.kernels import planner; "
            "print(planner.depthwise_candidates(jnp.float32), planner.fixed_depthwise_form(jnp.float32), "
            "planner.depthwise_candidates(jnp.bfloat16))")
    env = {**os.environ, native.OPT_OUT: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "('shift', 'xla') shift ('shift', 'xla')"


def test_a_model_measured_on_first_use_then_planned_from_the_cache(tuning, capfd):
    """End to end on B0 at 32 px, eval: the first trace measures (one line on stderr) and writes the plan, whose
    forms give the same logits as the fixed rule's; a second trace measures nothing."""
    model = effnet_jax.create_model("b0", num_classes=10, stem_stride=1)
    variables = effnet_jax.model.network.random_variables(model, 32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32))
    with autotune.recording() as first:
        tuned = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    err = capfd.readouterr().err
    assert err.count("effnet_jax: measuring") == 1 and str(autotune.plan_path()) in err
    assert {d.source for d in first} == {"measured", "cached"} and all(d.ms for d in first)
    assert all(d.form == autotune.fastest(d.ms, planner.fixed_depthwise_form(jnp.float32)) for d in first)
    with autotune.recording() as second:
        jax.jit(lambda v, x: model.apply(v, x) * 1.0)(variables, x)
    assert [d.form for d in second] == [d.form for d in first] and {d.source for d in second} == {"cached"}
    fixed = effnet_jax.create_model("b0", num_classes=10, stem_stride=1, depthwise_impl="shift")
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(jax.jit(fixed.apply)(variables, x)), atol=1e-4)


@pytest.mark.skipif(not native.available(), reason="the stem is fused with the kernels only")
def test_the_first_block_is_timed_with_the_stem_its_kernel_can_compute(tuning, monkeypatch):
    """In inference, B0's first block (no expansion, no shortcut) is one unit with the stem, on the image's shape,
    timed as the network runs them (the kernels computing the stem); the block then runs the form that unit got,
    never timed again alone. The stem's fused and unfused forms give the same logits."""
    timed = []

    def measure(unit, candidates, build, path=None, fixed=""):
        timed.append(unit)
        ms = dict.fromkeys(candidates, 9.0)
        ms["shift" if unit.kind == "stem+mbconv" and pick_shift else "native"] = 1.0
        if unit.kind == "stem+mbconv":  # the unit runs (outside the trace, as `measure` runs it): stem fused
            with ThreadPoolExecutor(1) as pool:
                pool.submit(lambda: build("native")()).result()
        return {"form": min(ms, key=ms.get), "ms": ms}
    monkeypatch.setattr(autotune, "measure", measure)
    model = effnet_jax.create_model("b0", num_classes=10)
    variables = effnet_jax.model.network.random_variables(model, 64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3), np.float32))
    logits = {}
    for pick_shift in (False, True):
        autotune._memo.clear()
        autotune.plan_path().unlink(missing_ok=True)
        timed.clear()
        with autotune.recording() as plan:
            logits[pick_shift] = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
        first = [d for d in plan if d.name == "blocks_0"]
        assert [d.unit.kind for d in first] == ["stem+mbconv"] and first[0].unit.shape == (2, 64, 64, 3)
        assert first[0].form == ("shift" if pick_shift else "native")
        assert sum(u.kind == "stem+mbconv" for u in timed) == 1
        assert not any(u.kind == "mbconv" and u.shape == (2, 32, 32, 32) for u in timed)  # blocks_0 alone
    np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), atol=1e-4)


def test_plan_command_prints_each_units_form_and_timings(tuning, capsys):
    """`python -m effnet_jax.kernels plan` in train mode with frozen units: both modes measured."""
    assert plan_main(["plan", "--variant", "lite0", "--resolution", "32", "--batch", "2", "--mode", "train",
                      "--freeze", "2", "--stem-stride", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and str(autotune.plan_path()) in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("blocks_")]
    assert len(rows) == len(effnet_jax.create_model("lite0").config.blocks)
    assert {r[2] for r in rows} == {"train", "inference"}
    assert all(r[3] in FORMS for r in rows)
    assert "shift ms" in out and "xla ms" in out
