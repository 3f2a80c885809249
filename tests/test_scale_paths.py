"""Paths that must stay fast on big stores, checked on small ones: `mlkv info` from the MANIFEST alone (no
index load) gives what a full open gives; `mlkv check`'s sequential verify finds every damaged live slot
and passes a sound file."""

from __future__ import annotations

import json
import mmap
import os

import numpy as np
import pytest

import mlkv
from mlkv.cli import main
from mlkv.engine import index_log, slab, slot_file
from mlkv.engine.key_index import KeyIndex, hash64
from mlkv.engine.manifest import read_manifest, write_manifest
from mlkv.engine.process_memory import process_memory
from mlkv.engine.slot_file import HEADER_BYTES, slot_bytes_for

DIM = 4
ROW_BYTES = 4 * 2 * DIM  # dim 4 + Adagrad accumulator


def _make(path: str) -> dict[str, int]:
    """A store with a snapshot and a log behind it, deletions, and a table created later. Returns the
    rows per table a full open counts."""
    rng = np.random.default_rng(0)
    with mlkv.open(path) as store:
        a = store.table("a", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.1))
        b = store.table("b", dim=2)
        for step in range(4):
            keys = rng.integers(-(2**62), 2**62, 3000)
            a.update(keys, np.ones((len(keys), DIM), dtype=np.float32))
            a.delete(keys[:100])
            b.put(np.arange(step * 10, step * 10 + 25), np.zeros((25, 2), dtype=np.float32))
            store.checkpoint({"step": step})
        store.table("c", dim=3).put([7], np.zeros((1, 3), dtype=np.float32))
        store.checkpoint({"step": 4})
    with mlkv.open(path, readonly=True) as store:
        return {name: len(store.table(name)) for name in store.tables()}


