"""Look-ahead: `t.lookahead(keys)` returns at once, I/O threads move the rows into the memory tier, announced
rows stay until a read consumes them, and a full tier makes look-ahead stop early instead of evicting them.

Slow disks are simulated by wrapping the engine read: `GatedReads` blocks every read until the test opens its
gate (so "the read is still in progress" is a fact, not a timing guess) and counts the keys each read asked
for; `slow_engine` sleeps inside the engine read, where `stall_seconds` measures it. No assertion compares a
duration with a constant; "a thread is blocked waiting for the in-flight read" is read off its stack.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from thread_helpers import JOIN, Worker, wait_for

import mlkv
from mlkv.optim import SGD, Adagrad

DIM = 4
ROW = 4 * DIM  # bytes of a row of a table without optimizer state


def arrived(store: mlkv.Store, n: int) -> None:
    """Wait until look-ahead has placed or dropped n rows in all."""

    def done() -> bool:
        s = store.stats()
        return s["lookahead_rows"] + s["lookahead_dropped"] >= n

    wait_for(done, f"look-ahead of {n} rows")


def values(keys) -> np.ndarray:
    k = np.asarray(keys, dtype=np.float32)
    return np.stack([k + 0.25 * j for j in range(DIM)], axis=1)


def cold_store(store_factory, path, n: int, cache, **kw) -> tuple[mlkv.Store, mlkv.Table]:
    """A store whose table holds rows 0..n-1 (value `values(key)`) on disk only: written, closed, reopened."""
    s = store_factory("slab", path, cache_bytes="1MiB")
    t = s.table("t", dim=DIM)
    for lo in range(0, n, 5000):
        keys = np.arange(lo, min(n, lo + 5000))
        t.put(keys, values(keys))
    s.close()
    s = store_factory("slab", path, cache_bytes=cache, **kw)
    return s, s.table("t")


class GatedReads:
    """Replaces table._read_engine: records the keys of every read and holds each read until `gate` is set."""

    def __init__(self, t: mlkv.Table, gated: bool = True):
        self.real = t._read_engine
        self.calls: list[np.ndarray] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        t._read_engine = self

    def __call__(self, keys: np.ndarray):
        if len(keys):
            self.calls.append(keys.copy())
            self.entered.set()
            self.gate.wait(JOIN)
        return self.real(keys)

    def keys_read(self) -> np.ndarray:
        return np.concatenate(self.calls) if self.calls else np.empty(0, np.uint64)


def blocked_in(thread: threading.Thread, function: str) -> bool:
    """Whether `thread` is waiting on a Condition somewhere inside `function`."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def delta(before: dict, after: dict, key: str):
    return after[key] - before[key]


# ---- lookahead is asynchronous ------------------------------------------------------------------------
def test_lookahead_returns_before_the_rows_arrive_then_get_hits(tmp_path, store_factory):
    store, t = cold_store(store_factory, tmp_path / "s", 300, "1MiB")
    reads = GatedReads(t)
    keys = np.arange(100, 200)
    t.lookahead(keys)  # the engine read is blocked: this returning proves it does not wait for it
    assert reads.entered.wait(JOIN), "no I/O thread started reading"
    assert not reads.gate.is_set()
    assert store.stats()["lookahead_rows"] == 0  # nothing has arrived yet
    reads.gate.set()
    arrived(store, 100)
    before = store.stats()
    rows = t.get(keys)
    after = store.stats()
    np.testing.assert_array_equal(rows, values(keys))
    assert delta(before, after, "hits") == 100 and delta(before, after, "misses") == 0
    assert after["lookahead_rows"] == 100 and after["lookahead_dropped"] == 0
    assert len(reads.calls) == 1  # the get read nothing itself
    t.release(keys)


@pytest.mark.parametrize("extra", [False, True], ids=["only-inflight", "with-other-cold-keys"])
def test_get_of_inflight_keys_waits_for_that_read(extra, tmp_path, store_factory):
    store, t = cold_store(store_factory, tmp_path / "s", 300, "1MiB")
    reads = GatedReads(t)
    t.lookahead(np.arange(100))
    assert reads.entered.wait(JOIN)
    want = np.arange(40, 60)
    if extra:
        want = np.concatenate([want, np.arange(250, 260)])
    g = Worker(t.get, want)
    g.start()
    wait_for(lambda: blocked_in(g, "_gather"), "the get to wait for the in-flight read")
    assert g.result is None and len(reads.calls) == 1  # it waits; it has not started a read of its own
    reads.gate.set()
    rows = g.finish()
    np.testing.assert_array_equal(rows, values(want))
    read = reads.keys_read()
    assert len(read) == len(np.unique(read)), "some key was read from the engine twice"
    assert sorted(read.tolist()) == list(range(100)) + (list(range(250, 260)) if extra else [])
    assert store.stats()["stall_seconds"] > 0  # waiting for a read in flight is waiting for disk
    t.release(want, reader=g.ident)


