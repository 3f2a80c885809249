"""StoreContext: what a Store shares with its tables, and all that a Table may use of its Store.

A Store owns one context; every Table of the store holds it. Through it the tables share:

- one plain lock (``lock``) guarding the memory tiers, staleness gates, queues, stats and the flags below,
  and its condition (``cond``), which wakes every kind of waiter (pins released, a read finished, a cut
  ended, room in the write-back queue, an applier job done);
- the engine (``engine``) and its reader-writer lock (``engine_lock``): reads and scans take it shared,
  the write-back thread and checkpoints exclusively;
- the write-back queue (``writeback``), the asynchronous-update applier (``applier``), the tier budget
  (``budget``), the look-ahead I/O pool (``io_pool()``) and the counters of ``Store.stats()`` (``stats``);
- the flags: ``open`` (cleared by close), ``changed`` (rows changed since the last checkpoint),
  ``tables`` (the live Table of each name: a dropped table is no longer in it) and the cuts in progress.

Guarantees: every field is read and written with ``lock`` held, except ``engine`` (fixed at open) and the
objects that bring their own locking (``engine_lock``, ``applier``'s and ``writeback``'s threads, which
take ``lock`` through ``cond``). ``enter()`` is the guard of every row operation: it applies write-back
backpressure, waits out a checkpoint or flush in progress (``cut()``) and raises StoreClosedError for a
closed store or a dropped table, all before the operation changes anything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..errors import ReadOnlyError, StoreClosedError
from .applier import Applier
from .rwlock import RWLock
from .tier_budget import TierBudget
from .writeback import PendingOp, WriteBack

if TYPE_CHECKING:
    from ..engine.base import Engine
    from .table import Table

STAT_KEYS = (
    "hits", "misses", "lookahead_rows", "lookahead_dropped", "lookahead_errors", "evictions",
    "rows_written_back", "stall_seconds", "staleness_waits", "staleness_wait_seconds", "bytes_read",
    "bytes_written", "async_updates", "async_wait_seconds", "rows_admitted", "rows_rejected",
    "grads_dropped", "rows_expired", "rows_evicted_by_cap",
)  # fmt: skip


class StoreContext:
    """The shared state and guards of one store's tables (see the module docstring)."""

    def __init__(
        self,
        path: str,
        readonly: bool,
        engine: Engine,
        cache_bytes: int,
        writeback_limit: int,
        io_threads: int,
        applier_name: str,
    ):
        self.path = path
        self.readonly = readonly
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.engine_lock = RWLock()
        self.engine = engine
        self.budget = TierBudget(cache_bytes)
        self.stats: dict[str, float] = dict.fromkeys(STAT_KEYS, 0)
        self.stats["stall_seconds"] = 0.0
        self.stats["staleness_wait_seconds"] = 0.0
        self.writeback = WriteBack(self.cond, self._apply_pending, writeback_limit)
        self.applier = Applier(self.cond, applier_name)
        self.tables: dict[str, Table] = {}
        self.open = True
        self.changed = False
        self._cuts = 0  # checkpoints and flushes in progress (`cut`); row operations wait while > 0
        self._io_threads = io_threads
        self._io: ThreadPoolExecutor | None = None

    def _apply_pending(self, op: PendingOp) -> None:
        """Runs on the write-back thread: one queued write or delete reaches the engine."""
        with self.engine_lock.write():
            if op.void:  # its table was dropped (and maybe re-created under the name) since it was queued
                return
            if op.rows is None:
                self.engine.delete(op.table, op.keys)
            else:
                self.engine.write(op.table, op.keys, op.rows.view("uint8"))

    def io_pool(self) -> ThreadPoolExecutor:
        """The look-ahead I/O threads, started on first use (lock held)."""
        if self._io is None:
            self._io = ThreadPoolExecutor(self._io_threads, thread_name_prefix="mlkv-io")
        return self._io

    def shutdown_io(self) -> None:
        """Wait for the look-ahead jobs in flight and stop the I/O threads (close)."""
        if self._io is not None:
            self._io.shutdown(wait=True)

    # ---- guards (lock held) ---------------------------------------------------------------------------
    def is_current(self, table: Table) -> bool:
        """The store is open and `table` is the live table of its name (not dropped)."""
        return self.open and self.tables.get(table.name) is table

    def check_open(self, table: Table | None = None) -> None:
        """Raises:
        StoreClosedError: the store is closed, or `table` was dropped."""
        if not self.open:
            raise StoreClosedError(f"store {self.path} is closed")
        if table is not None and self.tables.get(table.name) is not table:
            raise StoreClosedError(f"table {table.name!r} was dropped from {self.path}")

    def check_writable(self, table: Table | None = None) -> None:
        """check_open, and:

        Raises:
            ReadOnlyError: the store is open readonly."""
        self.check_open(table)
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open readonly; writes are refused")

    def enter(self, table: Table | None = None) -> None:
        """Guard of every row operation: write-back backpressure (WriteBack.throttle), then no cut in
        progress, then check_open, before the operation has changed anything."""
        self.writeback.throttle(self.stats)
        while self.checkpointing:
            self.cond.wait()
        self.check_open(table)

    # ---- cuts -----------------------------------------------------------------------------------------
    @property
    def checkpointing(self) -> bool:
        """A cut (checkpoint, flush) is in progress: row operations wait."""
        return self._cuts > 0

    @contextlib.contextmanager
    def cut(self) -> Iterator[None]:
        """Row operations wait (`enter`, `Table._wait_checkpoint`) while this runs, also while it releases
        the lock to wait for the write-back queue: what it writes is one consistent cut (a checkpoint, a
        flush). Counted, so cuts of several threads may overlap and end in any order."""
        self._cuts += 1
        try:
            yield
        finally:
            self._cuts -= 1
            if self._cuts == 0:
                self.cond.notify_all()


__all__ = ["STAT_KEYS", "StoreContext"]