def _info(capsys, path: str) -> dict:
    assert main(["info", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_reads_rows_from_the_manifest_without_loading_the_index(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "s")
    expected = _make(path)
    assert expected["a"] == 4 * 2900 and expected["c"] == 1
    with monkeypatch.context() as m:
        for target in (index_log, KeyIndex):
            name = "load" if target is index_log else "insert_new"
            m.setattr(target, name, lambda *a, **k: pytest.fail("the index was loaded"))
        info = _info(capsys, path)
    assert {t["name"]: t["rows"] for t in info["tables"]} == expected
    assert info["checkpoint"]["metadata"] == {"step": 4} and info["recovery_seconds"] is None
    allocated = sum(os.stat(os.path.join(path, f)).st_blocks * 512 for f in os.listdir(path))
    assert info["disk_allocated_bytes"] == allocated > 0


def test_info_of_a_manifest_without_row_counts_counts_them(tmp_path, capsys):
    """A store written before the manifest kept row counts: info loads the index files to count."""
    path = str(tmp_path / "s")
    expected = _make(path)
    manifest = read_manifest(path)
    for state in manifest["tables"].values():
        del state["rows"]
    write_manifest(path, manifest)
    assert {t["name"]: t["rows"] for t in _info(capsys, path)["tables"]} == expected


def test_info_names_the_writer_and_still_reads_rows(tmp_path, capsys):
    path = str(tmp_path / "s")
    expected = _make(path)
    with mlkv.open(path) as writer:
        writer.table("a").put([1], np.zeros((1, DIM), dtype=np.float32))  # not checkpointed: not shown
        info = _info(capsys, path)
    assert info["in_use_by_pid"] == os.getpid()
    assert {t["name"]: t["rows"] for t in info["tables"]} == expected
    assert _info(capsys, path)["in_use_by_pid"] is None  # the probe left no lock behind


def _flip(path: str, slot: int, at: int, row_bytes: int = ROW_BYTES) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + slot * slot_bytes_for(row_bytes) + at)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("chunk_slots", [1, 7, 4096])
def test_check_finds_each_damaged_live_slot_in_one_sequential_pass(
    tmp_path, capsys, monkeypatch, chunk_slots, direct
):
    path = str(tmp_path / "s")
    _make(path)
    monkeypatch.setattr(slot_file, "VERIFY_CHUNK_BYTES", chunk_slots * slot_bytes_for(ROW_BYTES))
    if not direct:  # where O_DIRECT is unsupported (tmpfs) verify reads through the page cache
        monkeypatch.setattr(slot_file.SlotFile, "_direct_fd", lambda self: self.fd)
    assert main(["check", path]) == 0 and capsys.readouterr().out.startswith("OK")

    eng = mlkv.engine.open_engine("slab", path, readonly=True)
    try:
        keys, slots = eng._tables["a"].index.items()
        order = np.argsort(slots)
        keys, slots = keys[order], slots[order]
        b = eng._tables["b"]  # its rows were overwritten after checkpoints: it has superseded slots
        dead = np.setdiff1d(np.arange(b.n_slots), b.index.items()[1])
    finally:
        eng.close()
    assert len(dead)  # damage in a slot no key uses is not damage to the store
    _flip(os.path.join(path, "t1.slab"), int(dead[0]), 20, row_bytes=8)
    assert main(["check", path]) == 0
    capsys.readouterr()

    _flip(os.path.join(path, "t0.slab"), int(slots[5]), 16 + ROW_BYTES - 1)  # last row byte
    _flip(os.path.join(path, "t0.slab"), int(slots[-1]), 3)  # the stored key
    assert main(["check", path, "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 2
    assert "row checksum mismatch" in problems[0] and f"key {int(keys[5])} " in problems[0]
    assert "key mismatch" in problems[1] and f"key {int(keys[-1])} " in problems[1]
    assert all("t0.slab" in p and "'a'" in p for p in problems)


def test_check_counts_bad_slots_past_the_ones_it_describes(tmp_path, monkeypatch):
    path = str(tmp_path / "s")
    _make(path)
    monkeypatch.setattr(slot_file, "MAX_REPORTED", 3)
    eng = mlkv.engine.open_engine("slab", path, readonly=True)
    try:
        _, slots = eng._tables["a"].index.items()
    finally:
        eng.close()
    for s in slots[:10]:
        _flip(os.path.join(path, "t0.slab"), int(s), 40)
    with mlkv.open(path, readonly=True) as store:
        problems = store.verify()
    assert len(problems) == 4 and "7 more bad slots (10 in all)" in problems[-1]


def test_index_load_of_snapshot_and_log_matches_a_dict_model(tmp_path):
    """The last record of a key wins over the snapshot and earlier records; slot -1 deletes."""
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**64, 5000, dtype=np.uint64)
    model = dict(zip(keys.tolist(), range(5000), strict=True))
    snap, log = str(tmp_path / "t.snap"), str(tmp_path / "t.log")
    index_log.write_snapshot(snap, 1, keys, np.arange(5000), table_id=0)
    index_log.create_log(log)
    length = 0
    for ckpt in range(2, 6):
        k = np.concatenate(
            [rng.choice(keys, 300, replace=False), rng.integers(0, 2**64, 50, dtype=np.uint64)]
        )
        s = rng.integers(-1, 10**6, len(k))
        for key, slot in zip(k.tolist(), s.tolist(), strict=True):
            model[key] = slot
        length = index_log.append_log(log, ckpt, k, s, committed=length, table_id=0)
    got_k, got_s = index_log.load(snap, log, length)
    assert dict(zip(got_k.tolist(), got_s.tolist(), strict=True)) == {
        k: v for k, v in model.items() if v >= 0
    }
    assert len(got_k) == len({k for k, v in model.items() if v >= 0})
    only_k, only_s = index_log.load(snap, None, 0)
    assert np.array_equal(only_k, keys) and np.array_equal(only_s, np.arange(5000))


def _bulk_engine(path: str, seed: int, n: int):
    """(keys, rows, engine): up to n distinct random keys with 8-byte rows, and a slab engine at `path`
    with an empty table "t" of that width."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64, n, dtype=np.uint64))
    rows = rng.integers(0, 256, (len(keys), 8), dtype=np.uint8)
    eng = mlkv.engine.open_engine("slab", path)
    eng.create_table("t", 8)
    return keys, rows, eng


def _assert_reopens_with(path: str, keys: np.ndarray, rows: np.ndarray, live: np.ndarray) -> None:
    """Reopened readonly, table "t" holds rows[live] under keys[live], no other of `keys`, and verifies."""
    eng = mlkv.engine.open_engine("slab", path, readonly=True)
    try:
        got, found = eng.read("t", keys)
        assert np.array_equal(found, live) and np.array_equal(got[live], rows[live])
        assert eng.verify() == []
    finally:
        eng.close()


def test_checkpoint_of_a_bulk_load_snapshots_without_deduplicating_and_reopens_exactly(tmp_path, monkeypatch):
    """70,000 new keys outgrow the 1 MiB log: the snapshot is written without a dedup of every key
    written (the keys the epoch added prove it is due); the next, small epoch goes to the log."""
    path = str(tmp_path / "s")
    keys, rows, eng = _bulk_engine(path, 2, 70_000)
    for i in range(0, len(keys), 10_000):
        eng.write("t", keys[i : i + 10_000], rows[i : i + 10_000])
        eng.write("t", keys[i : i + 10], rows[i : i + 10])  # rewrites: the write list repeats keys
    with monkeypatch.context() as m:
        m.setattr(slab, "unique_keys", lambda k: pytest.fail("deduplicated a bulk load's keys"))
        eng.checkpoint({"checkpoint_id": 1})
    state = read_manifest(path)["tables"]["t"]
    assert state["has_snapshot"] and state["log_len"] == 0 and state["rows"] == len(keys)
    rows[:5] = 0
    eng.write("t", keys[:5], rows[:5])
    eng.delete("t", keys[5:7])
    eng.checkpoint({"checkpoint_id": 2})
    eng.close()
    state = read_manifest(path)["tables"]["t"]
    assert state["log_len"] > 0 and state["rows"] == len(keys) - 2
    live = np.ones(len(keys), dtype=bool)
    live[5:7] = False
    _assert_reopens_with(path, keys, rows, live)


def test_a_bulk_load_past_the_log_keeps_no_keys_and_deletes_after_it_still_reopen_exactly(tmp_path):
    """Once the epoch's new keys outgrow the log, the engine stops listing the keys it writes (the epoch
    ends in a snapshot: 800 MB of keys at 100M rows); deleting most of them again in the same epoch does not
    turn it back into a log record (which would then miss the keys): the reopen matches a dict model."""
    path = str(tmp_path / "s")
    keys, rows, eng = _bulk_engine(path, 4, 80_000)
    table = eng._tables["t"]
    for i in range(0, len(keys), 10_000):
        eng.write("t", keys[i : i + 10_000], rows[i : i + 10_000])
    assert table.snapshot_due and sum(len(k) for k in table.changed) == 0
    gone = np.arange(len(keys)) % 8 != 0  # 7/8 deleted: the keys new since the commit fit the log again
    eng.delete("t", keys[gone])
    eng.checkpoint({"checkpoint_id": 1})
    eng.close()
    assert read_manifest(path)["tables"]["t"]["has_snapshot"]
    _assert_reopens_with(path, keys, rows, ~gone)


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def _read_all_randomly(f: slot_file.SlotFile, keys: np.ndarray, rows: np.ndarray) -> int:
    """Read every slot back in random batches of 500, checking each row; return the largest RssFile
    growth seen."""
    base, grown = _rss_file(), 0
    order = np.random.default_rng(3).permutation(len(keys))
    for i in range(0, len(keys), 500):
        s = order[i : i + 500]
        assert np.array_equal(f.read(keys[s], s), rows[s])
        grown = max(grown, _rss_file() - base)
    return grown


def _unmapped(f: slot_file.SlotFile) -> None:
    """Start a measurement from nothing of `f` mapped."""
    f.mm.madvise(mmap.MADV_DONTNEED)
    f._mapped_base = process_memory()[1]


def test_slot_file_unmaps_its_pages_past_the_window_and_keeps_every_byte(tmp_path, monkeypatch):
    """Random reads of a 27 MB slot file that is large next to memory (READ_IN_SHARE 0): with a 4 MiB
    window RssFile stays near it; without, it grows to the file's size. Rows written before a trim
    unmapped their dirty pages read back, and survive a reopen after sync."""
    n, path = 100_000, str(tmp_path / "t.slab")
    keys = np.arange(n, dtype=np.uint64) * 7919
    rows = np.random.default_rng(4).integers(0, 256, (n, 256), dtype=np.uint8)
    monkeypatch.setattr(slot_file, "MAPPED_WINDOW_BYTES", 4 << 20)
    monkeypatch.setattr(slot_file, "READ_IN_SHARE", 0.0)
    f = slot_file.SlotFile(path, 256, table_id=0)
    f.ensure_capacity(n)
    for i in range(0, n, 1000):
        f.write(keys[i : i + 1000], np.arange(i, i + 1000), rows[i : i + 1000])
    _unmapped(f)
    assert _read_all_randomly(f, keys, rows) < 10 << 20
    f.sync()
    f.close()

    monkeypatch.setattr(slot_file, "MAPPED_WINDOW_BYTES", 1 << 40)
    f = slot_file.SlotFile(path, 256, table_id=0)
    try:
        _unmapped(f)
        assert _read_all_randomly(f, keys, rows) > 20 << 20  # the oracle: every page stays mapped
    finally:
        f.close()


def test_slot_file_small_next_to_memory_stays_mapped_whole(tmp_path, monkeypatch):
    """A file within READ_IN_SHARE of the memory for files is never unmapped, whatever the window: after
    one pass of random reads maps it, a second pass takes (almost) no page faults. The same file counted
    as large (READ_IN_SHARE 0) keeps dropping its pages and faults again throughout the second pass."""
    import resource

    n, path = 100_000, str(tmp_path / "t.slab")
    keys = np.arange(n, dtype=np.uint64) * 7919
    rows = np.random.default_rng(6).integers(0, 256, (n, 256), dtype=np.uint8)
    monkeypatch.setattr(slot_file, "MAPPED_WINDOW_BYTES", 4 << 20)
    f = slot_file.SlotFile(path, 256, table_id=0)
    try:
        f.ensure_capacity(n)
        f.write(keys, np.arange(n), rows)
        faults = {}
        monkeypatch.setattr(slot_file, "memory_for_files", lambda: 1 << 40)  # whatever this machine has
        for share in (1.0, 0.0):
            monkeypatch.setattr(slot_file, "READ_IN_SHARE", share)
            _unmapped(f)
            grown = _read_all_randomly(f, keys, rows)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            _read_all_randomly(f, keys, rows)
            faults[share] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            if share:
                assert grown > 20 << 20, grown  # the whole 27 MB file mapped
    finally:
        f.close()
    assert faults[1.0] < 200 and faults[0.0] > 1000, faults


@pytest.mark.parametrize("other_mapping", [False, True])
def test_slot_file_keeps_its_pages_mapped_while_the_rss_they_add_is_below_the_window(
    tmp_path, monkeypatch, other_mapping
):
    """The 64 KiB-a-read count passes the window long before hot rows really map that much: the file must
    not unmap on the count alone, or every read of the hot rows faults again (minor faults counted). The
    old count-only rule dropped this 64 MiB mapping every 4 batches: 25 drops x 64 faults. With another
    20 MiB file mapped by the process (another table, a library), the file drops once and then measures
    from there, instead of dropping at every window."""
    import resource

    n, path = 256_000, str(tmp_path / "t.slab")
    keys = np.arange(n, dtype=np.uint64) * 7919
    rows = np.random.default_rng(5).integers(0, 256, (n, 256), dtype=np.uint8)
    monkeypatch.setattr(slot_file, "READ_IN_SHARE", 0.0)  # a file large next to memory: the window applies
    monkeypatch.setattr(slot_file, "MAPPED_WINDOW_BYTES", 16 << 20)
    f = slot_file.SlotFile(path, 256, table_id=0)
    other = None
    try:
        f.ensure_capacity(n)
        for i in range(0, n, 8000):
            f.write(keys[i : i + 8000], np.arange(i, i + 8000), rows[i : i + 8000])
        f.sync()
        _unmapped(f)
        hot = np.arange(0, n, n // 64)[:64]  # 64 rows on 64 different pages: ~4 MiB mapped with fault-around
        assert np.array_equal(f.read(keys[hot], hot), rows[hot])
        if other_mapping:
            (tmp_path / "other").write_bytes(os.urandom(20 << 20))
            with open(tmp_path / "other", "rb") as g:
                other = mmap.mmap(g.fileno(), 20 << 20, access=mmap.ACCESS_READ)
            assert sum(other[i] for i in range(0, 20 << 20, 4096)) >= 0  # map every page
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(100):  # the count passes the 16 MiB window every 4 batches
            assert np.array_equal(f.read(keys[hot], hot), rows[hot])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        f.close()
        if other is not None:
            other.close()
    assert faults < 400, f"{faults} minor faults re-reading 64 resident rows 100 times"


def test_slot_file_write_of_a_big_batch_copies_in_bounded_steps(tmp_path):
    """A tier flush hands `write` GiBs at once: its temporary records stay bounded (tracemalloc sees numpy's
    allocations), and every row lands in its slot."""
    import tracemalloc

    n = 600_000
    rows = np.random.default_rng(5).integers(0, 256, (n, 256), dtype=np.uint8)  # 154 MB
    keys = np.arange(n, dtype=np.uint64)
    slots = np.random.default_rng(6).permutation(n)
    f = slot_file.SlotFile(str(tmp_path / "t.slab"), 256, table_id=0)
    try:
        f.ensure_capacity(n)
        f.write(keys[:1], slots[:1], rows[:1])  # loads the compiled kernels before tracing
        tracemalloc.start()
        try:
            f.write(keys, slots, rows)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 100 << 20  # two steps' copies at most; whole-batch copies (records, rows): > 300 MB
        assert np.array_equal(f.read(keys, slots), rows)
    finally:
        f.close()


def _filled_slot_file(path: str, n: int, width: int = 64, seed: int = 7):
    keys = np.arange(n, dtype=np.uint64) * 104729 + 3
    rows = np.random.default_rng(seed).integers(0, 256, (n, width), dtype=np.uint8)
    f = slot_file.SlotFile(path, width, table_id=0)
    f.ensure_capacity(n)
    f.write(keys, np.arange(n), rows)
    return f, keys, rows


@pytest.mark.parametrize("from_device", [False, True])
def test_slot_file_read_spreads_over_fault_threads_only_when_its_probe_is_slow(
    tmp_path, monkeypatch, from_device
):
    """A large read whose first rows came from the device (major faults; forced here) gathers the
    rest on the fault threads, in parts; one served from the page cache stays on the calling thread. Either
    way every row, and the zeros of a missing slot, come back as a single gather returns them."""
    f, keys, rows = _filled_slot_file(str(tmp_path / "t.slab"), 20_000)
    calls = []
    real_pool = slot_file._fault_pool

    def spy():
        calls.append(1)
        return real_pool()

    monkeypatch.setattr(slot_file, "_fault_pool", spy)
    monkeypatch.setattr(slot_file, "_probe_cold", lambda faults, start: from_device)
    try:
        pick = np.random.default_rng(8).choice(len(keys), 5000, replace=False)
        slots = pick.astype(np.int64)
        slots[[3, 700, 4999]] = -1
        got = f.read(keys[pick], slots)
        want = rows[pick].copy()
        want[[3, 700, 4999]] = 0
        assert np.array_equal(got, want)
        assert len(calls) == (1 if from_device else 0)
    finally:
        f.close()


def test_slot_file_read_on_fault_threads_names_the_first_bad_row_and_counts_them_all(tmp_path, monkeypatch):
    """Damaged slots in different parts of a parallel read: the error names the first one in read order and
    counts every one, as the single-threaded gather does."""
    f, keys, _ = _filled_slot_file(str(tmp_path / "t.slab"), 4000)
    monkeypatch.setattr(slot_file, "_probe_cold", lambda faults, start: True)
    try:
        order = np.random.default_rng(9).permutation(len(keys))
        for i in (3000, 1200, 3999):  # read positions, each in a different fault thread's part
            f.slots[order[i], 20] ^= 0x10
        with pytest.raises(mlkv.errors.CorruptionError, match=rf"key {int(keys[order[1200]])} \(3 bad\)"):
            f.read(keys[order], order.astype(np.int64))
    finally:
        f.close()


def test_flush_of_a_large_dirty_tier_copies_a_bounded_part_at_a_time(tmp_path, monkeypatch):
    """A 48 MiB tier of dirty rows flushes in parts of at most half the write-back limit (4 MiB here), so a
    flush's allocations stay near the limit, not the tier (the old flush copied the whole tier into one
    queued write: > 48 MiB), and every row reaches the engine: the checkpoint reopens with each row. The
    rows' keys are in the engine already, so its key index does not grow (that is index memory)."""
    import tracemalloc

    from mlkv.store import store as store_module

    monkeypatch.setattr(store_module, "WRITEBACK_MAX_BYTES", 4 << 20)
    n, dim = 380_000, 32
    rows = np.random.default_rng(11).standard_normal((n, dim), dtype=np.float32)
    keys = np.arange(n, dtype=np.int64) * 31 + 5
    with mlkv.open(str(tmp_path / "s"), cache_bytes=64 << 20) as store:
        t = store.table("t", dim=dim)
        t.put(keys, np.zeros_like(rows))
        store.checkpoint()  # the engine's key index holds every key now: the flush below does not grow it
        for i in range(0, n, 50_000):
            t.put(keys[i : i + 50_000], rows[i : i + 50_000])
        store.reset_stats()
        tracemalloc.start()
        try:
            store.flush()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert store.stats()["rows_written_back"] == n
        store.checkpoint({"at": "flushed"})
    assert peak < 24 << 20, f"flush peak {peak / 2**20:.0f} MiB"  # whole-tier copies: 105 MiB
    with mlkv.open(str(tmp_path / "s"), readonly=True) as store:
        assert np.array_equal(store.table("t").get(keys, track=False), rows)


