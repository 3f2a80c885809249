"""The fault campaigns of mlkv.bench.faults, short forms (full runs and their figures: docs/reliability.md).

Each test runs the same code as `python -m mlkv.bench.faults ...` with small counts and requires zero
failures and zero wrong rows; a failure message carries the seed and case that reproduce it. The soak also
gets a negative control: with an optimizer that drops one update in 40 it must report lost updates.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib

import numpy as np
import pytest

import mlkv
from mlkv.bench import fault_crash, fault_fuzz, fault_powerloss, fault_soak, faults

pytestmark = pytest.mark.slow
pytest.importorskip("rocksdict")
ENGINES = ("slab", "rocksdb")


def _assert_clean(tally, min_cases: int) -> None:
    print(tally.summary())
    assert not tally.failures, tally.summary()
    assert tally.wrong_rows == 0
    assert tally.cases >= min_cases, tally.summary()


def test_crash_loop_recovers_the_last_checkpoint_exactly(tmp_path):
    """20 SIGKILLs of the multi-threaded writer (10 stores, engines alternating, 2 kills each)."""
    tally = fault_crash.campaign(20, ENGINES, tmp_path, seed=7000, kills_per_store=2, delays=(0.05, 0.6))
    _assert_clean(tally, 20)
    recovered = sum(n for outcome, n in tally.counts.items() if outcome.startswith("recovered"))
    assert recovered == 20  # every kill came after the writer's first checkpoint


def test_power_loss_images_recover_a_checkpoint_or_raise(tmp_path):
    """One killed writer per engine: synced and partial images (slab) and torn tails of each file kind
    (those of fault_powerloss.KNOWN_FINDINGS that open an older checkpoint are skipped here)."""
    tally = fault_powerloss.campaign(2, ENGINES, tmp_path, seed=8000, partial=2, skip_known=True)
    _assert_clean(tally, 10)
    assert (
        tally.counts["power loss: recovered the last checkpoint"]
        + tally.counts["power loss: recovered a checkpoint not yet journaled"]
        == 3
    )  # the synced image and both partial ones


def test_corruption_fuzz_never_returns_wrong_rows(tmp_path):
    """Every mutation; the cases of the still-open findings (fault_fuzz.KNOWN_FINDINGS, each with a
    strict-xfail test below) are skipped here and run by the full campaign."""
    tally = fault_fuzz.campaign(50, ENGINES, tmp_path, seed=9000, skip_known=True)
    _assert_clean(tally, 50)
    checked = sum(n for outcome, n in tally.counts.items() if not outcome.startswith("skipped"))
    raised = sum(n for outcome, n in tally.counts.items() if "CorruptionError" in outcome)
    assert checked >= 40 and raised >= 10  # the damage did land on data


@pytest.mark.parametrize("size", [40, 100, 4095])
def test_slab_file_cut_inside_its_header_is_a_corruption_error(tmp_path, size):
    """Fuzz finding (case 94 of seed 1): a slab file cut inside its 4 KiB header raised ValueError."""
    path = tmp_path / "s"
    with mlkv.open(path) as store:
        store.table("t", dim=4).put(np.arange(5, dtype=np.uint64), np.ones((5, 4), np.float32))
    os.truncate(path / "t0.slab", size)  # magic, version, widths and CRC intact; the 4 KiB header is not
    with pytest.raises(mlkv.CorruptionError, match=r"t0\.slab.*shorter than its 4096-byte header"):
        mlkv.open(path).close()
    from mlkv.bench.fault_common import run_check

    assert run_check(str(path))[0] == 1


def _rocksdb_two_checkpoints(path, closed: bool = False) -> dict:
    """A RocksDB store with checkpoint 1 (keys 0..49) in an SST file and checkpoint 2 (keys 50..99) in the
    synced WAL only, copied while still open (what a kill leaves) to `path`; `closed`: copied after close
    (which flushes checkpoint 2 into a second SST file, named by the MANIFEST's last edit). Returns
    {key: row}."""
    import shutil

    live = path.with_name("live")
    with mlkv.open(live, engine="rocksdb") as store:
        t = store.table("t", dim=4)
        t.put(np.arange(50, dtype=np.uint64), np.ones((50, 4), np.float32))
        store.checkpoint()
        store._engine.compact()  # checkpoint 1 in an SST file (a MANIFEST edit names it)
        t.put(np.arange(50, 100, dtype=np.uint64), np.full((50, 4), 2, np.float32))
        store.checkpoint()
        if not closed:
            shutil.copytree(live, path)
    if closed:
        shutil.copytree(live, path)
    return {k: np.full(4, 1 + (k >= 50), np.float32) for k in range(100)}


@pytest.mark.parametrize("damage", ["MANIFEST tail", "WAL tail"])
def test_rocksdb_log_tail_lost_is_refused_before_anything_is_deleted(tmp_path, damage):
    """Fuzz and power-loss finding (issue 8): RocksDB treats a damaged tail of its MANIFEST or WAL as the
    end of its log and opened an older checkpoint (or an empty store) silently; a writable open then
    deleted the SST files the lost MANIFEST edits named, and `mlkv check` said OK. Every open must raise
    CorruptionError and delete nothing, and `mlkv check` exit 1."""
    from mlkv.bench.fault_common import run_check

    path = tmp_path / "s"
    _rocksdb_two_checkpoints(path, closed=damage == "MANIFEST tail")
    db = path / "rocksdb"
    if damage == "MANIFEST tail":
        manifest = next(db.glob("MANIFEST-*"))
        os.truncate(manifest, manifest.stat().st_size - 32)  # the last edit: the SST of close's flush
    else:
        wal = max(db.glob("*.log"), key=lambda f: f.stat().st_size)
        os.truncate(wal, wal.stat().st_size - 32)  # inside checkpoint 2's batch
    files = {f.name: f.stat().st_size for f in db.iterdir() if f.name != "LOCK"}
    for readonly in (True, False, False):
        with pytest.raises(mlkv.CorruptionError, match="lost its tail") as err:
            mlkv.open(path, engine="rocksdb", readonly=readonly).close()
        assert err.value.file == str(db)
        assert {f.name: f.stat().st_size for f in db.iterdir() if f.name != "LOCK"} == files
    assert run_check(str(path))[0] == 1


def test_rocksdb_commit_record_one_behind_opens_the_last_checkpoint(tmp_path):
    """A crash between RocksDB's synced commit and the commit record's replacement leaves the record one
    commit behind: the store opens with RocksDB's (newer) checkpoint, and the next checkpoint catches the
    record up. A record that is missing while RocksDB's meta counts commits is refused."""
    from mlkv.engine import rocksdb

    path = tmp_path / "s"
    want = _rocksdb_two_checkpoints(path)
    record = path / "rocksdb" / rocksdb.COMMITTED
    body = rocksdb._COMMITTED.pack(rocksdb._COMMITTED_MAGIC, 1, 1)  # checkpoint 1's record
    record.write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
    keys = np.arange(100, dtype=np.uint64)
    with mlkv.open(path, engine="rocksdb") as store:
        assert np.array_equal(store.table("t").get(keys, track=False), np.stack(list(want.values())))
        assert store.last_checkpoint()[0] == 2
        store.table("t").put(keys[:1], np.zeros((1, 4), np.float32))  # close checkpoints: commit 3
    engine = rocksdb.RocksDBEngine(str(path / "rocksdb"), readonly=True)
    assert engine._read_committed() == engine._seq == 3
    engine.close()
    record.unlink()
    with pytest.raises(mlkv.CorruptionError, match="commit record is missing") as err:
        mlkv.open(path, engine="rocksdb")
    assert err.value.file == str(record)


def test_rocksdb_store_written_before_the_commit_record_opens_and_gets_one(tmp_path):
    """A database without COMMITTED whose meta record has no commit seq (written by an earlier mlkv)
    opens with its rows; the writable open writes the record, and later commits keep it current."""
    from rocksdict import Options, Rdict

    from mlkv.engine import rocksdb

    path = tmp_path / "s"
    with mlkv.open(path, engine="rocksdb") as store:
        store.table("t", dim=4).put(np.arange(50, dtype=np.uint64), np.ones((50, 4), np.float32))
    db = path / "rocksdb"
    (db / rocksdb.COMMITTED).unlink()
    raw = Rdict(str(db), Options(raw_mode=True))
    state = json.loads(raw[rocksdb._META_KEY][4:-4])
    del state["seq"]
    raw[rocksdb._META_KEY] = rocksdb._frame(rocksdb.KIND_META, json.dumps(state).encode())
    raw.close()
    with mlkv.open(path, engine="rocksdb", readonly=True) as store:  # readonly: unchecked, writes nothing
        assert store.table("t").get(np.arange(50, dtype=np.uint64), track=False).sum() == 200
    assert not (db / rocksdb.COMMITTED).exists()
    with mlkv.open(path, engine="rocksdb") as store:
        assert (db / rocksdb.COMMITTED).exists()
        store.table("t").put(np.arange(5, dtype=np.uint64), np.zeros((5, 4), np.float32))
    with mlkv.open(path, engine="rocksdb", readonly=True) as store:
        assert store.table("t").get(np.arange(50, dtype=np.uint64), track=False).sum() == 180
        assert store._engine._read_committed() == store._engine._seq == 1


def _two_tables(path, monkeypatch, shift: int) -> dict:
    """A slab store with two Adam tables of one width, each with an index snapshot: table a holds keys
    0..99, table b keys shift..shift+99 (other values). Returns {table: {key: row}}."""
    from mlkv.engine import slab

    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 16)  # the first checkpoint writes snapshots
    want = {}
    with mlkv.open(path, cache_bytes="1MiB") as store:
        for i, name in enumerate(("a", "b")):
            keys = np.arange(100, dtype=np.uint64) + np.uint64(i * shift)
            rows = np.full((100, 8), 1000 * (i + 1), dtype=np.float32) + keys[:, None].astype(np.float32)
            store.table(name, dim=8, optimizer=mlkv.optim.Adam(lr=0.01)).put(keys, rows)
            want[name] = dict(zip(keys.tolist(), rows, strict=True))
        store.checkpoint()
    return want


