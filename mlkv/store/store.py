"""Store: the tables under one path, their shared memory budget, the engine beneath them, checkpoints.

The schema of every table (dim, dtype, optimizer, init, Adam step count) and the user's checkpoint
metadata travel inside the engine's checkpoint, so they commit atomically with the rows they describe.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ..durable_files import replace_atomically
from ..engine import ENGINES, open_engine
from ..engine.base import check_keep
from ..engine.manifest import table_files
from ..engine.process_memory import process_memory
from ..errors import (
    CorruptionError,
    InvalidArgumentError,
    InvalidTypeError,
    MlkvError,
    ReadOnlyError,
    SchemaError,
    UnknownTableError,
)
from ..faults import crash_point
from ..init import init_from_config, resolve_init
from ..optim import Optimizer, optimizer_from_config
from .applier import ApplierError
from .context import StoreContext
from .lock import StoreLock
from .row_codec import DTYPES, RowCodec
from .sizes import parse_bytes
from .staleness import LAG_BINS
from .table import Table

FORMAT = 1
_MARKER = "MLKV"
#: bytes of evicted rows that may wait in the write-back queue: max(1 MiB, min(64 MiB, cache_bytes / 4))
WRITEBACK_MIN_BYTES, WRITEBACK_MAX_BYTES = 1 << 20, 64 << 20
# look-ahead I/O threads: one per core, at most 4. Device depth comes from the slot file's fault threads, so
# more I/O threads only take CPU from training (README main job, 2 cores: 0.85x torch with 2, 0.72x with 4)
DEFAULT_IO_THREADS = max(
    1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
)


def lost_marker(path: str) -> CorruptionError | None:
    """The error for a directory holding engine files but no MLKV marker; None when it holds none.

    The marker is written before any engine file, so engine files without it mean it was lost: that is
    damage, not a new store to create over them. The message says how to restore the marker."""
    slab = sorted({"MANIFEST"}.intersection(os.listdir(path))) + table_files(path)
    rocksdb = os.path.isdir(os.path.join(path, "rocksdb"))
    if not slab and not rocksdb:
        return None
    marker = os.path.join(path, _MARKER)
    found = ", ".join([*slab[:4], *(["rocksdb/"] if rocksdb else [])])
    what = f"the {_MARKER} marker is missing, but the directory holds engine files ({found}): not opened"
    if not (slab and rocksdb):
        body = json.dumps({"format": FORMAT, "engine": "slab" if slab else "rocksdb"})
        what += f". To restore the marker: echo '{body}' > {marker}"
    return CorruptionError(marker, None, what)


def _lifetime_options(admit_after, ttl_steps, max_rows, expire_on_checkpoint) -> dict:
    """The admission/expiry arguments of `Store.table` that were given, validated."""
    out: dict = {}
    for name, value, low, high in (
        ("admit_after", admit_after, 1, 255),
        ("ttl_steps", ttl_steps, 1, None),
        ("max_rows", max_rows, 1, None),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            limit = f"an int in [{low}, {high}]" if high else f"an int >= {low}"
            raise InvalidArgumentError(f"{name} must be {limit} or None, got {value!r}")
        out[name] = value
    if expire_on_checkpoint is not None:
        if not isinstance(expire_on_checkpoint, bool):
            raise InvalidTypeError(f"expire_on_checkpoint must be a bool, got {expire_on_checkpoint!r}")
        out["expire_on_checkpoint"] = expire_on_checkpoint
    return out


def _check_marker(path: str, engine: str, create: bool) -> None:
    """Each store directory names its engine, so opening it with another engine is an error, not data loss.
    A missing marker beside engine files is damage (`lost_marker`)."""
    marker = os.path.join(path, _MARKER)
    if not os.path.exists(marker) and (lost := lost_marker(path)) is not None:
        raise lost
    if os.path.exists(marker):
        with open(marker, "rb") as f:
            raw = f.read()
        try:
            found = json.loads(raw)
        except ValueError:
            found = None
        if not isinstance(found, dict) or found.get("engine") not in ENGINES:
            raise CorruptionError(marker, 0, f"not an mlkv store marker: {raw[:60]!r}")
        if found.get("engine") != engine:
            raise SchemaError(f"{path} is a {found.get('engine')!r} store, opened with engine={engine!r}")
        if engine == "rocksdb" and not create and not os.path.isdir(os.path.join(path, "rocksdb")):
            raise CorruptionError(
                os.path.join(path, "rocksdb"), None, "the RocksDB database directory is missing"
            )
    elif create:
        body = json.dumps({"format": FORMAT, "engine": engine}).encode()
        replace_atomically(marker, lambda f: f.write(body))


class Store:
    r"""The embedding tables under one path, their shared memory tier, and their checkpoints.

    Usually made by :func:`mlkv.open`, which takes the same arguments and documents each of them. A store
    is thread-safe: any number of threads may use it and its tables at once.

    Args:
        path (str or os.PathLike): the store directory (a name only, for ``engine="memory"``).
        cache_bytes (int or str): byte budget of the memory tier of all tables, e.g. ``"4GiB"``.
        engine (str): ``"slab"``, ``"rocksdb"`` or ``"memory"``.
        staleness_bound (int): updates a tracked read may miss, for tables that do not set their own.
        staleness_timeout (float): seconds a tracked read waits for the bound before
            :class:`StalenessTimeout`.
        create (bool): create the store when there is none at `path`.
        readonly (bool): open for reading only (shared lock; writes raise :class:`ReadOnlyError`).
        io_threads (int): background threads reading looked-ahead rows (default: one per core, at most 4).
        keep_checkpoints (int, optional): how many of the last checkpoints to keep (``None``: as stored,
            1 for a new store); given to a writable open, it is stored with the store.
        checkpoint (int, optional): with ``readonly=True``, open the kept checkpoint of that id (slab and
            memory engines: also while a writer has the store open).

    Attributes:
        path (str): the store directory.
        cache_bytes (int): the memory tier budget in bytes.
        engine_name (str): the engine.
        staleness_bound (int): the default bound of its tables.
        readonly (bool): whether writes are refused.
        keep_checkpoints (int): how many of the last checkpoints the store keeps.

    Raises:
        StoreLockedError: another writer holds the store (the message names its pid).
        CorruptionError: the directory is damaged (the message names file and offset).
        SchemaError: the directory is a store of another engine.
        InvalidArgumentError: an argument has a wrong value.
        FileNotFoundError: no store at `path` and ``create=False`` or ``readonly=True``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        cache_bytes: int | str = "1GiB",
        engine: str = "slab",
        staleness_bound: int = 0,
        staleness_timeout: float = 60.0,
        create: bool = True,
        readonly: bool = False,
        io_threads: int = DEFAULT_IO_THREADS,
        keep_checkpoints: int | None = None,
        checkpoint: int | None = None,
    ):
        path = os.fspath(path)
        if keep_checkpoints is not None:
            check_keep(keep_checkpoints)
            if readonly:
                raise InvalidArgumentError(
                    f"keep_checkpoints={keep_checkpoints} changes the store: not with readonly=True"
                )
        if checkpoint is not None:
            if isinstance(checkpoint, bool) or not isinstance(checkpoint, int):
                raise InvalidTypeError(f"checkpoint must be an int checkpoint id, got {checkpoint!r}")
            if not readonly:
                raise InvalidArgumentError(
                    f"checkpoint={checkpoint} opens a kept checkpoint for reading: pass readonly=True"
                )
        if engine not in ENGINES:
            raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(staleness_bound, bool) or not isinstance(staleness_bound, int) or staleness_bound < 0:
            raise InvalidArgumentError(f"staleness_bound must be an int >= 0, got {staleness_bound!r}")
        if not isinstance(staleness_timeout, (int, float)) or staleness_timeout <= 0:
            raise InvalidArgumentError(f"staleness_timeout must be a number > 0, got {staleness_timeout!r}")
        if isinstance(io_threads, bool) or not isinstance(io_threads, int) or io_threads < 1:
            raise InvalidArgumentError(f"io_threads must be an int >= 1, got {io_threads!r}")
        self.path = path
        self.cache_bytes = parse_bytes(cache_bytes)
        self.engine_name = engine
        self.staleness_bound = staleness_bound
        self.staleness_timeout = float(staleness_timeout)
        self.readonly = readonly
        on_disk = engine != "memory"
        if on_disk:
            if not os.path.isdir(path):
                if not create or readonly:
                    raise FileNotFoundError(f"no mlkv store at {path} (pass create=True to make one)")
                os.makedirs(path)
            _check_marker(path, engine, create and not readonly)
        self.io_threads = io_threads
        # a kept checkpoint's files are never changed while it is kept: reading one needs no lock (slab)
        self._file_lock = StoreLock(path, readonly, on_disk and (checkpoint is None or engine == "rocksdb"))
        try:
            opened = open_engine(engine, path, readonly, keep_checkpoints, checkpoint)
        except BaseException:
            self._file_lock.release()
            raise
        self.keep_checkpoints = opened.keep_checkpoints
        meta = opened.committed_meta() or {}
        self._schemas: dict[str, dict] = dict(meta.get("tables", {}))
        self._last = (meta["checkpoint_id"], meta.get("metadata")) if "checkpoint_id" in meta else None
        limit = max(WRITEBACK_MIN_BYTES, min(WRITEBACK_MAX_BYTES, self.cache_bytes // 4))
        name = os.path.basename(os.path.normpath(path)) or "store"
        # what the tables share with the store: one lock, the engine's lock, queues, stats, guards
        self._ctx = StoreContext(path, readonly, opened, self.cache_bytes, limit, io_threads, name)

    @property
    def _engine(self):
        """The engine beneath the tables (its one reference lives in the context)."""
        return self._ctx.engine

    # ---- tables -------------------------------------------------------------------------------------
    def table(
        self,
        name: str,
        *,
        dim: int | None = None,
        dtype: str | None = None,
        init=None,
        optimizer: Optimizer | None = None,
        staleness_bound: int | None = None,
        admit_after: int | None = None,
        ttl_steps: int | None = None,
        max_rows: int | None = None,
        expire_on_checkpoint: bool | None = None,
        stochastic_rounding: bool | None = None,
    ) -> Table:
        r"""Open table `name`, creating it when it does not exist (then `dim` is required).

        Opening a table that is already open returns the same :class:`Table`; a given `optimizer` (of the
        stored kind) or `staleness_bound` then replaces the current one, e.g. to change the learning rate.

        Args:
            name (str): the table's name, unique in the store.
            dim (int, optional): embedding width. Required to create the table; if given for an existing
                table it must match. Default: ``None``.
            dtype (str): how embeddings are stored: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
                A 16-bit table stores each embedding weight in 2 bytes, on disk and in the memory tier
                (optimizer state and the age column stay float32), so the same ``cache_bytes`` holds
                up to twice the rows; reads still return float32 (the stored values exactly), and
                :meth:`Table.update` computes in float32 and rounds once when it stores (likewise
                :meth:`Table.put` and new rows from `init`). Fixed at creation; ``None`` (the
                default): ``"float32"`` at creation, the stored dtype when reopening.
            init (optional): how a key never seen gets its first row: ``mlkv.init.Normal(mean, std)``
                (the default, ``Normal(0.0, 0.01)``), ``mlkv.init.Uniform(low, high)``,
                ``mlkv.init.Zeros()``, or a callable ``(keys, dim) -> (len(keys), dim)`` array that is
                deterministic in the keys. Stored with the table; ``None`` reuses the stored one.
            optimizer (mlkv.optim.Optimizer, optional): the update rule of :meth:`Table.update`, whose
                state is stored in each row. ``None`` at creation makes the table not trainable; ``None``
                when reopening reuses the stored optimizer. Default: ``None``.
            staleness_bound (int, optional): this table's bound (``None``: the store's).
            admit_after (int, optional): store a key only once it was named by that many tracked reads
                (1-255; ``None``/1: at once). Before that, reads return its init row and its gradients
                are dropped (``stats()["grads_dropped"]``).
            ttl_steps (int, optional): :meth:`Table.expire` deletes rows not written in the table's last
                `ttl_steps` update steps.
            max_rows (int, optional): :meth:`Table.expire` deletes the least recently written rows beyond
                `max_rows`.
            expire_on_checkpoint (bool, optional): run :meth:`Table.expire` inside every checkpoint.
            stochastic_rounding (bool, optional): a 16-bit table rounds stored embeddings up or down at
                random, in proportion to the distance (unbiased), instead of to nearest even; the random
                bits are a hash of (table name, key, table step, column), so runs are reproducible.
                Fixed at creation (``None``: the stored setting; ``False`` at creation). Only for
                ``float16``/``bfloat16`` tables.

        Returns:
            Table: the open table.

        Raises:
            UnknownTableError: no such table and no `dim` (a ``KeyError``; the message lists the tables
                and says that ``dim=`` creates it).
            SchemaError: an existing table opened with another `dim`, `dtype` or optimizer kind (the
                message states both).
            ReadOnlyError: creating a table in a readonly store.
            InvalidArgumentError: an argument has a wrong value (``dim=0``, ``admit_after=300``...).
            InvalidTypeError: an argument has a wrong type.
            StoreClosedError: the store is closed.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"table name must be a non-empty str, got {name!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise InvalidArgumentError(f"dim must be a positive int, got {dim!r}")
        if dtype is not None and not isinstance(dtype, str):
            raise InvalidTypeError(f"dtype must be a str such as 'float32' or None, got {dtype!r}")
        if stochastic_rounding is not None and not isinstance(stochastic_rounding, bool):
            raise InvalidTypeError(f"stochastic_rounding must be a bool or None, got {stochastic_rounding!r}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise InvalidTypeError(
                f"optimizer must be an mlkv.optim optimizer or None, got {type(optimizer).__name__}"
            )
        if staleness_bound is not None and (
            isinstance(staleness_bound, bool) or not isinstance(staleness_bound, int) or staleness_bound < 0
        ):
            raise InvalidArgumentError(
                f"staleness_bound must be an int >= 0 or None, got {staleness_bound!r}"
            )
        lifetime = _lifetime_options(admit_after, ttl_steps, max_rows, expire_on_checkpoint)
        init_fn, init_cfg = resolve_init(init)
        with self._ctx.lock:
            self._ctx.enter()
            schema = self._schemas.get(name)
            if schema is None:
                if dim is None:
                    how = "the store is open readonly" if self.readonly else "pass dim= to create it"
                    raise UnknownTableError(
                        f"no table {name!r} in {self.path}; tables: {sorted(self._schemas)} ({how})"
                    )
                dtype = "float32" if dtype is None else dtype
                if dtype not in DTYPES:  # checked here: an existing table's dtype mismatch is a SchemaError
                    raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
                if stochastic_rounding and dtype == "float32":
                    raise InvalidArgumentError(
                        "stochastic_rounding=True needs dtype='float16' or 'bfloat16', got dtype='float32'"
                    )
                if self.readonly:
                    raise ReadOnlyError(f"cannot create table {name!r}: store {self.path} is open readonly")
                schema = {
                    "dim": dim,
                    "dtype": dtype,
                    "optimizer": optimizer.config() if optimizer else None,
                    "init": init_cfg,
                    "staleness_bound": staleness_bound,
                    "step": 0,
                    **lifetime,
                    # expiry needs each row's last-write step: one more column, fixed at creation
                    "age_column": any(lifetime.get(k) is not None for k in ("ttl_steps", "max_rows")),
                }
                if dtype != "float32":
                    schema["stochastic_rounding"] = bool(stochastic_rounding)
                width = dim + (optimizer.state_width(dim) if optimizer else 0) + schema["age_column"]
                with self._ctx.engine_lock.write():
                    self._engine.create_table(name, RowCodec(dtype, dim, width).row_bytes)
                self._schemas[name] = schema
                self._ctx.changed = True
            else:
                optimizer = self._check_schema(name, schema, dim, dtype, optimizer)
                stored = schema.get("stochastic_rounding", False)
                if stochastic_rounding is not None and stochastic_rounding != stored:
                    raise SchemaError(
                        f"table {name!r} has stochastic_rounding={stored}, opened with "
                        f"stochastic_rounding={stochastic_rounding}"
                    )
                if init is None and schema["init"].get("kind") != "callable":
                    init_fn = init_from_config(schema["init"])
                ages = ("ttl_steps", "max_rows")
                if any(lifetime.get(k) is not None for k in ages) and not schema.get("age_column"):
                    raise SchemaError(
                        f"table {name!r} was created without ttl_steps/max_rows, so its rows carry no "
                        "last-update step; expiry can only be set when a table is created"
                    )
            t = self._ctx.tables.get(name)
            if t is not None:  # already open: same rows and tier; hyperparameters may change
                if optimizer is not None:
                    t.optimizer = optimizer
                if staleness_bound is not None:
                    t.staleness_bound = staleness_bound
                t._set_lifetime(lifetime)
                return t
            if staleness_bound is not None:
                schema = {**schema, "staleness_bound": staleness_bound}
            schema = {**schema, **lifetime}
            t = Table(self, self._ctx, name, schema, optimizer, init_fn)
            self._ctx.tables[name] = t
            self._ctx.budget.register(t)
            return t

    def _check_schema(self, name: str, schema: dict, dim, dtype, optimizer):
        if dim is not None and dim != schema["dim"]:
            raise SchemaError(f"table {name!r} has dim={schema['dim']}, opened with dim={dim}")
        if dtype is not None and dtype != schema["dtype"]:
            raise SchemaError(f"table {name!r} has dtype={schema['dtype']}, opened with dtype={dtype}")
        stored = schema["optimizer"]
        if optimizer is None:
            return optimizer_from_config(stored) if stored else None
        if stored is None or stored["kind"] != optimizer.kind:
            was = stored["kind"] if stored else None
            raise SchemaError(
                f"table {name!r} has optimizer {was!r}, opened with optimizer {optimizer.kind!r}"
            )
        return optimizer

    def tables(self) -> list[str]:
        """The names of the store's tables, sorted.

        Raises:
            StoreClosedError: the store is closed.
        """
        with self._ctx.lock:
            self._ctx.check_open()
            return sorted(self._schemas)

    def drop_table(self, name: str) -> None:
        """Delete table `name` and all its rows (durable at the next checkpoint).

        The :class:`Table` object of a dropped table raises :class:`StoreClosedError` from then on.

        Raises:
            UnknownTableError: no such table (the message lists the tables).
            ReadOnlyError: the store is readonly.
        """
        with self._ctx.lock:
            self._ctx.enter()
            self._ctx.check_writable()
            if name not in self._schemas:
                raise UnknownTableError(f"no table {name!r} in {self.path}; tables: {sorted(self._schemas)}")
            t = self._ctx.tables.pop(name, None)
            if t is not None:
                self._ctx.budget.unregister(t)
            del self._schemas[name]
            self._ctx.writeback.forget(name)
            with self._ctx.engine_lock.write():
                self._engine.drop_table(name)
            self._ctx.changed = True

    # ---- durability ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty row of the memory tier, and every queued write, to the engine.

        Not yet durable: a crash still returns to the last checkpoint (see :meth:`checkpoint`). Waits for
        queued asynchronous updates first.
        """
        with self._ctx.lock:
            self._ctx.enter()
            self._ctx.applier.drain()
            if not self.readonly:
                self._flush_locked()

    def _flush_locked(self) -> None:
        for t in self._ctx.tables.values():
            t._flush_locked()
        self._ctx.writeback.drain()

    def checkpoint(self, metadata: dict | None = None) -> int:
        """Make every write so far durable, atomically with `metadata`; return the new checkpoint id.

        One consistent cut: row operations wait while it runs; queued asynchronous updates are applied
        first. The tables' schemas (dim, optimizer, Adam step, settings) commit with the rows. After a crash,
        :func:`mlkv.open` recovers exactly the last completed checkpoint.

        Args:
            metadata (dict, optional): JSON-serialisable data stored with the checkpoint (e.g. the dense
                model's step and file); returned by :meth:`last_checkpoint`. A private copy is kept.

        Returns:
            int: the checkpoint id, one more than the previous one (the first is 1).

        Raises:
            InvalidTypeError: `metadata` is not JSON-serialisable.
            ReadOnlyError: the store is readonly.
            StorageFullError: the disk is full (the last checkpoint stays intact).
            StoreClosedError: the store is closed.
        """
        try:
            # a private copy, as JSON gives it back after a reopen: the caller may mutate their dict later
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            raise InvalidTypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        with self._ctx.lock:
            self._ctx.enter()
            self._ctx.check_writable()
            self._ctx.applier.drain()  # before the cut: a checkpoint holds every update submitted before it
            return self._checkpoint_locked(metadata)

    def _checkpoint_locked(self, metadata: dict | None) -> int:
        with self._ctx.cut():  # row operations wait: the checkpoint is one consistent cut
            for t in self._ctx.tables.values():
                if t.expire_on_checkpoint:
                    t._expire_locked()
            self._flush_locked()
            crash_point("checkpoint:start")
            for name, t in self._ctx.tables.items():
                self._schemas[name] = t.schema()
            ckpt = (self._last[0] if self._last else 0) + 1
            meta = {
                "format": FORMAT,
                "checkpoint_id": ckpt,
                "metadata": metadata,
                "time": time.time(),
                "tables": self._schemas,
            }
            with self._ctx.engine_lock.write():
                self._engine.checkpoint(meta)
            self._last = (ckpt, metadata)
            self._ctx.changed = False
            return ckpt

    def last_checkpoint(self) -> tuple[int, dict | None] | None:
        """``(id, metadata)`` of the last committed checkpoint (of this process or recovered at open), or
        ``None`` if the store has none."""
        return self._last

    def checkpoints(self) -> list[tuple[int, dict | None]]:
        """``(id, metadata)`` of each kept checkpoint (the last ``keep_checkpoints``), oldest first.

        A store opened with ``checkpoint=ID`` lists those kept when it was opened.

        Raises:
            StoreClosedError: the store is closed.
        """
        with self._ctx.lock:
            self._ctx.check_open()
            with self._ctx.engine_lock.read():
                metas = self._engine.checkpoints()
        return [(m["checkpoint_id"], m.get("metadata")) for m in metas if "checkpoint_id" in m]

    # ---- reporting ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since open (or :meth:`reset_stats`) and the current memory use, as a new dict.

        Keys include ``hits``, ``misses`` and ``hit_rate`` (memory-tier lookups per key asked for),
        ``stall_seconds`` (time reads waited for the disk), ``staleness_waits`` and
        ``staleness_wait_seconds``, ``lookahead_rows``, ``lookahead_dropped``, ``evictions``,
        ``rows_written_back``, ``bytes_read``, ``bytes_written``, ``memory_tier_bytes`` (never above
        ``cache_bytes``), ``memory_tier_rows``, ``cache_bytes``, ``recovery_seconds`` (spent by this open)
        and ``writeback_pending``; ``docs/API.md`` lists them all. ``rss_anon_bytes`` and
        ``rss_file_bytes``: the whole process's anonymous and file-backed resident memory (None off
        Linux), what a container limit sees, apart: mapped slab pages count as file-backed.
        """
        with self._ctx.lock:
            s = dict(self._ctx.stats)
            looked = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / looked if looked else 0.0
            s["memory_tier_bytes"] = self._ctx.budget.used_bytes
            s["memory_tier_rows"] = sum(t.tier.resident for t in self._ctx.tables.values())
            s["cache_bytes"] = self.cache_bytes
            s["recovery_seconds"] = self._engine.recovery_seconds
            s["writeback_pending"] = self._ctx.writeback.pending()
            s["applier_pending"] = self._ctx.applier.pending()
            lag = np.zeros(LAG_BINS, dtype=np.int64)
            for t in self._ctx.tables.values():
                lag += t._gate.lag_hist
            s["staleness_lag_hist"] = lag.tolist()
        s["rss_anon_bytes"], s["rss_file_bytes"] = process_memory()
        return s

    def reset_stats(self) -> None:
        """Set the counters of :meth:`stats` back to zero (the memory-use figures are not counters)."""
        with self._ctx.lock:
            for k in self._ctx.stats:
                self._ctx.stats[k] = 0.0 if k.endswith("seconds") else 0

    def disk_bytes(self) -> int:
        """Bytes of the engine's files on disk (0 for the memory engine)."""
        return self._engine.disk_bytes()

    def verify(self) -> list[str]:
        """Check every checksum of the rows in the engine (flushing the tier first, unless readonly).

        Returns:
            list[str]: one description per problem, naming file, table and offset; empty if sound.
        """
        with self._ctx.lock:
            self._ctx.enter()
            if not self.readonly:
                self._flush_locked()
            with self._ctx.engine_lock.read():
                return self._engine.verify()

    # ---- lifetime -----------------------------------------------------------------------------------
    def close(self, checkpoint: bool = True) -> None:
        """Checkpoint outstanding writes (metadata None) and release the store. Idempotent.

        checkpoint=False releases without committing: reopening gives the last checkpoint (what a job that
        failed midway wants, so that a resume starts from state it knows).

        After a storage failure (StorageFullError, StorageIOError) the store is released all the same and
        the last checkpoint stays in force: a write-back failure skips the checkpoint (and is raised here
        only if no earlier call raised it); a checkpoint that fails here is raised after the release.

        Args:
            checkpoint (bool): checkpoint outstanding writes before releasing. Default: ``True``.

        Raises:
            StorageFullError, StorageIOError: a write or the final checkpoint failed (raised after the
                store is released).
        """
        failed: BaseException | None = None
        seen = False
        with self._ctx.lock:
            if not self._ctx.open:
                return
            try:
                while self._ctx.checkpointing:
                    self._ctx.cond.wait()
                seen = self._ctx.applier.reported
                try:  # queued asynchronous updates are applied, not lost
                    self._ctx.applier.drain()
                except ApplierError as e:  # no checkpoint after a failed update; raised here only if
                    failed = e  # no earlier call has raised it
                if checkpoint and failed is None and self._ctx.writeback.error is not None:
                    seen = self._ctx.writeback.reported  # a failed write-back (full disk): no checkpoint
                    try:
                        self._ctx.writeback.raise_error()
                    except MlkvError as e:
                        failed = e
                if checkpoint and not self.readonly and self._ctx.changed and failed is None:
                    try:
                        self._checkpoint_locked(None)
                    except Exception as e:  # e.g. StorageFullError: release all the same, then raise it
                        failed, seen = e, False
            finally:
                self._ctx.open = False
                self._ctx.cond.notify_all()
                self._ctx.applier.shutdown()
        try:  # background threads need the store lock to finish: stop them with it released
            self._ctx.shutdown_io()
            self._ctx.writeback.shutdown()
            with self._ctx.engine_lock.write():
                self._engine.close()
        finally:
            self._file_lock.release()
        if failed is not None and not seen:
            raise failed

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leaving a ``with`` block: as sqlite3's connection does, a clean exit commits (``close()``,
        which checkpoints outstanding writes) and an exception, KeyboardInterrupt included, closes without
        checkpointing (``close(checkpoint=False)``): the last checkpoint stays as it was, so rows updated
        past a dense model's checkpoint are not committed without it."""
        self.close(checkpoint=exc_type is None)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (or the process that opened the store let it go)."""
        return not self._ctx.open

    def __repr__(self) -> str:
        state = "open" if self._ctx.open else "closed"
        return f"mlkv.Store({self.path!r}, engine={self.engine_name!r}, {state})"


def rollback(
    path: str | os.PathLike, checkpoint_id: int, *, engine: str | None = None
) -> list[tuple[int, dict | None]]:
    """Make the kept checkpoint `checkpoint_id` of the store at `path` its last one.

    The checkpoints after it are dropped (their files deleted); the next checkpoint gets id
    ``checkpoint_id + 1``. One atomic manifest replacement: a crash leaves either the old list of kept
    checkpoints or the new one. Rolling back to the last checkpoint changes nothing.

    Args:
        path (str or os.PathLike): the store directory (a name, for ``engine="memory"``).
        checkpoint_id (int): a kept checkpoint's id (see :meth:`Store.checkpoints`).
        engine (str, optional): the store's engine; ``None`` reads it from the store's marker.

    Returns:
        list[tuple[int, dict | None]]: ``(id, metadata)`` of the dropped checkpoints, oldest first.

    Raises:
        StoreLockedError: another opener (a writer, or readonly opens) holds the store.
        InvalidArgumentError: `checkpoint_id` is not kept (the message lists the kept ids).
        UnsupportedError: the engine keeps no history (rocksdb), for an id other than the last.
        FileNotFoundError: no store at `path`.
    """
    if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int):
        raise InvalidTypeError(f"checkpoint_id must be an int, got {checkpoint_id!r}")
    path = os.fspath(path)
    if engine is None:
        try:
            with open(os.path.join(path, _MARKER), "rb") as f:
                engine = json.loads(f.read()).get("engine")
        except FileNotFoundError:
            raise FileNotFoundError(f"no mlkv store at {path}") from None
        except (ValueError, AttributeError):
            engine = None  # Store raises the damaged marker's CorruptionError
    store = Store(path, engine=engine or "slab", create=False, io_threads=1)
    try:
        ids = [i for i, _ in store.checkpoints()]
        if ids and checkpoint_id == ids[-1]:
            return []
        with store._ctx.lock, store._ctx.engine_lock.write():
            dropped = store._engine.rollback(checkpoint_id)
    finally:
        store.close(checkpoint=False)
    return [(m["checkpoint_id"], m.get("metadata")) for m in dropped if "checkpoint_id" in m]


def open_store(path: str | os.PathLike, **kwargs) -> Store:
    """Open (or create) the store at `path`. See Store for the arguments.

    As a context manager (``with mlkv.open(path) as store:``) the store closes when the block ends: a clean
    exit checkpoints outstanding writes, like ``close()``; an exception (KeyboardInterrupt included) closes
    without checkpointing, so reopening gives the last checkpoint taken before it.

    Raises:
        CorruptionError: the directory is damaged; it names what is missing or failed its check (a lost
            MANIFEST or MLKV marker beside table files, a missing file the manifest names). Opening never
            deletes a file the last checkpoint references, and never any file without a valid manifest.
    """
    return Store(path, **kwargs)


__all__ = ["Store", "open_store", "rollback"]
