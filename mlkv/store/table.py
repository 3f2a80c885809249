"""Table: one named embedding table of a Store — its schema, optimizer, memory tier and row traffic.

Every public method validates its arguments before it takes the store lock or changes anything.

The row path, all under the store lock except the disk read: memory-tier hit -> gather. Miss -> the newest
queued write-back of the key, else the engine (read with the store lock released and the keys marked in
flight, so other threads wait for this read instead of repeating it), else `init` for a key never seen ->
admitted to the tier, evicting cold rows (their dirty bytes go to the write-back queue). Rows that find no
room (every row pinned or announced) are served from a batch buffer, and their changes are queued for the
engine directly, so a batch larger than the tier still works. `update` reads, applies the optimizer and
stores within one critical section, so concurrent updates of a row never lose each other.

What a Table uses of its Store is the StoreContext (context.py): the one lock and its condition, the
engine and its lock, the write-back queue, the applier, the budget, the stats and the guards; its rows'
memory is the MemoryTier's (memory_tier.py), which alone pins, announces, marks dirty and evicts.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..engine.kernel import kernel
from ..engine.key_index import KeyIndex, dedup, unique_inverse, unique_keys
from ..errors import InvalidArgumentError, InvalidTypeError, MlkvError
from ..optim import Adagrad
from .admission import DEFAULT_WIDTH, AdmissionSketch
from .memory_tier import MemoryTier
from .row_codec import RowCodec
from .staleness import StalenessGate
from .validate import as_keys, as_rows
from .writeback import ROW

if TYPE_CHECKING:
    from .context import StoreContext
    from .store import Store

# Keys per background read. The engine puts a cold read's device reads in flight together itself (the slot
# file's fault threads), so a job need not be small to keep the device busy; and each job costs a fixed
# share of Python, locking and a write-back hand-off. 512-key jobs took 6 ms of I/O-thread CPU a training
# step for 3,300 admitted rows, 8,192-key jobs 2.5 ms (`mlkv bench train`'s 10 % warm run).
_LOOKAHEAD_CHUNK = 8192


@kernel
def _sum_by_inverse(inverse, grads, summed):
    """summed[inverse[i]] += grads[i], in order (np.add.at's result, ~50x faster for a 4096 x 64 batch)."""
    for i in range(grads.shape[0]):
        r = inverse[i]
        for j in range(grads.shape[1]):
            summed[r, j] += grads[i, j]


@kernel
def _fill_misses(out, miss, rows, inverse):
    """out[i] = rows[inverse[c]][:dim] for the c-th i where miss[i]: a get's missed keys, in one pass."""
    c = 0
    for i in range(out.shape[0]):
        if miss[i]:
            r = inverse[c]
            for j in range(out.shape[1]):
                out[i, j] = rows[r, j]
            c += 1


class _PendingUpdate:
    """The staleness-gate holder of one queued asynchronous update (see Table.update_async)."""

    __slots__ = ("table",)

    def __init__(self, table: str):
        self.table = table

    def __repr__(self) -> str:
        return f"<mlkv pending update of {self.table!r}>"


class Table:
    r"""One named embedding table of a :class:`Store`: rows by 64-bit key, each ``[embedding | optimizer
    state]``, with the hot ones in the store's memory tier and all of them on disk.

    Made by :meth:`Store.table`, not directly. Thread-safe: any number of threads may call any method at
    once. Keys are any 1-D integer array-like (numpy, list, torch tensor), signed or unsigned; the full
    64-bit range is valid and ``-1`` is the same key as ``2**64 - 1``. Every method validates its arguments
    before it changes anything.

    Attributes:
        name (str): the table's name.
        dim (int): embedding width.
        dtype (str): how embeddings are stored: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (see
            :meth:`Store.table`); rows are float32 in every method all the same.
        stochastic_rounding (bool): 16-bit embeddings are rounded stochastically when stored.
        optimizer (mlkv.optim.Optimizer or None): the update rule of :meth:`update`.
        step (int): update steps applied so far (Adam's bias correction counts them); checkpointed.
        staleness_bound (int or None): this table's bound, ``None`` for the store's.

    Shape:
        - keys: :math:`(n,)`, any integer dtype.
        - rows returned by :meth:`get`: :math:`(n, \text{dim})`, float32.
        - grads of :meth:`update`, values of :meth:`put`: :math:`(n, \text{dim})`, float32.
    """

    def __init__(self, store: Store, ctx: StoreContext, name: str, schema: dict, optimizer, init_fn):
        self._store = store  # `store` and its settings (staleness_bound, staleness_timeout); the rest: ctx
        self._ctx = ctx
        self.name = name
        self.dim: int = schema["dim"]
        self.dtype: str = schema["dtype"]
        self.stochastic_rounding: bool = schema.get("stochastic_rounding", False)
        self.optimizer = optimizer
        self._salt = zlib.crc32(name.encode())
        self._state_width = optimizer.state_width(self.dim) if optimizer else 0
        # the row's last column holds the table step of its last write (uint32 bits), when expiry is on
        self._age = 1 if schema.get("age_column") else 0
        self.width = self.dim + self._state_width + self._age
        # 16-bit tables: embeddings stored rounded (engine and tier); rows here are float32 all the same
        self._codec = RowCodec(self.dtype, self.dim, self.width, self.stochastic_rounding, self._salt)
        self._init = init_fn if not self._codec.half else self._rounded_init(init_fn)
        self.step: int = schema.get("step", 0)
        self.staleness_bound: int | None = schema.get("staleness_bound")
        self.admit_after: int = schema.get("admit_after", 1)
        self.ttl_steps: int | None = schema.get("ttl_steps")
        self.max_rows: int | None = schema.get("max_rows")
        self.expire_on_checkpoint: bool = schema.get("expire_on_checkpoint", False)
        width = schema.get("sketch_width", DEFAULT_WIDTH)
        self._sketch = AdmissionSketch(width) if self.admit_after > 1 else None
        self.tier = MemoryTier(self.dim, self._state_width + self._age, self._codec)
        self._schema = schema
        self._gate = StalenessGate(name, ctx.cond)
        self._inflight = KeyIndex()
        self._announced = False  # set by the first lookahead; until then reads skip the announcement count
        with ctx.engine_lock.read():
            self._count = ctx.engine.count(name)

    def _rounded_init(self, init_fn):
        """`init_fn` with its rows rounded to the table's dtype (nearest even): a key's init row is what
        storing it gives, whether it is stored yet or not (admit_after)."""

        def init(keys: np.ndarray, dim: int, salt: int) -> np.ndarray:
            return self._codec.round_nearest(np.asarray(init_fn(keys, dim, salt), dtype=np.float32))

        return init

    # ---- schema -------------------------------------------------------------------------------------
    def schema(self) -> dict:
        return {
            **self._schema,
            "step": self.step,
            "staleness_bound": self.staleness_bound,
            "admit_after": self.admit_after,
            "ttl_steps": self.ttl_steps,
            "max_rows": self.max_rows,
            "expire_on_checkpoint": self.expire_on_checkpoint,
        }

    def __repr__(self) -> str:
        kind = self.optimizer.kind if self.optimizer else None
        return f"Table({self.name!r}, dim={self.dim}, dtype={self.dtype}, optimizer={kind})"

    @property
    def _bound(self) -> int:
        return self._store.staleness_bound if self.staleness_bound is None else self.staleness_bound

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes in the memory tier and on disk: embedding (2 or 4 bytes per weight), optimizer
        state and, with expiry, the last-write step."""
        return self.tier.row_bytes

    @property
    def effective_staleness_bound(self) -> int:
        """The bound in force for this table: its own ``staleness_bound``, else the store's."""
        return self._bound

    # ---- the row path (store lock held) -------------------------------------------------------------
    def _new_rows(self, keys: np.ndarray) -> np.ndarray:
        rows = np.empty((len(keys), self.width), dtype=np.float32)
        rows[:, : self.dim] = self._init(keys, self.dim, self._salt)
        if self._state_width:
            rows[:, self.dim : self.dim + self._state_width] = self.optimizer.init_state(len(keys), self.dim)
        self._stamp(rows)
        return rows

    def _stamp(self, rows: np.ndarray) -> None:
        """Record the table step in the age column of rows being written (no-op without expiry)."""
        if self._age:
            rows[:, -1:].view(np.uint32)[:] = np.uint32(min(self.step, 0xFFFFFFFF))

    def _opt_rows(self, rows: np.ndarray) -> np.ndarray:
        """The [embedding | optimizer state] columns the optimizer updates (a view)."""
        return rows[:, : self.width - self._age] if self._age else rows

    def _read_engine(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Engine rows of distinct keys (store lock NOT held): (rows, found, seconds)."""
        st = self._ctx
        t0 = time.perf_counter()
        with st.engine_lock.read():
            raw, found = st.engine.read(self.name, keys)
        return self._codec.from_bytes(raw), found, time.perf_counter() - t0

    def _assemble(self, keys, status, queued, disk_rows, found) -> tuple[np.ndarray, np.ndarray]:
        """Rows of distinct keys from their three sources: the write-back queue (status ROW), the engine
        (status 0: `disk_rows`, `found`), or init for keys never stored or deleted while queued.
        Returns (rows, created)."""
        if disk_rows is not None and len(disk_rows) == len(keys) and found.all():  # all from the engine
            return disk_rows, np.zeros(len(keys), dtype=bool)
        rows = np.empty((len(keys), self.width), dtype=np.float32)
        from_queue = status == ROW
        if from_queue.any():  # a 16-bit table queues engine bytes (see _queue_write)
            rows[from_queue] = (
                self._codec.from_bytes(queued[from_queue]) if self._codec.half else queued[from_queue]
            )
        created = status > ROW
        on_disk = status == 0
        if on_disk.any():
            rows[on_disk] = disk_rows
            created[np.flatnonzero(on_disk)[~found]] = True
        if created.any():
            rows[created] = self._new_rows(keys[created])
        return rows, created

    def _load(self, keys: np.ndarray, writable: bool) -> tuple[np.ndarray, np.ndarray]:
        """Rows of distinct keys that are neither resident nor in flight: (rows, created).

        Marks the keys in flight and releases the store lock for the engine read."""
        st = self._ctx
        status, queued = st.writeback.lookup(self.name, keys)
        on_disk = status == 0
        disk_rows, found = None, np.empty(0, dtype=bool)
        if on_disk.any():
            self._inflight.insert_new(keys, np.zeros(len(keys), dtype=np.int64))
            st.lock.release()
            try:
                disk_rows, found, secs = self._read_engine(keys[on_disk])
            finally:
                st.lock.acquire()
                self._wait_checkpoint()  # the keys stay in flight meanwhile: nobody loads them twice
                self._inflight.remove(keys)
                st.cond.notify_all()
            st.stats["stall_seconds"] += secs
            st.stats["bytes_read"] += int(found.sum()) * self.tier.row_bytes
        rows, created = self._assemble(keys, status, queued, disk_rows, found)
        st.stats["misses"] += len(keys)
        if writable and created.any():
            self._count += int(created.sum())
            st.changed = True
        return rows, created & writable

    def _make_room(self, n: int, demand: bool) -> None:
        """Free n tier slots if the budget allows, growing the tier or evicting cold rows. Rows announced by
        look-ahead are kept, except from a demand read that finds nothing else: announcements are hints
        (a batch announced and then never read must not pin the tier forever)."""
        tier, st = self.tier, self._ctx
        short = n - tier.n_free
        if short > 0 and not st.budget.settled(self):
            st.budget.grow(self, short)
            short = n - tier.n_free
        for announced_too in (False, True) if demand else (False,):
            if short > 0:
                before = tier.n_free
                self._queue_write(*tier.evict(short, announced_too))
                st.stats["evictions"] += tier.n_free - before
                short = n - tier.n_free

    def _queue_write(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if len(keys):
            st = self._ctx
            st.stats["rows_written_back"] += len(keys)
            st.stats["bytes_written"] += len(keys) * self.tier.row_bytes
            if self._codec.half:  # queued as engine bytes: half the embedding bytes, read back decoded
                rows = self._codec.to_bytes(rows)
            st.writeback.submit(self.name, keys, rows, st.stats)

    def resize_tier(self, cap: int) -> None:
        self._queue_write(*self.tier.resize(cap))

    def _wait_checkpoint(self) -> None:
        """After the store lock was released mid-operation: a checkpoint that began meanwhile must end before
        this operation changes anything, or the checkpoint would hold part of it (the Adam step without the
        rows) and clear `changed` under it (close() would then skip it). `StoreContext.enter` does the same
        for operations that have not begun."""
        while self._ctx.checkpointing:
            self._ctx.cond.wait()

    def _wait_busy(self, keys: np.ndarray) -> None:
        """Wait until no key is in flight or pinned by a read in progress (a delete must not pull a row
        out from under a read that has released the lock for its engine read)."""
        tier = self.tier
        while True:
            busy = len(self._inflight) and (self._inflight.lookup(keys) >= 0).any()
            if not busy:
                slots = tier.lookup(keys)
                busy = tier.pinned(slots).any()
            if not busy:
                return
            self._ctx.cond.wait()
            self._wait_checkpoint()

    def _gather(
        self, keys: np.ndarray, writable: bool, slots: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of distinct keys as of now, admitting misses to the tier: (slots, rows); slot -1 marks a row
        that found no room and lives only in `rows` (a created one is already queued for the engine).
        `slots`: the caller's tier lookup of `keys`, made under the same hold of the lock."""
        tier, st = self.tier, self._ctx
        while True:
            if slots is None:
                slots = tier.lookup(keys)
            miss = slots < 0
            if not miss.any():
                st.stats["hits"] += len(keys)
                return slots, tier.rows(slots)
            if not (len(self._inflight) and (self._inflight.lookup(keys[miss]) >= 0).any()):
                break
            t0 = time.perf_counter()
            st.cond.wait()  # another thread is reading some of them: wait for it rather than read twice
            st.stats["stall_seconds"] += time.perf_counter() - t0  # waiting for that read is a disk stall
            self._wait_checkpoint()
            slots = None
        hit_at = np.flatnonzero(~miss)
        hit_keys = keys[hit_at]
        tier.pin(slots[hit_at])  # keep the batch's resident rows while the lock is released
        st.stats["hits"] += len(hit_keys)
        miss_at = np.flatnonzero(miss)
        moves = tier.moves  # unchanged: every slot found so far still holds its key (pinned rows stay)
        try:
            loaded, created = self._load(keys[miss_at], writable)
            self._make_room(len(miss_at), demand=True)
            placed = tier.admit(keys[miss_at], loaded, created)
        finally:
            hit_slots = slots[hit_at] if tier.moves == moves else tier.lookup(hit_keys)
            tier.unpin(hit_slots)  # all of them: a delete waits for pins, eviction skips them
            st.cond.notify_all()  # a delete may be waiting for these pins
        slots = slots.copy()
        slots[miss_at] = placed
        slots[hit_at] = hit_slots
        if len(hit_at):
            rows = np.empty((len(keys), self.width), dtype=np.float32)
            rows[miss_at] = loaded  # an admitted row is still what was loaded: the lock was held since
            rows[hit_at] = tier.rows(hit_slots)  # after the engine read: updates made meanwhile are in
        else:
            rows = loaded
        spilled = placed < 0
        if spilled.any():
            new = spilled & created
            self._queue_write(keys[miss_at[new]], loaded[new])
        return slots, rows

    def _store_rows(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write changed rows back: into their tier slot (dirty) or, if they have none, to the queue. The
        embeddings of a 16-bit table are rounded here, in `rows`: the one rounding of an update or put."""
        bits = self._codec.round_embeddings(rows, keys, self.step)
        tier = self.tier
        inside = slots >= 0
        s = slots[inside]
        tier.set_rows(s, rows[inside], None if bits is None else bits[inside])
        tier.mark_written(s)
        if not inside.all():
            self._queue_write(keys[~inside], rows[~inside])
        self._ctx.changed = True

    def _consume(self, slots: np.ndarray) -> None:
        """Reads of resident rows: CLOCK's bit set, one look-ahead announcement used up each."""
        self.tier.consume(slots, self._announced)

    def _get_untracked(self, keys: np.ndarray) -> np.ndarray:
        """get(track=False), store lock held. Resident rows are copied out in the same pass that finds them,
        so only the distinct missing keys go through the miss path (no dedup of the whole batch, no pins)."""
        st = self._ctx
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        slots = self.tier.read(keys, out)
        miss = slots < 0
        n_miss = int(np.count_nonzero(miss))
        st.stats["hits"] += len(keys) - n_miss
        if self._announced:
            self._consume(slots)
        if n_miss:
            uk, inv = dedup(keys[miss])
            slots, rows = self._gather(uk, not st.readonly, np.full(len(uk), -1, dtype=np.int64))
            st.stats["misses"] += n_miss - len(uk)  # counted per key asked for, like the hits
            self._consume(slots)
            _fill_misses(out, miss, rows, inv)
        return out

    def _embeddings(self, slots: np.ndarray) -> np.ndarray:
        """Embedding columns of resident rows, float32."""
        return self.tier.embeddings(slots)

    @property
    def store(self) -> Store:
        return self._store

    def _reader(self, reader: Hashable | None) -> Hashable:
        return threading.get_ident() if reader is None else reader

    # ---- public API ---------------------------------------------------------------------------------
    def get(self, keys, track: bool = True, reader: Hashable | None = None) -> np.ndarray:
        r"""Embeddings of `keys`; keys never seen are created from the table's init.

        A tracked read (the default) counts as outstanding for `reader` until its
        :meth:`update`/:meth:`put`/:meth:`release` of the key, and waits while more than the staleness
        bound of other readers hold a key (``stats()["staleness_waits"]``). Rows not in the memory tier
        are read from disk and admitted to it.

        Args:
            keys: 1-D integer keys; duplicates allowed.
            track (bool): take part in staleness accounting. ``False`` for evaluation and export: a plain
                read that never waits and needs no release. Default: ``True``.
            reader (hashable, optional): who holds the tracked read. Default: the calling thread.

        Returns:
            np.ndarray: float32, shape :math:`(n, \text{dim})`, row ``i`` the embedding of ``keys[i]``.

        Raises:
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
            StalenessTimeout: a tracked read waited longer than the store's ``staleness_timeout``.
            CorruptionError: a row read from disk failed its checksum.
        """
        k = as_keys(keys)
        if self._sketch is not None and not self._ctx.readonly:
            return self._get_admitting(k, track, reader)
        return self._get(k, track, reader)

    def _get_admitting(self, k: np.ndarray, track: bool, reader: Hashable | None) -> np.ndarray:
        """get() when admit_after > 1: a key not stored yet is counted by each tracked read (one per batch)
        and served from init, without being stored, until admit_after reads have named it."""
        st = self._ctx
        with st.lock:
            st.enter(self)
            uk, inv, _ = unique_inverse(k)
            new_at = np.flatnonzero(~self._exists(uk))
            counts = self._sketch.add(uk[new_at]) if track else self._sketch.estimate(uk[new_at])
            waiting = np.zeros(len(uk), dtype=bool)
            waiting[new_at[counts < self.admit_after]] = True
            n_waiting = int(np.count_nonzero(waiting))
            if track:  # sightings: only tracked reads count
                st.stats["rows_rejected"] += n_waiting
                st.stats["rows_admitted"] += len(new_at) - n_waiting
        if n_waiting == 0:
            return self._get(k, track, reader)
        out = np.empty((len(uk), self.dim), dtype=np.float32)
        out[waiting] = self._init(uk[waiting], self.dim, self._salt)
        if n_waiting < len(uk):
            out[~waiting] = self._get(uk[~waiting], track, reader)
        return out[inv]

    def _get(self, k: np.ndarray, track: bool, reader: Hashable | None) -> np.ndarray:
        st = self._ctx
        with st.lock:
            st.enter(self)
            if not track:
                return self._get_untracked(k)
            uk, inv, _ = unique_inverse(k)
            timeout = self._store.staleness_timeout
            new = self._gate.acquire(uk, self._reader(reader), self._bound, timeout, st.stats)
            try:
                self._wait_checkpoint()  # the gate may have waited with the lock released
                slots = self.tier.lookup(uk)
                if slots.min(initial=0) >= 0:  # all resident: one gather of just the embedding columns
                    st.stats["hits"] += len(uk)
                    self._consume(slots)
                    return self._embeddings(slots[inv])
                slots, rows = self._gather(uk, not st.readonly, slots)
            except BaseException:
                self._gate.resolve(new, self._reader(reader))
                raise
            self._consume(slots)
            return rows[inv, : self.dim]

    def update(self, keys, grads, reader: Hashable | None = None, optimizer=None) -> None:
        r"""Apply the table's optimizer with `grads` (len(keys), dim); duplicate keys' grads are summed.

        `optimizer`: an mlkv.optim optimizer of the table's kind to apply instead of the table's own for this
        update only (SparseOptimizer passes its param group's learning rate this way); the table's optimizer,
        its schema and the state layout are unchanged.

        One update step: the table's :attr:`step` advances by one. Read, optimizer and write happen in one
        critical section, so concurrent updates of a row never lose each other; the update resolves
        `reader`'s tracked reads of the keys.

        Args:
            keys: 1-D integer keys, shape :math:`(n,)`.
            grads: float32 gradients of the embeddings, shape :math:`(n, \text{dim})` (numpy or torch).
            reader (hashable, optional): whose tracked reads this update resolves. Default: this thread.
            optimizer (mlkv.optim.Optimizer, optional): see above.

        Raises:
            MlkvError: the table was created with ``optimizer=None``.
            InvalidArgumentError: `grads` has the wrong shape (the message names expected and received).
            InvalidTypeError: `keys` or `grads` has the wrong dtype, or `optimizer` another kind.
            ReadOnlyError: the store is readonly.
            StoreClosedError: the store is closed or the table was dropped.
        """
        k, g = self._update_args(keys, grads, optimizer)
        st = self._ctx
        if len(k) == 0:
            return
        with st.lock:
            st.enter(self)
            self._after_async()
            self._check_writeback(k, reader)
            uk, inv, _ = unique_inverse(k)
            self._apply_update(uk, inv, g, self._reader(reader), optimizer)

    def _update_args(self, keys, grads, optimizer) -> tuple[np.ndarray, np.ndarray]:
        """Validated (keys, grads) of an update; raises before anything changes."""
        k = as_keys(keys)
        self._ctx.check_writable(self)
        if self.optimizer is None:
            raise MlkvError(f"table {self.name!r} was created with optimizer=None and is not trainable")
        if optimizer is not None and type(optimizer) is not type(self.optimizer):
            raise InvalidTypeError(
                f"optimizer must be a {type(self.optimizer).__name__} like table {self.name!r}'s own, "
                f"got {type(optimizer).__name__}"
            )
        return k, as_rows(grads, len(k), self.dim, "grads")

    def _apply_update(
        self,
        uk: np.ndarray,
        inv: np.ndarray,
        g: np.ndarray,
        reader: Hashable,
        optimizer=None,
        outside_lock: bool = False,
    ) -> None:
        """One optimizer step on distinct keys `uk` with per-key gradients `g` (summed by `inv`), by
        `optimizer` (None: the table's own); store lock held. `outside_lock` (the applier's updates, which
        are serialised among themselves): the optimizer's arithmetic runs with the lock released and the
        rows pinned, so the trainer's next reads and forward overlap with it. Adagrad over resident rows
        runs its fused in-place kernel under the lock either way: one pass over the rows costs less than
        the gather, pin, unpin and scatter that releasing the lock needs (`mlkv bench train` step, tier
        holding the table: s=1 went from 0.70x to 1.0x the s=0 step)."""
        summed = np.zeros((len(uk), self.dim), dtype=np.float32)
        _sum_by_inverse(inv, g, summed)
        if self._sketch is not None:  # gradients of keys not admitted yet are dropped
            stored = self._exists(uk)
            if not stored.all():
                self._ctx.stats["grads_dropped"] += int((~stored).sum())
                self._gate.resolve(uk[~stored], reader)
                uk, summed = uk[stored], summed[stored]
                if not len(uk):
                    return
        opt = self.optimizer if optimizer is None else optimizer
        fusable = type(opt) is Adagrad and not opt.weight_decay  # the kernel has no weight decay term
        if not self._age and fusable and not self._codec.half:
            slots = self.tier.lookup(uk)
            if slots.min(initial=0) >= 0:  # all resident: the step in place, one kernel over the rows
                self._ctx.stats["hits"] += len(uk)
                self.step += 1
                self.tier.adagrad(slots, summed, opt.lr, opt.eps)
                self._ctx.changed = True
                self._gate.resolve(uk, reader)
                return
        slots, rows = self._gather(uk, True)
        self.step += 1
        step = self.step

        def apply() -> None:
            opt.apply(self._opt_rows(rows), summed, step)

        if outside_lock:
            slots = self._unlocked(uk, slots, apply)
        else:
            apply()
        self._stamp(rows)
        self._store_rows(uk, slots, rows)
        self._gate.resolve(uk, reader)

    def _unlocked(self, keys: np.ndarray, slots: np.ndarray, work) -> np.ndarray:
        """Run `work` with the store lock released while `keys`' resident rows stay pinned (never evicted
        or removed meanwhile); return the keys' slots as of after it (a resize may move pinned rows)."""
        tier, st = self.tier, self._ctx
        resident = slots >= 0
        tier.pin(slots[resident])
        moves = tier.moves
        st.lock.release()
        try:
            work()
        finally:
            st.lock.acquire()
            if tier.moves != moves:
                slots = tier.lookup(keys)
            tier.unpin(slots[resident])
            st.cond.notify_all()  # a delete may be waiting for these pins
        return slots

    def _check_writeback(self, keys: np.ndarray, reader: Hashable | None) -> None:
        """A failed write-back (StorageFullError...) is raised at the next update/put/delete, which then
        changes nothing; the reader's tracked reads of `keys` are given back first, so other readers do not
        wait for an update that will not come. Store lock held."""
        if self._ctx.writeback.error is not None:
            self._gate.resolve(unique_keys(keys), self._reader(reader))
            self._ctx.writeback.raise_error()

    def _after_async(self) -> None:
        """A synchronous write comes after every asynchronous update of this table submitted before it
        (program order); store lock held."""
        if self._ctx.applier.pending(self.name):
            self._ctx.applier.drain(self.name)
        else:
            self._ctx.applier.raise_error()

    def update_async(self, keys, grads, reader: Hashable | None = None, optimizer=None) -> None:
        """Like :meth:`update`, but applied by the store's background applier when the table's staleness
        bound ``s`` is at least 1; with ``s = 0`` it is :meth:`update` (synchronous, exact).

        The update holds its keys in the staleness gate until it is applied, like an outstanding read, and
        the reader's own reads of them are resolved at once: a later tracked read of a key (by this reader
        or any other) misses at most ``s`` updates. At most ``s`` asynchronous updates of this table are
        queued; a further call waits for room. Updates apply in submission order; a synchronous
        ``update``/``put``/``delete`` of the table, ``flush``, ``checkpoint`` and ``close`` first wait for
        the queued ones, so a checkpoint contains every update submitted before it.

        Args:
            keys: 1-D integer keys, shape ``(n,)``; duplicates' gradients are summed.
            grads: float gradients, shape ``(n, dim)``; copied, so the caller may reuse the buffer.
            reader: the staleness reader whose reads of ``keys`` this update resolves (default: this thread).
            optimizer: as for :meth:`update` (this update's hyper-parameters, e.g. a scheduled ``lr``).

        Raises:
            ApplierError: an earlier asynchronous update failed (nothing after it was applied).
            MlkvError: the table has no optimizer; the store is closed or read-only.
            InvalidArgumentError, InvalidTypeError: bad keys or gradients (nothing is queued).
        """
        k, g = self._update_args(keys, grads, optimizer)
        st = self._ctx
        bound = self._bound
        if bound == 0 or len(k) == 0:
            self.update(k, g, reader=reader, optimizer=optimizer)
            return
        g = np.array(g, dtype=np.float32, copy=True)
        owner = self._reader(reader)
        with st.lock:
            st.enter(self)
            self._check_writeback(k, reader)
            uk, inv, _ = unique_inverse(k)
            token = _PendingUpdate(self.name)

            def job() -> None:
                with st.lock:
                    try:
                        st.enter(self)
                        self._apply_update(uk, inv, g, token, optimizer, outside_lock=True)
                    finally:
                        self._gate.release_all(token)

            st.stats["async_wait_seconds"] += st.applier.submit(self.name, job, bound)
            st.check_open(self)  # submit may have waited with the lock released
            self._gate.hand_over(uk, owner, token)
            st.stats["async_updates"] += 1

    def wait_updates(self, raise_only: bool = False) -> None:
        """Wait until this table's asynchronous updates submitted so far are applied (``update_async``).

        Args:
            raise_only: do not wait; only raise a failure of an earlier asynchronous update, if any.

        Raises:
            ApplierError: an asynchronous update of the store failed (later ones were not applied).
        """
        st = self._ctx
        with st.lock:
            st.check_open(self)
            if raise_only:
                st.applier.raise_error()
            else:
                st.applier.drain(self.name)

    def put(self, keys, values, reader: Hashable | None = None) -> None:
        r"""Overwrite embeddings (optimizer state is kept); for a key given twice the last value wins.

        Args:
            keys: 1-D integer keys, shape :math:`(n,)`.
            values: float32 embeddings, shape :math:`(n, \text{dim})`.
            reader (hashable, optional): whose tracked reads of the keys this resolves. Default: this
                thread.

        Raises:
            InvalidArgumentError: `values` has the wrong shape.
            InvalidTypeError: `keys` or `values` has the wrong dtype.
            ReadOnlyError: the store is readonly.
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        st = self._ctx
        st.check_writable(self)
        v = as_rows(values, len(k), self.dim, "values")
        if len(k) == 0:
            return
        with st.lock:
            st.enter(self)
            self._after_async()
            self._check_writeback(k, reader)
            uk, _, last = unique_inverse(k[::-1])
            slots, rows = self._gather(uk, True)
            rows[:, : self.dim] = v[::-1][last]
            self._stamp(rows)
            self._store_rows(uk, slots, rows)
            self._gate.resolve(uk, self._reader(reader))

    def release(self, keys, reader: Hashable | None = None) -> None:
        """Give back `reader`'s tracked reads of `keys` without writing (e.g. a batch that is skipped).

        Args:
            keys: 1-D integer keys.
            reader (hashable, optional): whose reads. Default: this thread.

        Raises:
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        st = self._ctx
        with st.lock:
            st.check_open(self)
            st.applier.raise_error()  # a failed asynchronous update surfaces at the trainer's next call
            self._gate.resolve(unique_keys(k), self._reader(reader))

    def lookahead(self, keys) -> None:
        """Announce keys a coming batch will read; returns at once while I/O threads move their rows into
        the memory tier. Announced rows are not evicted until a read consumes the announcement; when the
        budget is full of such rows, look-ahead stops early (stats: lookahead_dropped) instead.

        A hint: it never changes what a read returns, and rows it could not bring in are read on demand.

        Args:
            keys: 1-D integer keys a coming batch will read.

        Raises:
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        st = self._ctx
        with st.lock:
            st.enter(self)
            uk = unique_keys(k)
            if self._sketch is not None:  # keys not admitted yet are served from init: nothing to fetch
                uk = uk[self._exists(uk)]
            slots = self.tier.lookup(uk)
            resident = slots >= 0
            self.tier.announce(slots[resident])
            self._announced = True
            todo = uk[~resident]
            if len(self._inflight):
                at = self._inflight.lookup(todo)
                again = at >= 0  # in flight: the admission counts this announcement too (see _lookahead_job)
                self._inflight.assign(todo[again], at[again] + 1)
                todo = todo[~again]
            if len(todo) == 0:
                return
            self._inflight.insert_new(todo, np.zeros(len(todo), dtype=np.int64))
            pool = st.io_pool()
            for chunk in np.array_split(todo, -(-len(todo) // _LOOKAHEAD_CHUNK)):
                pool.submit(self._lookahead_job, chunk)

    def lookahead_capacity(self) -> int:
        """Rows this table's memory tier may hold: its size, or its fair share of the store's budget if that
        is larger (the tier grows to it on demand). What look-ahead can keep announced beside the batch being
        trained (see Prefetcher): announcing more evicts rows announced earlier, and the reads of the batch
        being trained find no room. Read without the store lock: a pacing hint, possibly a moment old.

        Returns:
            int: rows, >= 1.
        """
        return max(self.tier.capacity, self._ctx.budget.fair_rows(self.tier))

    def _lookahead_job(self, keys: np.ndarray) -> None:
        """On an I/O thread: read announced rows (store lock released) and admit those that fit."""
        st = self._ctx
        try:
            with st.lock:
                status, queued = st.writeback.lookup(self.name, keys)
            on_disk = status == 0
            disk_rows, found, _ = self._read_engine(keys[on_disk])
        except BaseException:
            with st.lock:
                self._inflight.remove(keys)
                st.stats["lookahead_errors"] += 1
                st.cond.notify_all()
            return  # the reader that needs these rows reads them itself and sees the error
        with st.lock:
            self._wait_checkpoint()
            more = np.maximum(self._inflight.remove(keys), 0)  # announced again while in flight
            st.cond.notify_all()
            if not st.is_current(self):
                return
            rows, created = self._assemble(keys, status, queued, disk_rows, found)
            # a key may have been loaded by a reader meanwhile: only the still-absent ones are admitted
            absent = self.tier.lookup(keys) < 0
            keys, rows, created, more = keys[absent], rows[absent], created[absent], more[absent]
            self._make_room(len(keys), demand=False)
            created &= not st.readonly
            slots = self.tier.admit(keys, rows, created)
            placed = slots >= 0
            self.tier.announce(slots[placed], 1 + more[placed].astype(np.int32))
            spilled = created & ~placed  # a created key exists from now on, cached or not
            self._queue_write(keys[spilled], rows[spilled])
            self._count += int(created.sum())
            st.changed |= bool(created.any())
            st.stats["bytes_read"] += int(found.sum()) * self.tier.row_bytes
            st.stats["lookahead_rows"] += int(placed.sum())
            st.stats["lookahead_dropped"] += int((~placed).sum())

    def delete(self, keys, reader: Hashable | None = None) -> None:
        """Delete the rows of `keys` (absent keys are ignored); a later read creates them afresh from init.

        Waits for reads in progress that hold the rows. Durable at the next checkpoint.

        Args:
            keys: 1-D integer keys.
            reader (hashable, optional): whose tracked reads of the keys this resolves. Default: this
                thread.

        Raises:
            ReadOnlyError: the store is readonly.
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        st = self._ctx
        st.check_writable(self)
        with st.lock:
            st.enter(self)
            self._after_async()
            self._check_writeback(k, reader)
            uk = unique_keys(k)
            self._wait_busy(uk)
            self._count -= int(self._exists(uk).sum())
            self.tier.remove(uk)
            st.writeback.submit(self.name, uk, None, st.stats)
            self._gate.resolve(uk, self._reader(reader))
            st.changed = True

    def _exists(self, keys: np.ndarray) -> np.ndarray:
        """Which distinct keys exist (writable store: every resident row exists)."""
        st = self._ctx
        out = self.tier.lookup(keys) >= 0
        status, _ = st.writeback.lookup(self.name, keys)
        out |= status == ROW
        ask = ~out & (status == 0)
        if ask.any():
            with st.engine_lock.read():
                out[ask] = st.engine.contains(self.name, keys[ask])
        return out

    def contains(self, keys) -> np.ndarray:
        """Whether each key has a row (in the memory tier, queued for disk, or on disk).

        Returns:
            np.ndarray: bool, shape :math:`(n,)`.

        Raises:
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        st = self._ctx
        with st.lock:
            st.check_open(self)
            if st.readonly:
                return st.engine.contains(self.name, k)
            uk, inv, _ = unique_inverse(k)
            return self._exists(uk)[inv]

    def __len__(self) -> int:
        """The number of rows (keys stored)."""
        st = self._ctx
        with st.lock:
            st.check_open(self)
            return st.engine.count(self.name) if st.readonly else self._count

    # ---- admission and expiry ------------------------------------------------------------------------
    def _set_lifetime(self, options: dict) -> None:
        """Apply admit_after/ttl_steps/max_rows/expire_on_checkpoint given to store.table (lock held)."""
        for name, value in options.items():
            setattr(self, name, value)
        if "admit_after" in options:
            if self.admit_after > 1 and self._sketch is None:
                self._sketch = AdmissionSketch(self._schema.get("sketch_width", DEFAULT_WIDTH))
            elif self.admit_after == 1:
                self._sketch = None

    def expire(self) -> int:
        """Delete the rows that ``ttl_steps`` and ``max_rows`` say must go; return how many were deleted.

        - ``ttl_steps=T``: rows not written (updated, put or created) in the table's last ``T`` steps, i.e.
          whose last write came at table step ``<= t.step - T`` (``t.step`` counts updates).
        - ``max_rows=M``: then, while more than ``M`` rows remain, the least recently written go (ties:
          smaller key first), down to ``M``.

        Rows a read in progress holds in the memory tier are skipped this time. The table's rows are
        flushed to the engine and scanned once (cost: a sequential read of the table), with the store lock
        held, so call it between steps; ``expire_on_checkpoint=True`` runs it inside every checkpoint.
        Deleted rows are durable at the next checkpoint. Counted in ``stats()`` as ``rows_expired`` and
        ``rows_evicted_by_cap``.

        Returns:
            int: rows deleted.

        Raises:
            ReadOnlyError, StoreClosedError: the store is read-only or closed.
        """
        st = self._ctx
        st.check_writable(self)
        with st.lock:
            st.enter(self)
            self._after_async()
            return self._expire_locked()

    def _expire_locked(self) -> int:
        if not self._age or (self.ttl_steps is None and self.max_rows is None):
            return 0
        st = self._ctx
        self._flush_locked()
        st.writeback.drain(self.name)  # every row of the table is in the engine now
        parts_k, parts_a = [], []
        with st.engine_lock.read():
            for keys, raw in st.engine.scan(self.name, 1 << 16):
                words = self._codec.words(raw)
                parts_k.append(keys)
                parts_a.append(words[:, -1].astype(np.int64))
        if not parts_k:
            return 0
        keys, ages = np.concatenate(parts_k), np.concatenate(parts_a)
        stale = np.zeros(len(keys), dtype=bool)
        if self.ttl_steps is not None:
            stale = ages <= self.step - self.ttl_steps
        drop = stale.copy()
        expired = int(drop.sum())
        over = len(keys) - expired - (self.max_rows if self.max_rows is not None else len(keys))
        if over > 0:
            left = np.flatnonzero(~drop)
            oldest = left[np.lexsort((keys[left], ages[left]))[:over]]
            drop[oldest] = True
        gone = keys[drop]
        where = self.tier.lookup(gone)
        busy = self.tier.pinned(where)
        if len(self._inflight):
            busy |= self._inflight.lookup(gone) >= 0
        gone = gone[~busy]  # a read in progress holds them: they stay until the next expire
        gone = np.sort(gone)
        if len(gone):
            self.tier.remove(gone)
            st.writeback.submit(self.name, gone, None, st.stats)
            self._count -= len(gone)
            st.changed = True
        by_ttl = int(np.isin(gone, keys[stale]).sum())
        st.stats["rows_expired"] += by_ttl
        st.stats["rows_evicted_by_cap"] += len(gone) - by_ttl
        return len(gone)

    def _flush_locked(self) -> None:
        """Queue every dirty row of the tier for the engine, a part of at most half the write-back queue's
        limit at a time, waiting for room before each (the store lock is released meanwhile, while row
        operations wait: `Store._cut`), so a flush of a GiB-sized tier copies a bounded amount at once
        instead of the whole tier. A resize meanwhile (a look-ahead admission) moves rows: the scan starts
        again, and only rows still dirty are taken. A failed write-back queue stops the flush: the rows not
        queued stay dirty in the tier (the caller's drain raises the failure)."""
        st, tier = self._ctx, self.tier
        per = max(1, st.writeback.limit_bytes // 2 // max(1, 4 * tier.width))
        with st.cut():
            first, moves = 0, tier.moves
            while first < tier.capacity:
                st.writeback.wait_room(per * 4 * tier.width)
                if st.writeback.error is not None:  # the queue stopped: rows stay dirty here, readable
                    return  # (the caller's drain raises the failure)
                if tier.moves != moves:  # rows moved while the lock was released
                    first, moves = 0, tier.moves
                self._queue_write(*tier.take_dirty(first, per))
                first += per

    def flush(self) -> None:
        """Queue every dirty row for the engine and wait until it is there (durable at next checkpoint)."""
        st = self._ctx
        with st.lock:
            st.enter(self)  # after a checkpoint in progress, as every row operation
            if not st.readonly:
                self._flush_locked()
                st.writeback.drain(self.name)

    def items(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (keys, embeddings) of the table, in batches; flushes the tier first.

        Reads the engine one batch at a time (its lock held per batch), so training may go on meanwhile:
        every key present for the whole iteration is yielded exactly once, with its row as of its batch
        (rows still in the memory tier are not seen); a key deleted or added meanwhile may be missing.

        Raises:
            InvalidArgumentError: `batch_size` is not a positive int.
            StoreClosedError: the store was closed or the table dropped (also in the middle).
            StorageFullError, StorageIOError: the flush found a failed write-back."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        st = self._ctx
        self.flush()
        with st.engine_lock.read():
            batches = st.engine.scan(self.name, batch_size)
        while True:
            with st.engine_lock.read():
                st.check_open(self)  # under the engine lock: a close or drop cannot take the table now
                batch = next(batches, None)
            if batch is None:
                return
            keys, raw = batch
            yield keys, self._codec.from_bytes(raw)[:, : self.dim].copy()

    def optimizer_state(self, keys) -> dict[str, np.ndarray]:
        r"""The optimizer state of `keys`, by name (e.g. Adam's exp_avg and exp_avg_sq).

        Returns:
            dict[str, np.ndarray]: name -> float32 array with one row per key (empty dict for a table
            without optimizer state); e.g. Adagrad's ``"sum"`` has shape :math:`(n, \text{dim})`.

        Raises:
            InvalidArgumentError: `keys` is not 1-D (a ``ValueError``; the message names the shape).
            InvalidTypeError: `keys` has a non-integer dtype (a ``TypeError``).
            StoreClosedError: the store is closed or the table was dropped.
        """
        k = as_keys(keys)
        if self.optimizer is None:
            return {}
        st = self._ctx
        with st.lock:
            st.enter(self)
            uk, inv, _ = unique_inverse(k)
            _, rows = self._gather(uk, not st.readonly)
            state = rows[inv, self.dim : self.dim + self._state_width]
            return {name: state[:, sl].copy() for name, sl in self.optimizer.state_names(self.dim).items()}

    def export(self, path: str | os.PathLike) -> int:
        r"""Write every row's key and embedding to a file, **sorted by key**, and return the row count.

        The suffix of `path` picks the format; row ``i`` of ``weights`` is the embedding of ``keys[i]``
        and ``keys`` is strictly ascending in every format:

        - ``.safetensors``: tensors ``keys`` and ``weights``
          (``safetensors.numpy.load_file(path)``).
        - ``.npy``: ``path`` holds the weights and ``<stem>.keys.npy`` beside it the keys
          (``np.load(path)``, ``np.load(stem + ".keys.npy")``).
        - ``.pt``: ``torch.save`` of ``{"keys": ..., "weights": ...}`` (``torch.load(path)``).

        Only embedding columns are written, not optimizer state. Dirty rows are flushed first. The file
        appears under its name only when complete (written to ``path + ".tmp"``, then renamed).

        Args:
            path (str or os.PathLike): the output file; its directory must exist.

        Returns:
            int: the number of rows written.

        Raises:
            InvalidArgumentError: the suffix is none of ``.safetensors``, ``.npy``, ``.pt`` (the message
                lists them).
            PathNotFoundError: the directory of `path` does not exist (the message names it); nothing
                is written.
            MlkvError: rows were added or deleted while the table was exported; nothing is written.
            StoreClosedError: the store is closed or the table was dropped.

        Shape:
            - keys: :math:`(n,)`, int64.
            - weights: :math:`(n, \text{dim})`, float32.
        """
        from .export import export_table

        return export_table(self, path)