def _swap(a, b) -> None:
    tmp = a.with_name("swap.tmp")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


def _rows_read_or_corruption(path, want) -> None:
    with mlkv.open(path, readonly=True) as store:
        for name, rows in want.items():
            for k, row in rows.items():  # key by key: a scan that raises does not protect a get of one key
                with contextlib.suppress(mlkv.CorruptionError):
                    got = store.table(name).get(np.array([k], dtype=np.uint64), track=False)
                    assert np.array_equal(got[0], row), f"table {name!r} key {k}: {got[0]}, not its row"


def _swapped_raises_naming(path, want, files) -> None:
    """Opening raises CorruptionError naming one of the swapped `files`, and so does a readonly open and
    `mlkv check`; a get of any single key never returns another table's row."""
    from mlkv.bench.fault_common import run_check

    for readonly in (False, True):
        with pytest.raises(mlkv.CorruptionError, match="table id") as err:
            mlkv.open(path, readonly=readonly).close()
        assert os.path.basename(err.value.file) in {f.name for f in files}, err.value
    assert run_check(str(path))[0] == 1
    with contextlib.suppress(mlkv.CorruptionError):
        _rows_read_or_corruption(path, want)


def test_swapped_slab_files_of_two_tables_never_return_the_other_tables_rows(tmp_path, monkeypatch):
    """Fuzz finding (issue 8): same key in the same slot of the other table's file read as its row."""
    want = _two_tables(tmp_path / "s", monkeypatch, shift=0)
    files = [tmp_path / "s" / "t0.slab", tmp_path / "s" / "t1.slab"]
    _swap(*files)
    _swapped_raises_naming(tmp_path / "s", want, files)


