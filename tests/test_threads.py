"""Many threads, one store: no update is lost; bound 0 is exact whatever tier, look-ahead and write-back do.

Counters: SGD(lr=1) with gradient -1 adds exactly 1.0 to every column of a row, so a row's value is the
number of updates applied to it and a lost or doubled update shows up as a wrong integer. The test keeps
its own count of every update it made (under a test lock) and compares every row against it.

Timing never appears in an assertion; every thread is joined with a timeout and staleness waits are bounded
by a short `staleness_timeout`, so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import numpy as np
import pytest
from thread_helpers import JOIN, Worker

import mlkv
from mlkv.optim import SGD, Adagrad, Adam

DIM = 4
ROW = 4 * DIM  # bytes of an SGD row


def run_all(fn, n: int) -> None:
    workers = [Worker(fn, i, name=f"worker-{i}") for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.finish()


def plus_one(n: int) -> np.ndarray:
    return -np.ones((n, DIM), dtype=np.float32)


def counter_table(store: mlkv.Store, name: str = "ctr", **kw) -> mlkv.Table:
    return store.table(name, dim=DIM, optimizer=SGD(lr=1.0), init=mlkv.init.Zeros(), **kw)


def assert_counts(t: mlkv.Table, counts: dict[int, int]) -> None:
    keys = np.array(sorted(counts), dtype=np.int64)
    want = np.array([counts[k] for k in keys], dtype=np.float32)
    got = t.get(keys, track=False)
    bad = np.flatnonzero((got != want[:, None]).any(axis=1))
    assert len(bad) == 0, f"{len(bad)} rows off, e.g. key {keys[bad[0]]}: {got[bad[0]]} != {want[bad[0]]}"


# ---- no update is lost ------------------------------------------------------------------------------------
HOT = 0
CHURN = np.arange(1, 3001)


@pytest.mark.parametrize(
    "engine,writeback_limit",
    [("slab", None), ("memory", None), ("slab", 0)],
    ids=["slab", "memory", "slab-writeback-backpressure"],
)
def test_counter_is_exact_under_eviction_and_writeback(engine, writeback_limit, tmp_path, store_factory):
    """T threads add 1 to one hot row N times each, while also churning 3000 other keys through a tier of 32
    rows (evictions, write-back, disk reads) with look-ahead on. Every row ends at exactly its count, also
    after checkpoint and reopen. `writeback_limit=0` makes every eviction wait for the write-back queue to
    drain (a slow disk), which releases the store lock in the middle of admitting rows."""
    threads, n = 4, 150
    store = store_factory(engine, tmp_path / "s", cache_bytes=32 * ROW, staleness_timeout=10.0)
    if writeback_limit is not None:
        store._ctx.writeback.limit_bytes = writeback_limit
    t = counter_table(store)
    lock = threading.Lock()
    counts = {HOT: 0} | dict.fromkeys(CHURN.tolist(), 0)

    def worker(tid: int) -> None:
        rng = np.random.default_rng(tid)
        for i in range(n):
            churn = rng.choice(CHURN, size=12, replace=False)
            t.lookahead(np.append(rng.choice(CHURN, size=12), HOT))
            mode = (tid + i) % 3
            if mode == 0:  # a bare update: no read, no staleness accounting
                t.update([HOT], plus_one(1))
                t.get(churn, track=False)
            elif mode == 1:  # read the hot row together with churn keys, update all of them
                keys = np.append(churn, HOT)
                t.get(keys)
                t.update(keys, plus_one(len(keys)))
                with lock:
                    for k in churn.tolist():
                        counts[k] += 1
            else:  # the hot row alone, read then update, churn updated without a read
                t.get([HOT])
                t.update([HOT], plus_one(1))
                t.update(churn, plus_one(len(churn)))
                with lock:
                    for k in churn.tolist():
                        counts[k] += 1
            with lock:
                counts[HOT] += 1

    run_all(worker, threads)
    assert counts[HOT] == threads * n
    stats = store.stats()
    assert stats["evictions"] > 0 and stats["rows_written_back"] > 0 and stats["misses"] > 0
    assert stats["lookahead_rows"] + stats["lookahead_dropped"] > 0
    assert stats["memory_tier_bytes"] <= 32 * ROW
    assert_counts(t, counts)
    store.checkpoint()
    assert store.stats()["writeback_pending"] == 0
    assert_counts(t, counts)
    store.close()
    store = store_factory(engine, tmp_path / "s", cache_bytes=32 * ROW)
    assert_counts(counter_table(store), counts)


def test_put_and_update_increments_mix_exactly(engine, tmp_path, store_factory):
    """With bound 0 a read-modify-put is as atomic as an update: two threads add 1 by get + put(v + 1), two
    by get + update, on rows that keep getting evicted; nothing is lost."""
    threads, n, keys_all = 4, 100, np.arange(40)
    store = store_factory(engine, tmp_path / "s", cache_bytes=16 * ROW, staleness_timeout=10)
    t = counter_table(store)
    lock = threading.Lock()
    counts = dict.fromkeys(keys_all.tolist(), 0)

    def worker(tid: int) -> None:
        rng = np.random.default_rng(100 + tid)
        for _ in range(n):
            keys = np.sort(rng.choice(keys_all, size=rng.integers(1, 6), replace=False))
            rows = t.get(keys)
            if tid % 2:
                t.put(keys, rows + np.float32(1.0))
            else:
                t.update(keys, plus_one(len(keys)))
            with lock:
                for k in keys.tolist():
                    counts[k] += 1

    run_all(worker, threads)
    assert sum(counts.values()) > 0
    assert store.stats()["evictions"] > 0
    assert_counts(t, counts)
    store.checkpoint()
    store.close()
    store = store_factory(engine, tmp_path / "s", cache_bytes=16 * ROW)
    assert_counts(counter_table(store), counts)


# ---- bound 0 is exact -------------------------------------------------------------------------------------
N_KEYS, STEPS, BATCH, DEPTH, EDIM = 20_000, 120, 256, 8, 8


def zipf_batches(seed: int) -> list[np.ndarray]:
    """Zipf-ish batches (hot head, long tail of never-seen keys) over N_KEYS spread-out 63-bit ids."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(N_KEYS).astype(np.int64) * np.int64(0x9E3779B1) + np.int64(12345)
    out = []
    for _ in range(STEPS):
        ranks = rng.zipf(1.2, size=BATCH)
        ranks = ranks[ranks <= N_KEYS] - 1
        out.append(ids[ranks])
    return out