# ---- announced rows stay ------------------------------------------------------------------------------
def test_announced_rows_survive_eviction_pressure_until_consumed(tmp_path, store_factory):
    cap = 64
    store, t = cold_store(store_factory, tmp_path / "s", 2000, cap * ROW)
    announced = np.arange(16)
    t.lookahead(announced)
    arrived(store, 16)
    assert store.stats()["lookahead_rows"] == 16
    reads = GatedReads(t, gated=False)
    rng = np.random.default_rng(0)
    for _ in range(20):  # 640 other rows through the 48 slots left: every unannounced row is evicted
        t.get(rng.choice(np.arange(100, 2000), size=32, replace=False), track=False)
    assert store.stats()["evictions"] > 0
    reads.calls.clear()
    before = store.stats()
    np.testing.assert_array_equal(t.get(announced, track=False), values(announced))
    after = store.stats()
    assert delta(before, after, "hits") == 16 and delta(before, after, "misses") == 0
    assert not reads.calls
    # consumed: now they are ordinary rows, and the same pressure pushes them out
    for _ in range(20):
        t.get(rng.choice(np.arange(100, 2000), size=32, replace=False), track=False)
    before = store.stats()
    np.testing.assert_array_equal(t.get(announced, track=False), values(announced))
    assert delta(before, store.stats(), "misses") > 0
    assert store.stats()["memory_tier_bytes"] <= cap * ROW


@pytest.mark.parametrize("second", ["resident", "in-flight"])
def test_each_announcement_keeps_the_row_for_one_read(second, tmp_path, store_factory):
    """Two coming batches read A (depth-8 pipelines announce hot keys again and again): the rows stay until
    both reads, whether the second announcement came once A was resident or while its read was in flight."""
    store, t = cold_store(store_factory, tmp_path / "s", 2000, 64 * ROW)
    reads = GatedReads(t)
    a = np.arange(16)
    t.lookahead(a)
    assert reads.entered.wait(JOIN)
    if second == "in-flight":
        t.lookahead(a)
    reads.gate.set()
    arrived(store, 16)
    if second == "resident":
        t.lookahead(a)
    rng = np.random.default_rng(1)
    for _ in range(2):  # each read of A is followed by pressure that evicts every unannounced row
        before = store.stats()
        np.testing.assert_array_equal(t.get(a, track=False), values(a))
        assert delta(before, store.stats(), "misses") == 0
        for _ in range(20):
            t.get(rng.choice(np.arange(100, 2000), size=32, replace=False), track=False)
    before = store.stats()
    t.get(a, track=False)  # both announcements consumed: A was an ordinary row under that pressure
    assert delta(before, store.stats(), "misses") > 0


def test_lookahead_beyond_the_budget_stops_early_without_evicting_announced_rows(tmp_path, store_factory):
    cap = 64
    store, t = cold_store(store_factory, tmp_path / "s", 2000, cap * ROW)
    first = np.arange(16)
    t.lookahead(first)
    arrived(store, 16)
    flood = np.arange(100, 300)  # 200 rows announced into the 48 slots left
    t.lookahead(flood)
    arrived(store, 216)
    s = store.stats()
    assert s["lookahead_dropped"] > 0
    assert s["lookahead_rows"] + s["lookahead_dropped"] == 216
    assert s["lookahead_rows"] <= cap
    assert s["memory_tier_bytes"] <= cap * ROW
    reads = GatedReads(t, gated=False)
    before = store.stats()
    np.testing.assert_array_equal(t.get(first, track=False), values(first))
    assert delta(before, store.stats(), "hits") == 16 and not reads.calls  # the first batch is still there
    # the dropped rows are read on demand, correctly
    for lo in range(100, 300, 40):
        keys = np.arange(lo, lo + 40)
        np.testing.assert_array_equal(t.get(keys, track=False), values(keys))
    assert len(reads.keys_read()) == s["lookahead_dropped"]  # exactly the dropped ones came from disk


