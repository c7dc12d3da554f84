"""The host process: settings that must exist before the process starts, applied by restarting it once.

`with_fast_malloc()` is called by the commands (`effnet-train`, `python train.py`) and the benchmark scripts,
before any work (not on import: a library must not re-execute its caller's interpreter).
"""

import os
import sys

MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "EFFNET_JAX_NO_REEXEC"


def with_fast_malloc() -> None:
    """Restart this process once (same pid, same interpreter flags and arguments) with glibc's malloc backing
    its large blocks by transparent huge pages. XLA on CPU allocates and frees its activation buffers every
    step; without this the kernel faults their pages in afresh each time (what it gains: docs/performance.md).
    glibc reads GLIBC_TUNABLES only at start-up, hence the restart; other C libraries ignore it. Does nothing
    off Linux, when the tunable is already set, or when EFFNET_JAX_NO_REEXEC is non-empty (e.g. =1)."""
    if (sys.platform != "linux" or MALLOC_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
            or os.environ.get(OPT_OUT)):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLE]))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], dict(os.environ, GLIBC_TUNABLES=tunables))
