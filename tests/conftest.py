"""The order in which the two pytest-xdist workers take the test files (`--dist loadfile` with
`--no-loadscope-reorder`, pyproject's addopts): the longest files first, each measured at 1.5–4 minutes on
2 cores (benchmarks/results/test-suite.md), then the short ones. A worker takes the next file when it is
nearly done with its own, so with the long ones first the two finish within a short file of each other;
xdist's default order (most tests first) left test_resilience.py for last and one worker running it alone.

Fixtures shared by the test files are here too; plain helpers (importable) are in helpers.py."""

import os
import pathlib

import pytest

# The planner's fixed rule throughout the suite: measuring each unit's forms on first use would make the tests'
# forms depend on the machine's timings and cost a compile per candidate; tests/test_planner.py turns it on.
os.environ.setdefault("EFFNET_JAX_AUTOTUNE", "0")

from helpers import CIFAR_TAR

pytest.register_assert_rewrite("hub_server")  # the local Hub's module, imported by test files for its fixture

LONGEST_FIRST = ("test_resilience.py", "test_models.py", "test_train.py", "test_convert.py", "test_export.py",
                 "test_benchmarks.py", "test_keras.py", "test_timm.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


@pytest.fixture(scope="session")
def cifar_tar() -> pathlib.Path:
    """The real-data archive (`helpers.CIFAR_TAR`); a test that needs it is skipped, naming the path, without it."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real CIFAR-10 JPEG archive not found: {CIFAR_TAR} (expected in ../shared/data beside the "
                    "repository)")
    return CIFAR_TAR