def exact_tables(store: mlkv.Store) -> dict[str, mlkv.Table]:
    return {
        "ada": store.table("ada", dim=EDIM, optimizer=Adagrad(lr=0.1)),
        "adam": store.table("adam", dim=EDIM, optimizer=Adam(lr=0.01)),
    }


def train(store: mlkv.Store, depth: int) -> dict[str, np.ndarray]:
    """One single-threaded loop over both tables; the gradient depends on the rows read, so a stale read
    changes the result. Look-ahead of batch i + depth is announced before batch i is read."""
    tables = exact_tables(store)
    batches = {name: zipf_batches(seed) for seed, name in enumerate(tables)}
    noise = np.random.default_rng(7)
    if depth:
        for i in range(min(depth, STEPS)):
            for name, t in tables.items():
                t.lookahead(batches[name][i])
    for i in range(STEPS):
        for name, t in tables.items():
            if depth and i + depth < STEPS:
                t.lookahead(batches[name][i + depth])
        for name, t in tables.items():
            keys = batches[name][i]
            rows = t.get(keys)
            grads = (0.5 * rows + noise.standard_normal(rows.shape)).astype(np.float32)
            t.update(keys, grads)
    return {name: np.unique(np.concatenate(b)) for name, b in batches.items()}


def table_state(t: mlkv.Table, keys: np.ndarray) -> dict[str, np.ndarray]:
    return {"rows": t.get(keys, track=False), **t.optimizer_state(keys)}


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_bound_zero_is_exact_with_small_tier_lookahead_and_writeback(engine, tmp_path, store_factory):
    ref = store_factory("memory", tmp_path / "ref", cache_bytes="1GiB", staleness_bound=0)
    touched = train(ref, depth=0)
    assert ref.stats()["evictions"] == 0

    row_bytes = sum(4 * (EDIM + t.optimizer.state_width(EDIM)) for t in exact_tables(ref).values())
    budget = N_KEYS * row_bytes // 20  # 5% of the rows
    store = store_factory(engine, tmp_path / "s", cache_bytes=budget, staleness_bound=0, staleness_timeout=10)
    assert train(store, depth=DEPTH).keys() == touched.keys()
    stats = store.stats()
    assert stats["evictions"] > 0 and stats["rows_written_back"] > 0 and stats["lookahead_rows"] > 0
    assert stats["memory_tier_bytes"] <= budget

    def compare(s: mlkv.Store) -> None:
        got_tables, ref_tables = exact_tables(s), exact_tables(ref)
        for name, keys in touched.items():
            got, want = table_state(got_tables[name], keys), table_state(ref_tables[name], keys)
            assert got.keys() == want.keys()
            for part in want:
                assert np.array_equal(got[part], want[part]), f"{engine}: {name}.{part} differs"
            assert got_tables[name].step == ref_tables[name].step == STEPS
            assert len(got_tables[name]) == len(ref_tables[name]) == len(keys)

    compare(store)
    store.checkpoint()
    store.close()
    compare(store_factory(engine, tmp_path / "s", cache_bytes=budget))


