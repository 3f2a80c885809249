"""KeyIndex: an open-addressing hash map from 64-bit keys to int64 values (slots), for whole batches.

Why not a dict: a Python dict lookup of 50 K keys costs ~16 ms, more than gathering the rows. Here every
operation takes a whole batch of keys into one compiled loop (numba, `nogil`: the GIL is released, so
look-ahead threads and the trainer's own compute run meanwhile), ~20-50 ns per key, mostly its cache miss.

Layout: linear probing, Fibonacci-hashed, key and value side by side in one (capacity, 2) int64 `table`
(`keys` and `vals` are views of its columns), so a probe costs one cache miss, not two. The full 64-bit key
range is valid, so emptiness lives in `vals` (EMPTY = -1). Deletion shifts the rest of the chain back
(Knuth's algorithm R) instead of leaving tombstones, so a tier that evicts and admits every batch never
fills up with dead entries or needs a rebuild. Load stays <= 1/2: the table doubles in place (resized,
then re-laid by one kernel), so growing holds the new table alone, not a second table or a copy of the pairs.
Memory: 16 bytes per table position, 32-64 bytes per live key.
Thread-safety: none; callers serialise (the store lock, the engine lock).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .kernel import kernel
from .prefetch import prefetch_row

EMPTY = -1
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


@kernel
def home(key, shift):
    """Fibonacci hashing (top bits of key * 2^64/phi) of the key with its high half folded in: spreads
    sequential, strided and high-bit-only keys evenly."""
    return np.int64(((key ^ (key >> _HALF)) * _FIB) >> shift)


@kernel
def probe(tkeys, tvals, shift, key):
    """Table position of `key`, -1 when absent (callable from other kernels)."""
    mask = tvals.shape[0] - 1
    p = home(key, shift)
    while tvals[p] != EMPTY:
        if tkeys[p] == key:
            return p
        p = (p + 1) & mask
    return -1


@kernel
def _find(tkeys, tvals, shift, keys, pos):
    """pos[i] = table position of keys[i], or -1 when absent."""
    for i in range(keys.shape[0]):
        pos[i] = probe(tkeys, tvals, shift, keys[i])


_AHEAD = 8  # keys between prefetching an entry and probing it


@kernel
def _lookup(tkeys, tvals, shift, keys, out):
    """out[i] = value of keys[i], or -1 when absent (entries prefetched _AHEAD keys ahead: a big index
    misses the cache on every key)."""
    n = keys.shape[0]
    for i in range(min(_AHEAD, n)):
        prefetch_row(tvals, home(keys[i], shift))
    for i in range(n):
        if i + _AHEAD < n:
            prefetch_row(tvals, home(keys[i + _AHEAD], shift))
        p = probe(tkeys, tvals, shift, keys[i])
        out[i] = tvals[p] if p >= 0 else EMPTY


@kernel
def insert_one(tkeys, tvals, shift, key, val):
    """Insert a key known to be absent at the end of its chain (callable from other kernels; the caller
    keeps the load <= 1/2, see KeyIndex.reserve)."""
    mask = tvals.shape[0] - 1
    p = home(key, shift)
    while tvals[p] != EMPTY:
        p = (p + 1) & mask
    tkeys[p] = key
    tvals[p] = val


@kernel
def remove_one(tkeys, tvals, shift, key):
    """Delete `key`; return the value it had, -1 when absent (callable from other kernels).

    Backward shift: after emptying position i, each later entry j of the run whose home is not
    cyclically in (i, j] moves back into i, so every chain stays unbroken without tombstones."""
    mask = tvals.shape[0] - 1
    i = probe(tkeys, tvals, shift, key)
    if i < 0:
        return EMPTY
    old = tvals[i]
    j = i
    while True:
        j = (j + 1) & mask
        if tvals[j] == EMPTY:
            break
        h = home(tkeys[j], shift)
        if (i < h <= j) if i < j else (h > i or h <= j):
            continue  # j's home is in (i, j]: it cannot move before its home
        tkeys[i] = tkeys[j]
        tvals[i] = tvals[j]
        i = j
    tvals[i] = EMPTY
    return old


@kernel
def _insert(tkeys, tvals, shift, keys, vals):
    n = keys.shape[0]
    for i in range(n):
        if i + _AHEAD < n:
            prefetch_row(tvals, home(keys[i + _AHEAD], shift))
        insert_one(tkeys, tvals, shift, keys[i], vals[i])


@kernel
def _remove(tkeys, tvals, shift, keys, old):
    """old[i] = the value keys[i] had (-1: absent); returns how many were present."""
    removed, n = 0, keys.shape[0]
    for i in range(n):
        if i + _AHEAD < n:
            prefetch_row(tvals, home(keys[i + _AHEAD], shift))
        old[i] = remove_one(tkeys, tvals, shift, keys[i])
        removed += old[i] != EMPTY
    return removed


_BLOCK = 4096  # entries whose positions _rehash_in_place recomputes at a time


@kernel
def _rehash_in_place(tkeys, tvals, old_cap, shift):
    """Re-lay a table grown in place: its first `old_cap` positions hold the old table, the rest is EMPTY,
    and `shift` is the new one. Without a second table: the entries are packed to the front (in table
    order, which is their order by home except within a cluster), insertion-sorted by new home (a few
    moves each), and placed at max(home, previous place + 1) from the last one down, so an entry only
    ever moves to a place at or after its index. Entries of the old table's first run (some wrapped
    around from its end) and any that would run past the new end are set aside and inserted last."""
    new_cap = tvals.shape[0]
    r = 0
    while r < old_cap and tvals[r] != EMPTY:
        r += 1
    aside_k = tkeys[:r].copy()
    aside_v = tvals[:r].copy()
    tvals[:r] = EMPTY
    m = 0
    for p in range(r, old_cap):
        if tvals[p] != EMPTY:
            if p != m:
                tkeys[m] = tkeys[p]
                tvals[m] = tvals[p]
                tvals[p] = EMPTY
            m += 1
    for i in range(1, m):  # insertion sort by new home: the order is off only within a cluster
        k, v = tkeys[i], tvals[i]
        hk = home(k, shift)
        j = i - 1
        while j >= 0 and home(tkeys[j], shift) > hk:
            tkeys[j + 1] = tkeys[j]
            tvals[j + 1] = tvals[j]
            j -= 1
        tkeys[j + 1] = k
        tvals[j + 1] = v
    # place i at pos(i) = i + max over j <= i of (home(j) - j): the running maximum at each block's start
    n_blocks = (m + _BLOCK - 1) // _BLOCK
    start_max = np.empty(n_blocks, dtype=np.int64)
    best = np.int64(-(1 << 62))
    # entries from t on would be placed past the end: set aside. This never happens while the old first
    # run is set aside (entries homed in the old table's last k positions are at most k, and get 2k or
    # more), but a place past the end would be a write outside the array, so the kernel does not rely on it
    t = m
    for i in range(m):
        if i % _BLOCK == 0:
            start_max[i // _BLOCK] = best
        d = home(tkeys[i], shift) - i
        if d > best:
            best = d
        if i + best >= new_cap and t == m:
            t = i
    extra_k = tkeys[t:m].copy()
    extra_v = tvals[t:m].copy()
    tvals[t:m] = EMPTY
    pos = np.empty(_BLOCK, dtype=np.int64)
    for b in range(n_blocks - 1, -1, -1):
        lo = b * _BLOCK
        hi = min(lo + _BLOCK, t)
        if hi <= lo:
            continue
        best = start_max[b]
        for i in range(lo, hi):
            d = home(tkeys[i], shift) - i
            if d > best:
                best = d
            pos[i - lo] = i + best
        for i in range(hi - 1, lo - 1, -1):
            q = pos[i - lo]
            if q != i:
                k, v = tkeys[i], tvals[i]
                tvals[i] = EMPTY
                tkeys[q] = k
                tvals[q] = v
    for i in range(aside_k.shape[0]):
        insert_one(tkeys, tvals, shift, aside_k[i], aside_v[i])
    for i in range(extra_k.shape[0]):
        insert_one(tkeys, tvals, shift, extra_k[i], extra_v[i])


PART_POSITIONS = 1 << 22  # table positions of one part of `KeyIndex.live_parts` (a 64 MiB slice)


class KeyIndex:
    """Batched key -> value map. Keys are uint64 arrays; values are non-negative int64."""

    def __init__(self, capacity: int = _MIN_CAPACITY):
        cap = _MIN_CAPACITY
        while cap < 2 * capacity:  # load <= 1/2 at the expected size
            cap *= 2
        self._alloc(cap)

    def _alloc(self, cap: int) -> None:
        # one contiguous fill (np.zeros then a strided fill of the values costs 3x at 4 GiB); the key column
        # of an empty position is never read
        self.table = np.full((cap, 2), EMPTY, dtype=np.int64)
        self.keys = self.table[:, 0].view(np.uint64)
        self.vals = self.table[:, 1]
        self._shift = np.uint64(65 - cap.bit_length())
        self.live = 0

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

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        pos = np.empty(len(keys), dtype=np.int64)
        _find(self.keys, self.vals, self._shift, as_u64(keys), pos)
        return pos

    def kernel_args(self) -> tuple:
        """(keys, vals, shift): what a kernel elsewhere passes to `probe`."""
        return self.keys, self.vals, self._shift

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values of `keys` (uint64 array), -1 where absent."""
        out = np.empty(len(keys), dtype=np.int64)
        if len(keys) and self.live:
            _lookup(self.keys, self.vals, self._shift, as_u64(keys), out)
        else:
            out.fill(EMPTY)
        return out

    def reserve(self, n: int) -> None:
        """Make room for n more keys at load <= 1/2 (before a kernel inserts them with insert_one)."""
        if (self.live + n) * 2 > len(self.vals):
            self._grow(self.live + n)

    def insert_new(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert distinct keys that are known to be absent."""
        n = len(keys)
        if n == 0:
            return
        self.reserve(n)
        _insert(self.keys, self.vals, self._shift, as_u64(keys), np.ascontiguousarray(vals, dtype=np.int64))
        self.live += n

    def assign(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Set key -> val for distinct keys, inserting the absent ones."""
        if len(keys) == 0:
            return
        pos = self._positions(keys)
        found = pos >= 0
        self.vals[pos[found]] = vals[found]
        if not found.all():
            self.insert_new(keys[~found], vals[~found])

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Delete distinct keys; return their old values (-1 where absent)."""
        old = np.full(len(keys), EMPTY, dtype=np.int64)
        if len(keys) and self.live:
            self.live -= int(_remove(self.keys, self.vals, self._shift, as_u64(keys), old))
        return old

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, values), in table order."""
        live = self.vals != EMPTY
        return self.keys[live], self.vals[live]

    def live_parts(
        self, positions: int | None = None, keys: bool = True
    ) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """The live (keys, values) of `items()`, in the same order, in parts of at most `positions` table
        positions each (default PART_POSITIONS): what a caller streams (a snapshot) holds one part at a
        time, not every pair. `keys=False`: (None, values), for a caller that needs the values only."""
        step = positions or PART_POSITIONS
        for lo in range(0, len(self.vals), step):
            vals = self.vals[lo : lo + step]
            live = vals != EMPTY
            yield (self.keys[lo : lo + step][live] if keys else None), vals[live]

    def clear(self) -> None:
        self._alloc(_MIN_CAPACITY)

    def _grow(self, need: int) -> None:
        """Double (or more) the table in place: the array is resized (realloc: a large table's pages are
        remapped, not copied) and re-laid by one kernel, so the peak is the new table alone. Making a new
        table beside the old one, or beside a copy of the live pairs, took 2 or 1 GiB more at 67M keys."""
        old_cap = cap = len(self.vals)
        while cap < 2 * need:
            cap *= 2
        if not self.table.flags.owndata:  # e.g. unpickled: resize needs an array that owns its memory
            self.table = self.table.copy()
        self.keys = self.vals = None
        try:
            self.table.resize((cap, 2), refcheck=False)  # nothing else holds a view: see kernel_args
        finally:  # a failed resize (MemoryError) leaves the old table, still usable
            self.keys = self.table[:, 0].view(np.uint64)
            self.vals = self.table[:, 1]
        self.table[old_cap:] = EMPTY
        self._shift = np.uint64(65 - cap.bit_length())
        _rehash_in_place(self.keys, self.vals, old_cap, self._shift)


def as_u64(keys: np.ndarray) -> np.ndarray:
    """The kernels take one contiguous uint64 type (int64 keys are the same bits)."""
    if keys.dtype != np.uint64:
        keys = keys.view(np.uint64) if keys.dtype == np.int64 else keys.astype(np.uint64)
    return np.ascontiguousarray(keys)


@kernel
def _dedup(tkeys, tvals, shift, keys, uniq, inverse, first):
    mask = tvals.shape[0] - 1
    m = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        p = home(k, shift)
        while True:
            if tvals[p] == EMPTY:
                tkeys[p], tvals[p] = k, m
                uniq[m], first[m], inverse[i] = k, i, m
                m += 1
                break
            if tkeys[p] == k:
                inverse[i] = tvals[p]
                break
            p = (p + 1) & mask
    return m


def _dedup_all(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = as_u64(keys)
    cap = _MIN_CAPACITY
    while cap < 2 * len(keys):
        cap *= 2
    tkeys, tvals = np.empty(cap, dtype=np.uint64), np.full(cap, EMPTY, dtype=np.int64)
    uniq, inverse = np.empty(len(keys), dtype=np.uint64), np.empty(len(keys), dtype=np.intp)
    first = np.empty(len(keys), dtype=np.intp)
    m = _dedup(tkeys, tvals, np.uint64(65 - cap.bit_length()), keys, uniq, inverse, first)
    return uniq[:m], inverse, first[:m]


def dedup(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys in order of first appearance, inverse such that uk[inverse] == keys): one hashed pass,
    for callers that need the distinct keys but not sorted."""
    uniq, inverse, _ = _dedup_all(keys)
    return uniq, inverse


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct keys, as uint64 (numpy 2.x's hash-based np.unique is several times slower here).
    Keys already sorted and distinct (a Prefetcher's announcement) cost one pass and a copy."""
    u = as_u64(keys)
    if _strictly_increasing(u):
        return u.copy()
    return np.sort(dedup(u)[0])


@kernel
def _strictly_increasing(keys):
    for i in range(1, keys.shape[0]):  # noqa: SIM110 - numba compiles the loop, not a generator
        if keys[i] <= keys[i - 1]:
            return False
    return True


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted distinct keys, inverse such that uk[inverse] == keys, index of each key's first occurrence):
    a hashed pass, then a sort of the distinct keys only (Zipf batches repeat keys). Keys that are already
    sorted and distinct (as uint64: what mlkv.torch hands the store after its own dedup) cost one pass."""
    u = as_u64(keys)
    if _strictly_increasing(u):
        ident = np.arange(len(u), dtype=np.intp)
        return u.copy(), ident, ident  # a copy, as otherwise: the store may keep it, the caller reuse theirs
    uniq, inverse, first = _dedup_all(u)
    order = np.argsort(uniq)
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse], first[order]
