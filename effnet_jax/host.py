"""The host process: settings that must exist before the process starts, applied by restarting it once.

`with_fast_malloc()` is called under `__main__` by `train.py` and the benchmark scripts, before any work (not on
import: a library must not re-execute its caller's interpreter).
"""

import os
import sys

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "EFFNET_JAX_NO_REEXEC"


def with_fast_malloc() -> None:
    """Restart this process once (same pid, same interpreter flags and arguments) with glibc's malloc backing
    its large blocks by transparent huge pages. XLA on CPU allocates and frees its activation buffers every
    step; without this the kernel faults their pages in afresh each time (a third of a 128 px run's CPU time
    here). Measured on a 2-core CPU: train step +24 % (Lite0 128 px) and +31 % (B0 32 px), 10-20x fewer page
    faults (benchmarks/RESULTS.md). glibc reads GLIBC_TUNABLES only at start-up, hence the restart; other C
    libraries ignore it. EFFNET_JAX_NO_REEXEC=1 turns this off."""
    if (sys.platform != "linux" or MALLOC_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
            or os.environ.get(OPT_OUT)):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLE]))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, GLIBC_TUNABLES=tunables))
