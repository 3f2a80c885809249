"""Table: one named embedding table of a Store — its schema, optimizer, memory tier and row traffic.

Every public method validates its arguments before it takes the store lock or changes anything. The read
path is: memory tier hit -> gather; miss -> engine read (or `init` for a key never seen) -> admitted to the
tier when there is room (evicting cold rows, writing dirty ones back). Rows that do not fit the budget are
served from a batch buffer and written straight to the engine, so a batch larger than the tier still works.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgumentError, MlkvError
from .memory_tier import MemoryTier
from .validate import as_keys, as_rows

if TYPE_CHECKING:
    from .store import Store


class Table:
    def __init__(self, store: Store, name: str, schema: dict, optimizer, init_fn):
        self._store = store
        self.name = name
        self.dim: int = schema["dim"]
        self.dtype: str = schema["dtype"]
        self.optimizer = optimizer
        self._init = init_fn
        self._salt = zlib.crc32(name.encode())
        self._state_width = optimizer.state_width(self.dim) if optimizer else 0
        self.width = self.dim + self._state_width
        self.step: int = schema.get("step", 0)
        self.staleness_bound: int | None = schema.get("staleness_bound")
        self.tier = MemoryTier(self.width)
        self._schema = schema

    # ---- schema -------------------------------------------------------------------------------------
    def schema(self) -> dict:
        return {**self._schema, "step": self.step, "staleness_bound": self.staleness_bound}

    def __repr__(self) -> str:
        kind = self.optimizer.kind if self.optimizer else None
        return f"Table({self.name!r}, dim={self.dim}, dtype={self.dtype}, optimizer={kind})"

    # ---- the row path -------------------------------------------------------------------------------
    def _new_rows(self, keys: np.ndarray) -> np.ndarray:
        rows = np.empty((len(keys), self.width), dtype=np.float32)
        rows[:, : self.dim] = self._init(keys, self.dim, self._salt)
        if self._state_width:
            rows[:, self.dim :] = self.optimizer.init_state(len(keys), self.dim)
        return rows

    def _fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of distinct keys absent from the tier, from the engine or from init: (rows, fresh)."""
        st = self._store
        t0 = time.perf_counter()
        raw, found = st._engine.read(self.name, keys)
        st._stats["stall_seconds"] += time.perf_counter() - t0
        st._stats["bytes_read"] += int(found.sum()) * self.tier.row_bytes
        rows = np.ascontiguousarray(raw).view(np.float32).reshape(len(keys), self.width)
        if not found.all():
            rows[~found] = self._new_rows(keys[~found])
        return rows, ~found

    def _write_back(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if len(keys):
            st = self._store
            st._engine.write(self.name, keys, np.ascontiguousarray(rows).view(np.uint8))
            st._stats["rows_written_back"] += len(keys)
            st._stats["bytes_written"] += len(keys) * self.tier.row_bytes

    def resize_tier(self, cap: int) -> None:
        keys, rows, _ = self.tier.resize(cap)
        self._write_back(keys, rows)

    def _gather(self, keys: np.ndarray, writable: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of distinct keys, admitting misses to the tier. Returns (slots, rows, fresh); slot -1 means
        the row did not fit the budget and lives only in `rows`."""
        tier, st = self.tier, self._store
        slots = tier.lookup(keys)
        hit = slots >= 0
        rows = np.empty((len(keys), self.width), dtype=np.float32)
        rows[hit] = tier.data[slots[hit]]
        fresh = np.zeros(len(keys), dtype=bool)
        st._stats["hits"] += int(hit.sum())
        if hit.all():
            return slots, rows, fresh
        miss = ~hit
        mk = keys[miss]
        st._stats["misses"] += len(mk)
        fetched, mfresh = self._fetch(mk)
        rows[miss] = fetched
        fresh[miss] = mfresh & writable
        tier.pins[slots[hit]] += 1  # the batch's own rows must survive the room-making below
        try:
            short = len(mk) - len(tier.free)
            if short > 0:
                st._budget.grow(self, short)
                short = len(mk) - len(tier.free)
            if short > 0:
                before = len(tier.free)
                victims = tier.evict(short)
                st._stats["evictions"] += len(tier.free) - before
                self._write_back(victims[0], victims[1])
            dirty = fresh[miss]
            tier.admit(mk, fetched, dirty, dirty)
        finally:
            hit_slots = tier.lookup(keys[hit])  # a resize may have moved them
            tier.pins[hit_slots] -= 1
        return tier.lookup(keys), rows, fresh

    def _store_rows(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write updated rows back: into their tier slot (dirty) or, if they had none, to the engine."""
        tier = self.tier
        inside = slots >= 0
        s = slots[inside]
        tier.data[s] = rows[inside]
        tier.dirty[s] = True
        tier.ref[s] = True
        if not inside.all():
            self._write_back(keys[~inside], rows[~inside])
        self._store._changed = True

    # ---- public API ---------------------------------------------------------------------------------
    def get(self, keys, track: bool = True) -> np.ndarray:
        """Embeddings of `keys` as float32 (len(keys), dim); keys never seen are created from init."""
        k = as_keys(keys)
        st = self._store
        with st._lock:
            st._check_open(self)
            slots = self.tier.lookup(k)
            if len(k) and slots.min() >= 0:
                st._stats["hits"] += len(k)
                self.tier.ref[slots] = True
                return self.tier.data[slots, : self.dim]
            uk, inv = np.unique(k, return_inverse=True)
            writable = not st.readonly
            slots, rows, fresh = self._gather(uk, writable)
            spill = fresh & (slots < 0)
            if spill.any():
                self._write_back(uk[spill], rows[spill])
            if fresh.any():
                st._changed = True
            self.tier.ref[slots[slots >= 0]] = True
            return rows[inv, : self.dim]

    def update(self, keys, grads) -> None:
        """Apply the table's optimizer with `grads` (len(keys), dim); duplicate keys' grads are summed."""
        k = as_keys(keys)
        st = self._store
        st._check_writable(self)
        if self.optimizer is None:
            raise MlkvError(f"table {self.name!r} was created with optimizer=None and is not trainable")
        g = as_rows(grads, len(k), self.dim, "grads")
        if len(k) == 0:
            return
        with st._lock:
            st._check_open(self)
            uk, inv = np.unique(k, return_inverse=True)
            summed = np.zeros((len(uk), self.dim), dtype=np.float32)
            np.add.at(summed, inv, g)
            slots, rows, _ = self._gather(uk, True)
            self.step += 1
            self.optimizer.apply(rows, summed, self.step)
            self._store_rows(uk, slots, rows)

    def put(self, keys, values) -> None:
        """Overwrite embeddings (optimizer state is kept); for a key given twice the last value wins."""
        k = as_keys(keys)
        st = self._store
        st._check_writable(self)
        v = as_rows(values, len(k), self.dim, "values")
        if len(k) == 0:
            return
        with st._lock:
            st._check_open(self)
            uk, last = np.unique(k[::-1], return_index=True)
            slots, rows, _ = self._gather(uk, True)
            rows[:, : self.dim] = v[::-1][last]
            self._store_rows(uk, slots, rows)

    def lookahead(self, keys) -> None:
        """Announce keys a coming batch will read, so their rows are in the memory tier when it does."""
        k = as_keys(keys)
        st = self._store
        with st._lock:
            st._check_open(self)
            uk = np.unique(k)
            missing = uk[self.tier.lookup(uk) < 0]
            if len(missing):
                before = self.tier.resident
                slots, rows, fresh = self._gather(missing, not st.readonly)
                spill = fresh & (slots < 0)
                self._write_back(missing[spill], rows[spill])
                st._stats["lookahead_rows"] += self.tier.resident - before
                st._changed |= bool(fresh.any())

    def release(self, keys) -> None:
        """Give back tracked reads of `keys` without writing (a no-op until reads are tracked)."""
        as_keys(keys)
        self._store._check_open(self)

    def delete(self, keys) -> None:
        k = as_keys(keys)
        st = self._store
        st._check_writable(self)
        with st._lock:
            st._check_open(self)
            uk = np.unique(k)
            self.tier.remove(uk)
            st._engine.delete(self.name, uk)
            st._changed = True

    def contains(self, keys) -> np.ndarray:
        k = as_keys(keys)
        st = self._store
        with st._lock:
            st._check_open(self)
            out = st._engine.contains(self.name, k)
            slots = self.tier.lookup(k)
            inside = slots >= 0
            out[inside] |= self.tier.fresh[slots[inside]]
            return out

    def __len__(self) -> int:
        st = self._store
        with st._lock:
            st._check_open(self)
            return st._engine.count(self.name) + self.tier.n_fresh

    def flush(self) -> None:
        """Write every dirty row of the tier to the engine (durable only at the next checkpoint)."""
        keys, rows, _ = self.tier.take_dirty()
        self._write_back(keys, rows)

    def items(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (keys, embeddings) of the table, in batches; flushes the tier first."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        st = self._store
        with st._lock:
            st._check_open(self)
            if not st.readonly:
                self.flush()
            batches = st._engine.scan(self.name, batch_size)
        for keys, raw in batches:
            rows = np.ascontiguousarray(raw).view(np.float32).reshape(len(keys), self.width)
            yield keys, rows[:, : self.dim].copy()

    def optimizer_state(self, keys) -> dict[str, np.ndarray]:
        """The optimizer state of `keys`, by name (e.g. Adam's exp_avg and exp_avg_sq)."""
        k = as_keys(keys)
        if self.optimizer is None:
            return {}
        st = self._store
        with st._lock:
            st._check_open(self)
            uk, inv = np.unique(k, return_inverse=True)
            _, rows, fresh = self._gather(uk, not st.readonly)
            st._changed |= bool(fresh.any())
            state = rows[inv, self.dim :]
            return {name: state[:, sl].copy() for name, sl in self.optimizer.state_names(self.dim).items()}

    def export(self, path: str) -> int:
        """Stream keys (int64) and weights (n, dim) float32 into a .safetensors file; return the row count."""
        st = self._store
        with st._lock:
            st._check_open(self)
            n = len(self)
        header = {
            "keys": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
            "weights": {
                "dtype": "F32",
                "shape": [n, self.dim],
                "data_offsets": [8 * n, 8 * n + 4 * n * self.dim],
            },
            "__metadata__": {"table": self.name, "dim": str(self.dim)},
        }
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        base = 8 + len(head)
        tmp = path + ".tmp"
        written = 0
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            f.truncate(base + 8 * n + 4 * n * self.dim)
            for keys, rows in self.items():
                os.pwrite(f.fileno(), keys.tobytes(), base + 8 * written)
                os.pwrite(f.fileno(), rows.tobytes(), base + 8 * n + 4 * self.dim * written)
                written += len(keys)
        if written != n:
            os.remove(tmp)
            raise MlkvError(f"table {self.name!r} changed during export ({n} rows expected, {written} read)")
        os.replace(tmp, path)
        return n
