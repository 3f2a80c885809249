"""KeyIndex: a vectorised open-addressing hash map from 64-bit keys to int64 values (slots).

Why not a dict: a Python dict lookup of 50 K keys costs ~16 ms, more than gathering the rows. Here every
operation works on a whole batch of keys with numpy: each probe round is a handful of array operations over
the keys still unresolved, so a batch costs O(rounds) numpy calls, not O(keys) Python steps.

Layout: linear probing, Fibonacci-hashed, over two arrays, `keys` (uint64) and `vals` (int64). The full
64-bit key range is valid, so emptiness lives in `vals`: EMPTY (-1) ends a probe chain, TOMBSTONE (-2)
marks a deleted entry that chains continue through. Load (live + tombstones) stays <= 1/2 (grow or rebuild).
Memory: 16 bytes per table position, 32-64 bytes per live key.
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
TOMBSTONE = -2
_MIN_CAPACITY = 1024
_FIB = np.uint64(0x9E3779B97F4A7C15)
_HALF = np.uint64(32)


def hash64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-mixing bijection on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


class KeyIndex:
    """Batched key -> value map. Keys are uint64 arrays; values are non-negative int64."""

    def __init__(self, capacity: int = _MIN_CAPACITY):
        cap = _MIN_CAPACITY
        while cap < 2 * capacity:  # load <= 1/2 at the expected size
            cap *= 2
        self._alloc(cap)

    def _alloc(self, cap: int) -> None:
        # key and value side by side: a probe costs one cache miss, not two
        self.table = np.zeros((cap, 2), dtype=np.int64)
        self.table[:, 1] = EMPTY
        self.keys = self.table[:, 0].view(np.uint64)
        self.vals = self.table[:, 1]
        self._mask = cap - 1
        self._shift = np.uint64(65 - cap.bit_length())
        self.live = 0
        self.used = 0  # live + tombstones

    def __len__(self) -> int:
        return self.live

    def __getstate__(self) -> dict:  # keys/vals are views of table: copies must re-derive them
        return {k: v for k, v in self.__dict__.items() if k not in ("keys", "vals")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.keys = self.table[:, 0].view(np.uint64)
        self.vals = self.table[:, 1]

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """Fibonacci hashing (top bits of key * 2^64/phi) of the key with its high half folded in: spreads
        sequential, strided and high-bit-only keys evenly, at two numpy operations fewer than splitmix."""
        with np.errstate(over="ignore"):
            return (((keys ^ (keys >> _HALF)) * _FIB) >> self._shift).astype(np.int64)

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Position of each key's entry (or of the EMPTY that ends its chain), whether it was found, and
        the value there."""
        pos = self._home(keys)
        mask = self._mask
        entries = self.table.take(pos, axis=0)
        v = entries[:, 1]
        found = (entries[:, 0].view(np.uint64) == keys) & (v >= 0)
        more = np.flatnonzero(~found & (v != EMPTY))
        if len(more) == 0:
            return pos, found, v
        window = 4
        while len(more):  # keys whose home was taken: scan the next positions of each at once
            step = np.arange(1, window + 1)
            p = (pos[more, None] + step) & mask
            entries = self.table.take(p.ravel(), axis=0).reshape(len(more), window, 2)
            v = entries[:, :, 1]
            hit = (entries[:, :, 0].view(np.uint64) == keys[more, None]) & (v >= 0)
            stop = hit | (v == EMPTY)
            ends = stop.any(axis=1)
            first = stop.argmax(axis=1)
            rows = np.arange(len(more))
            pos[more] = np.where(ends, p[rows, first], p[:, -1])
            found[more] = hit[rows, first] & ends
            more = more[~ends]
            window = 32  # the rare long chains
        return pos, found, self.table.take(pos, axis=0)[:, 1]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values of `keys` (uint64 array), -1 where absent."""
        if len(keys) == 0:
            return np.empty(0, dtype=np.int64)
        _, found, v = self._probe(keys)
        return np.where(found, v, EMPTY)

    def insert_new(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert distinct keys that are known to be absent."""
        n = len(keys)
        if n == 0:
            return
        if (self.used + n) * 2 > len(self.keys):
            self._rebuild(self.live + n)
            if self.used == 0:
                return self._fill_empty(keys, vals)
        if self.used == 0:
            return self._fill_empty(keys, vals)
        self._insert_rounds(keys, vals)

    def _fill_empty(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Bulk insert into an empty table (open, rebuild) in one pass, no probe rounds: in home order, key i
        lands at max(home_i, position of key i-1 + 1), a running maximum. The few that run past the end of
        the table wrap around through the general path."""
        n = len(keys)
        home = self._home(keys)
        order = np.argsort(home, kind="stable")
        steps = np.arange(n)
        pos = np.maximum.accumulate(home[order] - steps) + steps
        fits = pos <= self._mask
        at = order[fits]
        self.keys[pos[fits]] = keys[at]
        self.vals[pos[fits]] = vals[at]
        self.used = self.live = int(fits.sum())
        if not fits.all():
            rest = order[~fits]
            self._insert_rounds(keys[rest], vals[rest])

    def _insert_rounds(self, keys: np.ndarray, vals: np.ndarray) -> None:
        n = len(keys)
        pos = self._home(keys)
        todo = np.arange(n)
        mask = self._mask
        tv = self.vals
        while len(todo):
            p = pos[todo]
            v = tv[p]
            free = v < 0
            cand, cp, was_empty = todo[free], p[free], v[free] == EMPTY
            # several keys may want one free position: each writes a claim (-3 - its index) there, the last
            # write stands, and the key whose claim stands wins (no sort needed)
            tv[cp] = -3 - cand
            won = tv[cp] == -3 - cand
            win, wp = cand[won], cp[won]
            self.used += int(np.count_nonzero(was_empty[won]))
            self.keys[wp] = keys[win]
            tv[wp] = vals[win]
            placed = np.zeros(n, dtype=bool)
            placed[win] = True
            todo = todo[~placed[todo]]
            pos[todo] = (pos[todo] + 1) & mask
        self.live += n

    def assign(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Set key -> val for distinct keys, inserting the absent ones."""
        if len(keys) == 0:
            return
        pos, found, _ = self._probe(keys)
        self.vals[pos[found]] = vals[found]
        if not found.all():
            self.insert_new(keys[~found], vals[~found])

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Delete distinct keys; return their old values (-1 where absent)."""
        if len(keys) == 0:
            return np.empty(0, dtype=np.int64)
        pos, found, _ = self._probe(keys)
        old = np.where(found, self.vals[pos], EMPTY)
        self.vals[pos[found]] = TOMBSTONE
        self.live -= int(np.count_nonzero(found))
        if self.live == 0 and self.used:  # emptied (an in-flight set, a reader's holds): drop the tombstones
            self.vals.fill(EMPTY)
            self.used = 0
        return old

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, values), in table order."""
        live = self.vals >= 0
        return self.keys[live], self.vals[live]

    def clear(self) -> None:
        self._alloc(_MIN_CAPACITY)

    def _rebuild(self, need: int) -> None:
        keys, vals = self.items()
        cap = _MIN_CAPACITY
        while cap < 2 * max(need, 1) + 1:
            cap *= 2
        self._alloc(cap)
        self.insert_new(keys, vals)


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys. Sort-based: numpy 2.x's hash-based np.unique is several times slower here."""
    s = np.sort(keys)
    keep = np.empty(len(s), dtype=bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted distinct keys, inverse such that uk[inverse] == keys, index of each key's first occurrence)."""
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    keep = np.empty(len(s), dtype=bool)
    keep[:1] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    inverse = np.empty(len(keys), dtype=np.intp)
    inverse[order] = np.cumsum(keep) - 1
    return s[keep], inverse, order[keep]