# ---- Hogwild-style -----------------------------------------------------------------------------------------
def test_hogwild_threads_with_bound_one(tmp_path, store_factory):
    """3 threads train their own keys and a shared overlapping range with s=1 and look-ahead, through a tier
    smaller than the keys. Every update still lands exactly once, and the stats agree with each other."""
    threads, steps, cache = 3, 120, 48 * ROW
    store = store_factory("slab", tmp_path / "s", cache_bytes=cache, staleness_bound=1, staleness_timeout=10)
    t = counter_table(store)
    shared = np.arange(0, 24)
    own = [np.arange(1000 * (i + 1), 1000 * (i + 1) + 200) for i in range(threads)]
    lock = threading.Lock()
    counts: dict[int, int] = {}
    drawn: set[int] = set()

    def batch(rng: random.Random, tid: int) -> np.ndarray:
        keys = rng.sample(shared.tolist(), 3) + rng.sample(own[tid].tolist(), 8)
        with lock:
            drawn.update(keys)
        return np.array(keys, dtype=np.int64)

    def worker(tid: int) -> None:
        rng = random.Random(tid)
        upcoming = [batch(rng, tid) for _ in range(4)]
        for _ in range(steps):
            upcoming.append(batch(rng, tid))
            t.lookahead(upcoming[-1])
            keys = upcoming.pop(0)
            t.get(keys)
            t.update(keys, plus_one(len(keys)))
            with lock:
                for k in keys.tolist():
                    counts[k] = counts.get(k, 0) + 1
        for keys in upcoming:  # announced but never trained: harmless
            t.get(keys, track=False)

    run_all(worker, threads)
    assert sum(counts.values()) == threads * steps * 11
    assert_counts(t, counts)
    assert t._gate.holders() == 0
    store.checkpoint()
    s = store.stats()
    assert s["hits"] + s["misses"] > 0
    assert s["hit_rate"] == pytest.approx(s["hits"] / (s["hits"] + s["misses"]))
    assert s["evictions"] > 0  # 4 * 200 + 24 keys through a 48-row tier
    assert s["writeback_pending"] == 0
    assert s["memory_tier_bytes"] <= cache
    # every row reached the engine through the write-back path, which counts it
    assert len(t) == len(drawn)  # trained keys and the announced-only ones (created by look-ahead)
    assert s["rows_written_back"] >= len(t)
    assert s["bytes_written"] == s["rows_written_back"] * ROW
    assert s["lookahead_rows"] + s["lookahead_dropped"] > 0
    assert s["staleness_waits"] >= 0 and s["staleness_wait_seconds"] >= 0
    if s["staleness_waits"] == 0:
        assert s["staleness_wait_seconds"] == 0


