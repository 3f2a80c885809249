"""Prefetcher: batches in order, keys announced ahead, bounded run-ahead, and shutdown that never hangs.

The worker thread must be gone after every way out of the loop — the end of the loader, a loader or `keys`
exception (re-raised in the loop), `break`, `close()`, a `with` block — and an interpreter that exits in
the middle of a loop must exit promptly even when the loader is slow or stuck.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import mlkv
from mlkv.torch import Prefetcher

TIMEOUT = 10.0


class FakeTable:
    """Records each lookahead together with how many batches the consumer had taken by then."""

    def __init__(self, name: str, log: list):
        self.name, self._log = name, log

    def lookahead(self, keys) -> None:
        self._log.append((self.name, np.asarray(keys).tolist()))


def wait_until(cond, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def batches(n: int, delay: float = 0.0):
    for i in range(n):
        if delay:
            time.sleep(delay)
        yield {"i": i, "u": torch.tensor([[i, i + 1]]), "v": np.array([100 + i])}


def keys_of(b):
    return {"u": b["u"], "v": b["v"]}


def fake_tables():
    log: list = []
    return {"u": FakeTable("u", log), "v": FakeTable("v", log)}, log


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mlkv-prefetch")]


@pytest.fixture(autouse=True)
def no_leftover_threads():
    yield
    assert wait_until(lambda: not worker_threads()), "a prefetch thread outlived its test"


def test_order_and_lookahead_of_every_batch():
    tables, log = fake_tables()
    seen = [b["i"] for b in Prefetcher(list(batches(50)), keys_of, tables, depth=3)]
    assert seen == list(range(50))
    # each batch's keys were announced (flattened), per table, in loader order
    assert [k for name, k in log if name == "u"] == [[i, i + 1] for i in range(50)]
    assert [k for name, k in log if name == "v"] == [[100 + i] for i in range(50)]


def test_lookahead_runs_ahead_but_at_most_depth_batches():
    tables, log = fake_tables()
    produced = []

    def loader():
        for b in batches(40):
            produced.append(b["i"])
            yield b

    pf = Prefetcher(loader(), keys_of, tables, depth=4)
    it = iter(pf)
    assert next(it)["i"] == 0
    assert wait_until(lambda: len(produced) >= 5)
    time.sleep(0.2)  # the worker is blocked on the full queue now
    # 1 consumed + 4 queued + 1 in hand waiting for room
    assert len(produced) <= 1 + 4 + 1
    assert [k for name, k in log if name == "u"][:5] == [[i, i + 1] for i in range(5)]
    assert [b["i"] for b in it] == list(range(1, 40))
    assert not pf.running


def test_store_lookahead_brings_rows_into_the_tier(tmp_path):
    with mlkv.open(tmp_path / "s", cache_bytes="1MiB") as store:
        t = store.table("u", dim=4)
        store.table("v", dim=4)
        for b in Prefetcher(list(batches(20)), keys_of, store, depth=8):
            t.get(b["u"].flatten(), track=False)
        assert wait_until(lambda: store.stats()["lookahead_rows"] > 0)


@pytest.mark.parametrize("where", ["loader", "keys"])
def test_exception_is_raised_in_the_loop_at_its_batch(where):
    tables, _ = fake_tables()

    def loader():
        yield from batches(5)
        if where == "loader":
            raise KeyError("broken shard")
        yield {"i": 5, "u": "not keys", "v": np.array([1])}

    def keys(b):
        if b["i"] == 5:
            raise KeyError("broken shard")
        return keys_of(b)

    pf = Prefetcher(loader(), keys, tables, depth=2)
    got = []
    with pytest.raises(KeyError, match="broken shard"):
        for b in pf:
            got.append(b["i"])
    assert got == [0, 1, 2, 3, 4]
    assert wait_until(lambda: not pf.running)


def test_bad_keys_result_is_a_clear_error():
    tables, _ = fake_tables()
    with pytest.raises(TypeError, match="mapping table name -> keys"):
        list(Prefetcher(list(batches(3)), lambda b: [b["u"]], tables))


def test_break_stops_the_worker():
    tables, _ = fake_tables()
    pf = Prefetcher(batches(10**6, delay=0.001), keys_of, tables, depth=8)
    for b in pf:
        if b["i"] == 3:
            break
    assert wait_until(lambda: not pf.running), "break must stop the worker"


def test_close_joins_the_worker_even_with_a_slow_loader():
    tables, _ = fake_tables()
    pf = Prefetcher(batches(10**6, delay=0.05), keys_of, tables, depth=2)
    it = iter(pf)
    next(it)
    t0 = time.monotonic()
    pf.close()
    assert not pf.running and time.monotonic() - t0 < 2.0
    assert list(it) == []  # a closed pass is over
    pf.close()  # idempotent


def test_context_manager_and_new_passes():
    tables, _ = fake_tables()
    data = list(batches(10))
    with Prefetcher(data, keys_of, tables, depth=2) as pf:
        assert [b["i"] for b in pf] == list(range(10))
        first = iter(pf)
        next(first)
        assert [b["i"] for b in pf] == list(range(10))  # a new pass stops the previous one
        assert list(first) == []
        for _ in pf:
            break
    assert not pf.running
    assert len(pf) == 10


def test_generator_loader_is_closed_when_the_loop_stops():
    tables, _ = fake_tables()
    closed = threading.Event()

    def loader():
        try:
            yield from batches(10**6)
        finally:
            closed.set()

    for b in Prefetcher(loader(), keys_of, tables, depth=2):
        if b["i"] == 2:
            break
    assert closed.wait(TIMEOUT)


def test_bad_arguments():
    tables, _ = fake_tables()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], keys_of, tables, depth=0)
    with pytest.raises(TypeError, match="keys"):
        Prefetcher([], {"u": 1}, tables)
    with pytest.raises(TypeError, match="tables"):
        Prefetcher([], keys_of, [1, 2])


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import mlkv
    from mlkv.torch import Prefetcher

    stuck = sys.argv[2] == "stuck"

    def loader():
        i = 0
        while True:
            time.sleep(600 if stuck and i == 3 else 0.2)  # slow, and in 'stuck' mode hung in next()
            yield np.array([i, i + 1])
            i += 1

    store = mlkv.open(sys.argv[1], cache_bytes="1MiB")
    table = store.table("t", dim=4)
    prefetch = Prefetcher(loader(), lambda b: {"t": b}, store, depth=4)
    for n, keys in enumerate(prefetch):
        table.get(keys, track=False)
        if n == 2:
            print("exiting", flush=True)
            sys.exit(0)  # mid-iteration: the worker is alive, waiting on the loader or the queue
    """
)


