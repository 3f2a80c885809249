"""DedupMemo: a batch deduplicated once by the Prefetcher is reused by the module's forward, and only for
keys equal value for value to those it was made from; the memo stays bounded."""

from __future__ import annotations

import numpy as np
import torch

import mlkv
from mlkv.engine.key_index import unique_inverse, unique_keys
from mlkv.torch import EmbeddingBag, Prefetcher, SparseOptimizer
from mlkv.torch.dedup_memo import MEMO, DedupMemo


def zipf_keys(seed: int, n: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = rng.zipf(1.2, n).astype(np.int64) - 2**40  # negative keys too: uint64 order is not int64 order
    keys[::7] *= -1
    return keys


def test_take_returns_what_put_computed_for_equal_keys():
    memo = DedupMemo()
    keys = zipf_keys(0)
    uk, inv = memo.put(keys)
    expected = unique_inverse(keys)
    np.testing.assert_array_equal(uk, expected[0])
    np.testing.assert_array_equal(inv, expected[1])
    got = memo.take(keys.copy())  # another buffer, same values
    assert got is not None
    np.testing.assert_array_equal(got[0], uk)
    np.testing.assert_array_equal(uk[got[1]], keys.view(np.uint64))
    assert memo.take(keys) is None  # taken: a batch is read once
    assert (memo.hits, memo.misses) == (1, 1)


def test_keys_that_differ_only_inside_are_not_served_another_batch():
    memo = DedupMemo()
    keys = zipf_keys(1)
    memo.put(keys)
    other = keys.copy()
    other[len(other) // 2] += 12345  # same length, first and last keys: the same filing signature
    assert memo.take(other) is None
    assert memo.take(keys) is not None


def test_a_buffer_changed_in_place_after_put_misses():
    memo = DedupMemo()
    buf = zipf_keys(2)
    memo.put(buf)
    buf[10] = 777  # the loader reuses its buffer for the next batch
    assert memo.take(buf) is None


def test_memo_is_bounded_by_entries_and_bytes():
    memo = DedupMemo(max_entries=3)
    batches = [zipf_keys(s, 1000) for s in range(5)]
    for b in batches:
        memo.put(b)
    assert len(memo) == 3
    assert memo.take(batches[0]) is None  # the oldest went first
    assert memo.take(batches[4]) is not None
    small = DedupMemo(max_bytes=100_000)  # one entry of 4096 keys holds ~90 KB
    for s in range(4):
        small.put(zipf_keys(s))
    assert len(small) == 1
    big = DedupMemo(max_bytes=1000)
    uk, inv = big.put(zipf_keys(3))  # larger than the memo: computed, not kept
    assert len(big) == 0 and len(uk) and len(inv) == 4096


def test_unique_keys_of_sorted_distinct_keys_is_a_copy_and_unsorted_keys_still_sort():
    keys = np.array([3, 1, 3, 2**63 + 5, 0], dtype=np.uint64)
    uk = unique_keys(keys)
    np.testing.assert_array_equal(uk, np.array([0, 1, 3, 2**63 + 5], dtype=np.uint64))
    again = unique_keys(uk)
    np.testing.assert_array_equal(again, uk)
    assert again is not uk and not np.shares_memory(again, uk)
    assert unique_keys(np.array([2, 2], dtype=np.int64)).tolist() == [2]


def test_forward_behind_a_prefetcher_reuses_its_dedup_and_trains_identically(tmp_path):
    def train(path, prefetch: bool) -> tuple[list[float], np.ndarray]:
        store = mlkv.open(str(path), cache_bytes="64KiB")
        table = store.table("t", dim=4, optimizer=mlkv.optim.Adagrad(lr=0.1))
        emb = EmbeddingBag(table, mode="sum")
        opt = SparseOptimizer([emb])
        data = [torch.from_numpy(zipf_keys(s, 64).reshape(16, 4) % 500) for s in range(12)]
        it = Prefetcher(data, lambda b: {"t": b}, store, depth=3) if prefetch else data
        losses = []
        for batch in it:
            loss = emb(batch).square().sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        rows = table.get(np.arange(-600, 600))
        store.close()
        return losses, rows

    MEMO.clear()
    hits = MEMO.hits
    plain = train(tmp_path / "plain", prefetch=False)
    assert MEMO.hits == hits
    ahead = train(tmp_path / "ahead", prefetch=True)
    assert MEMO.hits - hits == 12  # every forward found its batch deduplicated already
    assert plain[0] == ahead[0]
    np.testing.assert_array_equal(plain[1], ahead[1])


def test_every_table_of_a_26_table_batch_at_depth_8_is_kept_until_read():
    """The main job announces 26 tables per batch, 8 batches ahead: all 234 entries stay until taken."""
    memo = DedupMemo()
    batches = [[zipf_keys(1000 * b + t, 512) for t in range(26)] for b in range(9)]
    for tables in batches:
        for keys in tables:
            memo.put(keys)
    for tables in batches:
        for keys in tables:
            assert memo.take(keys) is not None
    assert len(memo) == 0 and memo.misses == 0
