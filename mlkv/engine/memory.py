"""MemoryEngine: rows in process memory, nothing on disk.

For tests, small jobs and as the in-memory limit in benchmarks. A checkpoint copies the tables into a
process-wide registry keyed by path (cost proportional to the table size: there is no disk to be clever
about), so closing and reopening the same path in one process behaves like the durable engines: the state
of the last checkpoint comes back. Nothing survives the process.

Checkpoint history: the registry holds copies of the last `keep` committed states (a full copy each);
`checkpoint=` opens one readonly, `rollback` drops the later ones.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator

import numpy as np

from ..errors import InvalidArgumentError, ReadOnlyError
from .base import Engine, check_keep
from .key_index import KeyIndex

# path -> {"keep": int, "states": [(meta, tables), ...] oldest first, the committed one last}
_REGISTRY: dict[str, dict] = {}
_REGISTRY_LOCK = threading.Lock()


class _MemoryTable:
    def __init__(self, row_bytes: int):
        self.row_bytes = row_bytes
        self.index = KeyIndex()
        self.rows = np.zeros((1024, row_bytes), dtype=np.uint8)
        self.n_slots = 0
        self.free = np.empty(0, dtype=np.int64)

    def _allocate(self, n: int) -> np.ndarray:
        take = min(n, len(self.free))
        slots = self.free[len(self.free) - take :]
        self.free = self.free[: len(self.free) - take]
        if take < n:
            need = self.n_slots + n - take
            if need > len(self.rows):
                grown = np.zeros((max(need, 2 * len(self.rows)), self.row_bytes), dtype=np.uint8)
                grown[: self.n_slots] = self.rows[: self.n_slots]
                self.rows = grown
            slots = np.concatenate([slots, np.arange(self.n_slots, need, dtype=np.int64)])
            self.n_slots = need
        return slots


class MemoryEngine(Engine):
    name = "memory"

    def __init__(
        self, path: str, readonly: bool = False, keep: int | None = None, checkpoint: int | None = None
    ):
        if keep is not None:
            check_keep(keep)
        if checkpoint is not None and not readonly:
            raise InvalidArgumentError(f"checkpoint={checkpoint!r} needs readonly=True")
        self.path = os.path.abspath(path)
        self.readonly = readonly
        with _REGISTRY_LOCK:
            saved = _REGISTRY.get(self.path, {"keep": 1, "states": []})
            if keep is not None and not readonly:
                saved["keep"] = keep
                del saved["states"][: max(0, len(saved["states"]) - keep)]
                _REGISTRY[self.path] = saved
            self.keep_checkpoints = saved["keep"]
            states = list(saved["states"])
        self._metas = [copy.deepcopy(m) for m, _ in states]
        state = states[-1] if states else (None, {})
        if checkpoint is not None:
            ids = [m.get("checkpoint_id") for m in self._metas]
            if checkpoint not in ids:
                raise InvalidArgumentError(
                    f"checkpoint {checkpoint!r} is not kept in {path}; kept checkpoints: {ids}"
                )
            state = states[ids.index(checkpoint)]
        self._meta = copy.deepcopy(state[0])
        self._tables: dict[str, _MemoryTable] = copy.deepcopy(state[1])

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path} is open readonly")

    def create_table(self, table: str, row_bytes: int) -> None:
        if table not in self._tables:
            self._writable()
            self._tables[table] = _MemoryTable(row_bytes)

    def drop_table(self, table: str) -> None:
        self._writable()
        del self._tables[table]

    def tables(self) -> dict[str, int]:
        return {name: t.row_bytes for name, t in self._tables.items()}

    def read(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self._tables[table]
        slots = t.index.lookup(keys)
        found = slots >= 0
        rows = np.zeros((len(keys), t.row_bytes), dtype=np.uint8)
        rows[found] = t.rows[slots[found]]
        return rows, found

    def write(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None:
        self._writable()
        t = self._tables[table]
        slots = t.index.lookup(keys)
        new = slots < 0
        if new.any():
            slots[new] = t._allocate(int(new.sum()))
            t.index.insert_new(keys[new], slots[new])
        t.rows[slots] = rows

    def delete(self, table: str, keys: np.ndarray) -> None:
        self._writable()
        t = self._tables[table]
        old = t.index.remove(keys)
        t.free = np.concatenate([t.free, old[old >= 0]])

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        return self._tables[table].index.lookup(keys) >= 0

    def count(self, table: str) -> int:
        return len(self._tables[table].index)

    def scan(self, table: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The keys live at the first batch, each read at the slot it has when its batch is read (a delete
        between batches frees a slot that a write may give to another key); keys deleted meanwhile are
        skipped, keys added meanwhile are not yielded."""
        t = self._tables[table]
        keys, _ = t.index.items()
        for i in range(0, len(keys), batch_size):
            k = keys[i : i + batch_size]
            slots = t.index.lookup(k)
            live = slots >= 0
            yield k[live], t.rows[slots[live]]

    def checkpoint(self, meta: dict) -> None:
        self._writable()
        self._meta = copy.deepcopy(meta)
        with _REGISTRY_LOCK:
            saved = _REGISTRY.setdefault(self.path, {"keep": self.keep_checkpoints, "states": []})
            saved["states"].append((copy.deepcopy(meta), copy.deepcopy(self._tables)))
            del saved["states"][: max(0, len(saved["states"]) - saved["keep"])]
            self._metas = [copy.deepcopy(m) for m, _ in saved["states"]]

    def committed_meta(self) -> dict | None:
        return self._meta

    def checkpoints(self) -> list[dict]:
        return copy.deepcopy(self._metas)

    def rollback(self, checkpoint_id: int) -> list[dict]:
        self._writable()
        ids = [m.get("checkpoint_id") for m in self._metas]
        if checkpoint_id not in ids:
            raise InvalidArgumentError(
                f"checkpoint {checkpoint_id!r} is not kept in {self.path}; kept checkpoints: {ids}"
            )
        with _REGISTRY_LOCK:
            states = _REGISTRY[self.path]["states"]
            dropped = [m for m, _ in states[ids.index(checkpoint_id) + 1 :]]
            del states[ids.index(checkpoint_id) + 1 :]
        self.close()
        return dropped

    def verify(self) -> list[str]:
        return []

    def disk_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._tables = {}