@pytest.mark.parametrize("loader", ["slow", "stuck"])
def test_interpreter_exit_mid_iteration_is_prompt(tmp_path, loader):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path / "s"), loader],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 30, f"interpreter exit took {elapsed:.1f} s"


class _Unpaced:
    """A table as a Prefetcher sees it, without `lookahead_capacity`: look-ahead is not paced to its tier."""

    def __init__(self, table):
        self._t = table

    def lookahead(self, keys) -> None:
        self._t.lookahead(keys)


@pytest.mark.parametrize("paced", [True, False])
def test_lookahead_is_paced_to_what_the_tier_holds(tmp_path, paced):
    """A tier of ~300 rows and batches of 100 new rows each, 8 batches deep: unpaced, announcements evict
    each other and reads miss; paced, every batch's rows are in the tier when it is read."""
    with mlkv.open(tmp_path / "s", cache_bytes=300 * 8 * 4) as store:
        t = store.table("t", dim=8, optimizer=mlkv.optim.SGD(lr=0.1))
        t.put(np.arange(2000), np.ones((2000, 8), dtype=np.float32))
        store.checkpoint()
        store.reset_stats()
        data = [np.arange(100 * i, 100 * (i + 1)) for i in range(16)]
        tables = {"t": t if paced else _Unpaced(t)}
        for batch in Prefetcher(data, lambda b: {"t": b}, tables, depth=8):
            time.sleep(0.03)  # the training step: look-ahead has time to read the next batches in
            t.get(batch, track=False)
        stats = store.stats()
    if paced:
        assert stats["hit_rate"] == 1.0 and stats["lookahead_dropped"] == 0
    else:
        assert stats["hit_rate"] < 1.0 or stats["lookahead_dropped"] > 0


def test_paced_lookahead_still_runs_when_a_batch_is_larger_than_the_tier(tmp_path):
    with mlkv.open(tmp_path / "s", cache_bytes=50 * 8 * 4) as store:
        t = store.table("t", dim=8, optimizer=mlkv.optim.SGD(lr=0.1))
        data = [np.arange(100 * i, 100 * (i + 1)) for i in range(6)]
        seen = []
        for batch in Prefetcher(data, lambda b: {"t": b}, store, depth=4):
            seen.append(t.get(batch, track=False).shape)
        assert seen == [(100, 8)] * 6


def test_paced_lookahead_counts_every_batch_that_trainer_threads_still_train(tmp_path):
    """Two trainer threads share one pass (next() under a lock, as mlkv train --trainers): both batches in
    training keep their rows; pacing counting only the last one taken let look-ahead evict them."""
    with mlkv.open(tmp_path / "s", cache_bytes=600 * 8 * 4) as store:
        t = store.table("t", dim=8, optimizer=mlkv.optim.SGD(lr=0.1))
        t.put(np.arange(9000), np.ones((9000, 8), dtype=np.float32))
        store.checkpoint()
        store.reset_stats()
        it = iter(Prefetcher(list(range(60)), lambda i: {"t": np.arange(150 * i, 150 * (i + 1))}, store, 8))
        lock = threading.Lock()

        def trainer() -> None:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                time.sleep(0.02)  # the forward, before the rows are read
                t.get(np.arange(150 * i, 150 * (i + 1)), track=False)

        threads = [threading.Thread(target=trainer) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT)
        stats = store.stats()
    assert stats["hit_rate"] == 1.0 and stats["lookahead_dropped"] == 0


@pytest.mark.parametrize("dtype", [np.uint64, np.int16, np.uint32])
def test_announced_keys_of_any_integer_type_are_distinct(dtype):
    from mlkv.torch.prefetcher import _announced

    keys = np.array([5, 3, 5, 5, 9, 3], dtype=dtype)
    got = _announced(keys)
    assert sorted(np.asarray(got).tolist()) == [3, 5, 9]
    assert sorted(np.asarray(_announced(torch.from_numpy(keys.astype(np.int16)))).tolist()) == [3, 5, 9]


def test_a_paced_worker_stopped_while_it_waits_announces_nothing_more():
    calls = []

    class Small:
        def lookahead_capacity(self) -> int:
            return 100

        def lookahead(self, keys) -> None:
            calls.append(int(np.asarray(keys)[0]))

    pf = Prefetcher(list(range(50)), lambda i: {"t": np.arange(100 * i, 100 * i + 100)}, {"t": Small()}, 8)
    it = iter(pf)
    worker = pf._worker
    next(it)
    assert wait_until(lambda: len(calls) == 2)  # batch 1 queued; batch 2 waits for room (300 > 100 rows)
    time.sleep(0.05)
    it.close()  # what break does: stop without a join
    worker.thread.join(TIMEOUT)
    assert calls == [0, 100]
