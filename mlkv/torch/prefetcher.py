"""Prefetcher: runs a data loader ahead on a background thread and announces each future batch's keys.

The loader knows the future: while the training loop works on batch i, a worker thread has already produced
batches i+1 .. i+depth and called `table.lookahead(keys)` for each, so their rows are moving into the memory
tier before the model asks for them. Batches come out in the loader's order. Integer keys are deduplicated
once on the worker thread; the module's forward finds that result in `dedup_memo` instead of repeating it.
Look-ahead is paced to the tiers: while batches are queued, a batch is announced only when its distinct
keys fit in the table's tier beside those of the queued batches and the batches being trained, so a tier
smaller than `depth` batches holds as many as fit instead of evicting what it announced.

Shutdown is always prompt and never leaves a thread behind: the end of the loader, an exception in the
loader or in `keys` (re-raised in the consuming thread, after the batches before it), `break` out of the
loop (the iterator is closed when dropped), `close()`, leaving a `with` block, and interpreter exit (an
atexit hook stops every worker; workers are daemon threads, so even a loader stuck in `next()` cannot
hold the interpreter).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ..engine.key_index import unique_keys
from ..errors import InternalError, InvalidArgumentError, InvalidTypeError
from ..store.validate import as_keys
from .dedup_memo import MEMO
from .thread_tuner import ThreadTuner

#: how long interpreter exit waits for each worker to notice its stop event
EXIT_JOIN_SECONDS = 1.0
#: how often a blocked worker or consumer looks at the stop event
_POLL_SECONDS = 0.05

_END = object()
_workers: weakref.WeakSet[_Worker] = weakref.WeakSet()
_ids = itertools.count()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def _announced(keys: Any) -> np.ndarray:
    """What `lookahead` gets for one table's keys of a batch (any shape, flattened), distinct (the pacing
    counts them): int64 or int32 keys are deduplicated once, through the memo the module's forward reads
    (dedup_memo); other keys as the store takes them (`as_keys`: uint64 hashed ids, int16, ...; anything
    else raises its InvalidTypeError here, in the loop, at this batch)."""
    if isinstance(keys, torch.Tensor):
        flat = keys.detach().reshape(-1).cpu()
        if flat.dtype in (torch.int64, torch.int32):
            flat = flat.numpy()
    else:
        flat = np.asarray(keys).reshape(-1)
    if isinstance(flat, np.ndarray) and flat.dtype in (np.int64, np.int32):
        return MEMO.put(flat.astype(np.int64, copy=False))[0]
    return unique_keys(as_keys(flat))


class _Worker:
    """The thread and the bounded queue of one pass over the loader. Holds no reference to the iterator
    handed to the consumer, so dropping that iterator (`break`) can stop the worker."""

    def __init__(self, loader: Iterable, keys: Callable, tables, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self._loader, self._keys, self._tables = loader, keys, tables
        self._resolved: dict[str, Any] = {}
        # pacing (see _wait_for_room): batches produced and taken so far, rows announced per queued batch
        self.produced = self.taken = 0
        self._taken_ids = itertools.count(1)  # next() is atomic: trainer threads sharing a pass count right
        self.holding: dict[int, int] = {}  # consumer thread -> index of the batch it trains
        self.progress = threading.Condition()  # notified when a batch is taken and on stop
        self._ahead: dict[str, collections.deque] = {}
        self.thread = threading.Thread(target=self._run, name=f"mlkv-prefetch-{next(_ids)}", daemon=True)
        _workers.add(self)
        self.thread.start()

    def _table(self, name: str):
        t = self._resolved.get(name)
        if t is None:
            tables = self._tables
            t = tables[name] if isinstance(tables, Mapping) else tables.table(name)
            self._resolved[name] = t
        return t

    def _wait_for_room(self, name: str, table, n: int) -> None:
        """Pace look-ahead to the memory tier: while batches announced earlier wait in the queue, announce
        `n` more rows of table `name` only if its tier can hold them beside the rows announced for the
        batches still queued and for the batch being trained (counted here, per batch, as announced). A
        tier smaller than `depth` batches so gets as many as it holds, instead of announced rows evicting
        each other and the training batch's rows finding no room (the README main job with a 10 % tier:
        42.4 K samples/s at depth 8 unpaced, 55.4 K at depth 2). Once the queue is empty the batch is next:
        it is announced at once."""
        ahead = self._ahead.setdefault(name, collections.deque())
        capacity = getattr(table, "lookahead_capacity", None)
        if capacity is not None:
            with self.progress:  # checked under it: a batch taken after the check wakes the wait
                while not self.stop_event.is_set() and self.queue.qsize() > 0:
                    # the oldest batch a consumer thread still trains (several trainers may share a pass)
                    oldest = min(list(self.holding.values()), default=self.taken - 1)
                    while ahead and ahead[0][0] < oldest:  # trained: its announcements are used up
                        ahead.popleft()
                    if sum(rows for _, rows in ahead) + n <= capacity():  # read again: tiers resize
                        break
                    self.progress.wait(_POLL_SECONDS)
        ahead.append((self.produced, n))
        while len(ahead) > self.queue.maxsize + 1 + max(len(self.holding), 1):  # bounded unpaced too
            ahead.popleft()

    def _put(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        it = None
        try:
            it = iter(self._loader)
            while not self.stop_event.is_set():
                try:
                    batch = next(it)
                except StopIteration:
                    self._put(_END)
                    return
                wanted = self._keys(batch)
                if not isinstance(wanted, Mapping):
                    raise InvalidTypeError(
                        f"keys(batch) must return a mapping table name -> keys, got {type(wanted).__name__}"
                    )
                for name, k in wanted.items():
                    if self.stop_event.is_set():
                        return
                    table, distinct = self._table(name), _announced(k)
                    self._wait_for_room(name, table, len(distinct))
                    if self.stop_event.is_set():  # stopped while waiting: announce nothing more
                        return
                    table.lookahead(distinct)
                self.produced += 1
                if not self._put((batch,)):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failure(e))
        finally:
            close = getattr(it, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):  # the loader's cleanup must not hide the outcome
                    close()

    def stop(self, timeout: float | None) -> None:
        """Ask the thread to finish, unblock it, and wait up to `timeout` seconds for it (None: no wait)."""
        self.stop_event.set()
        with self.progress:
            self.progress.notify_all()
        while True:  # a worker blocked in put() sees the stop event within one poll; emptying helps too
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if timeout is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


class _PrefetchIterator(Iterator):
    def __init__(self, worker: _Worker, tuner: ThreadTuner | None):
        self._worker: _Worker | None = worker
        self._tuner = tuner

    def __iter__(self) -> _PrefetchIterator:
        return self

    def __next__(self):
        w = self._worker
        while True:
            if w is None or w.stop_event.is_set():  # closed: by us, the Prefetcher, or a new pass
                self._worker = None
                raise StopIteration
            try:
                item = w.queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not w.alive and w.queue.empty() and not w.stop_event.is_set():
                    self.close()
                    raise InternalError("the prefetch thread ended without a result") from None
        if item is _END:
            self.close()
            raise StopIteration
        with w.progress:
            w.taken = next(w._taken_ids)
            w.holding[threading.get_ident()] = w.taken - 1
            w.progress.notify_all()
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        if self._tuner is not None:
            self._tuner.step()
        return item[0]

    def close(self) -> None:
        w, self._worker = self._worker, None
        if w is not None:
            w.stop(timeout=None)
        if self._tuner is not None:
            self._tuner.restore()

    def __del__(self) -> None:
        self.close()


class Prefetcher:
    """Iterate `loader` with its batches produced and their rows announced `depth` batches ahead.

    Args:
        loader: any iterable of batches (a torch DataLoader, a generator, a list). Each ``iter()`` of the
            Prefetcher is one pass over ``iter(loader)``; starting a new pass stops the previous one.
        keys: ``batch -> {table_name: keys}``; keys are a tensor, array or list of int keys of any shape
            (flattened). Padding keys may be left in: announcing a key only moves or creates its row.
        tables: the Store (``tables.table(name)``) or a mapping ``name -> Table``.
        depth: how many batches may wait, produced and announced, in the queue (>= 1).
        tune_threads: while the loop runs, time its steps at torch's intra-op thread count n and at n - 1
            and keep the faster (`thread_tuner`: on few cores, mlkv's I/O threads and torch's compete);
            n is restored when the pass ends. Off by default: a torch op may sum in another order on
            another thread count, so results can differ in the last bits from a fixed count.

    Use ``for batch in Prefetcher(...)``; ``break`` stops the worker. ``close()`` and the context manager
    stop it too, and wait for the thread (up to ``close_timeout`` seconds). A loader or ``keys`` exception is
    raised by the loop at the batch where it happened.
    """

    def __init__(
        self,
        loader: Iterable,
        keys: Callable[[Any], Mapping[str, Any]],
        tables,
        depth: int = 8,
        close_timeout: float = 10.0,
        tune_threads: bool = False,
    ):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise InvalidArgumentError(f"depth must be an int >= 1, got {depth!r}")
        if not isinstance(tune_threads, (bool, np.bool_)):
            raise InvalidTypeError(f"tune_threads must be a bool, got {type(tune_threads).__name__}")
        if not callable(keys):
            raise InvalidTypeError(
                f"keys must be a callable batch -> {{table: keys}}, got {type(keys).__name__}"
            )
        if not (isinstance(tables, Mapping) or hasattr(tables, "table")):
            raise InvalidTypeError(
                f"tables must be a Store or a mapping name -> Table, got {type(tables).__name__}"
            )
        self.loader = loader
        self.keys = keys
        self.tables = tables
        self.depth = depth
        self.close_timeout = close_timeout
        self.tune_threads = bool(tune_threads)
        #: the ThreadTuner of the current pass (tune_threads), for its `threads` and `choices`
        self.tuner: ThreadTuner | None = None
        self._worker: _Worker | None = None

    def __iter__(self) -> Iterator:
        self.close()
        self._worker = _Worker(self.loader, self.keys, self.tables, self.depth)
        self.tuner = ThreadTuner() if self.tune_threads else None
        return _PrefetchIterator(self._worker, self.tuner)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        """Whether a worker thread of this Prefetcher is alive."""
        return self._worker is not None and self._worker.alive

    def close(self) -> None:
        """Stop the current pass and wait (up to close_timeout) for its thread to end. Idempotent."""
        w, self._worker = self._worker, None
        if w is not None:
            w.stop(self.close_timeout)
        if self.tuner is not None:
            self.tuner.restore()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _stop_all_workers() -> None:
    workers = list(_workers)
    for w in workers:
        w.stop(timeout=None)
    for w in workers:
        w.stop(timeout=EXIT_JOIN_SECONDS)
