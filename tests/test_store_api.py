"""The Store / Table API of API.md, on every engine, against plain numpy / dict oracles."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import mlkv
from mlkv.init import Normal, Uniform, Zeros
from mlkv.optim import SGD, Adagrad, Adam, RowWiseAdagrad

REPO = Path(__file__).resolve().parents[1]
U64_MAX = 2**64 - 1


def u64(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def initial_rows(table_name: str, keys: np.ndarray, dim: int, init=None) -> np.ndarray:
    init = init or Normal(0.0, 0.01)
    return init(keys, dim, salt=zlib.crc32(table_name.encode()))


def full_initial_rows(name: str, keys: np.ndarray, dim: int, opt, init=None) -> np.ndarray:
    """[embedding | optimizer state] of new rows, as the store makes them."""
    emb = initial_rows(name, keys, dim, init)
    if opt is None:
        return emb
    return np.concatenate([emb, opt.init_state(len(keys), dim)], axis=1)


def apply_by_hand(opt, rows: dict[int, np.ndarray], keys: np.ndarray, grads: np.ndarray, step: int) -> None:
    """The oracle of `Table.update`: sum duplicate keys' grads in order, apply `opt` to those rows."""
    uk = np.unique(keys)
    summed = np.zeros((len(uk), grads.shape[1]), dtype=np.float32)
    pos = {int(k): i for i, k in enumerate(uk)}
    for k, g in zip(keys.tolist(), grads, strict=True):
        summed[pos[k]] += g
    batch = np.stack([rows[int(k)] for k in uk])
    opt.apply(batch, summed, step)
    for i, k in enumerate(uk.tolist()):
        rows[k] = batch[i]


def all_items(t: mlkv.Table, batch_size: int = 65536) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for ks, rows in t.items(batch_size):
        assert len(ks) <= batch_size
        assert rows.dtype == np.float32 and rows.shape == (len(ks), t.dim)
        for k, r in zip(ks.tolist(), rows, strict=True):
            assert k not in out, f"items() yielded key {k} twice"
            out[k] = r.tobytes()
    return out


# ---- tables -------------------------------------------------------------------------------------------


