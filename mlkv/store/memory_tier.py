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
"""

from __future__ import annotations

import numpy as np

from ..engine.key_index import KeyIndex

SLOT_OVERHEAD_BYTES = 8 + 8 + 3 + 32


class MemoryTier:
    def __init__(self, dim: int, state_width: int = 0):
        self.dim = dim
        self.width = dim + state_width
        self.row_bytes = 4 * self.width
        self.capacity = 0
        self._alloc(0)
        self.index = KeyIndex()
        self.hand = 0
        self.moves = 0  # counts resizes and removals: the events that can move or free a pinned row

    def _alloc(self, cap: int) -> None:
        self.emb = np.zeros((cap, self.dim), dtype=np.float32)
        self.state = np.zeros((cap, self.width - self.dim), dtype=np.float32)
        self.keys = np.zeros(cap, dtype=np.uint64)
        self.used = np.zeros(cap, dtype=bool)
        self.dirty = np.zeros(cap, dtype=bool)
        self.announced = np.zeros(cap, dtype=np.int32)
        self.ref = np.zeros(cap, dtype=bool)
        self.pins = np.zeros(cap, dtype=np.int32)
        self.free = np.arange(cap - 1, -1, -1, dtype=np.int64)
        self.capacity = cap

    def rows(self, slots: np.ndarray) -> np.ndarray:
        """Whole rows [embedding | state] of `slots`, a new (n, width) array."""
        out = np.empty((len(slots), self.width), dtype=np.float32)
        out[:, : self.dim] = self.emb.take(slots, axis=0)
        if self.width > self.dim:
            out[:, self.dim :] = self.state.take(slots, axis=0)
        return out

    def set_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.emb[slots] = rows[:, : self.dim]
        if self.width > self.dim:
            self.state[slots] = rows[:, self.dim :]

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_bytes

    @property
    def resident(self) -> int:
        return len(self.index)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        return self.index.lookup(keys)

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
        self.free = np.arange(self.capacity - 1, n - 1, -1, dtype=np.int64)
        self.index = KeyIndex(n)
        self.index.insert_new(self.keys[:n], np.arange(n, dtype=np.int64))
        self.hand = 0
        return dropped

    def evict(self, n: int, announced_too: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Free up to n slots by CLOCK over rows not pinned (and not announced, unless `announced_too`);
        return the dirty victims (keys, rows)."""
        n = min(n, self.resident)
        chosen: list[np.ndarray] = []
        got, swept, cap = 0, 0, self.capacity
        while got < n and swept < 2 * cap + 1:  # two sweeps: the first clears every ref bit it passes
            window = (self.hand + np.arange(min(4096, cap))) % cap
            live = self.used[window] & (self.pins[window] == 0)
            if not announced_too:
                live &= self.announced[window] == 0
            cand = np.flatnonzero(live & ~self.ref[window])
            cut = int(cand[n - got - 1]) + 1 if len(cand) >= n - got else len(window)
            cand = cand[cand < cut]
            self.ref[window[:cut][live[:cut]]] = False
            chosen.append(window[cand])
            self.used[window[cand]] = False  # taken: a later window of this sweep must not pick it again
            got += len(cand)
            self.hand = (self.hand + cut) % cap
            swept += cut
        slots = np.concatenate(chosen) if chosen else np.empty(0, np.int64)
        return self._drop(slots)

    def _no_victims(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty(0, np.uint64), np.empty((0, self.width), np.float32)

    def _drop(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dirty = slots[self.dirty[slots]]
        out = (self.keys[dirty].copy(), self.rows(dirty))
        self.index.remove(self.keys[slots])
        self.used[slots] = False
        self.dirty[slots] = False
        self.pins[slots] = 0
        self.announced[slots] = 0
        self.free = np.concatenate([self.free, slots])
        return out

    def remove(self, keys: np.ndarray) -> None:
        """Forget rows of distinct keys without writing them back (delete)."""
        slots = self.index.lookup(keys)
        slots = slots[slots >= 0]
        if len(slots):
            self.moves += 1
            self._drop(slots)

    def admit(self, keys: np.ndarray, rows: np.ndarray, dirty: np.ndarray) -> np.ndarray:
        """Place distinct absent keys into free slots, as many as there are; return slots (-1: no room)."""
        k = min(len(keys), len(self.free))
        slots = np.full(len(keys), -1, dtype=np.int64)
        if k == 0:
            return slots
        s = self.free[len(self.free) - k :][::-1]
        self.free = self.free[: len(self.free) - k]
        self.keys[s] = keys[:k]
        self.set_rows(s, rows[:k])
        self.used[s] = True
        self.dirty[s] = dirty[:k]
        self.ref[s] = True
        self.index.insert_new(keys[:k], s)
        slots[:k] = s
        return slots

    def take_dirty(self) -> tuple[np.ndarray, np.ndarray]:
        """All dirty rows (keys, rows), now marked clean: what a flush writes back."""
        slots = np.flatnonzero(self.dirty)
        out = (self.keys[slots].copy(), self.rows(slots))
        self.dirty[slots] = False
        return out
