"""Store: the tables under one path, their shared memory budget, the engine beneath them, checkpoints.

The schema of every table (dim, dtype, optimizer, init, Adam step count) and the user's checkpoint
metadata travel inside the engine's checkpoint, so they commit atomically with the rows they describe.
"""

from __future__ import annotations

import json
import os
import threading
import time

from ..engine import ENGINES, open_engine
from ..errors import (
    InvalidArgumentError,
    InvalidTypeError,
    ReadOnlyError,
    SchemaError,
    StoreClosedError,
    UnknownTableError,
)
from ..faults import crash_point
from ..init import init_from_config, resolve_init
from ..optim import Optimizer, optimizer_from_config
from .lock import StoreLock
from .sizes import parse_bytes
from .table import Table
from .tier_budget import TierBudget

FORMAT = 1
_MARKER = "MLKV"
_STAT_KEYS = (
    "hits", "misses", "lookahead_rows", "evictions", "rows_written_back", "stall_seconds",
    "staleness_waits", "staleness_wait_seconds", "bytes_read", "bytes_written",
)  # fmt: skip


def _check_marker(path: str, engine: str, create: bool) -> None:
    """Each store directory names its engine, so opening it with another engine is an error, not data loss."""
    marker = os.path.join(path, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            found = json.load(f)
        if found.get("engine") != engine:
            raise SchemaError(f"{path} is a {found.get('engine')!r} store, opened with engine={engine!r}")
    elif create:
        with open(marker + ".tmp", "w") as f:
            json.dump({"format": FORMAT, "engine": engine}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)


class Store:
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
    ):
        path = os.fspath(path)
        if engine not in ENGINES:
            raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
        if isinstance(staleness_bound, bool) or not isinstance(staleness_bound, int) or staleness_bound < 0:
            raise InvalidArgumentError(f"staleness_bound must be an int >= 0, got {staleness_bound!r}")
        if not isinstance(staleness_timeout, (int, float)) or staleness_timeout <= 0:
            raise InvalidArgumentError(f"staleness_timeout must be a number > 0, got {staleness_timeout!r}")
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
        self._lock = threading.RLock()
        self._file_lock = StoreLock(path, readonly, on_disk)
        try:
            self._engine = open_engine(engine, path, readonly)
        except BaseException:
            self._file_lock.release()
            raise
        meta = self._engine.committed_meta() or {}
        self._schemas: dict[str, dict] = dict(meta.get("tables", {}))
        self._last = (meta["checkpoint_id"], meta.get("metadata")) if "checkpoint_id" in meta else None
        self._tables: dict[str, Table] = {}
        self._budget = TierBudget(self.cache_bytes)
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._stats["stall_seconds"] = 0.0
        self._stats["staleness_wait_seconds"] = 0.0
        self._changed = False
        self._open = True

    # ---- guards -------------------------------------------------------------------------------------
    def _check_open(self, table: Table | None = None) -> None:
        if not self._open:
            raise StoreClosedError(f"store {self.path} is closed")
        if table is not None and self._tables.get(table.name) is not table:
            raise StoreClosedError(f"table {table.name!r} was dropped from {self.path}")

    def _check_writable(self, table: Table | None = None) -> None:
        self._check_open(table)
        if self.readonly:
            raise ReadOnlyError(f"store {self.path} is open readonly; writes are refused")

    # ---- tables -------------------------------------------------------------------------------------
    def table(
        self,
        name: str,
        *,
        dim: int | None = None,
        dtype: str = "float32",
        init=None,
        optimizer: Optimizer | None = None,
        staleness_bound: int | None = None,
    ) -> Table:
        """Open table `name`, creating it when it does not exist (then `dim` is required)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"table name must be a non-empty str, got {name!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise InvalidArgumentError(f"dim must be a positive int, got {dim!r}")
        if dtype != "float32":
            raise InvalidArgumentError(
                f"dtype must be 'float32' (the only row dtype stored so far), got {dtype!r}"
            )
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise InvalidTypeError(
                f"optimizer must be an mlkv.optim optimizer or None, got {type(optimizer).__name__}"
            )
        if staleness_bound is not None and (not isinstance(staleness_bound, int) or staleness_bound < 0):
            raise InvalidArgumentError(
                f"staleness_bound must be an int >= 0 or None, got {staleness_bound!r}"
            )
        init_fn, init_cfg = resolve_init(init)
        with self._lock:
            self._check_open()
            schema = self._schemas.get(name)
            if schema is None:
                if dim is None:
                    raise UnknownTableError(
                        f"no table {name!r} in {self.path}; tables: {sorted(self._schemas)}"
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
                }
                width = dim + (optimizer.state_width(dim) if optimizer else 0)
                self._engine.create_table(name, 4 * width)
                self._schemas[name] = schema
                self._changed = True
            else:
                optimizer = self._check_schema(name, schema, dim, dtype, optimizer)
                if init is None and schema["init"].get("kind") != "callable":
                    init_fn = init_from_config(schema["init"])
            t = self._tables.get(name)
            if t is not None:  # already open: same rows and tier; hyperparameters may change
                if optimizer is not None:
                    t.optimizer = optimizer
                if staleness_bound is not None:
                    t.staleness_bound = staleness_bound
                return t
            if staleness_bound is not None:
                schema = {**schema, "staleness_bound": staleness_bound}
            t = Table(self, name, schema, optimizer, init_fn)
            self._tables[name] = t
            self._budget.register(t)
            return t

    def _check_schema(self, name: str, schema: dict, dim, dtype, optimizer):
        if dim is not None and dim != schema["dim"]:
            raise SchemaError(f"table {name!r} has dim={schema['dim']}, opened with dim={dim}")
        if dtype != schema["dtype"]:
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
        with self._lock:
            self._check_open()
            return sorted(self._schemas)

    def drop_table(self, name: str) -> None:
        with self._lock:
            self._check_writable()
            if name not in self._schemas:
                raise UnknownTableError(f"no table {name!r} in {self.path}; tables: {sorted(self._schemas)}")
            t = self._tables.pop(name, None)
            if t is not None:
                self._budget.unregister(t)
            del self._schemas[name]
            self._engine.drop_table(name)
            self._changed = True

    # ---- durability ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every dirty row of the memory tier to the engine (not yet durable: see checkpoint)."""
        with self._lock:
            self._check_open()
            if not self.readonly:
                for t in self._tables.values():
                    t.flush()

    def checkpoint(self, metadata: dict | None = None) -> int:
        """Make every write so far durable, atomically with `metadata`; return the new checkpoint id."""
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise InvalidTypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        with self._lock:
            self._check_writable()
            for t in self._tables.values():
                t.flush()
            crash_point("checkpoint:start")
            for name, t in self._tables.items():
                self._schemas[name] = t.schema()
            ckpt = (self._last[0] if self._last else 0) + 1
            meta = {
                "format": FORMAT,
                "checkpoint_id": ckpt,
                "metadata": metadata,
                "time": time.time(),
                "tables": self._schemas,
            }
            self._engine.checkpoint(meta)
            self._last = (ckpt, metadata)
            self._changed = False
            return ckpt

    def last_checkpoint(self) -> tuple[int, dict | None] | None:
        return self._last

    # ---- reporting ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
            looked = s["hits"] + s["misses"]
            s["hit_rate"] = s["hits"] / looked if looked else 0.0
            s["memory_tier_bytes"] = self._budget.used_bytes
            s["memory_tier_rows"] = sum(t.tier.resident for t in self._tables.values())
            s["cache_bytes"] = self.cache_bytes
            s["recovery_seconds"] = self._engine.recovery_seconds
            return s

    def reset_stats(self) -> None:
        with self._lock:
            for k in self._stats:
                self._stats[k] = 0.0 if k.endswith("seconds") else 0

    def disk_bytes(self) -> int:
        return self._engine.disk_bytes()

    # ---- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint outstanding writes (metadata None) and release the store. Idempotent."""
        with self._lock:
            if not self._open:
                return
            try:
                if not self.readonly and self._changed:
                    self.checkpoint(None)
            finally:
                self._open = False
                self._engine.close()
                self._file_lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"mlkv.Store({self.path!r}, engine={self.engine_name!r}, {state})"


def open_store(path: str | os.PathLike, **kwargs) -> Store:
    """Open (or create) the store at `path`. See Store for the arguments."""
    return Store(path, **kwargs)


__all__ = ["Store", "open_store"]