def test_fault_threads_of_a_read_from_the_device_stop_when_the_store_closes(tmp_path):
    """In a fresh interpreter (no other slot file open): a read forced onto the fault threads starts them,
    and closing the store, its last slot file, stops them: no mlkv thread outlives close()."""
    import subprocess
    import sys

    script = f"""
import threading, numpy as np, mlkv
from mlkv.engine import slot_file
slot_file._probe_cold = lambda faults, start: True
names = lambda: [t.name for t in threading.enumerate() if t.name.startswith("mlkv-fault")]
with mlkv.open({str(tmp_path / "s")!r}, cache_bytes=1 << 20) as store:
    t = store.table("t", dim=4)
    keys = np.arange(5000)
    t.put(keys, np.ones((5000, 4), dtype=np.float32))
    store.checkpoint()
with mlkv.open({str(tmp_path / "s")!r}, cache_bytes=1 << 16) as store:
    assert store.table("t").get(keys, track=False).sum() == 20000
    running = names()
print(len(running), len(names()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    running, after = map(int, out.stdout.split())
    assert running > 0 and after == 0


def _record_fadvise(monkeypatch) -> list[tuple[str, int, int, int]]:
    """Calls of os.posix_fadvise (thread name, offset, length, advice), passed on to the real one."""
    import threading

    calls, real = [], os.posix_fadvise

    def spy(fd, offset, length, advice):
        calls.append((threading.current_thread().name, offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    return calls


def test_a_small_cold_file_is_read_in_whole_on_its_first_cold_read_and_close_stops_it(tmp_path, monkeypatch):
    """The first read that finds the file cold (forced here) starts one background read-in: WILLNEED advice
    over every allocated byte in 128 KiB steps, once per open; rows read meanwhile are exact; close() waits
    for it, so no mlkv-readin thread is left."""
    import threading

    f, keys, rows = _filled_slot_file(str(tmp_path / "t.slab"), 100_000, width=256)  # 27 MB
    monkeypatch.setattr(slot_file, "_probe_cold", lambda faults, start: True)
    monkeypatch.setattr(slot_file, "memory_for_files", lambda: 1 << 40)
    calls = _record_fadvise(monkeypatch)
    try:
        for seed in range(3):
            pick = np.random.default_rng(seed).choice(len(keys), 2000, replace=False)
            assert np.array_equal(f.read(keys[pick], pick.astype(np.int64)), rows[pick])
        if f._read_in is not None:
            f._read_in.join()
    finally:
        f.close()
    assert f._advice == mmap.MADV_NORMAL  # faults meanwhile read around their page
    mine = [c for c in calls if c[0] == "mlkv-readin"]
    assert all(advice == os.POSIX_FADV_WILLNEED for *_, advice in mine)
    assert [off for _, off, _, _ in mine] == list(range(0, f.reserved, 128 << 10))  # once, in order
    assert sum(length for _, _, length, _ in mine) == f.reserved
    assert not [t for t in threading.enumerate() if t.name == "mlkv-readin"]


def test_a_cold_file_larger_than_its_share_of_memory_is_not_read_in(tmp_path, monkeypatch):
    """A table above READ_IN_SHARE of the memory for files (8x its size is needed) is left to random reads;
    warm reads never start a read-in either."""
    f, keys, rows = _filled_slot_file(str(tmp_path / "t.slab"), 100_000, width=256)
    monkeypatch.setattr(slot_file, "memory_for_files", lambda: 4 * f.reserved)  # a quarter: too big
    calls = _record_fadvise(monkeypatch)
    try:
        monkeypatch.setattr(slot_file, "_probe_cold", lambda faults, start: False)  # warm
        pick = np.arange(0, 100_000, 50)
        assert np.array_equal(f.read(keys[pick], pick), rows[pick])
        assert not f._read_in_tried
        monkeypatch.setattr(slot_file, "_probe_cold", lambda faults, start: True)
        assert np.array_equal(f.read(keys[pick], pick), rows[pick])
        assert f._read_in_tried and f._read_in is None
        assert f._advice == mmap.MADV_RANDOM  # a fault reads its own page only
    finally:
        f.close()
    assert not [c for c in calls if c[0] == "mlkv-readin"]


def test_memory_for_files_is_capped_by_the_cgroup_memory_limit(tmp_path):
    """In a cgroup v1 memory group limited to 256 MiB (CI runs as root), the memory a read-in may take is at
    most the limit, however much the machine has free."""
    import subprocess
    import sys

    from mlkv.engine.process_memory import memory_for_files

    root = "/sys/fs/cgroup/memory"
    if not os.path.isdir(root) or os.geteuid() != 0:
        pytest.skip("needs root and the cgroup v1 memory controller (the bench's --memory-limit does too)")
    assert memory_for_files() > 256 << 20  # outside the group: the machine's MemAvailable
    group = os.path.join(root, f"mlkv-test-{os.getpid()}")
    os.makedirs(group, exist_ok=True)
    try:
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(256 << 20))
        script = (
            f"open({os.path.join(group, 'cgroup.procs')!r}, 'w').write(str(__import__('os').getpid()))\n"
            "from mlkv.engine.process_memory import memory_for_files\nprint(memory_for_files())"
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert 0 < int(out.stdout) <= 256 << 20
    finally:
        os.rmdir(group)


def test_cuts_that_end_out_of_order_keep_row_operations_waiting_until_the_last_one_ends(tmp_path):
    """Two threads' cuts (checkpoint, flush) overlap while each waits with the store lock released; the
    first to begin may end first. Row operations must wait until both ended, and run again after: a saved
    and restored flag cleared it while the second cut was still writing."""
    with mlkv.open(str(tmp_path / "s")) as store:
        t = store.table("t", dim=2)
        first, second = store._ctx.cut(), store._ctx.cut()
        with store._ctx.lock:  # each cut runs under the store lock (released while it waits)
            first.__enter__()
            second.__enter__()
            first.__exit__(None, None, None)
            assert store._ctx.checkpointing  # the second cut is still writing
            second.__exit__(None, None, None)
            assert not store._ctx.checkpointing
        t.put([1], np.ones((1, 2), dtype=np.float32))  # would wait forever if the flag stayed set
        store.checkpoint()


def test_a_flush_stops_queueing_when_the_write_back_fails_and_the_rows_stay_readable(tmp_path, monkeypatch):
    """The disk fails under a flush of a 48 MiB dirty tier: the flush raises the failure after one part
    reached the queue instead of copying every part into a queue that will never drain; every row still
    reads back as written, and a reopen returns the last checkpoint (here: none of these rows)."""
    import errno

    from mlkv.store import store as store_module

    monkeypatch.setattr(store_module, "WRITEBACK_MAX_BYTES", 4 << 20)
    n, dim = 380_000, 32
    rows = np.random.default_rng(12).standard_normal((n, dim), dtype=np.float32)
    keys = np.arange(n, dtype=np.int64) * 7 + 1
    store = mlkv.open(str(tmp_path / "s"), cache_bytes=64 << 20)
    t = store.table("t", dim=dim)
    store.checkpoint()
    t.put(keys, rows)

    def failing(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", failing)
    with pytest.raises(mlkv.errors.StorageFullError):
        store.flush()
    assert store._ctx.writeback._bytes <= 4 << 20  # one part queued, not the 48 MiB tier
    assert np.array_equal(t.get(keys, track=False), rows)
    monkeypatch.undo()
    store.close()  # the failure was raised already: close does not raise it again
    with mlkv.open(str(tmp_path / "s"), readonly=True) as again:
        assert len(again.table("t")) == 0


@pytest.mark.parametrize("n", [0, 1, 1000, 300_000])
def test_a_snapshot_is_written_from_the_pairs_without_copying_them_and_byte_for_byte_the_record(tmp_path, n):
    """The snapshot file equals the record `_pack` builds (the format recovery reads), int64 and uint64 keys
    alike, while the writer allocates next to nothing (packing copied the 16 bytes a pair twice more)."""
    import tracemalloc

    rng = np.random.default_rng(n)
    keys = rng.integers(0, 2**63, n).astype(np.uint64)
    slots = rng.integers(-1, 10**6, n)
    path = str(tmp_path / "t.snap")
    for k in (keys, keys.view(np.int64)):
        tracemalloc.start()
        try:
            index_log.write_snapshot(path, 7, k, slots, table_id=3)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        with open(path, "rb") as f:
            assert f.read() == index_log._pack(index_log.SNAP_MAGIC, 7, keys, slots, 3)
        assert peak < (1 << 20) + n  # the pairs are 16 * n bytes


@pytest.mark.parametrize("n", [0, 1, 5000, 300_000])
def test_a_snapshot_streamed_from_the_key_index_is_the_record_of_its_items(tmp_path, n):
    """A checkpoint's snapshot comes part by part from the index table (`live_parts`), never as a copy of
    every pair: the file equals the `_pack` record of `items()`, and the writer holds about one part."""
    import tracemalloc

    from mlkv.engine.key_index import KeyIndex

    rng = np.random.default_rng(n + 1)
    keys = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64))
    index = KeyIndex()
    index.insert_new(keys, rng.integers(0, 10**7, len(keys)))
    index.remove(keys[::7])  # holes inside the parts
    live_k, live_s = index.items()
    path = str(tmp_path / "t.snap")
    positions = 1 << 12  # many parts of a small table
    tracemalloc.start()
    try:
        index_log.write_snapshot_parts(path, 9, len(index), index.live_parts(positions), table_id=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with open(path, "rb") as f:
        assert f.read() == index_log._pack(index_log.SNAP_MAGIC, 9, live_k, live_s, 5)
    # one part's pairs and mask; all the pairs are 16 * n bytes
    assert peak < (1 << 20) + 17 * positions
    assert sum(len(k) for k, _ in index.live_parts()) == len(index)


def test_a_snapshot_whose_parts_disagree_with_the_count_is_removed(tmp_path):
    """A writer that announces n pairs and streams another number raises and leaves no file."""
    path = tmp_path / "t.snap"
    k, s = np.arange(10, dtype=np.uint64), np.arange(10)
    for n in (9, 11):
        with pytest.raises(ValueError, match="announced"):  # 9: too many while writing; 11: too few
            index_log.write_snapshot_parts(str(path), 1, n, [(k, s)], table_id=0)
        assert not path.exists()


def test_a_snapshot_checkpoint_freezes_every_live_slot_part_by_part(tmp_path, monkeypatch):
    """The commit of a snapshot marks every live slot frozen walking the index in parts (here of 256
    positions, so a 40K-key table has hundreds): after each checkpoint every live slot is frozen, so the
    next epoch's writes never land in a slot a kept checkpoint names: `verify` of the three kept
    checkpoints finds every slot intact, and the store reopens with the last one."""
    from mlkv.engine import key_index

    monkeypatch.setattr(key_index, "PART_POSITIONS", 256)
    path = str(tmp_path / "s")
    keys, rows, eng = _bulk_engine(path, 8, 40_000)
    eng.keep_checkpoints = 3
    table = eng._tables["t"]
    live = np.ones(len(keys), dtype=bool)
    for ckpt in range(1, 5):
        rows = rows.copy()
        rows[:, 0] += 1  # every row changes: writes go to fresh slots, never a frozen one
        eng.write("t", keys[live], rows[live])
        if ckpt == 3:
            live[::5] = False
            eng.delete("t", keys[::5])
        table.snapshot_due = True  # the epoch ends in a snapshot (as a bulk load's does)
        eng.checkpoint({"checkpoint_id": ckpt})
        assert table.has_snapshot
        _, slots = table.index.items()
        assert table.frozen[slots].all()
        assert eng.verify() == []
    eng.close()
    _assert_reopens_with(path, keys, rows, live)


def test_crc32_combine_is_the_crc_of_the_concatenation():
    """crc32_combine(crc(A), crc(B), len(B)) == crc(A + B), for empty and odd-sized parts alike."""
    import zlib

    rng = np.random.default_rng(11)
    for la, lb in [(0, 0), (0, 5), (7, 0), (1, 1), (100, 3), (4096, 12345), (3, 1 << 20)]:
        a, b = rng.bytes(la), rng.bytes(lb)
        assert index_log.crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)


def _snapshot_of(tmp_path, n: int, seed: int) -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64))
    slots = rng.permutation(len(keys)).astype(np.int64)
    path = str(tmp_path / f"t{seed}.snap")
    index_log.write_snapshot(path, 3, keys, slots, table_id=2)
    return path, keys, slots


def test_a_recovery_streams_the_snapshot_into_the_index_part_by_part(tmp_path, monkeypatch):
    """load_snapshot_into builds the same index as loading the whole snapshot (every key at its slot, no
    other), reading parts of 1,000 pairs, and holds about one part besides the index."""
    import tracemalloc

    from mlkv.engine.key_index import KeyIndex

    monkeypatch.setattr(index_log, "SNAPSHOT_PART_PAIRS", 1000)
    path, keys, slots = _snapshot_of(tmp_path, 200_000, 1)
    index = KeyIndex(len(keys))
    tracemalloc.start()
    try:
        assert index_log.load_snapshot_into(path, index, len(keys), table_id=2) == len(keys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the snapshot is 3.2 MB
    assert len(index) == len(keys) and np.array_equal(index.lookup(keys), slots)
    want_k, want_s = index_log.load(path, None, 0, 2)
    assert np.array_equal(index.lookup(want_k), want_s)


@pytest.mark.parametrize("damage", ["key", "slot", "truncate", "append", "slot_range", "table_id"])
def test_a_streamed_snapshot_load_refuses_a_damaged_file(tmp_path, monkeypatch, damage):
    """A flipped bit in any part (found by the CRC after the last part), a short or long file, a slot past
    the table or another table's snapshot: CorruptionError naming the file."""
    from mlkv.engine.key_index import KeyIndex
    from mlkv.errors import CorruptionError

    monkeypatch.setattr(index_log, "SNAPSHOT_PART_PAIRS", 1000)
    path, keys, _ = _snapshot_of(tmp_path, 10_000, 2)
    n, head = len(keys), index_log._REC_BYTES
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if damage == "key":
        data[head + 8 * 7000 + 3] ^= 0x10  # in the 8th part's keys
    elif damage == "slot":
        data[head + 8 * n + 8 * 4321] ^= 0x01
    elif damage == "truncate":
        data = data[:-8]
    elif damage == "append":
        data += b"\0" * 8
    with open(path, "wb") as f:
        f.write(bytes(data))
    bound = n - 1 if damage == "slot_range" else n  # one slot names the table's end
    table_id = 3 if damage == "table_id" else 2
    with pytest.raises(CorruptionError, match=r"t2\.snap"):
        index_log.load_snapshot_into(path, KeyIndex(n), bound, table_id=table_id)


