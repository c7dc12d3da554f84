"""The planner's measurements: time each candidate form of a unit on this machine, keep the fastest, cache the plan.

Why measure: the same form is the fastest on one CPU and not on another (measured: benchmarks/results/speed.md,
section 'per CPU vector unit, kernels and the planner (AMD EPYC Zen 4 and the same CPU as AVX2, issue 40)'), and
what XLA fuses around a unit decides as much as the unit itself. So a unit is timed whole, in its mode and shape,
once per machine (`machine`), and kept in a plan file beside the compiled kernels. `EFFNET_JAX_AUTOTUNE=0` uses the
planner's fixed rule instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from effnet_jax.kernels import native

log = logging.getLogger(__name__)

OPT_OUT = "EFFNET_JAX_AUTOTUNE"
MARCH_ENV = "EFFNET_JAX_NATIVE_MARCH"
FORMAT = 1
# each candidate, compiled: its best call, of a first one and MIN_ROUNDS..MAX_ROUNDS rounds of turns (those within
# BUDGET_S); only the first where that was already SLOWER_CUTOFF times the fastest first call
MIN_ROUNDS, MAX_ROUNDS, SLOWER_CUTOFF, BUDGET_S = 3, 12, 2.0, 1.0
TIE = 0.05  # a form must beat the fixed rule's by more than this to be chosen instead (`fastest`)


@dataclasses.dataclass(frozen=True)
class Unit:
    """What a plan entry is for: a kind of unit ('mbconv'), its configuration, input shape, mode, dtype."""
    kind: str
    signature: str
    shape: tuple[int, ...]
    mode: str  # 'train' (forward and backward) or 'inference' (forward only)
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.kind} | {self.signature} | {'x'.join(map(str, self.shape))} | {self.mode} | {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Decision:
    """One unit's form: `source` 'measured' (now), 'cached' (the plan file), 'fixed' (the fixed rule)."""
    name: str
    unit: Unit
    form: str
    ms: dict[str, float] | None
    source: str


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_source_hash() -> str:
    try:
        source = resources.files("effnet_jax.kernels").joinpath("csrc", "depthwise.cc").read_bytes()
    except OSError:
        source = b""
    return hashlib.sha256(source).hexdigest()[:16]


def machine() -> dict[str, str]:
    """What a plan is valid for (the plan file's `machine`, and its name's hash): the CPU (model and flags), jax's
    and jaxlib's versions, the kernels' source and build target (`EFFNET_JAX_NATIVE_MARCH`), `XLA_FLAGS` and the
    device count. A plan file that cannot be read, or that was written for another machine, is measured again."""
    cpu = native._cpu_id()
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "")
    return {"cpu": model or cpu[:80], "cpu_id": hashlib.sha256(cpu.encode()).hexdigest()[:16],
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "kernels": kernel_source_hash(),
            "march": os.environ.get(MARCH_ENV, "native"), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "devices": str(jax.local_device_count())}


def plan_path(m: dict[str, str] | None = None) -> Path:
    m = m or machine()
    digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]
    return native.cache_dir() / f"plan-{digest}.json"


