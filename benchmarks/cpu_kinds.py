#!/usr/bin/env python3
"""The CPU acceptance matrix of docs/performance.md, for this machine's build or an emulated AVX2 machine.

Each measurement is its own process (`throughput.py`, `onnx_peer.py`, `python -m effnet_jax.kernels plan`), run
one after another with the machine otherwise idle:

1. `checks`: what the build really is (the kernels' form, torch's CPU capability, XLA's flags);
2. `plan`: the planner's cost, measured afresh, for B0 224 px eval and train and the README default's step
   (it also fills the plan cache, so the timings below do not include it);
3. `forms`: every depthwise form in one process per configuration, each compiled once, then timed in 40 rounds of
   half-second turns (auto, native, shift, then back: `throughput.py --rounds`), so a slow minute falls on every form
   of its round alike; `auto` against the fastest fixed form: the median of the rounds' ratios, and the ratio of the
   best turns (a shared CPU only ever slows a turn down, so each form's best turn is its least disturbed one);
4. `torch`: `auto` against torch eager and `torch.compile`, `--runs` times (median and range);
5. `onnx`: B0 224 px eval against ONNX Runtime on torchvision's exported model.

`--build avx2` emulates an AVX2 + FMA machine (Zen 3, Haswell..) on an AVX-512 one: the kernels built with
`-march=x86-64-v3`, XLA with `--xla_cpu_max_isa=AVX2`, torch with `ATEN_CPU_CAPABILITY=avx2` and oneDNN with
`ONEDNN_MAX_CPU_ISA=AVX2`. Writes DIR/rows.jsonl (every row, tagged with its step) and DIR/summary.md.

    python benchmarks/cpu_kinds.py --build native --out /tmp/kinds-native
    python benchmarks/cpu_kinds.py --build avx2 --out /tmp/kinds-avx2 --steps forms,torch
    python benchmarks/cpu_kinds.py --summarize /tmp/kinds-avx2      # the tables again, from rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
AVX2_ENV = {"EFFNET_JAX_NATIVE_MARCH": "x86-64-v3", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
            "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# (name, throughput.py arguments, the fixed forms to time beside auto). XLA's depthwise form runs 5-15x slower than
# the others at 224 px (the plan's per-unit timings show it), so it is timed where that costs seconds.
CONFIGS = [
    ("B0 train 224 px b16", ["--variant", "b0", "--resolution", "224", "--batch-size", "16", "--mode", "train"],
     "native,shift"),
    ("B0 eval 224 px b16", ["--variant", "b0", "--resolution", "224", "--batch-size", "16", "--mode", "eval"],
     "native,shift"),
    ("B0 train 32 px b64", ["--variant", "b0", "--resolution", "32", "--batch-size", "64", "--mode", "train"],
     "native,shift,xla"),
    ("B0 eval 32 px b64", ["--variant", "b0", "--resolution", "32", "--batch-size", "64", "--mode", "eval"],
     "native,shift,xla"),
    ("README default step (Lite0 128 px b64 --freeze 8, train)",
     ["--variant", "lite0", "--resolution", "128", "--batch-size", "64", "--mode", "train", "--freeze", "8"],
     "native,shift"),
]
# forms: rounds of turns of about TURN_S seconds each; identical computations in neighbouring turns differed by
# up to 40 % on the shared 2-core machines, so many short rounds, not a few long ones
ROUNDS, TURN_S = 40, 0.5
TORCH_CONFIGS = CONFIGS[:4]
PLANS = [("B0 224 px b16 eval", ["--variant", "b0", "--resolution", "224", "--mode", "eval"]),
         ("B0 224 px b16 train", ["--variant", "b0", "--resolution", "224", "--mode", "train"]),
         ("Lite0 128 px b64 --freeze 8 train",
          ["--variant", "lite0", "--resolution", "128", "--batch", "64", "--mode", "train", "--freeze", "8"])]
TARGETS = {"B0 train 224 px b16": (1.5, 1.2), "B0 eval 224 px b16": (2.0, 1.2), "B0 train 32 px b64": (2.0, None),
           "B0 eval 32 px b64": (4.0, None)}
CHECK = """
import json, os, torch
from effnet_jax.kernels import native
from effnet_jax.kernels import autotune
print(json.dumps({"kernels": native.form() if native.available() else None, "machine": autotune.machine(),
                  "torch_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))
"""


def run(cmd: list[str], env: dict, log: Path) -> tuple[list[dict], float, str]:
    """Runs one measuring process; returns its JSON lines, its wall seconds and its stdout."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n# rc {p.returncode}, {wall:.1f} s\n{p.stdout}\n{p.stderr[-4000:]}\n")
    if p.returncode:
        raise SystemExit(f"failed (rc {p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")], wall, p.stdout


def measure(build: str, out: Path, steps: list[str], runs: int, only: str = "") -> None:
    env = {**os.environ, **(AVX2_ENV if build == "avx2" else {})}
    # torch.compile's cache of its own, per build: with the cache the AVX2 emulation had filled, the native build's
    # train step under torch.compile crashed in malloc every time, and ran with a fresh one (2026-12-07)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out.absolute() / "torchinductor"))
    out.mkdir(parents=True, exist_ok=True)
    rows_path, log = out / "rows.jsonl", out / "log.txt"

    def keep(step: str, name: str, rows: list[dict], **extra) -> None:
        with rows_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "name": name, "build": build, **extra, **r}) + "\n")

    tp = [PY, str(HERE / "throughput.py")]
    if "checks" in steps:
        rows, _, _ = run([PY, "-c", CHECK], env, log)
        keep("checks", "build", rows)
    if "plan" in steps:
        for name, a in PLANS:
            _, wall, stdout = run([PY, "-m", "effnet_jax.kernels", "plan", "--remeasure", *a], env, log)
            keep("plan", name, [{"wall_s": wall, "tail": stdout.strip().splitlines()[-3:]}])
    if "forms" in steps:
        for name, a, fixed in (c for c in CONFIGS if only in c[0]):
            rows, _, _ = run([*tp, *a, "--compare", "none", "--rounds", str(ROUNDS), "--turn-s", str(TURN_S),
                              "--depthwise-impl", f"auto,{fixed}"], env, log)
            keep("forms", name, rows)
    if "torch" in steps:
        for i in range(runs):
            for name, a, _ in (c for c in TORCH_CONFIGS if only in c[0]):
                rows, _, _ = run([*tp, *a, "--depthwise-impl", "auto"], env, log)
                keep("torch", name, rows, run=i)
    if "onnx" in steps:
        rows, _, _ = run([PY, str(HERE / "onnx_peer.py"), "--variant", "b0", "--resolution", "224",
                          "--batch-size", "16"], env, log)
        keep("onnx", "B0 eval 224 px b16", rows)


