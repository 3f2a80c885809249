"""cache_bytes bounds the memory tier: tables 10x larger than the budget stream through it, several tables
share it, a batch larger than the whole tier still works - and every row stays bit-equal to an unbounded
in-memory store doing the same operations.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from mlkv.optim import SGD, Adagrad, Adam

MiB = 1 << 20


def spread_keys(n: int, seed: int = 0) -> np.ndarray:
    """n distinct keys spread over the 64-bit range (an odd multiplier is a bijection mod 2**64)."""
    with np.errstate(over="ignore"):
        keys = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(seed)
    return keys


def assert_same_tables(a, b, keys: np.ndarray) -> None:
    """Rows and optimizer state of `keys`, and the full row sets, bit-equal between tables a and b."""
    np.testing.assert_array_equal(a.get(keys, track=False), b.get(keys, track=False))
    sa, sb = a.optimizer_state(keys), b.optimizer_state(keys)
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name])
    assert len(a) == len(b)
    da = {k: r.tobytes() for ks, rs in a.items() for k, r in zip(ks.tolist(), rs, strict=True)}
    db = {k: r.tobytes() for ks, rs in b.items() for k, r in zip(ks.tolist(), rs, strict=True)}
    assert da == db


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_table_ten_times_the_budget_streams_within_it(engine, tmp_path, store_factory):
    cache = 1 * MiB
    dim = 16
    opt = Adam(lr=0.01)
    row_bytes = 4 * (dim + opt.state_width(dim))  # 192
    n = 10 * MiB // row_bytes + 1  # 10 MiB of rows incl. optimizer state
    keys = spread_keys(n)
    rng = np.random.default_rng(0)
    s = store_factory(engine, tmp_path / "s", cache_bytes=cache)
    ref = store_factory("memory", tmp_path / "ref", cache_bytes="4GiB")
    t = s.table("t", dim=dim, optimizer=opt)
    r = ref.table("t", dim=dim, optimizer=opt)
    batch = 4096
    for epoch in range(2):  # the second pass reads back every row the first one evicted
        order = rng.permutation(n)
        for i in range(0, n, batch):
            ks = keys[order[i : i + batch]]
            ks = np.concatenate([ks, ks[:100]])  # duplicates within the batch
            np.testing.assert_array_equal(t.get(ks), r.get(ks))
            g = rng.standard_normal((len(ks), dim)).astype(np.float32)
            t.update(ks, g)
            r.update(ks, g)
            st = s.stats()
            assert st["memory_tier_bytes"] <= cache, (epoch, i, st["memory_tier_bytes"])
            assert st["memory_tier_rows"] * row_bytes <= cache
    st = s.stats()
    assert st["evictions"] >= n  # the tier really was far smaller than the table
    assert st["rows_written_back"] >= n
    assert st["memory_tier_bytes"] > cache // 2  # and it was used
    assert_same_tables(t, r, keys[:5000])
    s.checkpoint()
    assert s.stats()["memory_tier_bytes"] <= cache
    s.close()
    s = store_factory(engine, tmp_path / "s", cache_bytes=cache)
    assert_same_tables(s.table("t"), r, keys[-5000:])


def test_tables_share_one_budget_and_a_late_table_gets_room(tmp_path, store_factory):
    cache = 512 * 1024
    s = store_factory("slab", tmp_path / "s", cache_bytes=cache)
    ref = store_factory("memory", tmp_path / "ref", cache_bytes="4GiB")
    specs = {"a": (32, Adagrad(lr=0.1)), "b": (8, SGD(lr=0.1)), "late": (24, Adam(lr=0.01))}
    rng = np.random.default_rng(1)

    def step(name: str, ks: np.ndarray) -> None:
        dim = specs[name][0]
        np.testing.assert_array_equal(s.table(name).get(ks), ref.table(name).get(ks))
        g = rng.standard_normal((len(ks), dim)).astype(np.float32)
        s.table(name).update(ks, g)
        ref.table(name).update(ks, g)
        assert s.stats()["memory_tier_bytes"] <= cache

    for name in ("a", "b"):
        dim, opt = specs[name]
        s.table(name, dim=dim, optimizer=opt)
        ref.table(name, dim=dim, optimizer=opt)
    a_keys = spread_keys(20_000, seed=1)  # 5 MiB of rows: alone, "a" fills the whole budget
    for i in range(0, len(a_keys), 2000):
        step("a", a_keys[i : i + 2000])
    assert s.table("a").tier.nbytes > 0.8 * cache
    b_keys = spread_keys(30_000, seed=2)
    for i in range(0, len(b_keys), 3000):
        step("b", b_keys[i : i + 3000])
        step("a", a_keys[i : i + 3000])
    # a table opened once the budget is full still gets room: its rows are cached, not only spilled
    dim, opt = specs["late"]
    s.table("late", dim=dim, optimizer=opt)
    ref.table("late", dim=dim, optimizer=opt)
    late_keys = spread_keys(500, seed=3)
    step("late", late_keys)
    step("a", a_keys[:2000])
    step("late", late_keys)
    late = s.table("late")
    assert late.tier.resident > 0
    assert s.stats()["hits"] > 0
    tiers = {name: s.table(name).tier.nbytes for name in specs}
    assert sum(tiers.values()) == s.stats()["memory_tier_bytes"] <= cache
    assert all(v > 0 for v in tiers.values()), tiers
    for name, ks in (("a", a_keys[:3000]), ("b", b_keys[:3000]), ("late", late_keys)):
        assert_same_tables(s.table(name), ref.table(name), ks)


def test_many_tables_filling_a_full_budget_resize_a_few_times_each(tmp_path, store_factory, monkeypatch):
    """26 tables of Zipf-drawn keys (the DLRM main job's shape) share a budget a fifth of their rows. Every
    resize copies a whole tier, so room must change hands in steps: each tier resizes O(log(share)) times,
    not on every batch that misses (before: 2,266 resizes in 60 steps, 38 a step). Each tier ends within
    a row of its fair share, the total within the budget."""
    from mlkv.store import memory_tier

    resizes = []
    real = memory_tier.MemoryTier.resize
    monkeypatch.setattr(memory_tier.MemoryTier, "resize", lambda t, cap: resizes.append(cap) or real(t, cap))
    n_tables, vocab, dim = 26, 8_000, 8
    cache = n_tables * vocab * 2 * dim * 4 // 5  # rows with Adagrad state: a fifth of them fit
    s = store_factory("slab", tmp_path / "s", cache_bytes=cache)
    tables = [s.table(f"t{i}", dim=dim, optimizer=Adagrad(lr=0.1)) for i in range(n_tables)]
    rng = np.random.default_rng(7)
    for _ in range(80):
        batch = np.minimum(rng.zipf(1.2, (2048, n_tables)) - 1, vocab - 1).astype(np.int64)
        for i, t in enumerate(tables):
            ks = np.unique(batch[:, i])
            t.get(ks, track=False)
            t.update(ks, np.ones((len(ks), dim), np.float32))
    fair_rows = cache // n_tables // tables[0].row_bytes
    doublings = int(np.ceil(np.log2(fair_rows / 1024))) + 3  # 1024 rows to the share, a trim, slack
    assert len(resizes) <= n_tables * doublings, f"{len(resizes)} resizes for {n_tables} tables"
    used = s.stats()["memory_tier_bytes"]
    assert used <= cache
    caps = [t.tier.capacity for t in tables]
    assert min(caps) >= fair_rows - 1 and used > cache - n_tables * tables[0].row_bytes, caps


@pytest.mark.parametrize("engine", ["slab", "rocksdb", "memory"])
@pytest.mark.parametrize("cache", [0, 64 * 1024])
def test_batch_bigger_than_the_whole_tier(engine, cache, tmp_path, store_factory):
    dim = 16
    opt = Adam(lr=0.01)
    s = store_factory(engine, tmp_path / "s", cache_bytes=cache)
    ref = store_factory("memory", tmp_path / "ref", cache_bytes="4GiB")
    t = s.table("t", dim=dim, optimizer=opt)
    r = ref.table("t", dim=dim, optimizer=opt)
    rng = np.random.default_rng(2)
    keys = spread_keys(20_000, seed=4)  # 3.75 MiB of rows in one batch
    for _ in range(3):
        ks = np.concatenate([keys, keys[rng.integers(0, len(keys), 500)]])
        np.testing.assert_array_equal(t.get(ks), r.get(ks))
        g = rng.standard_normal((len(ks), dim)).astype(np.float32)
        t.update(ks, g)
        r.update(ks, g)
        v = rng.standard_normal((1000, dim)).astype(np.float32)
        t.put(keys[:1000], v)
        r.put(keys[:1000], v)
        assert s.stats()["memory_tier_bytes"] <= cache
    assert len(t) == len(keys)
    assert_same_tables(t, r, keys)
    s.close()
    s = store_factory(engine, tmp_path / "s", cache_bytes=cache)
    assert_same_tables(s.table("t"), r, keys)


def _rss_anon() -> int:
    """Anonymous resident bytes of this process. File-backed pages (the slab's memory map: page cache the
    kernel may drop at any time) are not the process's own memory and are left out."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_resident_memory_follows_the_budget_not_the_table(tmp_path, store_factory):
    """128 MiB of rows through a 1 MiB tier: anonymous RSS grows by at most the budget, the per-key
    bookkeeping and a fixed 32 MiB (write-back queue, numpy temporaries, allocator slack). Per key: the
    engine's key index is 32-64 bytes, and while it doubles the old and the new table coexist (up to 96),
    plus 8 bytes a changed key until the next checkpoint and per-slot flags: 128 bytes a key allowed.
    Keeping the rows resident would need 128 MiB more than that."""
    cache = 1 * MiB
    dim = 64
    n = 128 * MiB // (4 * dim)  # 524288 rows, SGD: no state
    keys = spread_keys(n, seed=5)
    s = store_factory("slab", tmp_path / "s", cache_bytes=cache)
    t = s.table("t", dim=dim, optimizer=SGD(lr=0.1))
    g = np.ones((16384, dim), dtype=np.float32)
    gc.collect()
    base = _rss_anon()
    peak = 0
    for i in range(0, n, len(g)):
        ks = keys[i : i + len(g)]
        t.get(ks)
        t.update(ks, g[: len(ks)])
        peak = max(peak, _rss_anon() - base)
        assert s.stats()["memory_tier_bytes"] <= cache
    allowance = cache + 128 * n + 32 * MiB
    assert peak <= allowance, f"anonymous RSS grew {peak / MiB:.1f} MiB, allowed {allowance / MiB:.1f} MiB"
    assert len(t) == n


def test_a_table_whose_fair_share_is_under_one_row_still_gets_a_row(tmp_path, store_factory):
    """Three tables of 400-byte rows in a 1000-byte budget: the share (333 bytes) is under a row, but the
    budget holds two rows, so the first table does not keep both."""
    s = store_factory("slab", tmp_path / "s", cache_bytes=1000)
    tables = [s.table(name, dim=50, optimizer=Adagrad(lr=0.1)) for name in "abc"]  # 50 x 2 x 4 bytes
    assert tables[0].row_bytes == 400
    for t in tables[:2]:
        t.get(np.arange(5), track=False)
    assert [t.tier.capacity for t in tables[:2]] == [1, 1]
    assert s.stats()["memory_tier_bytes"] <= 1000
