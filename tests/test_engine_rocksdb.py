"""RocksDBEngine: round trips, counts, scans, exact crash recovery, table rollback, checksums, read-only."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rocksdict
from hypothesis import given, settings
from hypothesis import strategies as st

from mlkv.engine.rocksdb import RocksDBEngine, _encode_keys
from mlkv.errors import CorruptionError, ReadOnlyError, SchemaError, StoreClosedError

REPO = Path(__file__).resolve().parents[1]
RB = 24
U64_MAX = 2**64 - 1


def keys_of(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct keys over the whole uint64 range, always including 0 and 2**64 - 1."""
    ks = np.unique(rng.integers(0, U64_MAX, size=n, dtype=np.uint64, endpoint=True))
    ks = np.unique(np.concatenate([ks, keys_of(0, U64_MAX)]))
    rng.shuffle(ks)
    return ks


def random_rows(rng: np.random.Generator, n: int, row_bytes: int = RB) -> np.ndarray:
    return rng.integers(0, 256, size=(n, row_bytes), dtype=np.uint8)


def contents(engine: RocksDBEngine, table: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for ks, rows in engine.scan(table, 1000):
        out.update(zip(ks.tolist(), (r.tobytes() for r in rows), strict=True))
    return out


def assert_matches(engine: RocksDBEngine, table: str, model: dict[int, bytes]) -> None:
    assert contents(engine, table) == model
    assert engine.count(table) == len(model)
    if model:
        ks = np.array(sorted(model), dtype=np.uint64)
        rows, found = engine.read(table, ks)
        assert found.all()
        assert [r.tobytes() for r in rows] == [model[k] for k in ks.tolist()]


@pytest.fixture
def rocks(tmp_path):
    e = RocksDBEngine(str(tmp_path / "db"))
    yield e
    e.close()


def test_round_trip_over_full_key_range(rocks):
    rng = np.random.default_rng(1)
    rocks.create_table("t", RB)
    ks = random_keys(rng, 5000)
    rows = random_rows(rng, len(ks))
    rocks.write("t", ks, rows)
    got, found = rocks.read("t", ks)
    assert found.all()
    np.testing.assert_array_equal(got, rows)
    edge, found = rocks.read("t", keys_of(0, U64_MAX))
    assert found.all()
    rocks.checkpoint({"step": 1})
    perm = rng.permutation(len(ks))
    got, found = rocks.read("t", ks[perm])
    assert found.all()
    np.testing.assert_array_equal(got, rows[perm])
    np.testing.assert_array_equal(edge, rocks.read("t", keys_of(0, U64_MAX))[0])


def test_missing_keys_read_as_zero_rows(rocks):
    rocks.create_table("t", RB)
    rocks.write("t", keys_of(1, 3), np.full((2, RB), 7, dtype=np.uint8))
    rows, found = rocks.read("t", keys_of(0, 1, 2, 3, U64_MAX, 1))  # duplicates in a read are fine
    np.testing.assert_array_equal(found, [False, True, False, True, False, True])
    assert (rows[~found] == 0).all() and (rows[found] == 7).all()
    np.testing.assert_array_equal(rocks.contains("t", keys_of(3, 4)), [True, False])
    rows, found = rocks.read("t", np.empty(0, dtype=np.uint64))
    assert rows.shape == (0, RB) and found.shape == (0,)


def test_overwrite_delete_and_count_across_checkpoints(rocks):
    rng = np.random.default_rng(2)
    rocks.create_table("t", RB)
    model: dict[int, bytes] = {}
    ks = random_keys(rng, 300)
    for round_ in range(4):
        write = ks[rng.permutation(len(ks))[:150]]
        rows = random_rows(rng, len(write))
        rocks.write("t", write, rows)
        model.update(zip(write.tolist(), (r.tobytes() for r in rows), strict=True))
        gone = np.unique(np.concatenate([ks[rng.permutation(len(ks))[:60]], keys_of(12345)]))
        rocks.delete("t", gone)
        for k in gone.tolist():
            model.pop(k, None)
        assert_matches(rocks, "t", model)
        if round_ % 2:
            rocks.checkpoint({"round": round_})
            assert_matches(rocks, "t", model)


def test_scan_merges_staged_over_committed_in_key_order(rocks):
    rocks.create_table("t", 8)
    committed = keys_of(0, 10, 20, 30, U64_MAX)
    rocks.write("t", committed, np.repeat(committed.astype(np.uint8)[:, None], 8, axis=1))
    rocks.checkpoint({})
    rocks.write("t", keys_of(5, 20, U64_MAX - 1), np.full((3, 8), 99, dtype=np.uint8))
    rocks.delete("t", keys_of(10, 30, 7))
    expected = [0, 5, 20, U64_MAX - 1, U64_MAX]
    for batch_size in (1, 2, 3, 100):
        batches = list(rocks.scan("t", batch_size))
        assert all(len(k) <= batch_size for k, _ in batches)
        ks = np.concatenate([k for k, _ in batches])
        assert ks.dtype == np.uint64 and ks.tolist() == expected
        rows = np.concatenate([r for _, r in batches])
        assert rows.dtype == np.uint8 and rows.shape == (5, 8)
        assert rows[:, 0].tolist() == [0, 99, 99, 99, 255]
    assert rocks.count("t") == 5
    rocks.create_table("empty", 8)
    assert list(rocks.scan("empty", 10)) == []


def test_checkpoint_then_reopen(tmp_path):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    assert e.committed_meta() is None
    e.create_table("a", RB)
    e.create_table("b", 4)
    ks = random_keys(rng, 2000)
    rows = random_rows(rng, len(ks))
    e.write("a", ks, rows)
    e.write("b", keys_of(1), np.ones((1, 4), dtype=np.uint8))
    e.checkpoint({"step": 7, "schema": {"a": [RB]}})
    model = dict(zip(ks.tolist(), (r.tobytes() for r in rows), strict=True))
    e.close()
    e = RocksDBEngine(path)
    assert e.committed_meta() == {"step": 7, "schema": {"a": [RB]}}
    assert e.tables() == {"a": RB, "b": 4}
    assert_matches(e, "a", model)
    assert e.count("b") == 1
    assert e.recovery_seconds > 0
    assert e.disk_bytes() > len(ks) * RB
    assert e.verify() == []
    e.close()


def test_compact_merges_level0_and_keeps_every_row(tmp_path):
    """compact() (the bench calls it so RocksDB is timed at its best): level-0 files merged, rows intact."""
    rng = np.random.default_rng(5)
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.create_table("a", RB)
    model: dict[int, bytes] = {}
    for step in range(4):  # rewrite the same keys: each round leaves dead versions behind
        ks = random_keys(np.random.default_rng(9), 3000)
        rows = random_rows(rng, len(ks))
        e.write("a", ks, rows)
        e.checkpoint({"step": step})
        e._db.flush()  # one level-0 file per round
        model.update(zip(ks.tolist(), (r.tobytes() for r in rows), strict=True))
    # (how many level-0 files are left here depends on RocksDB's background compaction: not asserted)
    e.compact()
    assert e.level0_files() == 0
    assert_matches(e, "a", model)
    e.close()
    e = RocksDBEngine(path)
    assert_matches(e, "a", model)
    assert e.committed_meta() == {"step": 3}
    e.close()


@pytest.mark.parametrize("how", ["close", "del"])
def test_reopen_without_checkpoint_returns_last_checkpoint(tmp_path, how):
    rng = np.random.default_rng(4)
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.create_table("t", RB)
    ks = random_keys(rng, 1000)
    rows = random_rows(rng, len(ks))
    e.write("t", ks, rows)
    e.checkpoint({"step": 1})
    model = dict(zip(ks.tolist(), (r.tobytes() for r in rows), strict=True))
    e.write("t", ks[:300], random_rows(rng, 300))  # overwrites
    e.write("t", keys_of(42, 43), random_rows(rng, 2))  # new keys (42/43 are almost surely new)
    e.delete("t", ks[300:500])
    e.create_table("later", 8)
    e.write("later", keys_of(1), np.ones((1, 8), dtype=np.uint8))
    if how == "close":
        e.close()
    else:
        del e
        gc.collect()
    e = RocksDBEngine(path)
    assert e.committed_meta() == {"step": 1}
    assert e.tables() == {"t": RB}
    assert_matches(e, "t", model)
    # the discarded staging must not come back at the next checkpoint either
    e.checkpoint({"step": 2})
    e.close()
    e = RocksDBEngine(path)
    assert_matches(e, "t", model)
    assert e.verify() == []
    e.close()


def test_table_create_and_drop_roll_back_without_checkpoint(tmp_path):
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.create_table("keep", 8)
    e.write("keep", keys_of(1, 2), np.full((2, 8), 5, dtype=np.uint8))
    e.checkpoint({"step": 1})
    e.drop_table("keep")
    e.create_table("new", 16)
    e.write("new", keys_of(9), np.ones((1, 16), dtype=np.uint8))
    assert e.tables() == {"new": 16}
    with pytest.raises(KeyError):
        e.read("keep", keys_of(1))
    e.close()

    e = RocksDBEngine(path)
    assert e.tables() == {"keep": 8}
    assert_matches(e, "keep", {1: bytes([5] * 8), 2: bytes([5] * 8)})
    # drop and re-create under the same name with another width, committed this time
    e.drop_table("keep")
    e.create_table("keep", 4)
    assert e.count("keep") == 0 and e.read("keep", keys_of(1, 2))[1].tolist() == [False, False]
    e.write("keep", keys_of(3), np.full((1, 4), 3, dtype=np.uint8))
    e.checkpoint({"step": 2})
    e.close()

    e = RocksDBEngine(path)
    assert e.tables() == {"keep": 4}
    assert_matches(e, "keep", {3: bytes([3] * 4)})
    assert e.verify() == []  # the old table's rows are gone, not orphaned
    e.close()


def test_create_table_schema(rocks):
    rocks.create_table("t", 8)
    rocks.create_table("t", 8)  # no-op
    with pytest.raises(SchemaError):
        rocks.create_table("t", 16)
    with pytest.raises(ValueError):
        rocks.create_table("u", 0)
    with pytest.raises(KeyError):
        rocks.count("nope")
    with pytest.raises(KeyError):
        rocks.drop_table("nope")


def test_bad_arguments(rocks):
    rocks.create_table("t", 8)
    with pytest.raises(ValueError):
        rocks.write("t", keys_of(1, 2), np.zeros((2, 9), dtype=np.uint8))
    with pytest.raises(TypeError):
        rocks.write("t", keys_of(1), np.zeros((1, 8), dtype=np.float32))
    with pytest.raises(TypeError):
        rocks.read("t", np.array([-1]))
    with pytest.raises(ValueError):
        rocks.read("t", np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(ValueError):
        list(rocks.scan("t", 0))
    with pytest.raises(TypeError):
        rocks.checkpoint({"not json": object()})


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from mlkv.engine.rocksdb import RocksDBEngine

    path = sys.argv[1]
    rng = np.random.default_rng(5)
    e = RocksDBEngine(path)
    e.create_table("t", 24)
    e.create_table("doomed", 8)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=3000, dtype=np.uint64, endpoint=True))
    keys = np.concatenate([keys, np.array([0, 2**64 - 1], dtype=np.uint64)])
    e.write("t", keys, rng.integers(0, 256, size=(len(keys), 24), dtype=np.uint8))
    e.write("doomed", keys[:5], np.ones((5, 8), dtype=np.uint8))
    e.checkpoint({"step": 1})
    e.write("t", keys[:1000], rng.integers(0, 256, size=(1000, 24), dtype=np.uint8))
    e.write("t", np.array([7, 8], dtype=np.uint64), np.zeros((2, 24), dtype=np.uint8))
    e.delete("t", keys[1000:1500])
    e.drop_table("doomed")
    e.create_table("born", 8)
    e.write("born", keys[:5], np.ones((5, 8), dtype=np.uint8))
    os.environ["MLKV_CRASH_AT"] = sys.argv[2]  # may kill the process inside this checkpoint
    e.checkpoint({"step": 2})
    e.write("t", keys[2000:], rng.integers(0, 256, size=(len(keys) - 2000, 24), dtype=np.uint8))
    e.delete("t", keys[:100])
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _expected_state(step: int) -> tuple[dict[str, int], dict[int, bytes]]:
    """Replays the crash script's first `step` checkpoints in a model."""
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, U64_MAX, size=3000, dtype=np.uint64, endpoint=True))
    keys = np.concatenate([keys, keys_of(0, U64_MAX)])
    rows = rng.integers(0, 256, size=(len(keys), 24), dtype=np.uint8)
    model = dict(zip(keys.tolist(), (r.tobytes() for r in rows), strict=True))
    if step == 1:
        return {"t": 24, "doomed": 8}, model
    rows = rng.integers(0, 256, size=(1000, 24), dtype=np.uint8)
    model.update(zip(keys[:1000].tolist(), (r.tobytes() for r in rows), strict=True))
    model.update({7: bytes(24), 8: bytes(24)})
    for k in keys[1000:1500].tolist():
        model.pop(k, None)
    return {"t": 24, "born": 8}, model


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_at", "step"),
    [("", 2), ("rocksdb:before_commit", 1), ("rocksdb:after_commit", 2)],
)
def test_kill_9_recovers_exactly_the_last_checkpoint(tmp_path, crash_at, step):
    path = str(tmp_path / "db")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLKV_CRASH_AT", None)
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, path, crash_at],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    tables, model = _expected_state(step)
    e = RocksDBEngine(path)
    assert e.committed_meta() == {"step": step}
    assert e.tables() == tables
    assert_matches(e, "t", model)
    if "doomed" in tables:
        assert e.count("doomed") == 5
    else:
        assert e.count("born") == 5
    assert e.verify() == []
    e.close()


