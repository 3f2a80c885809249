"""Shared fixtures: the engine parametrisation, a store factory that cleans up, crash simulation, snapshots.

Every store test runs on the three engines. The memory engine keeps its checkpointed state in a process-wide
registry keyed by the store path, so each test uses its own `tmp_path` and the registry entries a test made
are dropped when it ends.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlkv
from mlkv.engine import memory as memory_engine

ENGINES = ["slab", "rocksdb", "memory"]


def open_store(engine: str, path, **kw) -> mlkv.Store:
    """`mlkv.open(path, engine=engine, **kw)`: the one place the tests open stores."""
    return mlkv.open(path, engine=engine, **kw)


def crash(store: mlkv.Store) -> None:
    """Drop `store` as a killed process would: no flush, no checkpoint, just the engine and lock let go.

    The store object is marked closed first, so that nothing (a fixture teardown, a stray call) can later
    write through it into the files a reopened store now owns.
    """
    ctx = store._ctx
    with ctx.lock:
        ctx.open = False
    # let background threads (look-ahead reads, write-back) finish first, as close() does: their writes
    # reach the engine uncommitted, so a reopen must not see them; they must just not race the close
    ctx.shutdown_io()
    ctx.writeback.shutdown()
    store._engine.close()
    store._file_lock.release()


def table_snapshot(t: mlkv.Table) -> dict:
    """Everything observable about one table: rows, optimizer state and step, bit for bit."""
    parts_k, parts_r = [], []
    for k, r in t.items(batch_size=1000):
        parts_k.append(k)
        parts_r.append(r)
    keys = np.concatenate(parts_k) if parts_k else np.empty(0, np.uint64)
    rows = np.concatenate(parts_r) if parts_r else np.empty((0, t.dim), np.float32)
    order = np.argsort(keys)
    keys, rows = keys[order], rows[order]
    state = {name: v.tobytes() for name, v in sorted(t.optimizer_state(keys).items())} if len(keys) else {}
    return {
        "dim": t.dim,
        "optimizer": t.optimizer.config() if t.optimizer else None,
        "len": len(t),
        "keys": keys.tobytes(),
        "rows": rows.tobytes(),
        "state": state,
        "step": t.step,
    }


def store_snapshot(store: mlkv.Store) -> dict:
    """Every table of the store (by `table_snapshot`) plus its last checkpoint."""
    return {
        "tables": {name: table_snapshot(store.table(name)) for name in store.tables()},
        "last_checkpoint": store.last_checkpoint(),
    }


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def store_factory():
    """`store_factory(engine, path, **kw)` opens a store; every store it opened is closed at teardown."""
    opened: list[mlkv.Store] = []

    def make(engine: str, path, **kw) -> mlkv.Store:
        s = open_store(engine, path, **kw)
        opened.append(s)
        return s

    yield make
    for s in reversed(opened):
        if not s.closed:
            s.close()


@pytest.fixture(autouse=True)
def _forget_memory_stores():
    """Drop what this test left in the memory engine's process-wide registry."""
    with memory_engine._REGISTRY_LOCK:
        before = set(memory_engine._REGISTRY)
    yield
    with memory_engine._REGISTRY_LOCK:
        for key in set(memory_engine._REGISTRY) - before:
            del memory_engine._REGISTRY[key]


@pytest.fixture
def snapshot():
    return store_snapshot


@pytest.fixture
def crash_store():
    return crash