def summarize(out: Path) -> str:
    rows = [json.loads(l) for l in (out / "rows.jsonl").read_text().splitlines() if l.strip()]
    md = []
    for r in (r for r in rows if r["step"] == "checks"):
        m = r["machine"]
        md += [f"Build `{r['build']}`: CPU {m['cpu']}; kernels {r['kernels']}; march {m.get('march')}; "
               f"XLA_FLAGS `{m.get('xla_flags') or ''}`; torch {r['torch']} capability {r['torch_capability']}; "
               f"jax {m['jax']}.", ""]
    plans = [r for r in rows if r["step"] == "plan"]
    if plans:
        md += ["| plan measured afresh | wall s | printed |", "|---|---:|---|"]
        md += [f"| {r['name']} | {r['wall_s']:.1f} | {' / '.join(r['tail'])} |" for r in plans]
        md.append("")
    forms = [r for r in rows if r["step"] == "forms" and "turn_img_s" in r]
    if forms:
        md += ["| forms in one run, img/s (median of the rounds) | auto | native | shift | xla | fastest fixed "
               "| auto / fastest fixed: median of the rounds (range) | best turn / best turn | auto's plan |",
               "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for name in dict.fromkeys(r["name"] for r in forms):
            by = {r["depthwise_impl"]: r for r in forms if r["name"] == name}
            fastest = max((k for k in by if k != "auto"), key=lambda k: by[k]["jax_img_s"])
            auto = by["auto"]
            per_round = [a / f for a, f in zip(auto["turn_img_s"], by[fastest]["turn_img_s"])]
            cell = lambda k: f"{by[k]['jax_img_s']:.1f}" if k in by else "–"  # noqa: E731
            best_fixed = max(max(r["turn_img_s"]) for k, r in by.items() if k != "auto")
            md.append(f"| {name} | {cell('auto')} | {cell('native')} | {cell('shift')} | {cell('xla')} | {fastest} "
                      f"| {auto['vs'][fastest]:.3f} ({min(per_round):.3f}–{max(per_round):.3f}) | "
                      f"{max(auto['turn_img_s']) / best_fixed:.3f} | {json.dumps(auto.get('plan'))} |")
        md.append("")
    tr = [r for r in rows if r["step"] == "torch"]
    if tr:
        md += ["| against torch (auto) | runs | JAX img/s | eager img/s | compile img/s | × eager: median (range) "
               "| target | × compile: median (range) | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in dict.fromkeys(r["name"] for r in tr):
            rs = [r for r in tr if r["name"] == name]
            med = lambda k: statistics.median(r[k] for r in rs if r.get(k))  # noqa: E731

            def span(k):
                v = [r[k] for r in rs if r.get(k)]
                return f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})" if v else "–"
            te, tc = TARGETS[name]
            md.append(f"| {name} | {len(rs)} | {med('jax_img_s'):.1f} | {med('torch_img_s'):.1f} | "
                      f"{med('torch_compile_img_s') if any(r.get('torch_compile_img_s') for r in rs) else 0:.1f} | "
                      f"{span('ratio')} | ≥ {te} | {span('ratio_compiled')} | {'≥ ' + str(tc) if tc else '–'} |")
        md.append("")
    for r in (r for r in rows if r["step"] == "onnx"):
        i = r["img_s"]
        md += [f"ONNX peer, {r['name']}: JAX {i['jax']:.1f} img/s, ONNX Runtime {r['ort']} {i['onnxruntime']:.1f}, "
               f"ONNX Runtime on our own export {i.get('onnxruntime_our_export', 0):.1f}, torch eager "
               f"{i['torch_eager']:.1f}: JAX / ORT {r['jax_over_ort']:.2f}×, JAX / eager {r['jax_over_eager']:.2f}× "
               f"(plan forms {r['plan']}).", ""]
    text = "\n".join(md)
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", choices=("native", "avx2"), default="native")
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", default="checks,plan,forms,torch,onnx")
    p.add_argument("--runs", type=int, default=3, help="runs of the torch comparison (median and range)")
    p.add_argument("--only", default="", metavar="TEXT", help="forms and torch: only the configurations whose name "
                   "contains TEXT (e.g. 'train 224')")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="only print DIR's tables again")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.out is None:
        p.error("--out DIR is needed")
    measure(args.build, args.out, args.steps.split(","), args.runs, args.only)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
