"""Devices: joining a multi-process run, and the 1-D data-parallel mesh with how host arrays go onto it.

One `jax.jit` step runs over a mesh `('data',)` of all devices of all processes: batches are sharded over it,
the state and the on-device dataset replicated. The same code runs on 1..N devices and N processes (CPU, GPU,
TPU); on CPU the processes exchange collectives through gloo.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effnet_jax.errors import ConfigError

log = logging.getLogger("effnet_jax.train")
PyTree = Any


CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join JAX's multi-controller runtime (`jax.distributed.initialize`) before anything touches a device.

    With any of the arguments: exactly those (the others auto-detected by JAX). Without: JAX's own
    auto-detection where a launcher says there are several processes (SLURM, Open MPI, PMI, a TPU pod slice);
    on a single machine, nothing. On CPU the processes exchange collectives through gloo."""
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    launched = any(int(os.environ.get(v, "1") or 1) > 1 for v in CLUSTER_SIZE_VARS) \
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or launched):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


class Mesh:
    """The 1-D data-parallel mesh and how host arrays go onto it (one process or many)."""

    def __init__(self, devices=None):
        devices = jax.devices() if devices is None else devices
        self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self.batch = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.size = len(devices)

    def check_batch(self, batch_size: int, what: str = "--batch-size") -> None:
        if batch_size % self.size:
            raise ConfigError(f"{what} {batch_size} is not divisible by the {self.size} devices; use a multiple of "
                             f"{self.size}")

    def put_batch(self, global_array: np.ndarray) -> jax.Array:
        """A global batch array (identical on every process) sharded over the mesh: each process contributes
        its slice."""
        return self.put_local(self.local_rows(global_array), global_array.shape)

    @staticmethod
    def local_rows(global_array: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch (all of it with one process)."""
        n = jax.process_count()
        return np.array_split(global_array, n)[jax.process_index()] if n > 1 else global_array

    def put_local(self, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
        """This process's rows (`local_rows`) of a global batch of `global_shape`, sharded over the mesh."""
        return jax.make_array_from_process_local_data(self.batch, local, global_shape)

    def put_stream(self, feed, global_rows: int) -> tuple[jax.Array, jax.Array]:
        """The next (images, labels) of a `data.stream_batches` feed of this process's rows, as global arrays."""
        images, labels = next(feed)
        return (self.put_local(images, (global_rows, *images.shape[1:])),
                self.put_local(labels, (global_rows, *labels.shape[1:])))

    def replicate(self, tree: PyTree) -> PyTree:
        """A copy of `tree` on every device of the mesh. With several processes each one holds the same values
        and builds the global array from them (`device_put` cannot address other processes' devices)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            a = np.asarray(x)
            return jax.make_array_from_callback(a.shape, self.replicated, lambda index: a[index])
        return jax.tree.map(put, tree)
