"""Batching: `epoch_permutation`, `batch_indices`, `eval_batches` are plain numpy, identical on every host;
`stream_batches` feeds a streamed split's batches from grain threads that decode the next batches while the device
works on this one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from effnet_jax.data.dataset import Split

__all__ = ["epoch_permutation", "batch_indices", "eval_batches", "stream_batches"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) (int32) that depends only on (seed, epoch): the same on every host."""
    if not 0 <= n < 2**31:
        raise ValueError(f"n must be in [0, 2**31), got {n}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def batch_indices(perm: np.ndarray, batch_size: int, drop_last: bool = True) -> list[np.ndarray]:
    """Consecutive batches of `perm`; the last, shorter one is dropped when `drop_last`, else kept."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    stop = len(perm) - len(perm) % batch_size if drop_last else len(perm)
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def eval_batches(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask), both (ceil(n / batch_size), batch_size): examples 0..n-1 in order, the last batch padded
    with index 0 and mask False, so that counting only masked-in entries sees every example exactly once."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num = -(-n // batch_size)
    flat = np.arange(num * batch_size, dtype=np.int32)
    mask = flat < n
    return np.where(mask, flat, 0).reshape(num, batch_size), mask.reshape(num, batch_size)


def stream_batches(split: Split, batches: Sequence[np.ndarray], *, num_threads: int = 4,
                   prefetch: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each index array in `batches` (indices into `split`, usually a streamed one), in order,
    read by a grain pipeline: `num_threads` threads decode whole batches ahead of the consumer, at most `prefetch`
    batches."""
    import grain

    batches = [np.asarray(b) for b in batches]
    ds = grain.MapDataset.range(len(batches)).map(lambda b: split.read_batch(batches[b]))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