def _read(path: Path, m: dict[str, str]) -> dict[str, dict]:
    """The plan's entries, or {} (with a warning) when the file is damaged or for another machine."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("effnet_jax: the kernel plan %s cannot be read (%s); measuring again", path, e)
        return {}
    ok = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == m
          and isinstance(data.get("units"), dict))
    if not ok:
        log.warning("effnet_jax: the kernel plan %s was written for another machine or version; measuring again", path)
        return {}
    return {k: v for k, v in data["units"].items() if _valid_entry(v)}


def _valid_entry(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("form"), str) and isinstance(v.get("ms"), dict)
            and all(isinstance(t, (int, float)) for t in v["ms"].values()))


def _write(path: Path, m: dict[str, str], key: str, entry: dict) -> None:
    """Add one entry to the plan file: under a lock, merged with what other processes wrote, replaced atomically
    (a killed process leaves the old file or the new one, never half of one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            units = _read(path, m)
            units[key] = entry
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                             delete=False) as f:
                json.dump({"format": FORMAT, "machine": m, "units": units}, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
    except OSError as e:  # a plan that cannot be kept is measured again next time, nothing worse
        log.warning("effnet_jax: cannot write the kernel plan %s (%s)", path, e)


_memo: dict[tuple[str, str], dict] = {}
_memo_lock = threading.Lock()
_announced = False
_recording: contextvars.ContextVar[tuple[list, bool] | None] = contextvars.ContextVar("effnet_jax_plan", default=None)


@contextlib.contextmanager
def recording(remeasure: bool = False) -> Iterator[list[Decision]]:
    """Collect the decisions made while the block runs (one per unit met), for `python -m effnet_jax.kernels plan`;
    with `remeasure`, measure each unit again (once) and replace its cached entry."""
    decisions: list[Decision] = []
    token = _recording.set((decisions, remeasure))
    try:
        yield decisions
    finally:
        _recording.reset(token)


def _record(d: Decision) -> str:
    rec = _recording.get()
    if rec is not None and not any(r.name == d.name and r.unit == d.unit for r in rec[0]):  # one row per unit
        rec[0].append(d)
    return d.form


def choose(unit: Unit, candidates: tuple[str, ...], fixed: str, build: Callable[[str], Callable[[], object]],
           name: str = "", remeasure: bool = False) -> str:
    """The fastest of `candidates` for `unit` on this machine: from this process's memo, else the plan file, else
    measured now (`build(form)` returns a function that runs the unit once; its first call compiles) and cached.
    `fixed` where measuring is turned off or there is nothing to choose."""
    if len(candidates) == 1 or not enabled():
        return _record(Decision(name, unit, fixed if fixed in candidates else candidates[0], None, "fixed"))
    m = machine()
    path = plan_path(m)
    memo_key = (str(path), unit.key)
    rec = _recording.get()
    if rec is not None and rec[1] and not any(d.unit == unit and d.source == "measured" for d in rec[0]):
        remeasure = True
    with _memo_lock:
        entry = None if remeasure else _memo.get(memo_key)
        source = "cached"
        if entry is None and not remeasure:
            entry = _read(path, m).get(unit.key)
        if entry is None or not set(candidates) <= set(entry["ms"]):
            # a cached entry holds only the forms it timed: one measured while a form was off (EFFNET_JAX_NATIVE=0,
            # no compiler) has not seen it, and is measured again with it
            entry, source = measure(unit, candidates, build, path, fixed), "measured"
            _write(path, m, unit.key, entry)
        _memo[memo_key] = entry
    ms = {f: entry["ms"][f] for f in candidates}  # the fastest of what may run now
    return _record(Decision(name, unit, fastest(ms, fixed), ms, source))


def fastest(ms: dict[str, float], fixed: str) -> str:
    """The form of least time, but `fixed` where it is within TIE of that: a unit timed alone does not see what
    the fixed rule's form fuses with its neighbours (the kernels compute the stem or the expansion with the first
    block in inference), and forms that close swap places from one measurement to the next on a shared CPU."""
    best = min(ms, key=ms.get)
    return fixed if fixed in ms and ms[fixed] <= (1 + TIE) * ms[best] else best


def measure(unit: Unit, candidates: tuple[str, ...], build: Callable[[str], Callable[[], object]],
            path: Path | None = None, fixed: str = "") -> dict:
    """{'form': the fastest (`fastest`), 'ms': {form: milliseconds per call}}; a candidate that fails to run gets
    inf."""
    global _announced
    if not _announced:
        _announced = True
        print(f"effnet_jax: measuring the fastest kernel form of each new unit shape on this CPU, once per machine "
              f"(plan: {path or plan_path()}; EFFNET_JAX_AUTOTUNE=0 uses a fixed rule)", file=sys.stderr, flush=True)
    # in a thread of its own, outside any trace of the caller's: a unit is met while an enclosing function is being
    # traced (`jit`), and the timed functions must run for real
    with ThreadPoolExecutor(1) as pool:
        ms = pool.submit(_time_candidates, candidates, build).result()
    return {"form": fastest(ms, fixed), "ms": ms}


def _time_candidates(candidates, build) -> dict[str, float]:
    """Milliseconds per call of each candidate: its best call. The candidates compile side by side (XLA's compiler
    is mostly one thread), then each runs once (allocations; one already SLOWER_CUTOFF times the fastest first call
    stops there), then the others run in turns, one call each per round, for at least MIN_ROUNDS rounds and at
    most MAX_ROUNDS or BUDGET_S: on a shared CPU a slow moment then falls on every candidate alike, not on one."""
    with ThreadPoolExecutor(min(len(candidates), os.cpu_count() or 1)) as pool:
        prepared = {form: pool.submit(build, form) for form in candidates}
    ms: dict[str, float] = {}
    runs: dict[str, Callable[[], object]] = {}
    for form in candidates:
        try:
            runs[form] = prepared[form].result()
            ms[form] = _timed_call(runs[form])
        except Exception as e:  # noqa: BLE001 - a form that cannot run here is simply not chosen
            log.warning("effnet_jax: kernel form %r failed while measured (%s: %s)", form, type(e).__name__, e)
            ms[form] = math.inf
    fastest_first = min(ms.values())
    timed = [f for f in candidates if ms[f] <= SLOWER_CUTOFF * fastest_first and math.isfinite(ms[f])]
    t_end = time.perf_counter() + BUDGET_S
    for r in range(MAX_ROUNDS if len(timed) > 1 else 0):
        for form in (timed if r % 2 == 0 else timed[::-1]):
            ms[form] = min(ms[form], _timed_call(runs[form]))
        if r + 1 >= MIN_ROUNDS and time.perf_counter() > t_end:
            break
    return {f: round(t, 4) for f, t in ms.items()}


def _timed_call(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def time_module(module, x_shape: tuple[int, ...], train: bool) -> Callable[[], object]:
    """Compiled, a function running flax `module` (called as module(x, train)) once on random x of `x_shape`:
    forward only, or in training forward and backward (the gradients of the parameters and of x). The variables
    are random numbers of their shapes drawn without running `init` (positive, for BatchNorm's variances; kernels
    scaled by 1/sqrt(fan-in), so that the activations stay O(1))."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32)).astype(module.dtype)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, False), x)
    variables = jax.tree_util.tree_map(lambda s: jnp.asarray(
        (rng.uniform(0.5, 1.0, s.shape) / math.sqrt(math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1))
        .astype(s.dtype)), shapes)
    rngs = {"dropout": jax.random.key(1)}
    if train:
        def loss(params, x):
            y, _ = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"], rngs=rngs)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        f, args = jax.grad(loss, argnums=(0, 1)), (variables["params"], x)
    else:
        f, args = (lambda v, x: module.apply(v, x, False)), (variables, x)
    compiled = jax.jit(f).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args))
