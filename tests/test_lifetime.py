"""Admission and expiry for unbounded id spaces (issue 13): admit_after, ttl_steps, max_rows, expire().

Every case runs against a dict model of the table: per key, how many batches named it, whether it is
stored, its value (SGD lr=1 with gradient -1 adds one per applied update) and the table step of its last
write.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlkv
from mlkv.store.admission import AdmissionSketch

ENGINES = ["slab", "rocksdb", "memory"]


def open_store(path, engine="slab", **kw):
    return mlkv.open(path, engine=engine, **kw)


def counter(store, name="t", **kw) -> mlkv.Table:
    return store.table(name, dim=2, optimizer=mlkv.optim.SGD(lr=1.0), init=mlkv.init.Normal(0, 0.1), **kw)


def init_rows(tmp_path, keys, name="t") -> np.ndarray:
    """The deterministic init rows of `keys` in a table without admission (same name and init)."""
    with mlkv.open(tmp_path / "reference", engine="memory") as ref:
        return counter(ref, name).get(keys, track=False)


class Model:
    """The dict model: seen counts, stored keys, applied updates and last-write step per key."""

    def __init__(self, admit_after: int):
        self.n = admit_after
        self.seen: dict[int, int] = {}
        self.updates: dict[int, int] = {}  # stored keys -> updates applied
        self.written: dict[int, int] = {}  # stored keys -> table step of last write
        self.step = 0
        self.stats = dict.fromkeys(("rows_admitted", "rows_rejected", "grads_dropped"), 0)

    def get(self, keys) -> None:
        for k in sorted(set(keys.tolist())):
            if k in self.updates:
                continue
            self.seen[k] = self.seen.get(k, 0) + 1
            if self.seen[k] >= self.n:
                self.updates[k] = 0
                self.written[k] = self.step
                self.stats["rows_admitted"] += 1
            else:
                self.stats["rows_rejected"] += 1

    def update(self, keys) -> None:
        """Gradient -1 per occurrence: duplicates are summed, so a row gains its key's multiplicity."""
        ks, times = np.unique(keys, return_counts=True)
        stored = [(k, n) for k, n in zip(ks.tolist(), times.tolist(), strict=True) if k in self.updates]
        self.stats["grads_dropped"] += len(ks) - len(stored)
        if stored:
            self.step += 1
            for k, n in stored:
                self.updates[k] += n
                self.written[k] = self.step


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("admit_after", [1, 2, 4])
def test_admission_matches_dict_model(tmp_path, engine, admit_after):
    rng = np.random.default_rng(admit_after)
    model = Model(admit_after)
    batches = [rng.zipf(1.5, size=40) % 200 for _ in range(30)]
    with open_store(tmp_path / "s", engine, cache_bytes=12 * 30) as store:  # a tiny tier: evictions too
        t = counter(store, admit_after=admit_after)
        for b in batches:
            rows = t.get(b)
            model.get(b)
            t.update(b, -np.ones((len(b), 2), np.float32))
            model.update(b)
            del rows
        keys = np.arange(200)
        np.testing.assert_array_equal(t.contains(keys), [k in model.updates for k in keys])
        assert len(t) == len(model.updates)
        init = init_rows(tmp_path, keys)
        got = t.get(keys, track=False)  # (admit_after=1 creates the unseen keys here, as always)
        expect = init + np.array([model.updates.get(k, 0) for k in keys], np.float32)[:, None]
        np.testing.assert_allclose(got, expect, rtol=1e-6)
        stats = store.stats()
        for name, value in model.stats.items():
            assert stats[name] == (value if admit_after > 1 else 0), name
        assert t.step == model.step


