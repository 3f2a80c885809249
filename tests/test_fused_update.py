"""Adagrad on resident rows runs as one kernel in the memory tier; it must equal the optimizer's numpy code.

Oracle: mlkv.optim.Adagrad.apply on copies of the rows (which test_torch_equivalence holds to torch's
sparse Adagrad), bit for bit, over several steps, with duplicate keys, with resident and non-resident
rows in one batch (the tier's fast path and the general path side by side), and the rows' dirty state
reaching the engine (reopened store).
"""

from __future__ import annotations

import numpy as np
import pytest

import mlkv

DIM = 8


def _reference(rows: dict[int, np.ndarray], keys: np.ndarray, grads: np.ndarray, opt) -> None:
    uk, inv = np.unique(keys, return_inverse=True)
    summed = np.zeros((len(uk), DIM), dtype=np.float32)
    for i, r in enumerate(inv):  # in order, like the store's sum
        summed[r] += grads[i]
    block = np.stack([rows[int(k)] for k in uk])
    opt.apply(block, summed, 1)
    for k, row in zip(uk, block, strict=True):
        rows[int(k)] = row


@pytest.mark.parametrize("cache_bytes", ["64MiB", 24 * 1024])  # everything resident / a small tier
def test_adagrad_update_equals_the_optimizer_on_copies(tmp_path, cache_bytes):
    opt = mlkv.optim.Adagrad(lr=0.3, eps=1e-3)
    rng = np.random.default_rng(7)
    n = 600
    init = rng.standard_normal((n, DIM)).astype(np.float32)
    with mlkv.open(tmp_path / "s", cache_bytes=cache_bytes) as store:
        t = store.table("e", dim=DIM, optimizer=opt)
        t.put(np.arange(n), init)
        model = {k: np.concatenate([init[k], np.zeros(DIM, np.float32)]) for k in range(n)}
        for step in range(12):
            keys = rng.integers(0, 60 if step % 2 else n, 300)  # hot steps hit the tier, others miss too
            grads = rng.standard_normal((300, DIM)).astype(np.float32) * np.float32(10.0 ** (step % 3))
            if step % 3:  # a tracked read first, as training does (the update resolves it); else the
                t.get(np.unique(keys))  # small tier's update finds some rows absent: the general path
            t.update(keys, grads)
            _reference(model, keys, grads, opt)
        got = t.get(np.arange(n), track=False)
        want = np.stack([model[k][:DIM] for k in range(n)])
        np.testing.assert_array_equal(got, want)
        state = t.optimizer_state(np.arange(n))["sum"]
        np.testing.assert_array_equal(state, np.stack([model[k][DIM:] for k in range(n)]))
    with mlkv.open(tmp_path / "s", cache_bytes=cache_bytes) as store:  # the dirty rows were written back
        np.testing.assert_array_equal(store.table("e").get(np.arange(n), track=False), want)