def _put_raw(path: str, db_key: bytes, value: bytes) -> None:
    db = rocksdict.Rdict(path, rocksdict.Options(raw_mode=True))
    db[db_key] = value
    db.close()
    del db
    gc.collect()


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda v: b"garbage", "shorter than its frame"),
        (lambda v: b"\x00" + v[1:], "bad magic"),
        (lambda v: v[:10] + bytes([v[10] ^ 1]) + v[11:], "CRC-32"),
        (lambda v: v + b"\x00", "CRC-32"),
    ],
)
def test_corrupt_value_raises_and_verify_reports(tmp_path, damage, what):
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.create_table("t", RB)
    ks = keys_of(1, 2, 3)
    e.write("t", ks, np.full((3, RB), 4, dtype=np.uint8))
    e.checkpoint({})
    table_id = e._tables["t"][0]
    e.close()

    db_key = _encode_keys(b"D", table_id, keys_of(2))[0]
    db = rocksdict.Rdict(path, rocksdict.Options(raw_mode=True))
    good = db[db_key]
    db.close()
    del db
    _put_raw(path, db_key, damage(good))

    e = RocksDBEngine(path)
    _, found = e.read("t", keys_of(1, 3))  # the sound rows still read
    assert found.all()
    with pytest.raises(CorruptionError) as err:
        e.read("t", ks)
    assert err.value.file == os.path.abspath(path)
    assert (err.value.table, err.value.key, err.value.offset) == ("t", 2, None)  # a key, not a file offset
    assert what in str(err.value)
    with pytest.raises(CorruptionError):
        list(e.scan("t", 10))
    problems = e.verify()
    assert len(problems) == 1 and "key 2" in problems[0] and what in problems[0]
    e.close()