@pytest.mark.parametrize("kind", ["snap", "log"])
def test_swapped_index_files_of_two_tables_never_return_wrong_rows(tmp_path, monkeypatch, kind):
    """Fuzz finding (issue 8): a swapped snapshot gave init rows (keys missing) or the error named the log."""
    want = _two_tables(tmp_path / "s", monkeypatch, shift=50)
    if kind == "log":  # a second checkpoint gives each table a log record
        with mlkv.open(tmp_path / "s", cache_bytes="1MiB") as store:
            for name, rows in want.items():
                k = np.array(list(rows)[:3], dtype=np.uint64)
                store.table(name).put(k, np.stack([rows[int(x)] for x in k]))
    files = sorted((tmp_path / "s").glob(f"t*.{kind}"))
    assert len(files) == 2 and all(f.stat().st_size for f in files), files
    _swap(*files)
    _swapped_raises_naming(tmp_path / "s", want, files)


def _to_version_1(path) -> None:
    """Rewrite a slab store's slab headers and index records in format version 1 (no table id)."""
    import struct
    import zlib

    from mlkv.engine import index_log, slot_file
    from mlkv.engine.manifest import read_manifest, write_manifest

    for f in path.glob("t*.slab"):
        with open(f, "r+b") as fh:
            magic, _, row_bytes, slot_bytes, _ = slot_file._HEADER.unpack(fh.read(slot_file._HEADER.size))
            body = slot_file._HEADER_V1.pack(magic, 1, row_bytes, slot_bytes)
            fh.seek(0)
            fh.write((body + struct.pack("<I", zlib.crc32(body))).ljust(slot_file._HEADER.size + 4, b"\0"))
    for f in [*path.glob("t*.snap"), *path.glob("t*.log")]:
        raw, out, off = f.read_bytes(), b"", 0
        while off < len(raw):
            magic, _, ckpt, n, crc, _ = index_log._REC.unpack_from(raw, off)
            head = index_log._REC_V1.pack(magic, 1, ckpt, n, crc)
            end = off + index_log._REC_BYTES + 16 * n
            out += head + struct.pack("<I", zlib.crc32(head)) + raw[off + index_log._REC_BYTES : end]
            off = end
        f.write_bytes(out)
    manifest = read_manifest(str(path))
    for t in manifest["tables"].values():  # the log lengths the manifest commits shrink by 4 per record
        log = path / f"t{t['id']}.{t['gen']}.log"
        t["log_len"] = log.stat().st_size if log.exists() else 0
    write_manifest(str(path), manifest)


