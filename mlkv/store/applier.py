"""Applier: one background thread that applies queued sparse updates (`Table.update_async`) in order.

What it guarantees:
- Order: jobs run one at a time, in submission order (FIFO across tables), so two asynchronous updates of
  a row apply in the order they were submitted, as they would synchronously.
- Bounded lag: at most `limit` jobs of one table wait at a time (the table's staleness bound); `submit`
  waits for room. Together with the staleness gate (each queued update holds its keys like an outstanding
  read until applied) a tracked read misses at most `staleness_bound` updates of any row.
- Errors: the first failure stops the applier. Queued jobs after it are dropped, and the error is raised by
  every later `submit`, `drain` or `raise_error` (the next `update`, `update_async`, `flush`, `checkpoint`,
  `close` of the store) until the store is closed: training notices at its next step, never silently.
- Drain: `drain` returns when every job submitted so far is applied; the store drains before a flush, a
  checkpoint or a close, so a checkpoint contains every update submitted before it.
- Threads: the thread starts with the first job and ends at `shutdown`; a closed store leaves none behind.

Thread-safety: every method must be called with the store lock held (`cond` is the store's condition);
waiting releases it. Jobs run on the applier thread with the store lock released (they take it themselves).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import ApplierError


class Applier:
    def __init__(self, cond: threading.Condition, name: str):
        self._cond = cond
        self._name = name
        self._jobs: deque[tuple[str, Callable[[], None]]] = deque()
        self._queued: dict[str, int] = {}  # table -> jobs queued or running
        self._running = False
        self._error: BaseException | None = None
        self._reported = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.wait_seconds = 0.0  # time submit() waited for room: the lag bound at work

    # ---- called with the store lock held ---------------------------------------------------------------
    def pending(self, table: str | None = None) -> int:
        """Jobs queued or running (of `table`, or of all tables)."""
        if table is None:
            return len(self._jobs) + self._running
        return self._queued.get(table, 0)

    @property
    def reported(self) -> bool:
        """A failure exists and some call has raised it already."""
        return self._reported

    def raise_error(self) -> None:
        if self._error is not None:
            self._reported = True
            raise ApplierError(
                f"an asynchronous update failed in the background: {self._error!r}; updates submitted "
                "after it were not applied; the last checkpoint is intact"
            ) from self._error

    def submit(self, table: str, job: Callable[[], None], limit: int) -> float:
        """Queue `job` for `table`, first waiting while `limit` of its jobs are pending. Returns the seconds
        waited."""
        self.raise_error()
        start = time.perf_counter()
        while self._queued.get(table, 0) >= limit and self._error is None:
            self._cond.wait()
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        self.raise_error()
        self._jobs.append((table, job))
        self._queued[table] = self._queued.get(table, 0) + 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mlkv-applier-{self._name}", daemon=True)
            self._thread.start()
        self._cond.notify_all()
        return waited

    def drain(self, table: str | None = None) -> None:
        """Wait until every job submitted so far (of `table`, or all) is applied; raise a failure."""
        while self.pending(table) and self._error is None:
            self._cond.wait()
        self.raise_error()

    def shutdown(self) -> None:
        """Stop the thread after the queued jobs (store lock held; waits with it released)."""
        self._stop = True
        self._cond.notify_all()
        thread = self._thread
        while thread is not None and thread.is_alive():
            self._cond.wait(0.05)

    # ---- the applier thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                while not self._jobs and not self._stop:
                    cond.wait()
                if not self._jobs:  # stopping, nothing left
                    return
                table, job = self._jobs.popleft()
                self._running = True
                cond.release()  # the job takes the store lock itself
                try:
                    job()
                except BaseException as e:  # kept and raised at the next call that waits for us
                    failed: BaseException | None = e
                else:
                    failed = None
                finally:
                    cond.acquire()
                self._running = False
                self._queued[table] -= 1
                if failed is not None and self._error is None:
                    self._error = failed
                    for t, _ in self._jobs:
                        self._queued[t] -= 1
                    self._jobs.clear()
                cond.notify_all()
