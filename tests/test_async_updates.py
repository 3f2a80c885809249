"""Asynchronous sparse updates (issue 10): Table.update_async, the store's applier, SparseOptimizer at s >= 1.

Counters: SGD with lr=1 and a gradient of -1 per update makes a row's value the number of updates it has
seen, so the lag of a read is measured exactly: updates submitted before it minus the value it returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from thread_helpers import Worker

import mlkv
import mlkv.torch
from mlkv.optim import SGD
from mlkv.store.applier import ApplierError

KEYS = np.arange(8)


def counter_table(store: mlkv.Store, name: str = "emb") -> mlkv.Table:
    return store.table(name, dim=1, optimizer=SGD(lr=1.0), init=mlkv.init.Zeros())


def minus_ones(n: int) -> np.ndarray:
    return -np.ones((n, 1), np.float32)


def slow_updates(t: mlkv.Table, seconds: float) -> None:
    """Make every optimizer step of `t` take `seconds`, so the applier falls behind and lag shows."""
    apply = t.optimizer.apply

    def slow(rows, grads, step):
        time.sleep(seconds)
        return apply(rows, grads, step)

    object.__setattr__(t.optimizer, "apply", slow)  # optimizers are frozen dataclasses


@pytest.mark.parametrize("bound", [1, 2, 4])
def test_async_reads_miss_at_most_bound_updates_and_do_miss_some(tmp_path, bound):
    with mlkv.open(tmp_path / "s", engine="slab", cache_bytes=4 * 16, staleness_bound=bound) as store:
        t = counter_table(store)
        slow_updates(t, 0.002)
        lags = []
        for submitted in range(40):
            seen = t.get(KEYS)[:, 0]
            lags.extend((submitted - seen).tolist())
            t.update_async(KEYS, minus_ones(len(KEYS)))
        store.flush()
        np.testing.assert_array_equal(t.get(KEYS, track=False)[:, 0], 40)  # nothing lost, nothing doubled
        assert min(lags) >= 0
        assert max(lags) <= bound, f"a read missed {max(lags)} updates with staleness_bound={bound}"
        assert max(lags) >= 1, "no read ever overlapped a queued update: the step was not asynchronous"
        hist = store.stats()["staleness_lag_hist"]
        assert sum(hist[bound + 1 :]) == 0 and sum(hist[1:]) > 0


def test_two_trainers_async_lag_bounded_over_all_updates(tmp_path):
    """Two readers, each get -> update_async on the same hot keys: a read misses at most s of all the
    updates (both trainers') submitted before it started."""
    bound = 2
    with mlkv.open(tmp_path / "s", engine="slab", cache_bytes=4 * 16, staleness_bound=bound) as store:
        t = counter_table(store)
        slow_updates(t, 0.001)
        lock = threading.Lock()
        submitted = [0]
        lags: list[int] = []

        def trainer(name):
            for _ in range(30):
                with lock:
                    before = submitted[0]
                seen = t.get(KEYS[:4], reader=name)[:, 0]
                with lock:
                    lags.extend((before - seen).tolist())
                t.update_async(KEYS[:4], minus_ones(4), reader=name)
                with lock:
                    submitted[0] += 1

        workers = [Worker(trainer, f"T{i}") for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.finish()
        store.flush()
        np.testing.assert_array_equal(t.get(KEYS[:4], track=False)[:, 0], 60)
        assert max(lags) <= bound


def test_bound_zero_update_async_is_synchronous(tmp_path):
    with mlkv.open(tmp_path / "s", engine="slab", staleness_bound=0) as store:
        t = counter_table(store)
        t.update_async(KEYS, minus_ones(len(KEYS)))
        assert store.stats()["async_updates"] == 0 and store.stats()["applier_pending"] == 0
        np.testing.assert_array_equal(t.get(KEYS, track=False)[:, 0], 1)


def test_checkpoint_holds_every_async_update_before_it(tmp_path):
    path = tmp_path / "s"
    with mlkv.open(path, engine="slab", cache_bytes=4 * 16, staleness_bound=4) as store:
        t = counter_table(store)
        slow_updates(t, 0.002)
        for _ in range(10):
            t.get(KEYS)
            t.update_async(KEYS, minus_ones(len(KEYS)))
        store.checkpoint({"n": 10})
        for _ in range(3):  # after the checkpoint, then dropped by a close without checkpoint
            t.update_async(KEYS, minus_ones(len(KEYS)))
        store.close(checkpoint=False)
    with mlkv.open(path, engine="slab", readonly=True) as again:
        np.testing.assert_array_equal(again.table("emb").get(KEYS, track=False)[:, 0], 10)


def test_sync_write_after_async_keeps_program_order(tmp_path):
    with mlkv.open(tmp_path / "s", engine="memory", staleness_bound=3) as store:
        t = counter_table(store)
        slow_updates(t, 0.005)
        for _ in range(3):
            t.update_async(KEYS, minus_ones(len(KEYS)))
        t.put(KEYS, np.full((len(KEYS), 1), 100, np.float32))  # waits for the three queued updates
        t.update(KEYS, minus_ones(len(KEYS)))
        np.testing.assert_array_equal(t.get(KEYS, track=False)[:, 0], 101)


def test_applier_failure_surfaces_at_next_call_and_close_is_clean(tmp_path):
    path = tmp_path / "s"
    store = mlkv.open(path, engine="slab", staleness_bound=2)
    t = counter_table(store)
    t.update(KEYS, minus_ones(len(KEYS)))
    store.checkpoint()
    real = t.optimizer.apply

    def broken(rows, grads, step):
        raise OSError(5, "injected I/O error")

    object.__setattr__(t.optimizer, "apply", broken)
    t.update_async(KEYS, minus_ones(len(KEYS)))
    deadline = time.monotonic() + 10
    while store.stats()["applier_pending"] and time.monotonic() < deadline:
        time.sleep(0.01)
    object.__setattr__(t.optimizer, "apply", real)
    with pytest.raises(ApplierError, match="injected I/O error"):
        t.update_async(KEYS, minus_ones(len(KEYS)))
    with pytest.raises(ApplierError):
        store.checkpoint()
    assert isinstance(ApplierError("x"), mlkv.MlkvError)
    np.testing.assert_array_equal(t.get(KEYS, track=False)[:, 0], 1)  # reads still work
    store.close()  # already reported: close releases without a checkpoint and without raising again
    assert not [th for th in threading.enumerate() if th.name.startswith("mlkv-applier")]
    with mlkv.open(path, engine="slab", readonly=True) as again:
        np.testing.assert_array_equal(again.table("emb").get(KEYS, track=False)[:, 0], 1)


def test_close_applies_queued_updates_and_leaves_no_thread(tmp_path):
    path = tmp_path / "s"
    with mlkv.open(path, engine="slab", staleness_bound=4) as store:
        t = counter_table(store)
        slow_updates(t, 0.01)
        for _ in range(4):
            t.update_async(KEYS, minus_ones(len(KEYS)))
    assert not [th for th in threading.enumerate() if th.name.startswith("mlkv-applier")]
    with mlkv.open(path, engine="slab", readonly=True) as again:
        np.testing.assert_array_equal(again.table("emb").get(KEYS, track=False)[:, 0], 4)


# ---- through the torch layer -----------------------------------------------------------------------------
def _train(path, bound: int, steps: int = 30) -> tuple[list[float], np.ndarray, dict]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with mlkv.open(path, engine="slab", cache_bytes=64 * 40, staleness_bound=bound) as store:
        t = store.table("e", dim=8, optimizer=mlkv.optim.Adagrad(lr=0.1), init=mlkv.init.Normal(0, 0.1))
        emb = mlkv.torch.EmbeddingBag(t, mode="sum")
        head = torch.nn.Linear(8, 1)
        opt = mlkv.torch.SparseOptimizer([emb])
        dense = torch.optim.SGD(head.parameters(), lr=0.05)
        batches = [rng.zipf(1.3, size=(64, 4)) % 300 for _ in range(steps)]
        targets = [torch.from_numpy((b.sum(axis=1) % 2).astype(np.float32)) for b in batches]
        losses = []
        for b, y in mlkv.torch.Prefetcher(
            zip(batches, targets, strict=True), keys=lambda bt: {"e": bt[0]}, tables=store, depth=4
        ):
            out = head(emb(torch.from_numpy(b))).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
            opt.zero_grad()
            dense.zero_grad()
            loss.backward()
            dense.step()
            opt.step()
            losses.append(float(loss.detach()))
        store.flush()
        rows = t.get(np.arange(300), track=False)
        return losses, rows, store.stats()


def test_sparse_optimizer_async_at_s1_trains_like_s0(tmp_path):
    sync_losses, sync_rows, sync_stats = _train(tmp_path / "a", 0)
    again_losses, again_rows, _ = _train(tmp_path / "b", 0)
    assert sync_losses == again_losses  # s=0: synchronous, deterministic
    np.testing.assert_array_equal(sync_rows, again_rows)
    assert sync_stats["async_updates"] == 0 and sum(sync_stats["staleness_lag_hist"][1:]) == 0
    async_losses, async_rows, stats = _train(tmp_path / "c", 1)
    assert stats["async_updates"] == 30
    hist = stats["staleness_lag_hist"]
    assert hist[1] > 0 and sum(hist[2:]) == 0  # reads did overlap queued updates, never more than 1
    assert not np.array_equal(async_rows, sync_rows)
    np.testing.assert_allclose(np.mean(async_losses[-10:]), np.mean(sync_losses[-10:]), rtol=0.05)


# ---- a kill in the middle of asynchronous steps -----------------------------------------------------------
_WRITER = r"""
import sys, numpy as np, mlkv
path = sys.argv[1]
store = mlkv.open(path, engine="slab", cache_bytes=4 * 16, staleness_bound=3)
t = store.table("emb", dim=1, optimizer=mlkv.optim.SGD(lr=1.0), init=mlkv.init.Zeros())
keys = np.arange(64)
n = 0
while True:
    t.get(keys)
    t.update_async(keys, -np.ones((64, 1), np.float32))
    n += 1
    if n % 7 == 0:
        store.checkpoint({"n": n})
        print(n, flush=True)
"""


@pytest.mark.parametrize("trial", range(3))
def test_kill_mid_async_steps_restores_last_checkpoint(tmp_path, trial):
    path = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2 + 3 * trial):  # a few checkpoints, then a kill at a moment the writer chooses
            assert proc.stdout.readline(), "the writer died"
        time.sleep(0.01 * trial)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with mlkv.open(path, engine="slab", readonly=True) as store:
        n = store.last_checkpoint()[1]["n"]
        np.testing.assert_array_equal(store.table("emb").get(np.arange(64), track=False)[:, 0], n)
    assert subprocess.run([sys.executable, "-m", "mlkv", "check", str(path)]).returncode == 0
