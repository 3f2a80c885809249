"""AdmissionSketch: how many batches have named a key that is not stored yet, in bounded memory.

A table created with ``admit_after=N`` stores a key only once N batches (tracked ``get`` calls) have named
it; until then ``get`` serves its deterministic init row and ``update`` drops its gradients. Counting every
id of an endless id space exactly would grow without bound, so the counts live in a count-min sketch:
``DEPTH`` rows of ``width`` 8-bit counters (saturating at 255), one splitmix64-derived hash per row, and
**conservative update** (a sighting raises only the counters that equal the key's current estimate).

Error rate (documented guarantee of count-min, which conservative update only tightens): the estimate
never undercounts, and with probability at least ``1 - exp(-DEPTH)`` (98.2 % for DEPTH = 4) it overcounts by
at most ``e / width`` times the number of sightings counted so far (sightings of keys not yet stored; a
stored key is no longer counted). With the default width of 2^20 (4 MiB per table) that is one extra
count per ~385,000 sightings, so with N = 3 a key named once may be admitted early only after ~770,000
sightings of other new keys landed on all of its counters. An early admission stores a row one batch
early; it never loses one. `width` is a table argument for larger id streams.

The sketch is in memory, not part of checkpoints: after a reopen, keys not yet stored start counting
again (stored rows are never affected). Thread-safety: called with the store lock held.
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.kernel import kernel
from ..errors import InvalidArgumentError

DEPTH = 4
DEFAULT_WIDTH = 1 << 20
_SALTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], np.uint64)


@kernel
def _mix(z):
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@kernel
def _count(counters, salts, keys, add, out):
    """out[i] = the estimate of keys[i] after (add=True: conservatively) counting one sighting of it."""
    depth, width = counters.shape
    mask = np.uint64(width - 1)
    at = np.empty(depth, np.int64)
    for i in range(keys.shape[0]):
        est = 255
        for r in range(depth):
            at[r] = np.int64(_mix(keys[i] ^ salts[r]) & mask)
            c = counters[r, at[r]]
            if c < est:
                est = c
        if add and est < 255:
            est += 1
            for r in range(depth):
                if counters[r, at[r]] < est:
                    counters[r, at[r]] = est
        out[i] = est


class AdmissionSketch:
    def __init__(self, width: int = DEFAULT_WIDTH):
        if width < 1 or width & (width - 1):
            raise InvalidArgumentError(f"sketch width must be a power of two, got {width}")
        self.width = width
        self._counters = np.zeros((DEPTH, width), dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return self._counters.nbytes

    @staticmethod
    def overcount_bound(width: int, sightings: int) -> float:
        """Count-min: estimates exceed the truth by at most this, with probability >= 1 - e^-DEPTH."""
        return math.e / width * sightings

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count one sighting of each distinct key; return their estimated counts (uint8, saturating)."""
        out = np.empty(len(keys), dtype=np.uint8)
        _count(self._counters, _SALTS, keys.astype(np.uint64, copy=False), True, out)
        return out

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty(len(keys), dtype=np.uint8)
        _count(self._counters, _SALTS, keys.astype(np.uint64, copy=False), False, out)
        return out