def test_untracked_reads_do_not_count_or_store(tmp_path):
    with open_store(tmp_path / "s", cache_bytes="1MiB") as store:
        t = counter(store, admit_after=2)
        for _ in range(3):
            t.get([7], track=False)
        assert len(t) == 0 and not t.contains([7])[0]
        t.get([7])
        assert len(t) == 0
        t.get([7])
        assert len(t) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_ttl_and_max_rows_expire_what_the_model_says(tmp_path, engine):
    rng = np.random.default_rng(5)
    ttl, cap = 6, 40
    model = Model(1)
    with open_store(tmp_path / "s", engine, cache_bytes=12 * 20) as store:
        t = counter(store, ttl_steps=ttl, max_rows=cap)
        for i in range(25):
            b = rng.integers(0, 30 + 8 * i, size=16)  # the id space keeps growing
            t.get(b)
            model.get(b)
            t.update(b, -np.ones((len(b), 2), np.float32))
            model.update(b)
        assert t.step == model.step
        stale = {k for k, w in model.written.items() if w <= model.step - ttl}
        left = sorted((w, k) for k, w in model.written.items() if k not in stale)
        capped = {k for _, k in left[: max(len(left) - cap, 0)]}
        removed = t.expire()
        assert removed == len(stale) + len(capped)
        survivors = sorted(set(model.written) - stale - capped)
        keys = np.array(sorted(model.written))
        np.testing.assert_array_equal(t.contains(keys), np.isin(keys, survivors))
        assert len(t) == len(survivors) <= cap
        stats = store.stats()
        assert stats["rows_expired"] == len(stale) and stats["rows_evicted_by_cap"] == len(capped)
        # survivors keep their values
        vals = t.get(np.array(survivors), track=False)
        init = init_rows(tmp_path, np.array(survivors))
        np.testing.assert_allclose(vals, init + np.array([model.updates[k] for k in survivors])[:, None])


def test_expire_on_checkpoint_is_durable_and_settings_persist(tmp_path):
    path = tmp_path / "s"
    with open_store(path, cache_bytes="1MiB") as store:
        t = counter(store, ttl_steps=2, admit_after=2, expire_on_checkpoint=True)
        for _ in range(2):
            t.get([1, 2])
        t.update([1, 2], -np.ones((2, 2), np.float32))  # step 1
        for _ in range(3):
            t.get([1])
            t.update([1], -np.ones((1, 2), np.float32))
        store.checkpoint()  # key 2, last written at step 1 <= 4 - 2, is expired inside the checkpoint
        assert t.contains([1, 2]).tolist() == [True, False]
    with open_store(path, readonly=True) as store:
        t = store.table("t")
        assert (t.admit_after, t.ttl_steps, t.max_rows, t.expire_on_checkpoint) == (2, 2, None, True)
        assert len(t) == 1


def test_bad_settings_are_refused_and_change_nothing(tmp_path):
    with open_store(tmp_path / "s") as store:
        for kw in ({"admit_after": 0}, {"admit_after": 256}, {"ttl_steps": 0}, {"max_rows": -1},
                   {"admit_after": True}, {"ttl_steps": 1.5}):  # fmt: skip
            with pytest.raises(mlkv.MlkvError, match=next(iter(kw))) as e:
                counter(store, **kw)
            assert isinstance(e.value, ValueError)
        with pytest.raises(TypeError):
            counter(store, expire_on_checkpoint="yes")
        assert store.tables() == []
        counter(store, name="plain")
        with pytest.raises(mlkv.SchemaError, match="ttl_steps"):
            counter(store, name="plain", ttl_steps=5)
        assert counter(store, name="plain").expire() == 0


def test_expiry_rows_carry_one_more_column_on_disk(tmp_path):
    with open_store(tmp_path / "s") as store:
        plain = counter(store, name="plain")
        aged = counter(store, name="aged", ttl_steps=3)
        assert aged.width == plain.width + 1
        assert aged.tier.row_bytes == plain.tier.row_bytes + 4


def test_sketch_never_undercounts_and_stays_within_its_error_bound():
    rng = np.random.default_rng(0)
    width = 1 << 10
    sketch = AdmissionSketch(width)
    truth: dict[int, int] = {}
    sightings = 0
    for _ in range(200):
        keys = np.unique(rng.integers(0, 1 << 62, size=20, dtype=np.int64)).astype(np.uint64)
        keys = np.concatenate([keys, np.arange(5, dtype=np.uint64)])  # a few keys seen every batch
        keys = np.unique(keys)
        est = sketch.add(keys)
        sightings += len(keys)
        for k, e in zip(keys.tolist(), est.tolist(), strict=True):
            truth[k] = truth.get(k, 0) + 1
            assert e >= min(truth[k], 255)
    probe = np.array(list(truth), dtype=np.uint64)
    over = sketch.estimate(probe).astype(np.int64) - np.minimum([truth[k] for k in truth], 255)
    bound = AdmissionSketch.overcount_bound(width, sightings)
    assert (over <= bound).mean() >= 0.95  # count-min: within e/w * sightings with probability 1 - e^-4
