"""Soak: THREADS threads of mixed get / update / lookahead on one shared table, with a memory tier so small
that rows are evicted and written back all the time, for a fixed number of operations per thread.

The table uses SGD with lr=1, init zeros, and every update's gradient is -1, so a row's value is exactly the
number of updates applied to it (duplicate keys in a batch count twice: their gradients are summed). Each
thread counts the updates it issued per key. Checked:
- no lost or doubled update: at the end (and after close and reopen) every row equals the sum of the
  threads' counts for its key;
- read-your-writes during the run: a row a thread reads is >= the updates that thread itself applied;
- the staleness bound: a monitor thread samples, under the store lock, how many readers hold each key;
  never more than staleness_bound + 1 (the bound counts *other* holders);
- memory: the store's memory_tier_bytes never exceeds cache_bytes (sampled the same way);
- no thread left behind: after close() no mlkv thread is alive.
Not thread-safe itself: one soak per store directory.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np

from .fault_common import Tally

THREADS = 4
KEY_SPACE = 3000
HOT = 48  # keys every thread hits often: where updates of several threads meet


def _batch(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(1, 64))
    hot = rng.random(n) < 0.3
    return np.where(hot, rng.integers(0, HOT, n), rng.integers(0, KEY_SPACE, n)).astype(np.uint64)


def soak(
    engine: str,
    workdir: Path,
    ops: int = 2000,
    seed: int = 0,
    bound: int = 1,
    cache_bytes: int = 16 * 1024,
) -> Tally:
    """Run the soak once; the tally's cases are the threads' operations plus the final checks."""
    import mlkv

    tally = Tally(f"soak ({engine})")
    path = workdir / f"soak-{engine}-{seed}"
    shutil.rmtree(path, ignore_errors=True)
    before = {t.ident for t in threading.enumerate()}
    store = mlkv.open(
        path, engine=engine, cache_bytes=cache_bytes, staleness_bound=bound, staleness_timeout=60
    )
    table = store.table("counts", dim=4, optimizer=mlkv.optim.SGD(lr=1.0), init=mlkv.init.Zeros())
    issued = np.zeros((THREADS, KEY_SPACE), dtype=np.int64)
    problems: list[str] = []
    peak = {"holders": 0, "tier_bytes": 0, "samples": 0}
    done = threading.Event()

    def note(problem: str) -> None:
        if len(problems) < 20:
            problems.append(problem)

    def worker(t: int) -> None:
        rng = np.random.default_rng([seed, t])
        nxt = _batch(rng)
        try:
            for _ in range(ops):
                k, nxt = nxt, _batch(rng)
                kind = rng.random()
                if kind < 0.6:  # a training step: announce the next batch, read, update
                    table.lookahead(nxt)
                    rows = table.get(k)
                    mine = issued[t, k.astype(np.int64)]
                    if not (rows == rows[:, :1]).all() or (rows[:, 0] < mine).any():
                        bad = int(np.argmax(rows[:, 0] < mine))
                        note(f"thread {t}: read {rows[bad]} for key {k[bad]}, it applied {mine[bad]} itself")
                    table.update(k, np.full((len(k), 4), -1.0, dtype=np.float32))
                    np.add.at(issued[t], k.astype(np.int64), 1)
                    tally.add("update")
                elif kind < 0.8:
                    table.get(k, track=False)
                    tally.add("untracked get")
                else:
                    table.get(k)
                    table.release(k)
                    tally.add("get + release")
        except Exception as e:
            note(f"thread {t}: {type(e).__name__}: {e}")

    def monitor() -> None:
        while not done.is_set():
            with store._ctx.lock:  # the same lock every row operation holds: a consistent sample
                holds = list(table._gate._holds.values())
                tier_bytes = store._ctx.budget.used_bytes
            if holds:
                _, n = np.unique(np.concatenate(holds), return_counts=True)
                peak["holders"] = max(peak["holders"], int(n.max()))
            peak["tier_bytes"] = max(peak["tier_bytes"], tier_bytes)
            peak["samples"] += 1
            time.sleep(0.002)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    mon = threading.Thread(target=monitor)
    mon.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done.set()
    mon.join()
    seconds = time.perf_counter() - start
    want = issued.sum(axis=0)
    stats = store.stats()

    def compare(tab, when: str) -> None:
        keys, rows = [], []
        for k, r in tab.items():
            keys.append(k)
            rows.append(r)
        keys = np.concatenate(keys).astype(np.int64)
        rows = np.concatenate(rows)
        got = np.zeros(KEY_SPACE)
        got[keys] = rows[:, 0]
        if not (rows == rows[:, :1]).all() or not np.array_equal(got, want):
            diff = np.flatnonzero(got != want)
            eg = diff[:3]
            note(f"{when}: {len(diff)} keys differ, e.g. keys {eg}: got {got[eg]}, want {want[eg]}")

    compare(table, "before close")
    store.close()
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    if left:
        note(f"threads still alive after close: {left}")
    with mlkv.open(path, engine=engine, readonly=True) as again:
        compare(again.table("counts"), "after close and reopen")
    if peak["holders"] > bound + 1:
        note(f"{peak['holders']} readers held one key at once; staleness_bound {bound} allows {bound + 1}")
    if peak["tier_bytes"] > cache_bytes:
        note(f"memory_tier_bytes reached {peak['tier_bytes']} > cache_bytes {cache_bytes}")
    for p in problems:
        tally.add("failed", f"{engine} seed {seed}: {p}")
    tally.extra = (
        f"  {THREADS} threads x {ops} ops in {seconds:.1f}s; {int(want.sum())} row updates counted exactly; "
        f"{stats['evictions']} evictions, {stats['staleness_waits']} staleness waits; peak holders of a key "
        f"{peak['holders']} (bound {bound}); peak tier {peak['tier_bytes']} of {cache_bytes} bytes "
        f"({peak['samples']} samples); threads left after close: {len(left)}"
    )
    shutil.rmtree(path, ignore_errors=True)
    return tally
