"""StalenessGate: per-row bounded staleness for one table.

A tracked read of key k by reader R registers that R holds k; R's next update/put/release of k resolves
it. A read of k may proceed only while at most `bound` *other* readers hold k, so it misses at most `bound`
updates; with bound 0 every read sees every earlier update. A reader never waits for itself: keys it already
holds neither count again nor block (gradient accumulation, two modules sharing a table, a key twice in a
batch). A reader is any hashable: the current thread by default, or an explicit handle (the torch layer
passes one per SparseOptimizer). A reader whose owner is gone without resolving its reads is `forget()`-ten
(the torch layer does it from a weakref finalizer of its SparseOptimizer), so its holds never block others.

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

LAG_BINS = 18
_RECHECK_SECONDS = 1.0  # a waiter looks for forgotten readers at least this often


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
        self._gone: list[Hashable] = []  # readers forget() was called for; appended without the lock
        # lag_hist[i]: tracked reads of a key that i other holders (readers or queued updates) held when the
        # read was admitted (the last bin counts LAG_BINS - 1 or more): i bounds the updates the read missed
        self.lag_hist = np.zeros(LAG_BINS, dtype=np.int64)

    def holders(self) -> int:
        self._purge()
        return len(self._holds)

    def outstanding(self) -> int:
        self._purge()
        return sum(len(h) for h in self._holds.values())

    def forget(self, reader: Hashable) -> None:
        """`reader` is gone (e.g. its SparseOptimizer was garbage-collected): its holds are dropped at the
        gate's next use. Never blocks and never touches the holds, so a weakref finalizer may call it from
        any thread at any moment, even from inside a gate call on the same thread (the store lock is not
        reentrant). Waiters are woken now if the lock is free, else within _RECHECK_SECONDS."""
        self._gone.append(reader)
        if self._cond.acquire(blocking=False):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    def _purge(self) -> None:
        """Drop the holds of forgotten readers (store lock held)."""
        while self._gone:
            self._holds.pop(self._gone.pop(), None)

    def _others_holding(self, keys: np.ndarray, reader: Hashable) -> np.ndarray:
        self._purge()
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
            others = self._others_holding(new, reader)
            stuck = int((others > bound).sum())
            if stuck:
                self._wait(new, reader, bound, timeout, stats, stuck)
                new = self._new_for(keys, reader)  # the lock was released: look again
                others = self._others_holding(new, reader)
            self.lag_hist += np.bincount(np.minimum(others, LAG_BINS - 1), minlength=LAG_BINS)
        else:
            self.lag_hist[0] += len(new)
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
                self._cond.wait(min(left, _RECHECK_SECONDS))  # a forget() may not have been able to notify
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

    def hand_over(self, keys: np.ndarray, reader: Hashable, to: Hashable) -> None:
        """`reader` turns its reads of distinct sorted `keys` into an update pending for holder `to`: `to`
        holds every key until it is applied (readers meanwhile miss it and count it against the bound),
        `reader` holds none of them any more."""
        held = self._holds.get(to)
        self._holds[to] = keys.copy() if held is None else np.union1d(held, keys)
        self.resolve(keys, reader)

    def release_all(self, reader: Hashable) -> None:
        if self._holds.pop(reader, None) is not None and self._waiting:
            self._cond.notify_all()
