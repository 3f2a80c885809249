"""WriteBack: engine writes and deletes leave the training thread and run, in order, on one I/O thread.

Eviction, flush, spilled rows and deletes append an operation to the queue and return. Until an operation
has reached the engine it stays readable here (newest first), so a row evicted a moment ago is never read
back stale from the engine. One writer thread applies operations in FIFO order, so the engine always ends
with the newest version. The queue is bounded (`limit_bytes`): a row operation that starts while it is full
waits (`throttle`), which is counted as stall time.

A failed write (full disk: StorageFullError; I/O error: StorageIOError; anything else: MlkvError) stops the
queue for good. Nothing queued is dropped: every op stays readable here, and later evictions still queue
(so reads go on returning the newest rows), but none reaches the engine again. The failure is raised by the
store's next `update`/`put`/`delete`/`flush`/`checkpoint` (`raise_error`), with the same errno; the store
stays openable at its last checkpoint. `reported` records whether it has been raised to a caller yet (close
raises it only if not).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..durable_files import storage_error
from ..engine.key_index import KeyIndex
from ..errors import MlkvError, StorageError

ROW, DELETED = 1, 2


@dataclass(eq=False)
class PendingOp:
    table: str
    keys: np.ndarray
    rows: np.ndarray | None  # None: a delete; float32 rows, or engine bytes (uint8) of a 16-bit table
    index: KeyIndex = field(init=False)
    void: bool = field(default=False, init=False)  # its table was dropped: never apply it

    def __post_init__(self) -> None:
        self.index = KeyIndex(len(self.keys))
        self.index.insert_new(self.keys, np.arange(len(self.keys), dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.nbytes


class WriteBack:
    def __init__(self, cond: threading.Condition, apply: Callable[[PendingOp], None], limit_bytes: int):
        self._cond = cond  # bound to the store lock; every method below runs with it held
        self._apply = apply  # writes one op to the engine; called on the writer thread, store lock NOT held
        self.limit_bytes = limit_bytes
        self._ops: dict[str, list[PendingOp]] = {}
        self._bytes = 0
        self._count = 0
        self._pool: ThreadPoolExecutor | None = None
        self.error: BaseException | None = None
        self.reported = False  # raise_error has raised `error` to a caller

    def submit(self, table: str, keys: np.ndarray, rows: np.ndarray | None, stats: dict) -> None:
        if len(keys) == 0:
            return
        op = PendingOp(table, keys, None if rows is None else np.ascontiguousarray(rows))
        self._ops.setdefault(table, []).append(op)
        self._bytes += op.nbytes
        self._count += 1
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlkv-writeback")
        self._pool.submit(self._run, op)

    def throttle(self, stats: dict) -> None:
        """Backpressure: while the queue holds more than `limit_bytes`, wait for the disk to catch up (stall
        time). Called where a row operation starts, never from `submit`: waiting there releases the store
        lock mid-operation, with evicted rows in neither the tier nor the queue (a reader meanwhile gets the
        engine's older row) and loaded rows not yet admitted (another thread loads and admits them too)."""
        if self._bytes > self.limit_bytes:
            start = time.perf_counter()
            while self._bytes > self.limit_bytes and self.error is None:
                self._cond.wait()
            stats["stall_seconds"] += time.perf_counter() - start

    def wait_room(self, nbytes: int) -> None:
        """Wait (store lock released) until `nbytes` more fit under `limit_bytes`, or the queue is empty: a
        large flush queues its parts one at a time, so its copies stay bounded. Not stall time."""
        while self._bytes and self._bytes + nbytes > self.limit_bytes and self.error is None:
            self._cond.wait()

    def _run(self, op: PendingOp) -> None:
        with self._cond:
            if self.error is not None or not any(o is op for o in self._ops.get(op.table, ())):
                return  # a failed queue stops; a dropped table's ops are void
        try:
            self._apply(op)
        except BaseException as e:
            with self._cond:
                if isinstance(e, OSError):  # the engine names the file; else the table at least
                    e = storage_error(e, e.filename or f"table {op.table!r}", "writing back rows")
                self.error = e
                self._cond.notify_all()
            return
        with self._cond:
            ops = self._ops.get(op.table, [])
            if any(o is op for o in ops):  # else forget() took it off the books already
                ops.remove(op)
                self._bytes -= op.nbytes
                self._count -= 1
            self._cond.notify_all()

    def lookup(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Newest queued state of each key: (status 0 / ROW / DELETED, rows where status is ROW)."""
        status = np.zeros(len(keys), dtype=np.int8)
        ops = self._ops.get(table)
        if not ops:
            return status, np.empty((0, 0), np.float32)
        rows = None
        for op in reversed(ops):
            todo = np.flatnonzero(status == 0)
            if len(todo) == 0:
                break
            at = op.index.lookup(keys[todo])
            got = at >= 0
            if not got.any():
                continue
            if op.rows is None:
                status[todo[got]] = DELETED
            else:
                if rows is None:
                    rows = np.zeros((len(keys), op.rows.shape[1]), dtype=op.rows.dtype)
                status[todo[got]] = ROW
                rows[todo[got]] = op.rows[at[got]]
        return status, rows if rows is not None else np.empty((0, 0), np.float32)

    def pending(self, table: str | None = None) -> int:
        if table is None:
            return self._count
        return len(self._ops.get(table, ()))

    def drain(self, table: str | None = None) -> None:
        """Wait until every queued op (of `table`, or all) reached the engine; raise a write-back failure."""
        while self.pending(table) and self.error is None:
            self._cond.wait()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the failure that stopped the queue, if any: the same StorageError class (and errno) for a
        failing device, else MlkvError."""
        e = self.error
        if e is None:
            return
        self.reported = True
        what = (
            f"background write-back failed ({e}); writes are refused from now on, reads still work, and "
            "reopening the store continues from its last checkpoint"
        )
        if isinstance(e, StorageError):
            raise type(e)(e.filename, what) from e
        raise MlkvError(what) from e

    def forget(self, table: str) -> None:
        """Drop a dropped table's queued ops (their engine table is gone)."""
        for op in self._ops.pop(table, []):
            op.void = True  # one the writer thread already picked up must not reach the engine either
            self._bytes -= op.nbytes
            self._count -= 1

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
