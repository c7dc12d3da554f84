#!/usr/bin/env python3
"""This tree's JAX step against the same step of another revision, timed in turns on the same machine.

On these shared CPUs the speed of the machine drifts by ±10 % and more from one minute to the next, so two
`throughput.py` runs one after the other cannot resolve a change of a few percent. Here two worker processes,
one per tree, each build and compile the step `throughput.py` times (`common.jax_setup` / `common.jax_runner`,
from the same arguments: variant, resolution, batch size, mode, freeze, dtype, impl choices) with `effnet_jax`
imported from its own tree; then they time `--steps` steps in turns, `--rounds` times, A B / B A alternating,
one worker at a time (the other waits on its pipe, so each has all the cores in its turn), each turn after
`--settle` untimed steps. A slow minute then falls on both, and the ratio of each round's pair says what the
change does.

`--against` is a directory holding another checkout (its `effnet_jax/` is imported) or a git revision of this
repository, checked out for the run into a temporary worktree (removed afterwards). `--xla-flags-a` /
`--xla-flags-b` set one worker's `XLA_FLAGS` (XLA reads them once per process): with `--against HEAD` and a
clean tree, the same code with and without a flag. Both workers run this tree's `ab.py --worker` and
`benchmarks/common.py` (so a revision must have the `effnet_jax` API they call: `steps.jit_train_step`,
`train.config.TrainConfig`, ...). stdout: a table, then one JSON line.

    python benchmarks/ab.py --against HEAD~1 --variant b0 --resolution 224 --batch-size 16 --mode eval
    python benchmarks/ab.py --against ../other-checkout --variant lite0 --resolution 128 --batch-size 64 \\
        --mode train --freeze 6 --rounds 8
    taskset -c 0 python benchmarks/ab.py --against HEAD~1 ...   # on one core: less noise still
    python benchmarks/ab.py --against HEAD --xla-flags-a=--xla_cpu_experimental_ynn_fusion_type=+individual_dot \
        --variant b0 --resolution 224 --batch-size 16 --mode train      # an XLA flag against none
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
PREFIX = "AB "  # the workers' protocol lines on stdout; anything else they print is passed through to stderr


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other argument is passed to both workers: the step's flags as "
                                       "throughput.py takes them (one variant, resolution, batch size, mode and "
                                       "depthwise form), see `ab.py --worker --help`.")
    p.add_argument("--against", required=True, metavar="DIR_OR_REV",
                   help="a checkout's directory, or a git revision of this repository (HEAD~1, a branch, a hash)")
    p.add_argument("--rounds", type=int, default=6, help="timed turns per worker (default 6)")
    p.add_argument("--steps", type=int, default=3, help="steps per turn (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="steps each worker runs after compiling (default 1)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps at the start of every turn (default 1): the first step after the other "
                        "worker's turn measured ~15 %% slower (two cores: caches, thread wake-up), whichever ran")
    for side in ("a", "b"):
        p.add_argument(f"--xla-flags-{side}", default=None, metavar="FLAGS",
                       help=f"worker {side.upper()}'s XLA_FLAGS (default: this process's)")
    args, rest = p.parse_known_args(argv)
    for flag in ("--variant", "--resolution", "--batch-size", "--mode", "--depthwise-impl"):
        if flag in rest and "," in rest[rest.index(flag) + 1]:
            p.error(f"{flag}: one value (ab.py compares one step; throughput.py sweeps lists)")
    if "--profile" in rest or "--compare" in rest:
        p.error("--profile and --compare are throughput.py's alone")
    if args.rounds < 1 or args.steps < 1 or args.settle < 0:
        p.error("--rounds and --steps must be at least 1, --settle at least 0")
    worker_parser().parse_args(rest)  # (a flag the workers do not take: refused here, before they start)
    return args, rest


# ------------------------------------------------------------------------------------------------------- trees

def git(*argv: str, cwd=REPO) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def describe(tree: pathlib.Path) -> str:
    """The tree's commit (with '-dirty' when it has changes), or its path outside git."""
    try:
        return git("describe", "--always", "--dirty", "--abbrev=10", cwd=tree)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return str(tree)


class OtherTree:
    """`--against` as a directory to import `effnet_jax` from: the directory itself, or a temporary git
    worktree of the revision (context manager: removed on exit)."""

    def __init__(self, against: str):
        self.against, self.worktree = against, None

    def __enter__(self) -> pathlib.Path:
        path = pathlib.Path(self.against).expanduser()
        if path.is_dir():
            if not (path / "effnet_jax" / "__init__.py").is_file():
                raise SystemExit(f"--against {self.against}: no effnet_jax/ package in that directory")
            return path.resolve()
        try:
            commit = git("rev-parse", "--verify", "--quiet", f"{self.against}^{{commit}}")
        except subprocess.CalledProcessError:
            raise SystemExit(f"--against {self.against!r} is neither a directory nor a revision of {REPO}") from None
        self.worktree = pathlib.Path(tempfile.mkdtemp(prefix="effnet-ab-"))
        git("worktree", "add", "--detach", str(self.worktree), commit)
        return self.worktree

    def __exit__(self, *exc) -> None:
        if self.worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(self.worktree)], cwd=REPO,
                           capture_output=True)
            shutil.rmtree(self.worktree, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ worker

def send(msg: dict) -> None:
    sys.__stdout__.write(PREFIX + json.dumps(msg) + "\n")
    sys.__stdout__.flush()


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ab.py --worker", description="One worker: build and compile the step, then "
                                "time it on request (stdin).")
    common.add_step_arguments(p)
    p.add_argument("--warmup", type=int, default=1, help="steps run after compiling")
    return p


