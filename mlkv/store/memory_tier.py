"""MemoryTier: one table's hot rows in preallocated numpy arrays, with CLOCK eviction.

Each resident row is [embedding | optimizer state], kept as two arrays, `emb` and `state`, so that a read
gathers only the embedding bytes (half or a third of the row under Adagrad or Adam); found through a
vectorised KeyIndex (key -> slot). Per slot, beside the row: `dirty` (must be written back before it is
dropped), `ref` (CLOCK's second-chance bit), `pins` (in use by an operation in progress) and `announced`
(look-ahead announcements not consumed yet). Pinned and announced rows are never evicted: rows a coming
batch needs stay. CLOCK rather than FIFO: a row read again since the hand last passed survives one
more sweep, so a Zipf head stays resident.

The tier never touches the engine: `evict` hands the dirty victims back to its table, which writes them.
Capacity is granted by the store's TierBudget, so the tiers of all tables share one byte budget.
Memory per slot: row bytes + 8 (key) + 8 (pins, announced) + 3 flags + 32 (index at load <= 1/2).

A float16/bfloat16 table (`codec.half`) keeps `emb` as uint16 bit patterns (2 bytes per weight): the
kernels decode them with `codec.lut` (`lut is None` for float32: numba prunes that branch, so the float32
kernels are the same code as before), and rows are encoded with `codec.encode` before a kernel stores them.
The rows handed in are already rounded by the table, so that encoding is exact.
"""

from __future__ import annotations

import numpy as np

from ..engine.kernel import kernel
from ..engine.key_index import KeyIndex, as_u64, home, insert_one, probe, remove_one
from ..engine.prefetch import prefetch_at, prefetch_row
from .row_codec import RowCodec

SLOT_OVERHEAD_BYTES = 8 + 8 + 3 + 32
_AHEAD = 8  # keys between prefetching a key's index entry and its row, and between its row and the copy


@kernel
def _read_embeddings(tkeys, tvals, shift, keys, emb, lut, ref, out, slots):
    """For each key: slots[i] = its slot (-1: not resident); a resident row's embedding is copied to out[i]
    and its CLOCK bit set. A three-stage pipeline over the keys: prefetch the index entry of key i + 2A,
    probe key i + A (its entry now cached) and prefetch its row, copy row i (cached): the two random
    reads per key overlap with other keys' work instead of stalling one after the other."""
    n, d = keys.shape[0], emb.shape[1]
    for i in range(min(2 * _AHEAD, n)):
        prefetch_row(tvals, home(keys[i], shift))
    for i in range(n):
        if i + 2 * _AHEAD < n:
            prefetch_row(tvals, home(keys[i + 2 * _AHEAD], shift))
        a = i + _AHEAD
        if a < n:
            p = probe(tkeys, tvals, shift, keys[a])
            slots[a] = tvals[p] if p >= 0 else -1
            if slots[a] >= 0:
                for j in range(0, d, 16):
                    prefetch_at(emb, slots[a], j)
        if i < _AHEAD:
            p = probe(tkeys, tvals, shift, keys[i])
            slots[i] = tvals[p] if p >= 0 else -1
        s = slots[i]
        if s >= 0:
            ref[s] = True
            for j in range(d):
                out[i, j] = emb[s, j] if lut is None else lut[np.int64(emb[s, j])]


@kernel
def _gather_rows(emb, lut, state, slots, out):
    """out[i] = [emb | state] of slots[i] (explicit loops: one pass, no temporaries)."""
    d, w = emb.shape[1], state.shape[1]
    for i in range(slots.shape[0]):
        s = slots[i]
        for j in range(d):
            out[i, j] = emb[s, j] if lut is None else lut[np.int64(emb[s, j])]
        for j in range(w):
            out[i, d + j] = state[s, j]


@kernel
def _scatter_rows(emb, state, slots, src, rows):
    """emb[slots[i]] = src[i, :dim] (`rows` itself, or its embeddings encoded to 16 bits), state = the rest
    of rows[i]."""
    d, w = emb.shape[1], state.shape[1]
    for i in range(slots.shape[0]):
        s = slots[i]
        for j in range(d):
            emb[s, j] = src[i, j]
        for j in range(w):
            state[s, j] = rows[i, d + j]