@pytest.mark.parametrize("cache", ["1MiB", 64 * 4 * 2 * DIM], ids=["roomy", "budget-full"])
def test_lookahead_of_never_seen_keys_creates_them_deterministically(cache, tmp_path, store_factory):
    """Rows created by look-ahead (also those that found no room and were dropped) equal the rows a plain
    get creates: same init values, same optimizer state; they count once and persist."""
    new = np.array([3, 2**63 + 5, 2**64 - 1, 12345678901234, *range(1000, 1200)], dtype=np.uint64)

    def table(store):
        return store.table("t", dim=DIM, optimizer=Adagrad(lr=0.1), init=mlkv.init.Normal(0.0, 1.0))

    a = store_factory("slab", tmp_path / "a", cache_bytes=cache)
    ta = table(a)
    ta.lookahead(new)
    arrived(a, len(new))
    assert len(ta) == len(new)
    got = ta.get(new, track=False)
    b = store_factory("slab", tmp_path / "b", cache_bytes=cache)
    tb = table(b)
    want = tb.get(new, track=False)
    np.testing.assert_array_equal(got, want)
    for name, v in tb.optimizer_state(new).items():
        np.testing.assert_array_equal(ta.optimizer_state(new)[name], v)
    assert len(ta) == len(tb) == len(new)
    assert ta.contains(new).all()
    a.checkpoint()
    a.close()
    a = store_factory("slab", tmp_path / "a", cache_bytes=cache)
    np.testing.assert_array_equal(table(a).get(new, track=False), want)
    assert len(table(a)) == len(new)


# ---- look-ahead pays -------------------------------------------------------------------------------------
N, BUDGET_ROWS, STEPS, BATCH = 10_000, 1000, 100, 64
SLOW_READ = 0.003  # seconds per engine read call


def zipf_batches(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    out = []
    for _ in range(STEPS):
        r = rng.zipf(1.1, size=BATCH)
        out.append(perm[r[r <= N] - 1])
    return out


def slow_engine(store: mlkv.Store) -> None:
    real = store._engine.read

    def read(table, keys):
        if len(keys):
            time.sleep(SLOW_READ)
        return real(table, keys)

    store._engine.read = read


def run_workload(store_factory, path, depth: int) -> dict:
    s = store_factory("slab", path, cache_bytes="4MiB")
    t = s.table("emb", dim=8, optimizer=SGD(lr=0.1))
    for lo in range(0, N, 5000):
        t.get(np.arange(lo, lo + 5000), track=False)  # creates the rows
    s.close()
    s = store_factory("slab", path, cache_bytes=BUDGET_ROWS * 32)  # the table is 10x the budget
    t = s.table("emb")
    slow_engine(s)
    batches = zipf_batches(1)
    for i in range(min(depth, STEPS)):
        t.lookahead(batches[i])
    for i, keys in enumerate(batches):
        if depth and i + depth < STEPS:
            t.lookahead(batches[i + depth])
        rows = t.get(keys)
        time.sleep(0.001)  # the model's compute, which look-ahead overlaps with I/O
        t.update(keys, 0.01 * rows)
    stats = s.stats()
    s.close()
    return stats


def test_lookahead_pays_on_a_zipf_workload(tmp_path, store_factory):
    plain = run_workload(store_factory, tmp_path / "d0", depth=0)
    ahead = run_workload(store_factory, tmp_path / "d8", depth=8)
    assert plain["lookahead_rows"] == 0 and ahead["lookahead_rows"] > 0
    assert ahead["hit_rate"] > plain["hit_rate"]
    assert ahead["stall_seconds"] < plain["stall_seconds"]
    assert plain["evictions"] > 0 and ahead["evictions"] > 0


def test_a_read_of_repeated_keys_uses_up_one_announcement_per_key():
    """An untracked read may name a key many times; it is one read of the batch, so it uses up one of the
    key's announcements (two batches announced it: one stays) and sets its CLOCK bit."""
    from mlkv.engine.key_index import hash64
    from mlkv.store.memory_tier import MemoryTier

    tier = MemoryTier(dim=4)
    tier.resize(16)
    keys = hash64(np.arange(3, dtype=np.uint64))
    slots = tier.admit(keys, np.ones((3, 4), np.float32), np.zeros(3, dtype=bool))
    tier.announced[slots] = [2, 2, 0]
    tier.ref[slots] = False
    tier.consume(np.array([slots[0], slots[0], slots[0], slots[1], slots[2], -1]), announced=True)
    assert tier.announced[slots].tolist() == [1, 1, 0]
    assert tier.ref[slots].all()
    tier.consume(np.array([slots[0]] * 4), announced=False)  # no look-ahead: announcements untouched
    assert tier.announced[slots].tolist() == [1, 1, 0]
