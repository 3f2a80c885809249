"""API.md "Boundaries": every wrong input raises the documented error, naming what was expected and what
came, and leaves the store exactly as it was: the full contents of every table (rows, optimizer state,
step, length) are compared bit for bit before and after the refused call, and again after a reopen.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlkv
from mlkv.optim import Adam

DIM = 4
U64_MAX = 2**64 - 1


def u64(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def ones(n: int, dim: int = DIM) -> np.ndarray:
    return np.ones((n, dim), dtype=np.float32)


@pytest.fixture
def populated(engine, tmp_path, store_factory):
    """A store with an Adam table and a plain one, some rows checkpointed, some only in the (small) tier."""
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    s = store_factory(engine, path, cache_bytes=6 * 4 * 3 * DIM)
    t = s.table("t", dim=DIM, optimizer=Adam(lr=0.1))
    p = s.table("plain", dim=DIM)
    for _ in range(3):
        t.update(
            rng.integers(0, 20, size=8).astype(np.uint64), rng.standard_normal((8, DIM)).astype(np.float32)
        )
    p.put(u64(1, 2, U64_MAX), rng.standard_normal((3, DIM)).astype(np.float32))
    s.checkpoint({"step": 3})
    t.update(u64(1, 2, 3, 30), rng.standard_normal((4, DIM)).astype(np.float32))  # not yet checkpointed
    p.get(u64(40, 41))
    return s, path


def refused(store, call, exc_type, *patterns, snapshot):
    """Run `call`; it must raise `exc_type` whose message matches every pattern, and change nothing."""
    before = snapshot(store)
    with pytest.raises(exc_type) as e:
        call()
    assert isinstance(e.value, mlkv.MlkvError), f"{type(e.value).__name__} does not derive from MlkvError"
    msg = str(e.value)
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"
    assert snapshot(store) == before
    return before


def same_after_reopen(store, path, before, store_factory, snapshot, **kw):
    engine = store.engine_name
    store.close()
    again = store_factory(engine, path, **kw)
    assert snapshot(again)["tables"] == before["tables"]
    return again


# ---- keys -----------------------------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param(np.array([1.0, 2.0]), TypeError, [r"integer", r"float64"], id="float64"),
    pytest.param(np.array([1.0, 2.0], np.float32), TypeError, [r"integer", r"float32"], id="float32"),
    pytest.param(np.array([True, False]), TypeError, [r"integer", r"bool"], id="bool"),
    pytest.param([True, False], TypeError, [r"integer", r"bool"], id="bool-list"),
    pytest.param(["1", "2"], TypeError, [r"integer", r"<U1|str"], id="str"),
    pytest.param([1.5, 2.0], TypeError, [r"integer", r"float64"], id="float-list"),
    pytest.param(np.array([[1, 2], [3, 4]], np.int64), ValueError, [r"\(n,\)", r"\(2, 2\)"], id="2-D"),
    pytest.param(np.int64(3), ValueError, [r"\(n,\)", r"\(\)"], id="0-D"),
    pytest.param([2**64], TypeError, [r"range"], id="above-u64"),
    pytest.param([-(2**63) - 1], TypeError, [r"range"], id="below-i64"),
]

KEY_OPS = {
    "get": lambda t, k: t.get(k),
    "get-untracked": lambda t, k: t.get(k, track=False),
    "put": lambda t, k: t.put(k, ones(2)),
    "update": lambda t, k: t.update(k, ones(2)),
    "delete": lambda t, k: t.delete(k),
    "contains": lambda t, k: t.contains(k),
    "optimizer_state": lambda t, k: t.optimizer_state(k),
    "lookahead": lambda t, k: t.lookahead(k),
    "release": lambda t, k: t.release(k),
}


@pytest.mark.parametrize("op", sorted(KEY_OPS))
@pytest.mark.parametrize(("keys", "exc", "patterns"), BAD_KEYS)
def test_bad_keys_are_refused(populated, op, keys, exc, patterns, snapshot):
    s, _ = populated
    refused(s, lambda: KEY_OPS[op](s.table("t"), keys), exc, *patterns, snapshot=snapshot)


def test_bad_keys_leave_the_store_unchanged_after_reopen(populated, store_factory, snapshot):
    s, path = populated
    t = s.table("t")
    before = snapshot(s)
    for keys, exc in ((np.array([1.0, 50.0]), TypeError), (np.array([[1, 50]]), ValueError)):
        for op in KEY_OPS.values():
            with pytest.raises(exc):
                op(t, keys)
    same_after_reopen(s, path, before, store_factory, snapshot)


def test_torch_keys_of_the_wrong_dtype(populated, snapshot):
    torch = pytest.importorskip("torch")
    s, _ = populated
    t = s.table("t")
    refused(s, lambda: t.get(torch.tensor([1.0, 2.0])), TypeError, "float32", snapshot=snapshot)
    refused(s, lambda: t.put(torch.tensor([True]), ones(1)), TypeError, "bool", snapshot=snapshot)


# ---- values and gradients -------------------------------------------------------------------------------


def _nan_at(row: int, col: int, value: float) -> np.ndarray:
    v = ones(3)
    v[row, col] = value
    return v


BAD_ROWS = [
    pytest.param(ones(3).astype(np.float64), TypeError, [r"float32", r"float64"], id="float64"),
    pytest.param(ones(3).astype(np.float16), TypeError, [r"float32", r"float16"], id="float16"),
    pytest.param(ones(3).astype(np.int32), TypeError, [r"float32", r"int32"], id="int32"),
    pytest.param(ones(3).tolist(), TypeError, [r"float32", r"float64"], id="list"),
    pytest.param(ones(3, DIM + 1), ValueError, [r"\(3, 4\)", r"\(3, 5\)"], id="wrong-dim"),
    pytest.param(ones(4), ValueError, [r"\(3, 4\)", r"\(4, 4\)"], id="wrong-n"),
    pytest.param(ones(2), ValueError, [r"\(3, 4\)", r"\(2, 4\)"], id="too-few"),
    pytest.param(np.ones(DIM, np.float32), ValueError, [r"\(3, 4\)", r"\(4,\)"], id="1-D"),
    pytest.param(ones(3)[None], ValueError, [r"\(3, 4\)", r"\(1, 3, 4\)"], id="3-D"),
    pytest.param(_nan_at(2, 1, np.nan), ValueError, [r"NaN", r"row 2"], id="nan"),
    pytest.param(_nan_at(0, 3, np.inf), ValueError, [r"inf", r"row 0"], id="inf"),
    pytest.param(_nan_at(1, 0, -np.inf), ValueError, [r"inf", r"row 1"], id="-inf"),
]
# two existing keys and one never seen: a refused call must not create it either
KEYS3 = u64(1, 2, 999)


@pytest.mark.parametrize("op", ["put", "update"])
@pytest.mark.parametrize(("rows", "exc", "patterns"), BAD_ROWS)
def test_bad_values_and_gradients_are_refused(populated, op, rows, exc, patterns, snapshot):
    s, _ = populated
    t = s.table("t")
    call = (lambda: t.put(KEYS3, rows)) if op == "put" else (lambda: t.update(KEYS3, rows))
    refused(s, call, exc, *patterns, snapshot=snapshot)
    assert not t.contains(u64(999))[0]


def test_bad_values_leave_the_store_unchanged_after_reopen(populated, store_factory, snapshot):
    s, path = populated
    t = s.table("t")
    before = snapshot(s)
    for rows in (_nan_at(0, 0, np.nan), _nan_at(2, 3, np.inf), ones(3, DIM + 1), ones(3).astype(np.float64)):
        with pytest.raises((TypeError, ValueError)):
            t.update(KEYS3, rows)
        with pytest.raises((TypeError, ValueError)):
            t.put(KEYS3, rows)
    s = same_after_reopen(s, path, before, store_factory, snapshot)
    assert s.table("t").step == before["tables"]["t"]["step"]


def test_nan_from_a_torch_gradient(populated, snapshot):
    torch = pytest.importorskip("torch")
    s, _ = populated
    g = torch.ones(3, DIM)
    g[1, 2] = float("nan")
    refused(s, lambda: s.table("t").update(KEYS3, g), ValueError, "NaN", snapshot=snapshot)


# ---- tables ---------------------------------------------------------------------------------------------


def test_unknown_table(populated, snapshot):
    s, _ = populated
    before = refused(s, lambda: s.table("nope"), KeyError, r"nope", r"'plain'", r"'t'", snapshot=snapshot)
    refused(s, lambda: s.drop_table("nope"), KeyError, r"nope", r"'plain'", r"'t'", snapshot=snapshot)
    assert s.tables() == ["plain", "t"] == sorted(before["tables"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "patterns"),
    [
        ({"dim": 0}, ValueError, [r"positive", r"\b0\b"]),
        ({"dim": -3}, ValueError, [r"positive", r"-3"]),
        ({"dim": 2.5}, ValueError, [r"int", r"2\.5"]),
        ({"dim": True}, ValueError, [r"int", r"True"]),
        ({"dim": "4"}, ValueError, [r"int", r"'4'"]),
        ({"dim": 4, "dtype": "float64"}, ValueError, [r"float32", r"float64"]),
        ({"dim": 4, "optimizer": "adam"}, TypeError, [r"optimizer", r"str"]),
        ({"dim": 4, "staleness_bound": -1}, ValueError, [r">= 0", r"-1"]),
        ({"dim": 4, "init": 3.0}, TypeError, [r"init", r"3\.0"]),
    ],
)
def test_bad_table_arguments(populated, kwargs, exc, patterns, snapshot):
    s, _ = populated
    refused(s, lambda: s.table("new", **kwargs), exc, *patterns, snapshot=snapshot)
    assert "new" not in s.tables()


@pytest.mark.parametrize("name", ["", 5, None])
def test_bad_table_names(populated, name, snapshot):
    s, _ = populated
    refused(s, lambda: s.table(name, dim=2), ValueError, r"name", re.escape(repr(name)), snapshot=snapshot)


def test_bad_items_batch_size(populated, snapshot):
    s, _ = populated
    t = s.table("t")
    for bad in (0, -1, 2.0):
        refused(
            s, lambda b=bad: next(t.items(batch_size=b)), ValueError, re.escape(repr(bad)), snapshot=snapshot
        )


def test_update_on_a_table_without_optimizer(populated, store_factory, snapshot):
    s, path = populated
    p = s.table("plain")
    before = refused(
        s,
        lambda: p.update(u64(1, 77), ones(2)),
        mlkv.MlkvError,
        r"optimizer=None",
        r"plain",
        snapshot=snapshot,
    )
    assert not p.contains(u64(77))[0]
    # get / put / release still work
    p.put(u64(1), ones(1))
    np.testing.assert_array_equal(p.get(u64(1)), ones(1))
    p.release(u64(1))
    before["tables"]["plain"] = snapshot(s)["tables"]["plain"]
    same_after_reopen(s, path, before, store_factory, snapshot)


# ---- closed store, dropped table, readonly store -------------------------------------------------------


def _writes(t):
    return {
        "get": lambda: t.get(u64(1)),
        "put": lambda: t.put(u64(1), ones(1)),
        "update": lambda: t.update(u64(1), ones(1)),
        "delete": lambda: t.delete(u64(1)),
        "contains": lambda: t.contains(u64(1)),
        "len": lambda: len(t),
        "items": lambda: next(t.items()),
        "optimizer_state": lambda: t.optimizer_state(u64(1)),
        "lookahead": lambda: t.lookahead(u64(1)),
        "release": lambda: t.release(u64(1)),
    }


def test_closed_store_refuses_everything(populated, store_factory, snapshot, tmp_path):
    s, path = populated
    t = s.table("t")
    before = snapshot(s)
    s.close()
    s.close()  # idempotent
    calls = {
        **_writes(t),
        "table": lambda: s.table("t"),
        "new table": lambda: s.table("x", dim=2),
        "tables": lambda: s.tables(),
        "drop_table": lambda: s.drop_table("t"),
        "checkpoint": lambda: s.checkpoint({"a": 1}),
        "flush": lambda: s.flush(),
        "export": lambda: t.export(str(tmp_path / "x.safetensors")),
    }
    for name, call in calls.items():
        with pytest.raises(mlkv.StoreClosedError, match="closed"):
            call()
        assert isinstance(mlkv.StoreClosedError("x"), RuntimeError), name
    again = store_factory(s.engine_name, path)
    assert snapshot(again)["tables"] == before["tables"]
    assert again.last_checkpoint()[0] == 2  # the close checkpointed; nothing after it did


def test_dropped_table_handle_refuses_everything(populated, store_factory, snapshot, tmp_path):
    s, path = populated
    t = s.table("t")
    s.drop_table("t")
    t_new = s.table("t", dim=DIM, optimizer=Adam(lr=0.1))  # same name: the old handle must not reach it
    t_new.put(u64(5), ones(1))
    before = snapshot(s)
    calls = {**_writes(t), "export": lambda: t.export(str(tmp_path / "x.safetensors"))}
    for call in calls.values():
        with pytest.raises(mlkv.StoreClosedError, match=r"'t'.*dropped"):
            call()
    assert snapshot(s) == before
    assert len(t_new) == 1
    same_after_reopen(s, path, before, store_factory, snapshot)


def test_readonly_store_refuses_writes(populated, store_factory, snapshot):
    s, path = populated
    engine = s.engine_name
    s.close()
    r = store_factory(engine, path, readonly=True)
    t, p = r.table("t"), r.table("plain")
    calls = {
        "put": lambda: t.put(u64(1), ones(1)),
        "update": lambda: t.update(u64(1), ones(1)),
        "update-new-key": lambda: t.update(u64(12345), ones(1)),
        "delete": lambda: t.delete(u64(1)),
        "put-plain": lambda: p.put(u64(1), ones(1)),
        "checkpoint": lambda: r.checkpoint({"a": 1}),
        "create table": lambda: r.table("new", dim=2),
        "drop_table": lambda: r.drop_table("t"),
    }
    for call in calls.values():
        refused(r, call, mlkv.ReadOnlyError, r"readonly", snapshot=snapshot)
    assert isinstance(mlkv.ReadOnlyError("x"), PermissionError)
    before = snapshot(r)
    # reads of unseen keys work and store nothing; flush is harmless
    t.get(u64(777, 778))
    r.flush()
    assert snapshot(r) == before and r.last_checkpoint()[0] == 2
    r.close()
    w = store_factory(engine, path)
    assert snapshot(w) == before


# ---- open arguments -------------------------------------------------------------------------------------

BAD_OPEN = [
    pytest.param({"cache_bytes": "lots"}, ValueError, [r"512MiB", r"'lots'"], id="cache-str"),
    pytest.param({"cache_bytes": "12XB"}, ValueError, [r"512MiB", r"'12XB'"], id="cache-unit"),
    pytest.param({"cache_bytes": -1}, ValueError, [r">= 0", r"-1"], id="cache-negative"),
    pytest.param({"cache_bytes": 1.5}, TypeError, [r"int", r"float"], id="cache-float"),
    pytest.param({"cache_bytes": True}, TypeError, [r"int", r"bool"], id="cache-bool"),
    pytest.param({"cache_bytes": None}, TypeError, [r"int", r"NoneType"], id="cache-none"),
    pytest.param({"staleness_bound": -1}, ValueError, [r">= 0", r"-1"], id="staleness-negative"),
    pytest.param({"staleness_bound": 1.5}, ValueError, [r"int", r"1\.5"], id="staleness-float"),
    pytest.param({"staleness_bound": True}, ValueError, [r"int", r"True"], id="staleness-bool"),
    pytest.param({"staleness_bound": "1"}, ValueError, [r"int", r"'1'"], id="staleness-str"),
    pytest.param({"staleness_timeout": 0}, ValueError, [r"> 0", r"\b0\b"], id="timeout-zero"),
    pytest.param({"staleness_timeout": -2.0}, ValueError, [r"> 0", r"-2\.0"], id="timeout-negative"),
]


@pytest.mark.parametrize(("kwargs", "exc", "patterns"), BAD_OPEN)
def test_bad_open_arguments(populated, kwargs, exc, patterns, store_factory, snapshot, tmp_path):
    s, path = populated
    engine = s.engine_name
    before = snapshot(s)
    s.close()
    for where in (path, tmp_path / "fresh"):
        with pytest.raises(exc) as e:
            store_factory(engine, where, **kwargs)
        for pat in patterns:
            assert re.search(pat, str(e.value)), f"{pat!r} not in {e.value}"
    assert not (tmp_path / "fresh").exists()  # nothing was created
    again = store_factory(engine, path)  # no lock was left behind
    assert snapshot(again)["tables"] == before["tables"]


@pytest.mark.parametrize("name", ["leveldb", "SLAB", ""])
def test_bad_engine_name(tmp_path, store_factory, name):
    with pytest.raises(ValueError) as e:
        store_factory(name, tmp_path / "s")
    assert repr(name) in str(e.value)
    for valid in ("slab", "rocksdb", "memory"):
        assert valid in str(e.value)
    assert not (tmp_path / "s").exists()


# ---- checkpoint metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [{"x": object()}, {"x": {1, 2}}, {"x": np.float32(1.0)}, {"x": b"bytes"}, {(1, 2): "tuple key"}],
    ids=["object", "set", "numpy-scalar", "bytes", "tuple-key"],
)
def test_non_json_checkpoint_metadata(populated, metadata, store_factory, snapshot, crash_store):
    s, path = populated
    checkpointed = s.last_checkpoint()
    refused(s, lambda: s.checkpoint(metadata), TypeError, r"JSON", snapshot=snapshot)
    assert s.last_checkpoint() == checkpointed
    # the refused checkpoint made nothing durable: a crash goes back to the previous checkpoint
    s.table("t").put(u64(1), ones(1) * 5)
    crash_store(s)
    s = store_factory(s.engine_name, path)
    assert s.last_checkpoint() == checkpointed == (1, {"step": 3})
    assert not (s.table("t").get(u64(1)) == 5).all()
    assert not s.table("plain").contains(u64(40))[0]  # created by a get after the checkpoint
    assert s.checkpoint({"ok": True}) == 2  # the id was not used up