# ---- a checkpoint while an operation is half-way ---------------------------------------------------------
def _blocked_in(thread: threading.Thread, inside: str, not_inside: str) -> bool:
    """Whether `thread` waits on a Condition with `inside` on its stack and `not_inside` not."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return inside in names and not_inside not in names


@pytest.mark.parametrize("final", ["close", "close-without-checkpoint"])
def test_checkpoint_never_holds_half_an_update(final, tmp_path, store_factory):
    """An update whose row read from disk is in progress when another thread checkpoints. The checkpoint
    must hold all of the update or none of it (Adam's step count and the row agree), and close() must still
    make the update durable. Forced interleaving: the update's engine read returns only once the checkpoint
    is waiting for its own write-back, i.e. with the store lock released."""

    def table(s: mlkv.Store) -> mlkv.Table:
        return s.table("t", dim=2, optimizer=Adam(lr=0.1))

    path = tmp_path / "s"
    s = store_factory("slab", path)
    table(s).put([1, 2], np.ones((2, 2), np.float32))
    s.close()
    s = store_factory("slab", path)
    t = table(s)
    t.put([2], np.full((1, 2), 5.0, np.float32))  # a dirty row: the checkpoint has a write to wait for
    read_done, read_gate, write_started, write_gate = (threading.Event() for _ in range(4))
    real_read, real_write = t._read_engine, s._engine.write

    def gated_read(keys):
        out = real_read(keys)
        read_done.set()
        read_gate.wait(JOIN)
        return out

    def gated_write(*args):
        write_started.set()
        write_gate.wait(JOIN)
        return real_write(*args)

    t._read_engine = gated_read
    s._engine.write = gated_write
    updater = Worker(t.update, [1], np.ones((1, 2), np.float32))
    updater.start()
    assert read_done.wait(JOIN)  # the update has read key 1 from disk, the store lock released
    checkpointer = Worker(s.checkpoint)
    checkpointer.start()
    assert write_started.wait(JOIN)  # the checkpoint waits for its write-back
    read_gate.set()
    deadline = time.monotonic() + JOIN  # let the update run: it finishes, or waits for the checkpoint to end
    while updater.is_alive() and not _blocked_in(updater, "_load", "gated_read"):
        assert time.monotonic() < deadline, "the update neither finished nor waited for the checkpoint"
        time.sleep(0.001)
    write_gate.set()
    updater.finish()
    checkpointer.finish()
    live_row, live_step = t.get([1], track=False), t.step
    assert live_step == 1 and not np.array_equal(live_row, np.ones((1, 2), np.float32))
    if final == "close":
        s.close()
        s = store_factory("slab", path)
        np.testing.assert_array_equal(table(s).get([1], track=False), live_row)
        assert table(s).step == 1
    else:  # only the concurrent checkpoint: it holds the update entirely or not at all
        s.close(checkpoint=False)
        s = store_factory("slab", path)
        row, step = table(s).get([1], track=False), table(s).step
        before = step == 0 and np.array_equal(row, np.ones((1, 2), np.float32))
        after = step == 1 and np.array_equal(row, live_row)
        assert before or after, f"checkpoint holds step {step} with row {row}"


# ---- a delete never pulls a row out from under a read in progress ------------------------------------
@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_delete_waits_for_a_read_holding_the_row(engine, tmp_path, store_factory):
    """update([resident, on disk]) pins the resident row while it reads the other one from the engine with
    the lock released. A delete of the resident key meanwhile must wait for it: afterwards the key is gone
    (the delete came last), not resurrected with a row the update never filled."""
    path = tmp_path / "s"
    s = store_factory(engine, path)
    t = counter_table(s)
    t.update(np.array([1, 2]), plus_one(2))
    s.close()
    s = store_factory(engine, path)
    t = counter_table(s)
    t.get(np.array([1]), track=False)  # key 1 resident, key 2 on disk only
    entered, go = threading.Event(), threading.Event()
    real_read = s._engine.read

    def slow_read(table, keys):
        entered.set()
        assert go.wait(JOIN)
        return real_read(table, keys)

    s._engine.read = slow_read
    updater = Worker(t.update, np.array([1, 2]), plus_one(2), name="updater")
    updater.start()
    assert entered.wait(JOIN)
    deleter = Worker(t.delete, np.array([1]), name="deleter")
    deleter.start()
    deleter.join(0.3)
    assert deleter.is_alive(), "the delete did not wait for the read holding key 1"
    go.set()
    updater.finish()
    deleter.finish()
    s._engine.read = real_read
    assert not t.contains(np.array([1]))[0]
    np.testing.assert_array_equal(t.get(np.array([2]), track=False), np.full((1, DIM), 2.0, np.float32))
    assert len(t) == 1


def test_open_sizes_the_lookahead_pool_to_the_cores(tmp_path):
    """mlkv.open and Store agree on the default: one I/O thread per core this process may run on, at
    most 4, and the pool really has that many."""
    import inspect

    defaults = [inspect.signature(f).parameters["io_threads"].default for f in (mlkv.open, mlkv.Store)]
    assert defaults[0] == defaults[1]
    with mlkv.open(tmp_path / "s", cache_bytes="1MiB") as store:
        assert store.io_threads == min(4, len(os.sched_getaffinity(0)))
        assert store._ctx.io_pool()._max_workers == store.io_threads
    with mlkv.open(tmp_path / "t", cache_bytes="1MiB", io_threads=3) as store:
        assert store.io_threads == 3
