"""benchmarks/throughput.py and benchmarks/epoch.py run end to end and print their JSON.

Tiny settings only (a b0 narrowed and shortened with --width 0.25 --depth 0.1 on both sides, 32 px, batch 4,
one repeat of 2 steps, no torch.compile; epoch.py on a 3-class folder of 36 PNGs with --max-examples), so
that the XLA compilations stay short: this checks the scripts work, not the figures.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from helpers import last_json

pytest.importorskip("torch")
pytest.importorskip("torchvision")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--variant", "b0", "--resolution", "32", "--batch-size", "4", "--width", "0.25", "--depth", "0.1"]


def load(name: str):
    """benchmarks/<name>.py as a module, imported as when it runs: its folder first on sys.path (`import common`)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (blocks.py's Flax modules) look their module up there
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_throughput_train_and_eval(capsys):
    rows = load("throughput").main(TINY + ["--mode", "train,eval", "--repeats", "1", "--steps", "2",
                                           "--warmup", "1", "--no-torch-compile", "--device-kind", "cpu"])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.strip().splitlines()[-2:]]
    assert lines == json.loads(json.dumps(rows)) and [r["mode"] for r in lines] == ["train", "eval"]
    assert last_json(out)["mode"] == "eval"
    for r in lines:
        for k in ("jax_img_s", "torch_img_s", "ratio", "compile_s", "peak_rss_mb", "gflops"):
            assert r[k] > 0, (k, r)
        assert r["ratio"] == pytest.approx(r["jax_img_s"] / r["torch_img_s"])
        assert r["torch_compile_img_s"] is None and "skipped" in r["torch_compile_error"]
    assert "JAX img/s" in out  # the table