def test_damaged_rocksdb_block_raises_corruption(tmp_path):
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.create_table("t", 256)
    ks = np.arange(20000, dtype=np.uint64)
    e.write("t", ks, random_rows(np.random.default_rng(6), len(ks), 256))
    e.checkpoint({})
    e.close()  # flushes the memtable: the rows now live in an SST file
    sst = max((os.path.join(path, f) for f in os.listdir(path) if f.endswith(".sst")), key=os.path.getsize)
    with open(sst, "r+b") as f:
        f.seek(os.path.getsize(sst) // 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    e = RocksDBEngine(path)
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        e.read("t", ks)
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        for _ in e.scan("t", 1000):
            pass
    problems = e.verify()
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    e.close()


def test_corrupt_meta_record_fails_open(tmp_path):
    path = str(tmp_path / "db")
    e = RocksDBEngine(path)
    e.checkpoint({"step": 1})
    e.close()
    _put_raw(path, b"M", b"\xe7\x01\x02\x00{}\x00\x00\x00\x00")
    with pytest.raises(CorruptionError):
        RocksDBEngine(path)


def test_readonly(tmp_path):
    path = str(tmp_path / "db")
    with pytest.raises(FileNotFoundError):
        RocksDBEngine(path, readonly=True)
    e = RocksDBEngine(path)
    e.create_table("t", 8)
    e.write("t", keys_of(1), np.ones((1, 8), dtype=np.uint8))
    e.checkpoint({"step": 1})
    e.write("t", keys_of(2), np.ones((1, 8), dtype=np.uint8))  # staged, never committed
    del e
    gc.collect()

    r = RocksDBEngine(path, readonly=True)
    assert r.committed_meta() == {"step": 1}
    assert r.read("t", keys_of(1, 2))[1].tolist() == [True, False]
    assert r.count("t") == 1 and contents(r, "t") == {1: bytes([1] * 8)}
    r.create_table("t", 8)  # already there: nothing to write
    for attempt in (
        lambda: r.write("t", keys_of(3), np.ones((1, 8), dtype=np.uint8)),
        lambda: r.delete("t", keys_of(1)),
        lambda: r.create_table("u", 8),
        lambda: r.drop_table("t"),
        lambda: r.checkpoint({}),
    ):
        with pytest.raises(ReadOnlyError):
            attempt()
    assert r.verify() == []
    r.close()


def test_use_after_close_raises(tmp_path):
    e = RocksDBEngine(str(tmp_path / "db"))
    e.create_table("t", 8)
    e.close()
    e.close()  # idempotent
    with pytest.raises(StoreClosedError):
        e.read("t", keys_of(1))
    with pytest.raises(StoreClosedError):
        e.write("t", keys_of(1), np.ones((1, 8), dtype=np.uint8))
    with pytest.raises(StoreClosedError):
        e.checkpoint({})


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.sampled_from("ab"),
            st.sets(st.integers(0, 40), max_size=12),
            st.integers(0, 255),
        ),
        st.tuples(st.just("delete"), st.sampled_from("ab"), st.sets(st.integers(0, 40), max_size=12)),
        st.tuples(st.just("create"), st.sampled_from("ab")),
        st.tuples(st.just("drop"), st.sampled_from("ab")),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("crash")),
    ),
    max_size=30,
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_random_operations_match_a_model(ops):
    """Any sequence of writes, deletes, table changes, checkpoints and crashes (reopen without checkpoint)
    leaves the engine equal to a dict model that rolls back to its last checkpoint on each crash."""
    width = {"a": 4, "b": 8}

    def spread(k: int) -> int:  # exercise the top of the key range too
        return k if k % 2 else U64_MAX - k

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "db")
        e = RocksDBEngine(path)
        live: dict[str, dict[int, bytes]] = {}
        committed: dict[str, dict[int, bytes]] = {}
        step = 0
        for op in ops:
            kind = op[0]
            if kind == "write" and op[1] in live:
                ks = np.array(sorted(spread(k) for k in op[2]), dtype=np.uint64)
                rows = np.full((len(ks), width[op[1]]), op[3], dtype=np.uint8)
                e.write(op[1], ks, rows)
                live[op[1]].update({k: bytes([op[3]] * width[op[1]]) for k in ks.tolist()})
            elif kind == "delete" and op[1] in live:
                ks = np.array(sorted(spread(k) for k in op[2]), dtype=np.uint64)
                e.delete(op[1], ks)
                for k in ks.tolist():
                    live[op[1]].pop(k, None)
            elif kind == "create":
                e.create_table(op[1], width[op[1]])
                live.setdefault(op[1], {})
            elif kind == "drop" and op[1] in live:
                e.drop_table(op[1])
                del live[op[1]]
            elif kind == "checkpoint":
                step += 1
                e.checkpoint({"step": step})
                committed = {t: dict(rows) for t, rows in live.items()}
            elif kind == "crash":
                e.close()
                e = RocksDBEngine(path)
                live = {t: dict(rows) for t, rows in committed.items()}
            assert e.tables() == {t: width[t] for t in live}
            for t, model in live.items():
                assert_matches(e, t, model)
        assert e.committed_meta() == ({"step": step} if step else None)
        assert e.verify() == []
        e.close()