def test_stores_written_before_table_ids_open_and_stay_writable(tmp_path, monkeypatch):
    """Format version 1 (no table id in slab headers and index records) opens unchecked; a checkpoint
    appends version-2 records to its logs, and the store reopens with every row (a dict model)."""
    path = tmp_path / "s"
    want = _two_tables(path, monkeypatch, shift=50)
    with mlkv.open(path, cache_bytes="1MiB") as store:  # a log record per table
        for name, rows in want.items():
            k = np.array(list(rows)[:5], dtype=np.uint64)
            new = np.stack([rows[int(x)] for x in k]) + 1
            store.table(name).put(k, new)
            rows.update(zip(k.tolist(), new, strict=True))
    _to_version_1(path)
    assert int.from_bytes((path / "t0.slab").read_bytes()[8:12], "little") == 1
    for step in range(2):
        with mlkv.open(path, cache_bytes="1MiB") as store:
            for name, rows in want.items():
                keys = np.array(list(rows), dtype=np.uint64)
                got = store.table(name).get(keys, track=False)
                assert np.array_equal(got, np.stack(list(rows.values()))), (step, name)
                k = keys[step * 7 : step * 7 + 7]
                new = got[step * 7 : step * 7 + 7] * 2
                store.table(name).put(k, new)  # mixed logs: version-1 records, then version-2 ones
                rows.update(zip(k.tolist(), new, strict=True))
    with mlkv.open(path, readonly=True) as store:
        for name, rows in want.items():
            got = store.table(name).get(np.array(list(rows), dtype=np.uint64), track=False)
            assert np.array_equal(got, np.stack(list(rows.values())))
    from mlkv.bench.fault_common import run_check

    assert run_check(str(path))[0] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_soak_counts_every_update_exactly(tmp_path, engine):
    tally = fault_soak.soak(engine, tmp_path, ops=250, seed=3)
    _assert_clean(tally, 4 * 250)
    assert "staleness waits" in tally.extra


