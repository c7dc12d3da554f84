#!/usr/bin/env python3
"""Does a change leave the numbers alone? Runs one short fine-tune and its evaluation, or compares two such runs.

    python benchmarks/same_numbers.py run OUT_DIR [--data-dir ../shared/data/cifar10-jpeg-train.tar.gz]
    python benchmarks/same_numbers.py compare OUT_A OUT_B [--tol 1e-5]

`run`: Lite0 from its ImageNet weights, 1 epoch on a seeded 5,000-image subset of CIFAR-10 (seed 0, the default
recipe otherwise), then `effnet-evaluate` on the run; each CLI's stdout is kept in OUT_DIR.
`compare`: every number of every `metrics.jsonl` record and of the evaluation's JSON line, except wall-clock
times and speeds, must agree within `--tol`; prints the largest difference and exits 1 when one is larger.
A refactor is checked by running `run` on the commit before and after it and `compare` on the two.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
TIMING = {"time_s", "img_s"}  # wall clock: differs between any two runs


def run(out: pathlib.Path, data_dir: str) -> None:
    workdir = out / "run"
    train = [sys.executable, str(REPO / "train.py"), "--variant", "lite0", "--dataset", "cifar10", "--data-dir",
             data_dir, "--init", "imagenet", "--epochs", "1", "--max-train-examples", "5000", "--seed", "0",
             "--workdir", str(workdir), "--no-progress"]
    evaluate = [sys.executable, "-m", "effnet_jax.cli.evaluate", "--workdir", str(workdir)]
    out.mkdir(parents=True, exist_ok=False)
    for name, cmd in (("train", train), ("evaluate", evaluate)):
        print("$", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        (out / f"{name}.stdout").write_text(done.stdout)
        if done.returncode:
            sys.exit(f"{name} exited with {done.returncode}")


def _numbers(out: pathlib.Path) -> dict[str, float]:
    values = {}
    for line in (out / "run" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        values |= {f"epoch {rec['epoch']} {k}": v for k, v in rec.items() if k not in TIMING and v is not None}
    last = (out / "evaluate.stdout").read_text().splitlines()[-1]
    values |= {f"evaluate {k}": v for k, v in json.loads(last).items() if isinstance(v, (int, float))}
    return values


def compare(a: pathlib.Path, b: pathlib.Path, tol: float) -> int:
    va, vb = _numbers(a), _numbers(b)
    if va.keys() != vb.keys():
        print(f"different fields: {sorted(va.keys() ^ vb.keys())}")
        return 1
    diffs = {k: abs(float(va[k]) - float(vb[k])) for k in va}
    worst = max(diffs, key=diffs.get)
    for k in sorted(va):
        print(f"{k:<28} {va[k]!s:<22} {vb[k]!s:<22} {diffs[k]:.2e}")
    print(f"largest difference: {diffs[worst]:.2e} ({worst}); tolerance {tol:g}")
    return int(diffs[worst] > tol)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=pathlib.Path)
    r.add_argument("--data-dir", default=str(DEFAULT_DATA))
    c = sub.add_parser("compare")
    c.add_argument("a", type=pathlib.Path)
    c.add_argument("b", type=pathlib.Path)
    c.add_argument("--tol", type=float, default=1e-5)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out, args.data_dir)
        return 0
    return compare(args.a, args.b, args.tol)


if __name__ == "__main__":
    sys.exit(main())