@kernel
def _adagrad_in_place(emb, state, slots, grads, neg_lr, eps, dirty, ref):
    """Adagrad on resident rows where they lie, in mlkv.optim.Adagrad's (and torch's) float32 operation
    order: sum += g*g; w += (g / (sqrt(sum) + eps)) * -lr; the rows are marked dirty and recently used."""
    d = emb.shape[1]
    for i in range(slots.shape[0]):
        if i + _AHEAD < slots.shape[0]:
            for j in range(0, d, 16):
                prefetch_at(emb, slots[i + _AHEAD], j)
                prefetch_at(state, slots[i + _AHEAD], j)
        s = slots[i]
        for j in range(d):
            g = grads[i, j]
            acc = state[s, j] + g * g
            state[s, j] = acc
            emb[s, j] += (g / (np.sqrt(acc) + eps)) * neg_lr
        dirty[s] = True
        ref[s] = True


@kernel
def _drop_slots(
    slots, keys, used, dirty, pins, announced, emb, lut, state, index, free, n_free, out_keys, out_rows
):
    """Free resident slots: their keys leave the index (`index` = KeyIndex.kernel_args()), dirty rows are
    copied to out_keys/out_rows for write-back, the slots go onto the free stack.
    Returns (dirty rows copied out, new n_free)."""
    tkeys, tvals, shift = index
    d, w = emb.shape[1], state.shape[1]
    n_dirty, n = 0, slots.shape[0]
    for i in range(n):
        if i + 2 * _AHEAD < n:
            prefetch_row(keys, slots[i + 2 * _AHEAD])
        if i + _AHEAD < n:
            prefetch_row(tvals, home(keys[slots[i + _AHEAD]], shift))
        s = slots[i]
        if dirty[s]:
            out_keys[n_dirty] = keys[s]
            for j in range(d):
                out_rows[n_dirty, j] = emb[s, j] if lut is None else lut[np.int64(emb[s, j])]
            for j in range(w):
                out_rows[n_dirty, d + j] = state[s, j]
            n_dirty += 1
        remove_one(tkeys, tvals, shift, keys[s])
        used[s] = False
        dirty[s] = False
        pins[s] = 0
        announced[s] = 0
        free[n_free] = s
        n_free += 1
    return n_dirty, n_free


@kernel
def _admit(new_keys, src, rows, new_dirty, keys, used, dirty, ref, emb, state, index, free, n_free, slots):
    """Pop a free slot for each new key, store its row (embedding from `src`, as in _scatter_rows) and
    flags, index it. Returns the new n_free."""
    tkeys, tvals, shift = index
    d, w = emb.shape[1], state.shape[1]
    n = slots.shape[0]
    for i in range(n):
        if i + _AHEAD < n:  # the row and index entry that key i + _AHEAD will write
            t = free[n_free - 1 - _AHEAD]
            for j in range(0, d, 16):
                prefetch_at(emb, t, j)
            for j in range(0, w, 16):
                prefetch_at(state, t, j)
            prefetch_row(tvals, home(new_keys[i + _AHEAD], shift))
        n_free -= 1
        s = free[n_free]
        keys[s] = new_keys[i]
        for j in range(d):
            emb[s, j] = src[i, j]
        for j in range(w):
            state[s, j] = rows[i, d + j]
        used[s] = True
        dirty[s] = new_dirty[i]
        ref[s] = True
        insert_one(tkeys, tvals, shift, new_keys[i], s)
        slots[i] = s
    return n_free


@kernel
def _consume(ref, announced, slots, use_announcements):
    """For each distinct slot >= 0 (slots may repeat: an untracked read of repeated keys): CLOCK's bit
    set, and one announcement used up (never below 0). A slot's count is negated to mark it taken in the
    first pass, so a repeated slot uses up one announcement, as one read of the batch does."""
    n = slots.shape[0]
    for i in range(n):
        s = slots[i]
        if s >= 0:
            ref[s] = True
            if use_announcements and announced[s] > 0:
                announced[s] = -announced[s]
    if use_announcements:
        for i in range(n):
            s = slots[i]
            if s >= 0 and announced[s] < 0:
                announced[s] = -announced[s] - 1


@kernel
def _clock(used, pins, announced, ref, hand, n, announced_too, out):
    """CLOCK: from `hand`, take up to n resident, unpinned (and unannounced, unless announced_too) slots
    whose ref bit is clear, clearing the ref bits passed over; at most two sweeps (the first may clear
    every bit). Taken slots are marked unused. Returns (how many were taken into out, the new hand)."""
    cap = used.shape[0]
    got, swept = 0, 0
    while got < n and swept < 2 * cap + 1:
        s = hand
        if used[s] and pins[s] == 0 and (announced_too or announced[s] == 0):
            if ref[s]:
                ref[s] = False
            else:
                out[got] = s
                got += 1
                used[s] = False
        hand = hand + 1 if hand + 1 < cap else 0
        swept += 1
    return got, hand