def test_soak_reports_a_lost_update(tmp_path, monkeypatch):
    """Negative control: the soak's counters see an optimizer that skips one update in 40."""
    real = mlkv.optim.SGD.apply
    calls = [0]

    def lossy(self, rows, grads, step):
        calls[0] += 1
        if calls[0] % 40 == 0:
            return
        real(self, rows, grads, step)

    monkeypatch.setattr(mlkv.optim.SGD, "apply", lossy)
    tally = fault_soak.soak("slab", tmp_path, ops=60, seed=4)
    assert any("keys differ" in f for f in tally.failures), tally.summary()


def test_campaign_command_line(tmp_path, capsys):
    assert faults.main(["soak", "--ops", "40", "--engine", "slab", "--workdir", str(tmp_path)]) == 0
    assert "soak (slab): 160 cases, 0 failures, 0 wrong rows" in capsys.readouterr().out


def _closed_rocksdb_store(path) -> None:
    with mlkv.open(path, engine="rocksdb") as store:
        store.table("t", dim=4).put(np.arange(50, dtype=np.uint64), np.ones((50, 4), dtype=np.float32))
        store.checkpoint()
        store._engine.compact()  # the rows in an SST file


@pytest.mark.parametrize("damage", ["sst footer", "CURRENT names a missing MANIFEST"])
def test_rocksdb_damage_found_while_opening_is_a_corruption_error(tmp_path, damage):
    """RocksDB reports a damaged file at open as a bare Exception; mlkv.open must raise CorruptionError and
    `mlkv check` exit 1 (it printed a traceback)."""
    path = tmp_path / "s"
    _closed_rocksdb_store(path)
    db = path / "rocksdb"
    if damage == "sst footer":
        sst = max(db.glob("*.sst"), key=lambda f: f.stat().st_size)
        with open(sst, "r+b") as f:
            f.seek(-8, os.SEEK_END)  # the table magic number
            f.write(b"\0" * 8)
    else:
        (db / "CURRENT").write_text("MANIFEST-999999\n")
    with pytest.raises(mlkv.CorruptionError, match="RocksDB open"):
        mlkv.open(path, engine="rocksdb")
    from mlkv.bench.fault_common import run_check

    assert run_check(str(path))[0] == 1


def test_checkpoint_makes_new_files_durable_before_the_manifest_names_them(tmp_path, monkeypatch):
    """Power loss: a file's directory entry is durable only after an fsync of its directory. Every file the
    new MANIFEST names (a new table's slab file, a new index snapshot or log) must be in the directory as
    of its last fsync before MANIFEST.tmp is renamed over MANIFEST, or a power loss right after the rename
    can leave a committed manifest naming a file that is gone."""
    import json
    import stat

    from mlkv.engine import slab

    path = tmp_path / "s"
    synced: set[str] = set()  # names in the store directory at its last fsync
    missing: list[tuple[str, set[str]]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode) and os.path.samefile(f"/proc/self/fd/{fd}", path):
            synced.clear()
            synced.update(os.listdir(path))

    def replace(src, dst, **kw):
        if os.path.basename(dst) == "MANIFEST":
            body = json.loads(open(src, "rb").read().partition(b"\n")[2])  # noqa: SIM115
            named = set()
            for t in body["tables"].values():
                named.add(f"t{t['id']}.slab")
                if t["has_snapshot"]:
                    named.add(f"t{t['id']}.{t['gen']}.snap")
                if t["log_len"]:
                    named.add(f"t{t['id']}.{t['gen']}.log")
            if named - synced:
                missing.append((body["meta"]["checkpoint_id"], named - synced))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 16)  # the second checkpoint starts a new snapshot and log
    with mlkv.open(path, cache_bytes="1MiB") as store:
        store.table("a", dim=4).put(np.arange(10, dtype=np.uint64), np.ones((10, 4), np.float32))
        store.checkpoint()  # t0.slab, t0.1.snap, t0.1.log
        store.table("a").put(np.arange(100, dtype=np.uint64), np.ones((100, 4), np.float32))
        store.table("b", dim=2).put(np.arange(5, dtype=np.uint64), np.ones((5, 2), np.float32))
        store.checkpoint()  # t1.slab, a new snapshot of t0
    assert not missing, f"(checkpoint, files named before their directory entry was synced): {missing}"
