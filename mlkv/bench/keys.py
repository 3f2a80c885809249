"""Key batches for benchmarks: uniform or Zipf-distributed over a table's keys, drawn with numpy.

Zipf(alpha) ranks the keys by a random permutation (so popularity is unrelated to key order or file
position) and samples rank r with probability proportional to r**-alpha, by inverse CDF: one searchsorted
per batch, no Python loop, and no truncation bias (numpy's `zipf` is unbounded and needs alpha > 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import InvalidArgumentError

DISTRIBUTIONS = ("zipf", "uniform")


class KeyStream:
    """An endless cycle over a pool of precomputed batches (drawing is kept out of the timed loops)."""

    def __init__(
        self,
        keys: np.ndarray,
        batch: int,
        dist: str = "zipf",
        alpha: float = 1.05,
        seed: int = 0,
        pool_keys: int = 1 << 21,
    ):
        if dist not in DISTRIBUTIONS:
            raise InvalidArgumentError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
        if dist == "zipf" and alpha <= 0:
            raise InvalidArgumentError(f"zipf alpha must be > 0, got {alpha}")
        if batch <= 0:
            raise InvalidArgumentError(f"batch must be a positive int, got {batch}")
        rng = np.random.default_rng(seed)
        n = len(keys)
        n_batches = max(8, -(-min(pool_keys, 2 * n) // batch))
        total = n_batches * batch
        if dist == "uniform":
            pos = rng.integers(0, n, total)
        else:
            by_rank = rng.permutation(n)
            weights = np.arange(1, n + 1, dtype=np.float64) ** -alpha
            cdf = np.cumsum(weights)
            cdf /= cdf[-1]
            ranks = np.minimum(np.searchsorted(cdf, rng.random(total), side="right"), n - 1)
            pos = by_rank[ranks]
        self.positions = pos.reshape(n_batches, batch)  # row numbers, for the array baselines
        self.keys = keys[self.positions]  # the same draws as store keys
        self.dist = dist
        self.alpha = alpha
        self._next = 0

    def __len__(self) -> int:
        return len(self.keys)

    def next_index(self) -> int:
        i = self._next
        self._next = (i + 1) % len(self.keys)
        return i

    def batches(self) -> Iterator[int]:
        """Indices of successive pool batches, cycling forever (read `keys[i]` or `positions[i]`)."""
        while True:
            yield self.next_index()