class MemoryTier:
    def __init__(self, dim: int, state_width: int = 0, codec: RowCodec | None = None):
        self.dim = dim
        self.width = dim + state_width
        self.codec = codec if codec is not None else RowCodec("float32", dim, self.width)
        self.lut = self.codec.lut
        self.row_bytes = self.codec.row_bytes
        self.capacity = 0
        self._alloc(0)
        self.index = KeyIndex()
        self.hand = 0
        self.moves = 0  # counts resizes and removals: the events that can move or free a pinned row

    def _alloc(self, cap: int) -> None:
        self.emb = np.zeros((cap, self.dim), dtype=np.uint16 if self.codec.half else np.float32)
        self.state = np.zeros((cap, self.width - self.dim), dtype=np.float32)
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.used = np.zeros(cap, dtype=bool)
        self.dirty = np.zeros(cap, dtype=bool)
        self.announced = np.zeros(cap, dtype=np.int32)
        self.ref = np.zeros(cap, dtype=bool)
        self.pins = np.zeros(cap, dtype=np.int32)
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack: free[:n_free] are free slots
        self.n_free = cap
        self.capacity = cap

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """Whole rows [embedding | state] of `slots`, a new (n, width) array."""
        out = np.empty((len(slots), self.width), dtype=np.float32)
        _gather_rows(self.emb, self.lut, self.state, np.ascontiguousarray(slots, dtype=np.int64), out)
        return out

    def embeddings(self, slots: np.ndarray) -> np.ndarray:
        """Float32 embeddings of `slots`, a new (n, dim) array (`take` is ~2x faster than fancy indexing)."""
        emb = self.emb.take(slots, axis=0)
        return emb if self.lut is None else self.lut.take(emb)

    def _src(self, rows: np.ndarray) -> np.ndarray:
        """What the kernels copy embeddings from: `rows` itself, or its embeddings encoded to 16 bits."""
        return rows if self.lut is None else self.codec.encode(rows[:, : self.dim])

    def adagrad(self, slots: np.ndarray, grads: np.ndarray, lr: float, eps: float) -> None:
        """Apply Adagrad (one accumulator per weight: state columns = dim) to resident `slots` in place with
        float32 `grads` (len(slots), dim), bit for bit what mlkv.optim.Adagrad.apply does to copies of the
        rows; marks them dirty. One pass over the rows instead of gather, six numpy passes and scatter."""
        _adagrad_in_place(
            self.emb, self.state, slots, grads, np.float32(-lr), np.float32(eps), self.dirty, self.ref
        )

    def set_rows(self, slots: np.ndarray, rows: np.ndarray, bits: np.ndarray | None = None) -> None:
        """Store `rows` into `slots`; `bits`: their embeddings already encoded to 16 bits, if at hand."""
        src = self._src(rows) if bits is None else bits
        _scatter_rows(self.emb, self.state, np.ascontiguousarray(slots, dtype=np.int64), src, rows)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_bytes

    @property
    def resident(self) -> int:
        return len(self.index)

    # ---- holds on rows: pins and announcements (module header: such rows are never evicted) -----------
    def pin(self, slots: np.ndarray) -> None:
        """Hold resident `slots` (distinct) while an operation runs with the store lock released: a pinned
        row is never evicted or removed (a resize may move it: `moves` counts that)."""
        self.pins[slots] += 1

    def unpin(self, slots: np.ndarray) -> None:
        """Release one hold of each of `slots` (distinct; -1 entries ignored)."""
        s = slots[slots >= 0]
        self.pins[s] = np.maximum(self.pins[s] - 1, 0)

    def pinned(self, slots: np.ndarray) -> np.ndarray:
        """Whether each of `slots` is pinned (False for -1)."""
        out = np.zeros(len(slots), dtype=bool)
        ok = slots >= 0
        out[ok] = self.pins[slots[ok]] > 0
        return out

    def announce(self, slots: np.ndarray, counts: np.ndarray | int = 1) -> None:
        """Look-ahead announced `counts` coming reads of resident `slots` (distinct): each stays resident
        (unless a demand read finds nothing else to evict) until those reads `consume` it."""
        self.announced[slots] += counts

    def mark_written(self, slots: np.ndarray) -> None:
        """Rows just stored into `slots`: dirty (written back before they are dropped) and recently used."""
        self.dirty[slots] = True
        self.ref[slots] = True

    def consume(self, slots: np.ndarray, announced: bool) -> None:
        """Reads of resident `slots` (-1 entries ignored; repeats count once): CLOCK's bit set and, if
        look-ahead `announced` rows of this tier, one announcement used up each."""
        _consume(self.ref, self.announced, np.ascontiguousarray(slots, dtype=np.int64), announced)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        return self.index.lookup(keys)

    def read(self, keys: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the embeddings of resident keys (duplicates allowed) into rows of out (len(keys), dim), mark
        them used for CLOCK; return their slots, -1 for keys not resident (their rows of out untouched)."""
        slots = np.empty(len(keys), dtype=np.int64)
        _read_embeddings(*self.index.kernel_args(), as_u64(keys), self.emb, self.lut, self.ref, out, slots)
        return slots

    def resize(self, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """Change capacity, compacting resident rows; shrinking drops the coldest evictable rows first.

        Returns the dirty rows that were dropped (keys, rows) for the caller to write back.
        """
        self.moves += 1
        dropped = self.evict(self.resident - cap) if self.resident > cap else self._no_victims()
        slots = np.flatnonzero(self.used)
        keep = (
            self.keys[slots],
            self.rows(slots),
            self.dirty[slots],
            self.pins[slots],
            self.announced[slots],
        )
        self._alloc(max(cap, len(slots)))
        n = len(slots)
        self.keys[:n], rows, self.dirty[:n], self.pins[:n], self.announced[:n] = keep
        self.set_rows(np.arange(n), rows)
        self.used[:n] = True
        self.ref[:n] = True
        self.n_free = self.capacity - n
        self.free[: self.n_free] = np.arange(self.capacity - 1, n - 1, -1, dtype=np.int64)
        self.index = KeyIndex(n)
        self.index.insert_new(self.keys[:n], np.arange(n, dtype=np.int64))
        self.hand = 0
        return dropped

    def evict(self, n: int, announced_too: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Free up to n slots by CLOCK over rows not pinned (and not announced, unless `announced_too`);
        return the dirty victims (keys, rows)."""
        n = min(n, self.resident)
        if n <= 0:
            return self._no_victims()
        slots = np.empty(n, dtype=np.int64)
        got, self.hand = _clock(
            self.used, self.pins, self.announced, self.ref, self.hand, n, announced_too, slots
        )
        return self._drop(slots[:got])

    def _no_victims(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(0, np.uint64), np.empty((0, self.width), np.float32)

    def _drop(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.empty(len(slots), dtype=np.uint64)
        rows = np.empty((len(slots), self.width), dtype=np.float32)
        flags = (self.used, self.dirty, self.pins, self.announced)
        args = (self.emb, self.lut, self.state, self.index.kernel_args(), self.free, self.n_free, keys, rows)
        n_dirty, self.n_free = _drop_slots(slots, self.keys, *flags, *args)
        self.index.live -= len(slots)
        return keys[:n_dirty], rows[:n_dirty]

    def remove(self, keys: np.ndarray) -> None:
        """Forget rows of distinct keys without writing them back (delete)."""
        slots = self.index.lookup(keys)
        slots = slots[slots >= 0]
        if len(slots):
            self.moves += 1
            self._drop(slots)

    def admit(self, keys: np.ndarray, rows: np.ndarray, dirty: np.ndarray) -> np.ndarray:
        """Place distinct absent keys into free slots, as many as there are; return slots (-1: no room)."""
        k = min(len(keys), self.n_free)
        slots = np.full(len(keys), -1, dtype=np.int64)
        if k == 0:
            return slots
        self.index.reserve(k)
        flags = (self.keys, self.used, self.dirty, self.ref, self.emb, self.state)
        new = (as_u64(keys[:k]), self._src(rows[:k]), rows[:k], np.ascontiguousarray(dirty[:k]))
        self.n_free = _admit(*new, *flags, self.index.kernel_args(), self.free, self.n_free, slots[:k])
        self.index.live += k
        return slots

    def take_dirty(self, first: int = 0, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The dirty rows (keys, rows) of slots [first, first + count) (default: all), now marked clean:
        what a flush writes back, a part at a time."""
        end = self.capacity if count is None else min(self.capacity, first + count)
        slots = np.flatnonzero(self.dirty[first:end]) + first
        out = (self.keys[slots].copy(), self.rows(slots))
        self.dirty[slots] = False
        return out