@pytest.mark.parametrize("row_bytes", [256, 250])
def test_slot_file_write_stores_key_check_row_and_zero_padding_and_reads_them_back(tmp_path, row_bytes):
    """Every written slot holds [key | check | row | zero padding to whole words], the check being
    splitmix64(sum_j (w_j ^ c1_j) * c2_j ^ splitmix64(key)) over the row's words (computed here with
    numpy, apart from the kernels), and reads verify it. Slots are written out of order, over slots
    written before; a row width that is not whole words is padded."""
    n = 5000
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
    rows = rng.integers(0, 256, (n, row_bytes), dtype=np.uint8)
    slots = rng.permutation(2 * n)[:n].astype(np.int64)
    f = slot_file.SlotFile(str(tmp_path / "t.slab"), row_bytes, table_id=0)
    try:
        f.ensure_capacity(2 * n)
        f.write(keys, slots, rng.integers(0, 256, (n, row_bytes), dtype=np.uint8))  # overwritten below
        f.write(keys, slots, rows)
        expected = np.zeros((n, slot_bytes_for(row_bytes)), dtype=np.uint8)
        expected[:, 16 : 16 + row_bytes] = rows
        words = expected.view(np.uint64)
        words[:, 0] = keys
        m = words.shape[1] - 2
        acc = ((words[:, 2:] ^ slot_file._C1[:m]) * slot_file._C2[:m]).sum(axis=1, dtype=np.uint64)
        words[:, 1] = hash64(acc ^ hash64(keys))
        np.testing.assert_array_equal(f.slots[slots], expected)
        np.testing.assert_array_equal(f.read(keys, slots), rows)
    finally:
        f.close()


def test_slot_file_write_refuses_rows_of_the_wrong_width_before_storing_anything(tmp_path):
    from mlkv.errors import InternalError

    f = slot_file.SlotFile(str(tmp_path / "t.slab"), 256, table_id=0)
    try:
        f.ensure_capacity(8)
        before = f.slots[:8].copy()
        with pytest.raises(InternalError, match=r"rows must be \(2, 256\) bytes"):
            f.write(np.array([1, 2], dtype=np.uint64), np.array([0, 1]), np.zeros((2, 264), dtype=np.uint8))
        np.testing.assert_array_equal(f.slots[:8], before)
    finally:
        f.close()