def test_throughput_over_all_devices_shards_the_batch():
    """`--devices all`: the JAX step's mesh spans every device (here 2 XLA CPU devices in one process), the row
    says so; a batch the devices do not divide is refused with a message."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", EFFNET_JAX_NO_REEXEC="1")
    cmd = [sys.executable, str(BENCH / "throughput.py"), *TINY, "--devices", "all", "--compare", "none",
           "--repeats", "1", "--steps", "1", "--warmup", "1"]
    out = subprocess.run(cmd + ["--mode", "train,eval"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert [(r["mode"], r["devices"]) for r in rows] == [("train", 2), ("eval", 2)]
    assert all(r["jax_img_s"] > 0 for r in rows)
    bad = subprocess.run(cmd + ["--batch-size", "3", "--mode", "eval"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "not divisible by the 2 devices" in bad.stderr


def test_thunk_profile_sums_operations_by_kind(tmp_path):
    # a hand-made perfetto trace of 2 steps: XLA operations are summed by name without their number; Python and
    # runtime events, a `while` (its body's operations are events of their own) and instant events are not counted
    events = [{"ph": "X", "name": "ynn_fusion.75", "dur": 3000}, {"ph": "X", "name": "ynn_fusion", "dur": 1000},
              {"ph": "X", "name": "ynn_fusion.3", "dur": 2000}, {"ph": "X", "name": "multiply_pad_fusion.14", "dur": 500},
              {"ph": "X", "name": "while.788", "dur": 9000}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
              {"ph": "X", "name": "$throughput.py:165 run", "dur": 9000}, {"ph": "X", "name": "ParseArguments", "dur": 9},
              {"ph": "i", "name": "dot", "dur": 9000}, {"ph": "X", "name": "dot", "dur": 250}]
    path = tmp_path / "host.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert load("throughput").thunk_profile(str(path), steps=2) == [
        ("ynn_fusion", 1.5, 3.0), ("multiply_pad_fusion", 0.5, 0.25), ("dot", 0.5, 0.125)]


def test_throughput_profile(tmp_path, capsys):
    rows = load("throughput").main(TINY + ["--mode", "eval", "--repeats", "1", "--steps", "2", "--warmup", "1",
                                           "--compare", "none", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    profile = rows[0]["profile"]
    assert profile and all(ms >= 0 and calls > 0 for _, calls, ms in profile)
    assert [ms for _, _, ms in profile] == sorted((ms for _, _, ms in profile), reverse=True)
    assert "XLA operations" in out and profile[0][0] in out
    assert list(tmp_path.glob("b0_32_4_eval/**/*.trace.json.gz"))


def test_epoch_side_by_side(tmp_path, capsys, monkeypatch):
    from PIL import Image
    monkeypatch.setenv("EFFNET_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "train" / c / f"{i}.png")
    res = load("epoch").main(TINY + ["--dataset", f"folder:{tmp_path / 'data'}", "--max-examples", "16",
                                     "--workers", "0", "--device-kind", "cpu"])
    out = capsys.readouterr().out
    assert last_json(out) == json.loads(json.dumps(res))
    assert res["n_examples"] == 16 and res["full_epoch_examples"] > 16 and res["extrapolated"] is True
    for k in ("jax_epoch_s", "torch_epoch_s", "ratio", "jax_compile_s", "jax_img_s", "torch_img_s"):
        assert res[k] > 0, (k, res)
    assert res["ratio"] == pytest.approx(res["torch_epoch_s"] / res["jax_epoch_s"])
    assert res["jax_epoch_s"] == pytest.approx(  # the one-time device transfer is not scaled, the steps are
        res["jax_transfer_s"] + res["jax_loop_s"] * res["full_epoch_examples"] / 16)
    assert res["jax_measured_s"] == pytest.approx(res["jax_transfer_s"] + res["jax_loop_s"])
    assert "extrapolated" in out


def test_blocks_per_unit(capsys):
    """blocks.py times every unit of the network on both sides; the units must be the same layers: the torch
    unit fed the JAX unit's input shape gives the JAX unit's output shape (the script asserts it), and the
    rows chain stem -> blocks -> head."""
    from effnet_jax.model.network import create_model, unit_names
    res = load("blocks").main(TINY + ["--repeats", "1", "--steps", "1", "--warmup", "0"])
    assert last_json(capsys.readouterr().out) == json.loads(json.dumps(res))
    rows = res["rows"]
    assert [r["unit"] for r in rows] == unit_names(create_model("b0", width=0.25, depth=0.1).config)
    assert rows[0]["in_shape"] == [4, 32, 32, 3]
    for a, b in zip(rows, rows[1:]):
        assert a["out_shape"] == b["in_shape"]
    for r in rows:
        assert all(r[k] > 0 for k in ("jax_train_ms", "torch_train_ms", "jax_eval_ms", "torch_eval_ms")), r
        assert ("dw_jax_train_ms" in r) == r["unit"].startswith("blocks_")
    assert res["train_ratio"] == pytest.approx(res["totals"]["torch_train_ms"] / res["totals"]["jax_train_ms"])


def run_ab(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "ab.py"), *argv], capture_output=True, text=True,
                          timeout=600, cwd=BENCH.parent)


def test_ab_against_a_revision_in_turns():
    """ab.py checks out HEAD into a temporary worktree, runs this tree's and that tree's step in turns, each worker
    importing effnet_jax from its own tree, and removes the worktree."""
    before = subprocess.run(["git", "worktree", "list"], cwd=BENCH.parent, capture_output=True, text=True).stdout
    out = run_ab("--against", "HEAD", "--rounds", "2", "--steps", "1", *TINY, "--mode", "eval")
    assert out.returncode == 0, out.stderr
    res = last_json(out.stdout)
    for side in ("A", "B"):
        assert len(res[side]["img_s"]) == 2 and all(x > 0 for x in res[side]["img_s"]), res
        assert res[side]["compile_s"] > 0
    assert res["B"]["against"] == "HEAD" and res["ratio_min"] <= res["ratio_median"] <= res["ratio_max"]
    assert res["ratio_median"] > 0 and "A / B per round" in out.stdout
    assert "worker B" in out.stderr and "effnet-ab-" in out.stderr  # B ran from the temporary worktree
    after = subprocess.run(["git", "worktree", "list"], cwd=BENCH.parent, capture_output=True, text=True).stdout
    assert after == before


def test_ab_gives_each_worker_its_xla_flags():
    """`--xla-flags-b`: worker B's process has that XLA_FLAGS (it reports what it saw), A this process's."""
    flags = "--xla_cpu_enable_fast_math=false"
    out = run_ab("--against", "HEAD", "--rounds", "1", "--steps", "1", "--settle", "0", f"--xla-flags-b={flags}",
                 *TINY, "--mode", "eval")
    assert out.returncode == 0, out.stderr
    res = last_json(out.stdout)
    assert res["B"]["xla_flags"] == flags and res["A"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert f"XLA_FLAGS={flags}" in out.stdout


def test_ab_rejects_what_it_cannot_compare():
    out = run_ab("--against", "no-such-revision-or-dir", *TINY)
    assert out.returncode != 0 and "neither a directory nor a revision" in out.stderr
    out = run_ab("--against", "HEAD", "--variant", "b0,b1")
    assert out.returncode == 2 and "one value" in out.stderr