def worker(argv: list[str]) -> None:
    """Build and compile throughput.py's step for `argv` (`common.jax_setup`), report, then time `steps` steps
    per request on stdin."""
    sys.stdout = sys.stderr  # only the protocol lines go to the parent's pipe
    # effnet_jax comes from PYTHONPATH, the worker's tree (common.py, beside this script, from this one)
    import effnet_jax
    p = worker_parser()
    args = p.parse_args(argv)
    common.resolve_step_arguments(p, args, compare="none")
    args.depthwise_impl = args.depthwise_impl[0] if args.depthwise_impl else None  # (one: parse_args refuses a list)
    s = common.jax_setup(args.variant, common.side(args.variant, args.resolution), int(args.batch_size), args)
    run, compile_s = common.jax_runner(s, args.mode)
    run(max(args.warmup, 1))
    send({"ready": True, "compile_s": compile_s, "batch_size": int(args.batch_size),
          "effnet_jax": os.path.dirname(effnet_jax.__file__), "xla_flags": os.environ.get("XLA_FLAGS", "")})
    for line in sys.stdin:
        request = json.loads(line)
        steps = request["steps"]
        if not steps:
            break
        if request["settle"]:
            run(request["settle"])
        t = time.perf_counter()
        run(steps)
        send({"seconds": time.perf_counter() - t})


class Worker:
    def __init__(self, name: str, tree: pathlib.Path, argv: list[str], xla_flags: str | None = None):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep))
        if xla_flags is not None:
            env["XLA_FLAGS"] = xla_flags
        self.name, self.tree = name, tree
        self.proc = subprocess.Popen([sys.executable, str(HERE / "ab.py"), "--worker", *argv], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            sys.stderr.write(line)
        raise SystemExit(f"worker {self.name} ({self.tree}) stopped (exit {self.proc.wait()}); its error is above")

    def time(self, steps: int, settle: int) -> float:
        self.proc.stdin.write(json.dumps({"steps": steps, "settle": settle}) + "\n")
        self.proc.stdin.flush()
        return self.receive()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"steps": 0}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def main(argv=None) -> dict:
    args, rest = parse_args(argv)
    wargs = rest + ["--warmup", str(args.warmup)]
    with OtherTree(args.against) as other:
        trees = {"A": REPO, "B": other}
        workers = {}
        try:
            # one at a time: two XLA compilations side by side would only slow each other
            for name, tree in trees.items():
                print(f"worker {name}: {describe(tree)} ({tree}), compiling ...", file=sys.stderr, flush=True)
                workers[name] = Worker(name, tree, wargs, getattr(args, f"xla_flags_{name.lower()}"))
                ready = workers[name].receive()
                if pathlib.Path(ready["effnet_jax"]).resolve() != (tree / "effnet_jax").resolve():
                    raise SystemExit(f"worker {name} imported effnet_jax from {ready['effnet_jax']}, not from {tree}")
                workers[name].compile_s, batch = ready["compile_s"], ready["batch_size"]
                workers[name].xla_flags = ready["xla_flags"]
            img_s = {name: [] for name in trees}
            for r in range(args.rounds):
                for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                    img_s[name].append(batch * args.steps / workers[name].time(args.steps, args.settle))
                print(f"round {r + 1}/{args.rounds}: A {img_s['A'][-1]:.1f}, B {img_s['B'][-1]:.1f} img/s",
                      file=sys.stderr, flush=True)
        finally:
            for w in workers.values():
                w.close()
        ratios = [a / b for a, b in zip(img_s["A"], img_s["B"])]
        result = {"args": rest, "rounds": args.rounds, "steps": args.steps, "settle": args.settle,
                  "A": {"tree": describe(REPO), "img_s": img_s["A"], "median_img_s": statistics.median(img_s["A"]),
                        "compile_s": workers["A"].compile_s, "xla_flags": workers["A"].xla_flags},
                  "B": {"tree": describe(other), "against": args.against, "img_s": img_s["B"],
                        "median_img_s": statistics.median(img_s["B"]), "compile_s": workers["B"].compile_s,
                        "xla_flags": workers["B"].xla_flags},
                  "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(" ".join(rest))
    for name in ("A", "B"):
        row = result[name]
        print(f"{name}  {row['tree']:<24} img/s " + " ".join(f"{x:7.1f}" for x in row["img_s"])
              + f"   median {row['median_img_s']:.1f}" + (f"   XLA_FLAGS={row['xla_flags']}" if row["xla_flags"] else ""))
    print(f"A / B per round: median {result['ratio_median']:.3f} (range {result['ratio_min']:.3f}–"
          f"{result['ratio_max']:.3f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        from effnet_jax.cli.host import with_fast_malloc
        with_fast_malloc()  # before the workers start: they inherit the allocator setting
        main()