def test_create_open_and_list_tables(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    assert s.tables() == []
    a = s.table("a", dim=4)
    b = s.table("b", dim=8, optimizer=Adam(lr=0.01), init=Uniform(-1.0, 1.0))
    assert s.tables() == ["a", "b"]
    assert s.table("a") is a  # the open table, not a second view with its own tier
    assert (a.dim, b.dim) == (4, 8)
    b.put(u64(1), np.full((1, 8), 3.0, np.float32))
    s.close()

    s = store_factory(engine, tmp_path / "s")
    assert s.tables() == ["a", "b"]
    b = s.table("b")  # schema from the store: no dim needed
    assert b.dim == 8
    assert b.optimizer.kind == "adam" and b.optimizer.config() == Adam(lr=0.01).config()
    np.testing.assert_array_equal(b.get(u64(1)), np.full((1, 8), 3.0, np.float32))
    # the stored init is used for new keys: Uniform(-1, 1), not the default Normal
    np.testing.assert_array_equal(b.get(u64(2)), initial_rows("b", u64(2), 8, Uniform(-1.0, 1.0)))


def test_drop_table_forgets_rows_even_under_the_same_name(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    a = s.table("a", dim=3)
    s.table("keep", dim=3).put(u64(5), np.ones((1, 3), np.float32))
    a.put(u64(1, 2), np.full((2, 3), 7.0, np.float32))
    s.checkpoint()
    s.drop_table("a")
    assert s.tables() == ["keep"]
    with pytest.raises(KeyError, match="keep"):
        s.drop_table("a")
    s.checkpoint()
    s.close()

    s = store_factory(engine, tmp_path / "s")
    assert s.tables() == ["keep"]
    a = s.table("a", dim=3)  # a new, empty table
    assert len(a) == 0
    assert not a.contains(u64(1, 2)).any()
    np.testing.assert_array_equal(a.get(u64(1, 2)), initial_rows("a", u64(1, 2), 3))
    np.testing.assert_array_equal(s.table("keep").get(u64(5)), np.ones((1, 3), np.float32))


def test_drop_table_with_queued_write_backs(engine, tmp_path, store_factory):
    """Rows of a dropped table still queued for the engine are void: they neither reach the table re-created
    under its name nor upset the queue's books (a checkpoint used to wait forever, or fail)."""
    result: list[object] = []

    def body() -> None:
        for trial in range(15):
            s = store_factory(engine, tmp_path / f"s{trial}", cache_bytes=16 * 4)  # a tier of 4 rows
            u = s.table("u", dim=4)
            keys = np.arange(2000, dtype=np.uint64)
            u.put(keys, np.full((2000, 4), 7.0, np.float32))  # nearly all spill to the write-back queue
            s.drop_table("u")
            u = s.table("u", dim=4)
            s.checkpoint()
            result.append((len(u), sum(len(k) for k, _ in u.items())))
            np.testing.assert_array_equal(u.get(keys[:3], track=False), initial_rows("u", keys[:3], 4))
            s.close()

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "checkpoint after drop_table hangs"
    assert result == [(0, 0)] * 15


def test_drop_without_checkpoint_then_close_is_durable(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    s.table("a", dim=2).put(u64(1), np.ones((1, 2), np.float32))
    s.checkpoint()
    s.drop_table("a")
    s.close()  # close checkpoints the drop
    s = store_factory(engine, tmp_path / "s")
    assert s.tables() == []


# ---- initialisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [None, Normal(0.5, 2.0, seed=3), Uniform(-0.1, 0.3), Zeros()])
def test_get_creates_rows_deterministically_from_init(engine, tmp_path, store_factory, init):
    keys = np.concatenate([np.arange(50, dtype=np.uint64), u64(2**63, U64_MAX, 12345678901234567890)])
    dim = 7  # odd: the last column of the Normal pairs
    got = []
    for sub in ("one", "two"):
        s = store_factory(engine, tmp_path / sub)
        t = s.table("emb", dim=dim, init=init)
        got.append(t.get(keys))
    expected = initial_rows("emb", keys, dim, init)
    assert got[0].dtype == np.float32 and got[0].shape == (len(keys), dim)
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got[1], expected)
    # independent of batch composition and order
    s = store_factory(engine, tmp_path / "three")
    t = s.table("emb", dim=dim, init=init)
    rev = keys[::-1].copy()
    np.testing.assert_array_equal(t.get(rev[:5]), expected[::-1][:5])
    np.testing.assert_array_equal(t.get(rev), expected[::-1])
    if not isinstance(init, Zeros):
        # another table name is another salt: other rows
        other = s.table("other", dim=dim, init=init).get(keys)
        assert not np.array_equal(other, expected)


def test_init_is_the_same_in_another_process(tmp_path):
    script = textwrap.dedent(
        """
        import sys, numpy as np, mlkv
        s = mlkv.open(sys.argv[1], engine="slab")
        rows = s.table("emb", dim=5).get(np.array([0, 7, 2**64 - 1], dtype=np.uint64))
        sys.stdout.write(rows.tobytes().hex())
        s.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    ).stdout
    expected = initial_rows("emb", u64(0, 7, U64_MAX), 5)
    assert bytes.fromhex(out) == expected.tobytes()


def test_callable_init(engine, tmp_path, store_factory):
    def my_init(keys, dim):
        return np.tile((keys % np.uint64(1000)).astype(np.float32)[:, None], (1, dim))

    s = store_factory(engine, tmp_path / "s")
    t = s.table("c", dim=3, init=my_init)
    np.testing.assert_array_equal(t.get(u64(4, 1005)), np.array([[4, 4, 4], [5, 5, 5]], np.float32))


# ---- put / get / update -------------------------------------------------------------------------------


def test_put_get_round_trip_last_duplicate_wins(engine, tmp_path, store_factory):
    rng = np.random.default_rng(0)
    s = store_factory(engine, tmp_path / "s", cache_bytes=40 * 16)  # a tier of a few rows
    t = s.table("t", dim=16)
    keys = rng.permutation(np.arange(500, dtype=np.uint64))
    vals = rng.standard_normal((500, 16)).astype(np.float32)
    t.put(keys, vals)
    order = np.argsort(keys)
    np.testing.assert_array_equal(t.get(np.arange(500, dtype=np.uint64)), vals[order])
    t.put(u64(3, 9, 3), np.array([[1] * 16, [2] * 16, [5] * 16], np.float32))
    np.testing.assert_array_equal(t.get(u64(3, 9)), np.array([[5] * 16, [2] * 16], np.float32))
    assert len(t) == 500
    s.close()
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t")
    vals[order[3]] = 5
    vals[order[9]] = 2
    np.testing.assert_array_equal(t.get(np.arange(500, dtype=np.uint64)), vals[order])


def test_get_returns_a_copy(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t", dim=2)
    t.put(u64(1), np.ones((1, 2), np.float32))
    r = t.get(u64(1))
    r[:] = 99
    np.testing.assert_array_equal(t.get(u64(1)), np.ones((1, 2), np.float32))


@pytest.mark.parametrize(
    "opt",
    [SGD(lr=0.5), Adagrad(lr=0.1, initial_accumulator_value=0.1), RowWiseAdagrad(lr=0.2), Adam(lr=0.05)],
    ids=lambda o: o.kind,
)
@pytest.mark.parametrize("cache_rows", [2, 1000])
def test_update_applies_the_optimizer_like_by_hand(engine, tmp_path, store_factory, opt, cache_rows):
    dim = 6
    rng = np.random.default_rng(1)
    width = dim + opt.state_width(dim)
    s = store_factory(engine, tmp_path / "s", cache_bytes=cache_rows * 4 * width)
    t = s.table("t", dim=dim, optimizer=opt)
    model: dict[int, np.ndarray] = {}
    universe = np.concatenate([np.arange(20, dtype=np.uint64), u64(2**63, U64_MAX)])
    for k, r in zip(universe.tolist(), full_initial_rows("t", universe, dim, opt), strict=True):
        model[k] = r
    for step in range(1, 9):
        keys = rng.choice(universe, size=12)  # duplicates on purpose
        grads = rng.standard_normal((12, dim)).astype(np.float32)
        t.update(keys, grads)
        apply_by_hand(opt, model, keys, grads, step)
        if step == 4:
            s.close()
            s = store_factory(engine, tmp_path / "s", cache_bytes=cache_rows * 4 * width)
            t = s.table("t", optimizer=opt)
    assert t.step == 8
    expected = np.stack([model[k] for k in universe.tolist()])
    np.testing.assert_array_equal(t.get(universe), expected[:, :dim])
    state = t.optimizer_state(universe)
    for name, sl in opt.state_names(dim).items():
        np.testing.assert_array_equal(state[name], expected[:, dim:][:, sl])


def test_update_matches_torch(engine, tmp_path, store_factory):
    torch = pytest.importorskip("torch")
    dim, n = 5, 30
    rng = np.random.default_rng(2)
    cases = [
        (SGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
        (Adagrad(lr=0.1), lambda p: torch.optim.Adagrad(p, lr=0.1)),
        (Adam(lr=0.02), lambda p: torch.optim.SparseAdam(p, lr=0.02)),
    ]
    s = store_factory(engine, tmp_path / "s", cache_bytes=8 * 4 * 3 * dim)
    for opt, make_torch in cases:
        t = s.table(opt.kind, dim=dim, optimizer=opt)
        keys = np.arange(n, dtype=np.uint64) * np.uint64(1 << 40)
        emb = torch.nn.Embedding(n, dim, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.from_numpy(t.get(keys)))
        topt = make_torch(emb.parameters())
        for _ in range(5):
            idx = rng.integers(0, n, size=40)
            g = rng.standard_normal((40, dim)).astype(np.float32)
            topt.zero_grad()
            (emb(torch.from_numpy(idx)) * torch.from_numpy(g)).sum().backward()
            topt.step()
            t.update(keys[idx], g)
        np.testing.assert_allclose(t.get(keys), emb.weight.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_put_keeps_optimizer_state(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t", dim=3, optimizer=Adam(lr=0.1))
    t.update(u64(1, 2), np.ones((2, 3), np.float32))
    before = t.optimizer_state(u64(1, 2))
    t.put(u64(1), np.zeros((1, 3), np.float32))
    after = t.optimizer_state(u64(1, 2))
    assert set(after) == {"exp_avg", "exp_avg_sq"}
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert (before["exp_avg"] != 0).all()
    np.testing.assert_array_equal(t.get(u64(1)), np.zeros((1, 3), np.float32))


def test_optimizer_state_names_and_fresh_values(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    keys = u64(1, 2)
    assert s.table("sgd", dim=2, optimizer=SGD(lr=0.1)).optimizer_state(keys) == {}
    assert s.table("none", dim=2).optimizer_state(keys) == {}
    ada = s.table("ada", dim=2, optimizer=Adagrad(lr=0.1, initial_accumulator_value=0.25))
    np.testing.assert_array_equal(ada.optimizer_state(keys)["sum"], np.full((2, 2), 0.25, np.float32))
    rw = s.table("rw", dim=4, optimizer=RowWiseAdagrad(lr=0.1)).optimizer_state(keys)
    assert rw["sum"].shape == (2, 1)
    adam = s.table("adam", dim=2, optimizer=Adam()).optimizer_state(u64(1, 2, 1))
    assert adam["exp_avg"].shape == (3, 2) and not adam["exp_avg_sq"].any()


def test_adam_step_counts_update_calls_and_survives_reopen(engine, tmp_path, store_factory):
    """A store closed and reopened mid-training ends bit-equal to one trained without a break."""
    rng = np.random.default_rng(3)
    batches = [
        (rng.integers(0, 50, size=20).astype(np.uint64), rng.standard_normal((20, 4)).astype(np.float32))
        for _ in range(10)
    ]
    ref = store_factory(engine, tmp_path / "ref", cache_bytes=16 * 48)
    rt = ref.table("t", dim=4, optimizer=Adam(lr=0.01))
    for k, g in batches:
        rt.update(k, g)
    s = store_factory(engine, tmp_path / "s", cache_bytes=16 * 48)
    t = s.table("t", dim=4, optimizer=Adam(lr=0.01))
    for i, (k, g) in enumerate(batches):
        t.update(k, g)
        if i in (2, 6):
            s.close()
            s = store_factory(engine, tmp_path / "s", cache_bytes=16 * 48)
            t = s.table("t")
    assert t.step == rt.step == 10
    keys = np.arange(50, dtype=np.uint64)
    np.testing.assert_array_equal(t.get(keys), rt.get(keys))
    for name, v in rt.optimizer_state(keys).items():
        np.testing.assert_array_equal(t.optimizer_state(keys)[name], v)


def test_update_with_no_keys_is_not_a_step(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t", dim=2, optimizer=Adam())
    t.update(np.empty(0, np.uint64), np.empty((0, 2), np.float32))
    assert t.step == 0 and len(t) == 0
    assert t.get(np.empty(0, np.int64)).shape == (0, 2)


# ---- delete / contains / len / items --------------------------------------------------------------------


def test_delete_contains_len(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s", cache_bytes=3 * 4 * 9)
    t = s.table("t", dim=3, optimizer=Adagrad(lr=0.1))
    assert len(t) == 0
    keys = np.arange(10, dtype=np.uint64)
    assert not t.contains(keys).any()
    t.get(keys[:4])  # get creates rows
    t.put(keys[4:6], np.ones((2, 3), np.float32))
    t.update(keys[6:8], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(t.contains(keys), [True] * 8 + [False] * 2)
    assert len(t) == 8
    t.delete(u64(1, 5, 7, 9, 1))  # 9 never existed; 1 twice
    np.testing.assert_array_equal(t.contains(keys), [1, 0, 1, 1, 1, 0, 1, 0, 0, 0])
    assert len(t) == 5
    # a deleted key comes back as new: init row and fresh optimizer state
    np.testing.assert_array_equal(t.get(u64(7)), initial_rows("t", u64(7), 3))
    assert not t.optimizer_state(u64(7))["sum"].any()
    assert len(t) == 6
    s.checkpoint()
    s.close()
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t")
    np.testing.assert_array_equal(t.contains(keys), [1, 0, 1, 1, 1, 0, 1, 1, 0, 0])
    assert len(t) == 6


def test_items_covers_every_row(engine, tmp_path, store_factory):
    rng = np.random.default_rng(4)
    s = store_factory(engine, tmp_path / "s", cache_bytes=10 * 4 * 4)
    t = s.table("t", dim=4, optimizer=SGD(lr=0.1))
    keys = np.unique(rng.integers(0, 2**64 - 1, size=300, dtype=np.uint64, endpoint=True))
    t.get(keys[:100])
    t.put(keys[100:200], rng.standard_normal((100, 4)).astype(np.float32))
    t.update(keys[200:], rng.standard_normal((len(keys) - 200, 4)).astype(np.float32))
    t.delete(keys[:10])
    live = keys[10:]
    got = all_items(t, batch_size=7)
    assert set(got) == set(live.tolist())
    expected = t.get(live, track=False)
    assert [got[k] for k in live.tolist()] == [r.tobytes() for r in expected]
    s.checkpoint()
    assert all_items(t) == got
    s.close()
    s = store_factory(engine, tmp_path / "s")
    assert all_items(s.table("t"), batch_size=1000) == got


def test_export_safetensors(engine, tmp_path, store_factory):
    rng = np.random.default_rng(5)
    s = store_factory(engine, tmp_path / "s", cache_bytes=4 * 4 * 6)
    t = s.table("t", dim=6)
    keys = np.concatenate([np.arange(40, dtype=np.uint64), u64(2**63, U64_MAX)])
    vals = rng.standard_normal((len(keys), 6)).astype(np.float32)
    t.put(keys, vals)
    out = tmp_path / "t.safetensors"
    assert t.export(str(out)) == len(keys)
    loaded = safetensors.numpy.load_file(str(out))
    assert loaded["keys"].dtype == np.int64
    assert loaded["weights"].dtype == np.float32 and loaded["weights"].shape == (len(keys), 6)
    by_key = dict(zip(loaded["keys"].view(np.uint64).tolist(), loaded["weights"], strict=True))
    assert set(by_key) == set(keys.tolist())
    assert -1 in loaded["keys"].tolist() and -(2**63) in loaded["keys"].tolist()
    for k, v in zip(keys.tolist(), vals, strict=True):
        np.testing.assert_array_equal(by_key[k], v)


# ---- checkpoints and durability -----------------------------------------------------------------------


def test_checkpoint_ids_and_metadata(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    assert s.last_checkpoint() is None
    t = s.table("t", dim=2)
    assert s.checkpoint({"step": 1, "file": "dense.pt"}) == 1
    t.put(u64(1), np.ones((1, 2), np.float32))
    meta = {"step": 2, "nested": {"lr": [0.1, 0.2]}}
    assert s.checkpoint(meta) == 2
    meta["step"] = 999  # the caller's dict changing later does not change what was stored
    meta["nested"]["lr"].append(7)
    assert s.last_checkpoint() == (2, {"step": 2, "nested": {"lr": [0.1, 0.2]}})
    assert s.checkpoint() == 3
    assert s.last_checkpoint() == (3, None)
    assert s.checkpoint({"step": 4}) == 4
    s.close()  # nothing changed since: no new checkpoint
    s = store_factory(engine, tmp_path / "s")
    assert s.last_checkpoint() == (4, {"step": 4})
    s.table("t").put(u64(2), np.ones((1, 2), np.float32))
    s.close()  # outstanding writes: close checkpoints them, without metadata
    s = store_factory(engine, tmp_path / "s")
    assert s.last_checkpoint() == (5, None)
    assert s.checkpoint({"a": "b"}) == 6
    assert s.last_checkpoint() == (6, {"a": "b"})


def test_crash_recovers_the_last_checkpoint_exactly(engine, tmp_path, store_factory, crash_store, snapshot):
    rng = np.random.default_rng(6)
    s = store_factory(engine, tmp_path / "s", cache_bytes=8 * 4 * 9)
    t = s.table("t", dim=3, optimizer=Adam(lr=0.1))
    for _ in range(4):
        t.update(rng.integers(0, 30, size=10).astype(np.uint64), rng.random((10, 3), np.float32))
    s.checkpoint({"step": 4})
    saved = snapshot(s)
    # later work, then a crash: none of it survives
    for _ in range(3):
        t.update(rng.integers(0, 60, size=10).astype(np.uint64), rng.random((10, 3), np.float32))
    t.delete(u64(1, 2, 3))
    s.table("new", dim=2).get(u64(1))
    s.drop_table("t")
    crash_store(s)
    s = store_factory(engine, tmp_path / "s")
    assert s.tables() == ["t"]
    assert snapshot(s) == saved
    assert s.last_checkpoint() == (1, {"step": 4})


def test_close_makes_writes_durable(engine, tmp_path, store_factory, snapshot):
    rng = np.random.default_rng(7)
    s = store_factory(engine, tmp_path / "s", cache_bytes=5 * 4 * 8)
    t = s.table("t", dim=4, optimizer=RowWiseAdagrad(lr=0.1))
    u = s.table("u", dim=2, init=Zeros())
    t.update(rng.integers(0, 40, size=50).astype(np.uint64), rng.standard_normal((50, 4)).astype(np.float32))
    u.put(u64(U64_MAX), np.full((1, 2), 2.5, np.float32))
    u.get(u64(3))
    before = snapshot(s)
    s.close()
    with pytest.raises(mlkv.StoreClosedError):
        t.get(u64(1))
    s = store_factory(engine, tmp_path / "s")
    after = snapshot(s)
    assert after["tables"] == before["tables"]
    assert after["last_checkpoint"] == (1, None)


# ---- schema -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reopen", [False, True])
def test_schema_errors_name_both_values(engine, tmp_path, store_factory, reopen):
    s = store_factory(engine, tmp_path / "s")
    s.table("t", dim=4, optimizer=Adagrad(lr=0.1))
    s.table("plain", dim=2)
    if reopen:
        s.close()
        s = store_factory(engine, tmp_path / "s")
    with pytest.raises(mlkv.SchemaError, match=r"dim=4.*dim=5"):
        s.table("t", dim=5)
    with pytest.raises(mlkv.SchemaError, match=r"float32.*float64"):
        s.table("t", dtype="float64")
    with pytest.raises(mlkv.SchemaError, match=r"adagrad.*adam"):
        s.table("t", optimizer=Adam())
    with pytest.raises(mlkv.SchemaError, match=r"None.*sgd"):
        s.table("plain", optimizer=SGD(lr=0.1))
    assert isinstance(mlkv.SchemaError("x"), ValueError)
    # same kind, other hyperparameters: allowed (a learning-rate schedule)
    t = s.table("t", dim=4, optimizer=Adagrad(lr=0.5))
    assert t.optimizer.lr == 0.5
    with pytest.raises(KeyError) as e:
        s.table("missing")
    assert "missing" in str(e.value) and "'t'" in str(e.value) and "'plain'" in str(e.value)
    assert s.tables() == ["plain", "t"]


def test_opening_with_another_engine_is_refused(tmp_path, store_factory):
    s = store_factory("slab", tmp_path / "s")
    s.table("t", dim=2).put(u64(1), np.ones((1, 2), np.float32))
    s.close()
    with pytest.raises(mlkv.SchemaError, match=r"slab.*rocksdb"):
        store_factory("rocksdb", tmp_path / "s")
    s = store_factory("slab", tmp_path / "s")
    np.testing.assert_array_equal(s.table("t").get(u64(1)), np.ones((1, 2), np.float32))


# ---- locking, readonly, context manager ---------------------------------------------------------------


def test_second_writer_in_this_process_is_refused(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    s.table("t", dim=2).put(u64(1), np.ones((1, 2), np.float32))
    with pytest.raises(mlkv.StoreLockedError, match=str(os.getpid())):
        store_factory(engine, tmp_path / "s")
    np.testing.assert_array_equal(s.table("t").get(u64(1)), np.ones((1, 2), np.float32))
    s.close()
    s2 = store_factory(engine, tmp_path / "s")  # free again once the holder closed
    np.testing.assert_array_equal(s2.table("t").get(u64(1)), np.ones((1, 2), np.float32))


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])  # the memory engine lives in one process
def test_second_writer_in_another_process_is_refused(engine, tmp_path, store_factory):
    script = textwrap.dedent(
        """
        import sys, numpy as np, mlkv
        s = mlkv.open(sys.argv[1], engine=sys.argv[2])
        s.table("t", dim=2).put(np.array([1], dtype=np.uint64), np.ones((1, 2), np.float32))
        print("ready", flush=True)
        sys.stdin.readline()
        s.close()
        """
    )
    path = tmp_path / "s"
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(path), engine],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(mlkv.StoreLockedError) as e:
            store_factory(engine, path)
        assert f"pid {child.pid}" in str(e.value)
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    s = store_factory(engine, path)
    np.testing.assert_array_equal(s.table("t").get(u64(1)), np.ones((1, 2), np.float32))


def test_readonly_opens_may_be_many(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s")
    s.table("t", dim=2).put(u64(1, 2), np.array([[1, 2], [3, 4]], np.float32))
    s.close()
    readers = [store_factory(engine, tmp_path / "s", readonly=True) for _ in range(3)]
    for r in readers:
        t = r.table("t")
        np.testing.assert_array_equal(t.get(u64(1, 2)), np.array([[1, 2], [3, 4]], np.float32))
        # an unseen key reads as its init row, and is not stored
        np.testing.assert_array_equal(t.get(u64(9)), initial_rows("t", u64(9), 2))
        assert len(t) == 2 and not t.contains(u64(9))[0]
    for r in readers:
        r.close()
    s = store_factory(engine, tmp_path / "s")
    assert len(s.table("t")) == 2


def test_context_manager(engine, tmp_path, store_factory):
    with mlkv.open(tmp_path / "s", engine=engine) as s:
        t = s.table("t", dim=2)
        t.put(u64(4), np.full((1, 2), 4.0, np.float32))
    with pytest.raises(mlkv.StoreClosedError):
        t.get(u64(4))
    with pytest.raises(RuntimeError, match="boom"), mlkv.open(tmp_path / "s", engine=engine) as s:
        raise RuntimeError("boom")
    assert s.closed  # the lock went with it: the next open works
    with mlkv.open(tmp_path / "s", engine=engine) as s:
        np.testing.assert_array_equal(s.table("t").get(u64(4)), np.full((1, 2), 4.0, np.float32))


# ---- keys ---------------------------------------------------------------------------------------------


def test_full_uint64_key_range_and_int64_bit_patterns(engine, tmp_path, store_factory):
    s = store_factory(engine, tmp_path / "s", cache_bytes=2 * 4 * 3)
    t = s.table("t", dim=3, optimizer=SGD(lr=1.0))
    ukeys = u64(0, 2**63, U64_MAX, 2**63 - 1, 2**63 + 1)
    ikeys = np.array([0, -(2**63), -1, 2**63 - 1, -(2**63) + 1], dtype=np.int64)
    assert (ikeys.view(np.uint64) == ukeys).all()
    vals = np.arange(15, dtype=np.float32).reshape(5, 3)
    t.put(ikeys, vals)
    np.testing.assert_array_equal(t.get(ukeys), vals)
    np.testing.assert_array_equal(t.get([0, -1, -(2**63)]), vals[[0, 2, 1]])
    np.testing.assert_array_equal(t.get([0, 2**63, 2**64 - 1]), vals[[0, 1, 2]])  # a list with big ints
    t.update(ikeys[[2, 2]], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(t.get(u64(U64_MAX)), vals[[2]] - 2)
    assert t.contains(np.array([-1], np.int64))[0]
    assert set(all_items(t)) == set(ukeys.tolist())
    assert len(t) == 5
    s.close()
    s = store_factory(engine, tmp_path / "s")
    np.testing.assert_array_equal(s.table("t").get(ikeys[[2]]), vals[[2]] - 2)


def test_torch_tensor_keys_and_values(engine, tmp_path, store_factory):
    torch = pytest.importorskip("torch")
    s = store_factory(engine, tmp_path / "s")
    t = s.table("t", dim=2, optimizer=SGD(lr=1.0))
    t.put(torch.tensor([-1, 5]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(t.get(u64(U64_MAX, 5)), np.array([[1, 2], [3, 4]], np.float32))
    np.testing.assert_array_equal(t.get(torch.tensor([5, -1], dtype=torch.int64)), [[3, 4], [1, 2]])
    np.testing.assert_array_equal(t.get(torch.tensor([5], dtype=torch.int32)), [[3, 4]])
    t.update(torch.tensor([5, 5]), torch.ones(2, 2))
    np.testing.assert_array_equal(t.get(u64(5)), [[1, 2]])
    assert t.contains(torch.tensor([-1, 6])).tolist() == [True, False]


def test_opening_a_missing_table_without_dim_says_dim_creates_it(tmp_path):
    with mlkv.open(tmp_path / "s") as store:
        store.table("a", dim=2).get([1])
        with pytest.raises(KeyError, match=r"no table 'b' .*tables: \['a'\] \(pass dim= to create it\)") as e:
            store.table("b")
        assert isinstance(e.value, mlkv.MlkvError)
        assert store.tables() == ["a"]  # nothing created
    readonly = mlkv.open(tmp_path / "s", readonly=True, create=False)
    with readonly, pytest.raises(KeyError, match=r"\(the store is open readonly\)"):
        readonly.table("b")


def test_mlkv_open_documents_every_argument_and_takes_those_of_store():
    import inspect

    params = inspect.signature(mlkv.open).parameters
    assert list(params) == list(inspect.signature(mlkv.Store).parameters)  # no Store argument left out
    doc = mlkv.open.__doc__
    for name in params:
        assert f"\n        {name} (" in doc, name
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc
