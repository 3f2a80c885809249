"""Bounded staleness: who holds a row, who waits for it, and that the bound really bounds what a read misses.

Contract (API.md, *Staleness*): a tracked `get` of k by a reader registers a hold on k until that reader's
`update`/`put`/`release`/`delete` of k; a tracked read proceeds only while at most `staleness_bound` OTHER
readers hold k, else it waits (counted in `staleness_waits`) and raises `StalenessTimeout` after
`staleness_timeout`. A reader never waits for itself.

Timing never appears in an assertion: "B is waiting" is observed through the `staleness_waits` counter, "B
has not finished" through events, and every wait in the tests is bounded (small `staleness_timeout`,
`join(timeout)`), so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import random
import re
import threading
import time

import numpy as np
import pytest
from thread_helpers import Worker, wait_for

import mlkv
from mlkv.optim import SGD

SHORT = 0.3  # staleness_timeout of stores in which a test expects a read to time out
LONG = 10.0  # staleness_timeout of stores in which no read should ever wait long


def one_step(n: int = 1) -> np.ndarray:
    """Gradients that make SGD(lr=1) add exactly 1.0 to each row: the row value counts its updates."""
    return -np.ones((n, 1), dtype=np.float32)


def counter_table(store: mlkv.Store, name: str = "emb", **kw) -> mlkv.Table:
    return store.table(name, dim=1, optimizer=SGD(lr=1.0), init=mlkv.init.Zeros(), **kw)


def make_store(store_factory, tmp_path, *, engine="memory", bound: int = 0, timeout: float = LONG, **kw):
    return store_factory(engine, tmp_path / "s", staleness_bound=bound, staleness_timeout=timeout, **kw)


def waits(store: mlkv.Store) -> int:
    return store.stats()["staleness_waits"]


def assert_free(t: mlkv.Table, keys, reader="probe") -> None:
    """No reader holds `keys`: a fresh reader under bound 0 reads them without waiting, then lets go."""
    before = waits(t.store)
    t.get(keys, reader=reader)
    t.release(keys, reader=reader)
    assert waits(t.store) == before, f"reading {keys} had to wait: some reader still holds them"


# ---- a reader and its own holds ---------------------------------------------------------------------------
def test_gradient_accumulation_rereads_never_wait(tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    t = counter_table(store)
    keys = [1, 2, 3]
    first = t.get(keys)
    again = t.get(keys)  # micro-batch 2 of the same step: must not wait for micro-batch 1
    more = t.get([3, 2])
    assert np.array_equal(first, again) and np.array_equal(more, first[[2, 1]])
    t.update([*keys, 3, 2], one_step(5))  # accumulated grads of both reads: one optimizer step
    assert waits(store) == 0
    np.testing.assert_array_equal(t.get(keys, track=False)[:, 0], [1.0, 2.0, 2.0])  # 2 and 3 twice
    assert_free(t, keys)
    assert waits(store) == 0


def test_two_modules_share_a_table_through_one_handle(tmp_path, store_factory):
    """Two modules of one model read the same table from different threads under one reader handle: the
    second read does not wait for the first, one update resolves both, then anybody may read."""
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    t = counter_table(store)
    handle = object()
    user, item = [1, 2, 3], [3, 4]
    t.get(user, reader=handle)
    module_b = Worker(t.get, item, True, handle, name="module-b")  # another thread, the same reader
    module_b.start()
    module_b.finish()
    assert waits(store) == 0
    # a different reader does wait for the shared key (bound 0) and times out: the handle really holds it
    with pytest.raises(mlkv.StalenessTimeout):
        t.get([3], reader="other")
    t.update(user + item, one_step(5), reader=handle)
    assert_free(t, [1, 2, 3, 4])
    np.testing.assert_array_equal(t.get([1, 2, 3, 4], track=False)[:, 0], [1, 1, 2, 1])


def test_a_key_twice_in_one_batch(tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    t = counter_table(store)
    rows = t.get([7, 7, 8, 7])
    assert rows.shape == (4, 1) and waits(store) == 0
    t.update([7, 7, 8], one_step(3))  # duplicates' grads are summed: key 7 gets +2 in one step
    assert_free(t, [7, 8])
    np.testing.assert_array_equal(t.get([7, 8], track=False)[:, 0], [2.0, 1.0])
    assert waits(store) == 0


# ---- one reader waits for another -------------------------------------------------------------------------
@pytest.mark.parametrize("resolve", ["update", "put", "release", "delete"])
def test_bound_zero_read_waits_until_the_holder_resolves(resolve, tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=LONG)
    t = counter_table(store)
    t.put([5], np.float32([[10.0]]))
    assert t.get([5])[0, 0] == 10.0  # this thread now holds key 5
    resolved = threading.Event()
    seen: list[float] = []

    def second_reader() -> None:
        row = t.get([5])  # must wait for the main thread
        seen.append(float(row[0, 0]))
        seen.append(resolved.is_set())
        t.release([5])

    b = Worker(second_reader, name="second-reader")
    b.start()
    wait_for(lambda: waits(store) == 1, "the second reader to start waiting")
    assert not seen and b.is_alive()  # it cannot have read: the main thread has not resolved key 5
    resolved.set()
    if resolve == "update":
        t.update([5], one_step())
    elif resolve == "put":
        t.put([5], np.float32([[42.0]]))
    elif resolve == "release":
        t.release([5])
    else:
        t.delete([5])
    b.finish()
    expected = {"update": 11.0, "put": 42.0, "release": 10.0, "delete": 0.0}[resolve]  # delete: fresh init
    assert seen == [expected, True]  # it read after the resolve and saw its effect
    assert waits(store) == 1 and store.stats()["staleness_wait_seconds"] > 0
    assert_free(t, [5])


def test_a_timeout_set_after_open_applies_to_the_next_read(tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=LONG)
    t = counter_table(store)
    store.staleness_timeout = SHORT  # a public setting: tables read it at each wait
    t.get([1], reader="A")
    with pytest.raises(mlkv.StalenessTimeout, match=rf"after {SHORT:g} s"):
        t.get([1], reader="B")


def test_timeout_names_table_and_stuck_keys_and_leaves_no_hold(tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    t = counter_table(store, "user_emb")
    t.get([1, 2, 3], reader="A")
    with pytest.raises(mlkv.StalenessTimeout) as info:
        t.get([1, 2, 3, 4, 5, 5], reader="B")  # 1, 2, 3 are stuck behind A; 4, 5 are free
    msg = str(info.value)
    assert "'user_emb'" in msg, msg
    assert re.search(r"\b3 keys\b", msg), msg
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, mlkv.MlkvError)
    assert waits(store) == 1
    # B holds nothing: not the free keys 4, 5 (a third reader takes them without waiting) ...
    assert_free(t, [4, 5], reader="C")
    # ... and once A resolves, nobody holds 1, 2, 3 either
    t.update([1, 2, 3], one_step(3), reader="A")
    assert_free(t, [1, 2, 3, 4, 5], reader="C")
    # B itself can now read everything and hold it normally
    t.get([1, 2, 3, 4, 5], reader="B")
    with pytest.raises(mlkv.StalenessTimeout):
        t.get([4], reader="C")
    t.release([1, 2, 3, 4, 5], reader="B")
    assert_free(t, [1, 2, 3, 4, 5], reader="C")
    assert waits(store) == 2  # only the two reads that hit a held key ever waited


def test_timed_out_reread_keeps_only_the_earlier_holds(tmp_path, store_factory):
    """A reader that holds k and times out on a batch [k, j] still holds k (from its earlier read) and
    nothing else; resolving k frees everything."""
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    t = counter_table(store)
    t.get([1], reader="B")
    t.get([2], reader="A")
    with pytest.raises(mlkv.StalenessTimeout, match=r"\b1 keys\b"):
        t.get([1, 2, 3], reader="B")
    assert_free(t, [3], reader="C")
    with pytest.raises(mlkv.StalenessTimeout):
        t.get([1], reader="C")
    t.release([1], reader="B")
    t.release([2], reader="A")
    assert_free(t, [1, 2, 3], reader="C")


def test_per_table_bound_overrides_the_store(tmp_path, store_factory):
    store = make_store(store_factory, tmp_path, bound=0, timeout=SHORT)
    strict = counter_table(store, "strict")  # the store's bound, 0
    loose = counter_table(store, "loose", staleness_bound=2)
    for r in "ABC":  # C reads while A and B hold: 2 others <= 2
        loose.get([1], reader=r)
    assert waits(store) == 0
    with pytest.raises(mlkv.StalenessTimeout, match="'loose'"):
        loose.get([1], reader="D")  # 3 others > 2
    strict.get([1], reader="A")
    with pytest.raises(mlkv.StalenessTimeout, match="'strict'"):
        strict.get([1], reader="B")
    assert waits(store) == 2
    for r in "ABC":
        loose.release([1], reader=r)
    strict.release([1], reader="A")

    # the other way round: a loose store, one exact table
    store2 = store_factory("memory", tmp_path / "s2", staleness_bound=5, staleness_timeout=SHORT)
    exact = counter_table(store2, "exact", staleness_bound=0)
    default = counter_table(store2, "default")
    for r in "ABCDEF":
        default.get([1], reader=r)
    exact.get([1], reader="A")
    with pytest.raises(mlkv.StalenessTimeout, match="'exact'"):
        exact.get([1], reader="B")
    assert waits(store2) == 1
    # re-opening the table with another bound changes it for the open table
    assert store2.table("exact", staleness_bound=1) is exact
    exact.get([1], reader="B")
    assert waits(store2) == 1


def test_untracked_reads_never_wait_and_never_hold(tmp_path, store_factory):
    # a small tier: untracked reads of rows held by others take both the resident and the disk path
    store = make_store(store_factory, tmp_path, engine="slab", bound=0, timeout=SHORT, cache_bytes=4 * 64)
    t = counter_table(store)
    t.put(np.arange(1000), np.ones((1000, 1), np.float32))
    t.get([1, 2], reader="A")  # A holds 1 and 2
    for _ in range(3):  # resident, then (after the other reads pushed it out) from disk
        rows = t.get([1, 2, 999], track=False)
        np.testing.assert_array_equal(rows[:, 0], [1, 1, 1])
        t.get(np.arange(100, 900), track=False)
    assert waits(store) == 0
    # the untracked reads registered nothing for this thread
    t.get(np.arange(100, 900), track=False)
    assert_free(t, [999, 500], reader="B")
    t.release([1, 2], reader="A")
    assert_free(t, [1, 2, 999], reader="B")
    assert waits(store) == 0


# ---- the bound bounds the lag ---------------------------------------------------------------------------
@pytest.mark.parametrize("bound", [0, 1, 4])
@pytest.mark.parametrize("engine,cache", [("memory", "1MiB"), ("slab", 4 * 4)], ids=["resident", "tiny-tier"])
def test_bound_limits_missed_updates(bound, engine, cache, tmp_path, store_factory):
    """T threads run get/update cycles on 8 hot keys; each update adds exactly 1, so a row's value is the
    number of updates it has seen (its version).

    Soundness of the measured lag: `completed[k]` counts reads of k that returned (bumped right after the
    get, under a test lock); `c_start` is read right before my get. Every one of those c_start reads
    registered its hold before mine started, and every read is followed by exactly one update, so at least
    c_start - v of them were still outstanding when my read saw version v — the bound says <= s."""
    threads, cycles, n_keys = 4, 120 if bound == 0 else 150, 8
    store = make_store(store_factory, tmp_path, engine=engine, bound=bound, timeout=LONG, cache_bytes=cache)
    t = counter_table(store)
    lock = threading.Lock()
    completed = np.zeros(n_keys, dtype=np.int64)
    updates = np.zeros(n_keys, dtype=np.int64)
    lags: list[int] = []
    seen_versions: list[list[int]] = [[] for _ in range(n_keys)]
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(cycles):
            keys = np.array(sorted(rng.sample(range(n_keys), rng.randint(1, 3))), dtype=np.int64)
            with lock:
                c_start = completed[keys].copy()
            v = t.get(keys)[:, 0].astype(np.int64)
            with lock:
                completed[keys] += 1
                lags.extend((c_start - v).tolist())
                for k, ver in zip(keys, v, strict=True):
                    seen_versions[k].append(int(ver))
            time.sleep(rng.uniform(0, 0.002))
            if bound == 0:  # exact: nobody updated my keys between my read and my update
                now = t.get(keys, track=False)[:, 0]
                if not np.array_equal(now, v):
                    errors.append(f"keys {keys}: read {v}, but {now} before my own update")
            t.update(keys, one_step(len(keys)))
            with lock:
                updates[keys] += 1

    workers = [Worker(worker, 1000 * bound + i, name=f"w{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.finish()
    assert not errors, errors[:5]
    assert max(lags) <= bound, f"a read missed {max(lags)} updates with staleness_bound={bound}"
    final = t.get(np.arange(n_keys), track=False)[:, 0]
    np.testing.assert_array_equal(final, updates)  # every update counted exactly once
    stats = store.stats()
    if bound == 0:
        assert stats["staleness_waits"] > 0  # the gate really engaged
        # exact: the reads of a key saw the versions 0, 1, 2, ... each exactly once
        for k in range(n_keys):
            assert sorted(seen_versions[k]) == list(range(updates[k])), f"key {k}"
    if bound >= threads - 1:  # at most threads - 1 other readers exist: the bound can never bite
        assert stats["staleness_waits"] == 0
    assert t._gate.holders() == 0
    assert_free(t, np.arange(n_keys))


# ---- no deadlock ----------------------------------------------------------------------------------------
HOT = 12
SHARED = ("shared-handle",)  # one reader handle that several threads' "modules" use at once


def _step(rng: random.Random, tables: list[mlkv.Table], tid: int) -> None:
    """One training step of a random shape. It always reads the union of its keys first (further reads are
    subsets, which never wait), and it always resolves everything it read by its end."""
    t = rng.choice(tables)
    keys = rng.sample(range(HOT), rng.randint(1, 4))
    dup = keys + rng.choices(keys, k=rng.randint(0, 2))  # duplicates in one batch
    rng.shuffle(dup)
    kind = rng.choice(["accumulate", "modules", "release", "put", "untracked", "lookahead", "delete"])
    reader = SHARED if kind == "modules" and rng.random() < 0.5 else None
    if kind == "untracked":
        t.get(dup, track=False)
        return
    if kind == "lookahead":
        t.lookahead([*rng.sample(range(HOT), 3), HOT + rng.randrange(200)])
    t.get(dup, reader=reader)
    for _ in range(rng.randint(0, 2)):  # re-reads: gradient accumulation / a second module
        t.get(rng.sample(keys, rng.randint(1, len(keys))), reader=reader)
    if rng.random() < 0.3:
        time.sleep(rng.uniform(0, 0.002))
    if kind == "release":
        t.release(keys, reader=reader)
    elif kind == "put":
        t.put(dup, np.full((len(dup), 1), float(tid), np.float32), reader=reader)
    elif kind == "delete":
        t.delete(keys, reader=reader)
    else:
        t.update(dup, one_step(len(dup)), reader=reader)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_interleavings_never_deadlock(seed, tmp_path, store_factory):
    # a tier smaller than the hot set + look-ahead keys: eviction, write-back and disk reads join in
    store = make_store(store_factory, tmp_path, engine="slab", bound=0, timeout=LONG, cache_bytes=4 * 16)
    tables = [counter_table(store, "a"), counter_table(store, "b", staleness_bound=1)]

    def script(tid: int) -> int:
        rng = random.Random(seed * 100 + tid)
        for _ in range(150):
            _step(rng, tables, tid)
        return tid

    workers = [Worker(script, i, name=f"script-{i}") for i in range(3)]
    for w in workers:
        w.start()
    assert [w.finish() for w in workers] == [0, 1, 2]
    for t in tables:
        assert t._gate.holders() == 0, f"table {t.name}: holds left behind"
        assert_free(t, np.arange(HOT))
    store.checkpoint()
