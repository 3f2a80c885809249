"""StalenessGate: per-row bounded staleness for one table.

A tracked read of key k by reader R registers that R holds k; R's next update/put/release of k resolves
it. A read of k may proceed only while at most `bound` *other* readers hold k, so it misses at most `bound`
updates; with bound 0 every read sees every earlier update. A reader never waits for itself: keys it already
holds neither count again nor block (gradient accumulation, two modules sharing a table, a key twice in a
batch). A reader is any hashable: the current thread by default, or an explicit handle (the torch layer
passes one per SparseOptimizer).

Holds live in one sorted key array per reader (a batch's keys arrive sorted and distinct), so checking a
batch costs one binary search per active reader and recording it one merge.
Everything here runs under the store lock; waiting releases it (Condition.wait), so waiting never spins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable

import numpy as np

from ..errors import StalenessTimeout


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """keys in sorted_keys, vectorised."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


class StalenessGate:
    def __init__(self, table: str, cond: threading.Condition):
        self.table = table
        self._cond = cond  # bound to the store lock
        self._holds: dict[Hashable, np.ndarray] = {}
        self._waiting = 0

    def holders(self) -> int:
        return len(self._holds)

    def outstanding(self) -> int:
        return sum(len(h) for h in self._holds.values())

    def _others_holding(self, keys: np.ndarray, reader: Hashable) -> np.ndarray:
        counts = np.zeros(len(keys), dtype=np.int64)
        for r, held in self._holds.items():
            if r != reader:
                counts += _member(held, keys)
        return counts

    def _new_for(self, keys: np.ndarray, reader: Hashable) -> np.ndarray:
        mine = self._holds.get(reader)
        return keys if mine is None else keys[~_member(mine, keys)]

    def acquire(
        self, keys: np.ndarray, reader: Hashable, bound: int, timeout: float, stats: dict
    ) -> np.ndarray:
        """Register `reader`'s reads of distinct sorted `keys`, first waiting while any key has > bound other
        holders. Returns the keys newly registered (those `reader` did not hold already)."""
        new = self._new_for(keys, reader)
        if len(new) and len(self._holds) > (reader in self._holds):  # others hold rows: the bound may bite
            stuck = int((self._others_holding(new, reader) > bound).sum())
            if stuck:
                self._wait(new, reader, bound, timeout, stats, stuck)
                new = self._new_for(keys, reader)  # the lock was released: look again
        if len(new):
            mine = self._holds.get(reader)
            self._holds[reader] = new.copy() if mine is None else np.union1d(mine, new)
        return new

    def _wait(self, keys: np.ndarray, reader: Hashable, bound: int, timeout: float, stats: dict, stuck: int):
        stats["staleness_waits"] += 1
        start = time.perf_counter()
        deadline = start + timeout
        self._waiting += 1
        try:
            while stuck:
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise StalenessTimeout(
                        f"table {self.table!r}: {stuck} keys still had more than {bound} outstanding reads "
                        f"by other readers after {timeout:g} s (staleness_bound={bound}); does a reader "
                        f"hold rows it never updates or releases?"
                    )
                self._cond.wait(left)
                stuck = int((self._others_holding(keys, reader) > bound).sum())
        finally:
            self._waiting -= 1
            stats["staleness_wait_seconds"] += time.perf_counter() - start

    def resolve(self, keys: np.ndarray, reader: Hashable) -> None:
        """`reader` wrote or released distinct sorted `keys`: its reads of them are no longer outstanding."""
        mine = self._holds.get(reader)
        if mine is None:
            return
        left = mine[~_member(keys, mine)]
        if len(left):
            self._holds[reader] = left
        else:
            del self._holds[reader]
        if self._waiting:
            self._cond.notify_all()

    def release_all(self, reader: Hashable) -> None:
        if self._holds.pop(reader, None) is not None and self._waiting:
            self._cond.notify_all()
