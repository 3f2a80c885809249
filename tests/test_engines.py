"""The Engine interface (mlkv.engine.open_engine) directly: one suite on every engine, plus slab damage.

Oracle: a dict key -> row bytes per table, and a copy of it at every checkpoint. `engine.close()` without a
checkpoint is a crash as far as an engine is concerned: reopening must give the last checkpoint exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlkv.engine import ENGINES, open_engine
from mlkv.engine.slot_file import HEADER_BYTES, slot_bytes_for
from mlkv.errors import CorruptionError, ReadOnlyError

U64_MAX = 2**64 - 1
RB = 20  # not a multiple of 8: the slab pads rows


def u64(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def rows_of(rng: np.random.Generator, n: int, row_bytes: int = RB) -> np.ndarray:
    return rng.integers(0, 256, size=(n, row_bytes), dtype=np.uint8)


def contents(e, table: str, batch_size: int = 1000) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for ks, rows in e.scan(table, batch_size):
        assert ks.dtype == np.uint64 and rows.dtype == np.uint8
        assert 0 < len(ks) <= batch_size and rows.shape[0] == len(ks)
        for k, r in zip(ks.tolist(), rows, strict=True):
            assert k not in out
            out[k] = r.tobytes()
    return out


def assert_matches(e, table: str, model: dict[int, bytes]) -> None:
    assert contents(e, table, batch_size=7) == model
    assert e.count(table) == len(model)
    if model:
        ks = np.array(sorted(model), dtype=np.uint64)
        rows, found = e.read(table, ks)
        assert found.all()
        assert [r.tobytes() for r in rows] == [model[k] for k in ks.tolist()]
        assert e.contains(table, ks).all()


def test_engine_names():
    assert set(ENGINES) == {"slab", "rocksdb", "memory"}
    with pytest.raises(ValueError, match="nope"):
        open_engine("nope", "/nonexistent")


def test_write_read_delete_count_scan(engine, tmp_path):
    rng = np.random.default_rng(0)
    e = open_engine(engine, str(tmp_path / "s"))
    try:
        assert e.tables() == {}
        assert e.committed_meta() is None
        e.create_table("a", RB)
        e.create_table("b", 8)
        e.create_table("a", RB)  # no-op
        assert e.tables() == {"a": RB, "b": 8}
        keys = np.unique(rng.integers(0, U64_MAX, size=3000, dtype=np.uint64, endpoint=True))
        keys = np.concatenate([keys, u64(0, U64_MAX, 2**63)])
        keys = np.unique(keys)
        rows = rows_of(rng, len(keys))
        e.write("a", keys, rows)
        model = {k: r.tobytes() for k, r in zip(keys.tolist(), rows, strict=True)}
        assert_matches(e, "a", model)
        assert e.count("b") == 0 and contents(e, "b") == {}
        # absent keys read as zeros, not found
        got, found = e.read("a", u64(1, 2, 3))
        absent = [k not in model for k in (1, 2, 3)]
        np.testing.assert_array_equal(found, [not a for a in absent])
        assert not got[np.array(absent)].any()
        # overwrite some, delete some (including absent keys)
        over = keys[::3]
        new = rows_of(rng, len(over))
        e.write("a", over, new)
        model.update({k: r.tobytes() for k, r in zip(over.tolist(), new, strict=True)})
        gone = np.concatenate([keys[1::5], u64(12345)]) if 12345 not in model else keys[1::5]
        gone = np.unique(gone)
        e.delete("a", gone)
        for k in gone.tolist():
            model.pop(k, None)
        assert_matches(e, "a", model)
        assert not e.contains("a", gone).any()
        # the other table is untouched
        e.write("b", u64(7), np.full((1, 8), 9, np.uint8))
        assert contents(e, "b") == {7: bytes([9] * 8)}
        assert_matches(e, "a", model)
        assert e.verify() == []
        # empty batches
        r0, f0 = e.read("a", np.empty(0, np.uint64))
        assert r0.shape == (0, RB) and f0.shape == (0,)
        e.write("a", np.empty(0, np.uint64), np.empty((0, RB), np.uint8))
        e.delete("a", np.empty(0, np.uint64))
        assert e.count("a") == len(model)
    finally:
        e.close()


def test_checkpoint_committed_meta_and_reopen(engine, tmp_path):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "s")
    e = open_engine(engine, path)
    e.create_table("t", RB)
    k1 = np.arange(100, dtype=np.uint64)
    r1 = rows_of(rng, 100)
    e.write("t", k1, r1)
    meta = {"checkpoint_id": 1, "tables": {"t": {"dim": 5}}, "x": [1, 2]}
    e.checkpoint(meta)
    assert e.committed_meta() == meta
    saved = {k: r.tobytes() for k, r in zip(k1.tolist(), r1, strict=True)}
    # after the checkpoint: overwrite, delete, a new table, drop - then close without a checkpoint
    e.write("t", k1[:50], rows_of(rng, 50))
    e.delete("t", k1[50:60])
    e.write("t", u64(U64_MAX), rows_of(rng, 1))
    e.create_table("late", 4)
    e.close()

    e = open_engine(engine, path)
    assert e.committed_meta() == meta
    assert e.tables() == {"t": RB}
    assert_matches(e, "t", saved)
    # a second epoch, committed, then a crash during a third
    e.write("t", k1[:10], rows_of(rng, 10))
    e.delete("t", k1[90:])
    e.checkpoint({"checkpoint_id": 2})
    saved2 = contents(e, "t")
    assert len(saved2) == 90
    e.drop_table("t")
    e.create_table("u", 8)
    e.close()

    e = open_engine(engine, path)
    try:
        assert e.committed_meta() == {"checkpoint_id": 2}
        assert e.tables() == {"t": RB}  # the drop and the creation were not committed
        assert_matches(e, "t", saved2)
        e.drop_table("t")
        e.create_table("t", 4)  # same name, new table
        e.checkpoint({"checkpoint_id": 3})
    finally:
        e.close()
    e = open_engine(engine, path)
    try:
        assert e.tables() == {"t": 4}
        assert e.count("t") == 0
    finally:
        e.close()


def test_many_epochs_against_a_model(engine, tmp_path):
    """Random writes/deletes over several checkpoints and crashes: slots are reused, nothing leaks."""
    rng = np.random.default_rng(2)
    path = str(tmp_path / "s")
    e = open_engine(engine, path)
    e.create_table("t", RB)
    e.checkpoint({"checkpoint_id": 0})
    model: dict[int, bytes] = {}
    saved: dict[int, bytes] = {}
    universe = np.concatenate([np.arange(300, dtype=np.uint64), u64(U64_MAX, 2**63, U64_MAX - 1)])
    try:
        for epoch in range(12):
            for _ in range(4):
                ks = np.unique(rng.choice(universe, size=rng.integers(1, 80)))
                if rng.random() < 0.7:
                    rs = rows_of(rng, len(ks))
                    e.write("t", ks, rs)
                    model.update({k: r.tobytes() for k, r in zip(ks.tolist(), rs, strict=True)})
                else:
                    e.delete("t", ks)
                    for k in ks.tolist():
                        model.pop(k, None)
            assert_matches(e, "t", model)
            if rng.random() < 0.3:
                e.close()  # crash: back to the last checkpoint
                e = open_engine(engine, path)
                model = dict(saved)
                assert_matches(e, "t", model)
            else:
                e.checkpoint({"checkpoint_id": epoch + 1})
                saved = dict(model)
        e.close()
        e = open_engine(engine, path)
        assert_matches(e, "t", saved)
        assert e.verify() == []
    finally:
        e.close()


def test_readonly_engine_refuses_writes(engine, tmp_path):
    path = str(tmp_path / "s")
    e = open_engine(engine, path)
    e.create_table("t", RB)
    e.write("t", u64(1), np.full((1, RB), 5, np.uint8))
    e.checkpoint({"checkpoint_id": 1})
    e.close()
    r = open_engine(engine, path, readonly=True)
    try:
        assert contents(r, "t") == {1: bytes([5] * RB)}
        for call in (
            lambda: r.write("t", u64(2), np.zeros((1, RB), np.uint8)),
            lambda: r.delete("t", u64(1)),
            lambda: r.create_table("new", 4),
            lambda: r.drop_table("t"),
            lambda: r.checkpoint({"checkpoint_id": 2}),
        ):
            with pytest.raises(ReadOnlyError):
                call()
        assert contents(r, "t") == {1: bytes([5] * RB)}
        assert r.committed_meta() == {"checkpoint_id": 1}
    finally:
        r.close()


# ---- slab: damage is detected, named and never returned as rows --------------------------------------


def _slab_with_rows(tmp_path, n: int = 50):
    rng = np.random.default_rng(3)
    path = str(tmp_path / "s")
    e = open_engine("slab", path)
    e.create_table("t", RB)
    keys = np.arange(1000, 1000 + n, dtype=np.uint64)
    rows = rows_of(rng, n)
    e.write("t", keys, rows)
    e.checkpoint({"checkpoint_id": 1})
    e.close()
    return path, keys, rows


def _slot_offset(slab_file: str, key: int) -> int:
    """Offset of the slot holding `key`, found by its stored key field (no reliance on allocation order)."""
    raw = np.fromfile(slab_file, dtype=np.uint8)
    sb = slot_bytes_for(RB)
    slots = raw[HEADER_BYTES:].reshape(-1, sb)
    hit = np.flatnonzero(slots[:, :8].copy().view(np.uint64).ravel() == key)
    assert len(hit) == 1
    return HEADER_BYTES + int(hit[0]) * sb


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("field", ["row", "key", "check"])
def test_slab_flipped_slot_byte_raises_corruption_naming_file_and_offset(tmp_path, field):
    path, keys, rows = _slab_with_rows(tmp_path)
    slab_file = os.path.join(path, "t0.slab")
    victim = int(keys[17])
    off = _slot_offset(slab_file, victim)
    _flip(slab_file, off + {"row": 16 + 5, "key": 3, "check": 9}[field])
    e = open_engine("slab", path)
    try:
        with pytest.raises(CorruptionError) as exc:
            e.read("t", keys)
        assert exc.value.file == slab_file and exc.value.offset == off
        assert slab_file in str(exc.value) and str(off) in str(exc.value)
        # the other rows still read right
        others = np.delete(keys, 17)
        got, found = e.read("t", others)
        assert found.all()
        np.testing.assert_array_equal(got, np.delete(rows, 17, axis=0))
        problems = e.verify()
        assert len(problems) == 1 and slab_file in problems[0] and str(off) in problems[0]
        with pytest.raises(CorruptionError):
            list(e.scan("t", 1000))
    finally:
        e.close()


def test_slab_verify_reports_every_damaged_batch(tmp_path):
    path, keys, _ = _slab_with_rows(tmp_path, n=20)
    e = open_engine("slab", path)
    assert e.verify() == []
    e.close()
    slab_file = os.path.join(path, "t0.slab")
    _flip(slab_file, _slot_offset(slab_file, int(keys[3])) + 20)
    e = open_engine("slab", path)
    try:
        problems = e.verify()
        assert len(problems) == 1 and "t0.slab" in problems[0]
        # reads of undamaged keys are fine; the damaged one is refused
        assert e.read("t", keys[4:])[1].all()
        with pytest.raises(CorruptionError):
            e.read("t", keys[3:4])
    finally:
        e.close()


@pytest.mark.parametrize("damage", ["flip_body", "truncate", "bad_magic", "bad_version", "empty"])
def test_slab_damaged_manifest(tmp_path, damage):
    path, _, _ = _slab_with_rows(tmp_path)
    manifest = os.path.join(path, "MANIFEST")
    raw = Path(manifest).read_bytes()
    head, _, body = raw.partition(b"\n")
    if damage == "flip_body":
        _flip(manifest, len(head) + 1 + len(body) // 2)
    elif damage == "truncate":
        with open(manifest, "r+b") as f:
            f.truncate(len(raw) - 5)
    elif damage == "bad_magic":
        _flip(manifest, 0)
    elif damage == "bad_version":
        parts = head.split(b" ")
        parts[1] = b"9"
        with open(manifest, "wb") as f:
            f.write(b" ".join(parts) + b"\n" + body)
    else:
        Path(manifest).write_bytes(b"")
    with pytest.raises(CorruptionError) as exc:
        open_engine("slab", path)
    assert exc.value.file == manifest and manifest in str(exc.value)


def test_slab_manifest_body_is_checked_as_json(tmp_path):
    """A manifest whose CRC matches must still be what the engine wrote: sanity of the fixture above."""
    path, _, _ = _slab_with_rows(tmp_path)
    raw = Path(path, "MANIFEST").read_bytes()
    body = json.loads(raw.partition(b"\n")[2])
    assert body["tables"]["t"]["id"] == 0 and body["meta"] == {"checkpoint_id": 1}


@pytest.mark.parametrize("damage", ["truncate_log", "flip_log_payload", "flip_log_header", "remove_log"])
def test_slab_damaged_index_log(tmp_path, damage):
    path, _, _ = _slab_with_rows(tmp_path)
    log = os.path.join(path, "t0.0.log")
    size = os.path.getsize(log)
    assert size > 0
    if damage == "truncate_log":
        with open(log, "r+b") as f:
            f.truncate(size - 9)
    elif damage == "flip_log_payload":
        _flip(log, size - 3)
    elif damage == "flip_log_header":
        _flip(log, 2)
    else:
        os.remove(log)
    if damage == "remove_log":
        with pytest.raises((CorruptionError, FileNotFoundError)):
            open_engine("slab", path)
        return
    with pytest.raises(CorruptionError) as exc:
        open_engine("slab", path)
    assert exc.value.file == log and log in str(exc.value)


def test_slab_damaged_slab_header(tmp_path):
    path, _, _ = _slab_with_rows(tmp_path)
    slab_file = os.path.join(path, "t0.slab")
    _flip(slab_file, 1)
    with pytest.raises(CorruptionError) as exc:
        open_engine("slab", path)
    assert exc.value.file == slab_file and exc.value.offset == 0


def test_slab_damaged_snapshot(tmp_path):
    """A checkpoint that changes many keys writes an index snapshot; damage to it is detected too."""
    rng = np.random.default_rng(4)
    path = str(tmp_path / "s")
    e = open_engine("slab", path)
    e.create_table("t", 8)
    keys = np.arange(70_000, dtype=np.uint64)  # 16 bytes a pair: past the 1 MiB log threshold
    e.write("t", keys, rows_of(rng, len(keys), 8))
    e.checkpoint({"checkpoint_id": 1})
    e.close()
    snaps = [f for f in os.listdir(path) if f.endswith(".snap")]
    assert snaps == ["t0.1.snap"]
    e = open_engine("slab", path)
    assert e.count("t") == len(keys)
    e.close()
    snap = os.path.join(path, snaps[0])
    _flip(snap, os.path.getsize(snap) // 2)
    with pytest.raises(CorruptionError) as exc:
        open_engine("slab", path)
    assert exc.value.file == snap
