"""A full or failing device: real small file systems (tmpfs, mounted here: CI runs as root) and injected
I/O errors. Each case checks the error (type, errno, message), that reads still work, that close() works,
and that reopening gives exactly the last completed checkpoint (a dict model of it). Before the fix, the
write-back thread writing a sparse mapped slab file on a full tmpfs killed the process with SIGBUS.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import mlkv
from mlkv.errors import ReadOnlyError, StorageFullError, StorageIOError

DIM = 16
BATCH = 2048


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _umount(path: str) -> None:
    if subprocess.run(["umount", path], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True)  # a leaked descriptor: detach lazily


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, unmounted afterwards; skipped where mounting is not permitted (not root)."""
    path = tmp_path / "fs"
    path.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {getattr(e, 'stderr', e)}")
    yield path
    _umount(str(path))


def _values(keys: np.ndarray, version: int) -> np.ndarray:
    """Rows [key, version, noise...] (noise: RocksDB compresses, and a full disk must be met)."""
    out = np.random.default_rng([version, len(keys), int(keys[0]) if len(keys) else 0]).random(
        (len(keys), DIM), dtype=np.float32
    )
    out[:, 0] = keys
    out[:, 1] = version
    return out


def _fill(directory) -> str:
    """A ballast file that takes every free byte of the file system holding `directory`."""
    ballast = os.path.join(directory, "ballast")
    chunk = b"\xff" * (64 << 10)
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    while True:  # the last partial page: a byte at a time is enough on tmpfs after 64 KiB chunks
        try:
            with open(ballast, "ab", buffering=0) as f:
                f.write(b"\xff" * 512)
        except OSError:
            break
    return ballast


def _check_reopen(path, engine: str, model: dict[int, np.ndarray], ckpt: int) -> None:
    """The store at `path` holds exactly `model` (checkpoint `ckpt`), readonly and writable."""
    for readonly in (True, False):
        with mlkv.open(path, engine=engine, readonly=readonly) as s:
            assert s.last_checkpoint()[0] == ckpt
            t = s.table("t")
            assert len(t) == len(model)
            keys = np.array(sorted(model), dtype=np.int64)
            np.testing.assert_array_equal(t.get(keys, track=False), np.stack([model[k] for k in keys]))


def _train_until_full(t, store, model: dict, current: dict, every: int) -> tuple[StorageFullError, int]:
    """Put batches of new keys, checkpointing after batch 1 and then every `every` batches, until the disk
    fills (in the write-back or in a checkpoint); `model` is the last checkpoint that completed.
    Returns (the error, that checkpoint's id)."""
    ckpt = 0
    for step in range(400):
        keys = np.arange(step * BATCH, (step + 1) * BATCH, dtype=np.int64)
        try:
            t.put(keys, _values(keys, step))
            current.update(zip(keys.tolist(), _values(keys, step), strict=True))
            if step % every == 1:
                ckpt = store.checkpoint()
                model.clear()
                model.update(current)
        except StorageFullError as e:
            return e, ckpt
    pytest.fail("the 8 MiB file system never filled up")


def _check_error(err: StorageFullError, path) -> None:
    assert isinstance(err, OSError) and isinstance(err, mlkv.MlkvError)
    assert err.errno == errno.ENOSPC
    assert "no space left on device" in str(err) and "bytes" in str(err)
    assert str(path) in err.filename


def test_full_disk_during_writeback_raises_storage_full_at_next_write(small_fs):
    """The write-back thread meets the full disk (reserving slab space for evicted rows): the next put,
    flush and checkpoint raise StorageFullError (ENOSPC), reads still return the newest rows, close()
    releases the store, and reopening gives the last checkpoint. Before the fix: SIGBUS, exit 135."""
    path = small_fs / "store"
    store = mlkv.open(path, cache_bytes="64KiB")
    t = store.table("t", dim=DIM, optimizer=None)
    model: dict[int, np.ndarray] = {}
    current: dict[int, np.ndarray] = {}
    err, ckpt = _train_until_full(t, store, model, current, every=1000)
    _check_error(err, path)
    assert "write-back" in str(err) and ckpt == 1
    with pytest.raises(StorageFullError):  # every later write raises the same, and changes nothing
        t.put(np.array([1]), _values(np.array([1]), 99))
    with pytest.raises(StorageFullError):
        store.flush()
    with pytest.raises(StorageFullError):
        store.checkpoint()
    # reads still serve the newest rows, from memory and the queue of rows not yet written
    keys = np.array(sorted(current), dtype=np.int64)[:: max(1, len(current) // 500)]
    np.testing.assert_array_equal(t.get(keys, track=False), np.stack([current[k] for k in keys]))
    store.close()  # the failure was raised already: close releases without a checkpoint, quietly
    _check_reopen(path, "slab", model, ckpt)


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_training_until_disk_full_keeps_last_checkpoint(small_fs, engine):
    """Training with frequent checkpoints until the disk is full, wherever that is met first (write-back,
    index log, manifest, RocksDB's WAL or tables): StorageFullError, reads work, reopen = last checkpoint."""
    path = small_fs / "store"
    store = mlkv.open(path, engine=engine, cache_bytes="64KiB")
    t = store.table("t", dim=DIM, optimizer=None)
    model: dict[int, np.ndarray] = {}
    current: dict[int, np.ndarray] = {}
    err, ckpt = _train_until_full(t, store, model, current, every=4)
    _check_error(err, path)
    assert ckpt >= 1
    keys = np.array(sorted(current), dtype=np.int64)[:: max(1, len(current) // 500)]
    np.testing.assert_array_equal(t.get(keys, track=False), np.stack([current[k] for k in keys]))
    store.close(checkpoint=False)
    if engine == "rocksdb":  # RocksDB's open replays its log into a new table file: it needs room
        with pytest.raises(StorageFullError):
            mlkv.open(path, engine=engine)
        _mount("-o", "remount,size=32m", str(small_fs))  # make room
    _check_reopen(path, engine, model, ckpt)


def test_full_disk_unreported_failure_is_raised_by_close(small_fs):
    """A write-back failure no call has raised yet is raised by close(), which still releases the store."""
    path = small_fs / "store"
    store = mlkv.open(path, cache_bytes="64KiB")
    t = store.table("t", dim=DIM, optimizer=None)
    keys = np.arange(BATCH, dtype=np.int64)
    t.put(keys, _values(keys, 0))
    store.checkpoint()
    model = dict(zip(keys.tolist(), _values(keys, 0), strict=True))
    _fill(small_fs)
    more = np.arange(BATCH, 20 * BATCH, dtype=np.int64)
    t.get(more, track=False)  # created rows spill to the write-back queue, which meets the full disk
    with pytest.raises(StorageFullError) as info:
        store.close()
    assert info.value.errno == errno.ENOSPC
    _check_reopen(path, "slab", model, 1)


@pytest.mark.parametrize("retry", [True, False], ids=["retry_after_freeing", "close_without_retry"])
def test_full_disk_during_checkpoint_keeps_manifest_and_can_be_retried(small_fs, retry):
    """Rows reach the engine first (their slots reserved), then a ballast file fills the disk, so the
    checkpoint itself (index log, manifest) meets ENOSPC: the old manifest stays, byte for byte."""
    path = small_fs / "store"
    store = mlkv.open(path, cache_bytes="1MiB")
    t = store.table("t", dim=DIM, optimizer=None)
    keys = np.arange(BATCH, dtype=np.int64)
    t.put(keys, _values(keys, 0))
    store.checkpoint()
    model = dict(zip(keys.tolist(), _values(keys, 0), strict=True))
    manifest = (path / "MANIFEST").read_bytes()
    changed, new = keys[:100], np.arange(BATCH, 2 * BATCH, dtype=np.int64)
    changed_rows, new_rows = _values(changed, 1), _values(new, 1)
    t.put(changed, changed_rows)
    t.put(new, new_rows)
    store.flush()
    ballast = _fill(small_fs)
    with pytest.raises(StorageFullError) as info:
        store.checkpoint({"epoch": 1})
    assert info.value.errno == errno.ENOSPC and "bytes wanted" in str(info.value)
    assert (path / "MANIFEST").read_bytes() == manifest
    assert not (path / "MANIFEST.tmp").exists()
    np.testing.assert_array_equal(t.get(changed, track=False), changed_rows)
    with pytest.raises(StorageFullError):  # still full: close's checkpoint fails, the store is released
        store.close()
    store = mlkv.open(path)
    assert store.last_checkpoint()[0] == 1
    store.close(checkpoint=False)
    os.remove(ballast)
    _check_reopen(path, "slab", model, 1)
    if retry:  # with room again, the same writes commit
        store = mlkv.open(path, cache_bytes="1MiB")
        t = store.table("t")
        t.put(changed, changed_rows)
        t.put(new, new_rows)
        _fill(small_fs)
        with pytest.raises(StorageFullError):
            store.checkpoint({"epoch": 1})
        os.remove(os.path.join(small_fs, "ballast"))
        assert store.checkpoint({"epoch": 1}) == 2
        store.close()
        model.update(zip(changed.tolist(), changed_rows, strict=True))
        model.update(zip(new.tolist(), new_rows, strict=True))
        _check_reopen(path, "slab", model, 2)


def _store_with_checkpoint(path, n: int = BATCH):
    store = mlkv.open(path, cache_bytes="64KiB")
    t = store.table("t", dim=DIM, optimizer=None)
    keys = np.arange(n, dtype=np.int64)
    t.put(keys, _values(keys, 0))
    store.checkpoint()
    return store, t, dict(zip(keys.tolist(), _values(keys, 0), strict=True))


def test_eio_from_engine_write_raises_storage_io_error(tmp_path, monkeypatch):
    """EIO where the engine reserves slot space (the write-back path): StorageIOError at the next put."""
    store, t, model = _store_with_checkpoint(tmp_path / "s")

    def failing(fd, offset, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "posix_fallocate", failing)
    with pytest.raises(StorageIOError) as info:
        for step in range(1, 50):
            keys = np.arange(step * BATCH, (step + 1) * BATCH, dtype=np.int64)
            t.put(keys, _values(keys, step))
    assert info.value.errno == errno.EIO and isinstance(info.value, mlkv.MlkvError)
    assert info.value.filename.endswith("t0.slab")
    np.testing.assert_array_equal(t.get(np.arange(5), track=False), np.stack([model[k] for k in range(5)]))
    monkeypatch.undo()
    store.close()
    _check_reopen(tmp_path / "s", "slab", model, 1)


@pytest.mark.parametrize("where", ["index_log", "manifest_dir"])
def test_eio_from_fsync_during_checkpoint_rules_out_later_checkpoints(tmp_path, monkeypatch, where):
    """An fsync failure in a checkpoint (the kernel may have dropped unsynced pages): StorageIOError, and
    every later checkpoint of the process raises; reopening gives the last checkpoint that committed (the
    failed one itself if the manifest was already renamed when the directory fsync failed)."""
    store, t, model = _store_with_checkpoint(tmp_path / "s")
    rows = _values(np.arange(10), 5)
    t.put(np.arange(10), rows)
    real_fsync = os.fsync
    manifest = (tmp_path / "s" / "MANIFEST").read_bytes()

    def failing_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if where == "index_log":
            fail = target.endswith(".log")
        else:  # the directory fsync after the rename (not the one before it)
            fail = os.path.isdir(target) and (tmp_path / "s" / "MANIFEST").read_bytes() != manifest
        if fail:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageIOError) as info:
        store.checkpoint()
    assert info.value.errno == errno.EIO and info.value.fsync_failed
    monkeypatch.undo()
    np.testing.assert_array_equal(t.get(np.arange(10), track=False), rows)
    with pytest.raises(StorageIOError, match="earlier failure"):
        store.checkpoint()
    store.close(checkpoint=False)
    if where == "manifest_dir":  # renamed before the directory fsync failed: that checkpoint is in place
        model.update(zip(range(10), rows, strict=True))
    _check_reopen(tmp_path / "s", "slab", model, 2 if where == "manifest_dir" else 1)


@pytest.mark.parametrize("how", ["remount_ro", "ro_bind_mount"])
def test_read_only_file_system_refuses_writable_open_and_serves_readonly(small_fs, tmp_path, how):
    """A store on a read-only file system (the whole mount remounted read-only, or seen through a read-only
    bind mount: what root gets instead of permission denied): a writable open raises ReadOnlyError naming
    the path, nothing is changed, and a readonly open reads every row."""
    path = small_fs / "store"
    store, _, model = _store_with_checkpoint(path)
    store.close()
    if how == "remount_ro":
        _mount("-o", "remount,ro", str(small_fs))
        seen = path
    else:
        view = tmp_path / "view"
        view.mkdir()
        _mount("--bind", str(path), str(view))
        try:
            _mount("-o", "remount,bind,ro", str(view))
        except subprocess.CalledProcessError:
            _umount(str(view))
            raise
        seen = view
    try:
        with pytest.raises(ReadOnlyError, match="read-only file system") as info:
            mlkv.open(seen)
        assert isinstance(info.value, PermissionError) and str(seen) in str(info.value)
        with pytest.raises(ReadOnlyError):
            mlkv.open(seen, engine="slab")
        _check_reopen_readonly(seen, model)
    finally:
        if how == "ro_bind_mount":
            _umount(str(seen))
    if how == "remount_ro":
        _mount("-o", "remount,rw", str(small_fs))
    _check_reopen(path, "slab", model, 1)


def _check_reopen_readonly(path, model):
    with mlkv.open(path, readonly=True) as s:
        t = s.table("t")
        keys = np.array(sorted(model), dtype=np.int64)
        assert len(t) == len(model)
        np.testing.assert_array_equal(t.get(keys, track=False), np.stack([model[k] for k in keys]))


def test_slab_file_shorter_than_manifest_raises_corruption_not_sigbus(tmp_path):
    """A slab file cut short by someone else: a mapped read past its end would kill the process with
    SIGBUS, so the open compares its size with the manifest's slot count. Readonly and writable opens run
    in a child process, so that a SIGBUS fails the test instead of killing pytest."""
    path = tmp_path / "s"
    store, _, _ = _store_with_checkpoint(path, n=8000)
    store.close()
    os.truncate(path / "t0.slab", 4096 + 1000 * 80)
    code = (
        "import mlkv\n"
        "for readonly in (True, False):\n"
        "    try:\n"
        f"        mlkv.open({str(path)!r}, readonly=readonly).table('t').get(list(range(8000)))\n"
        "    except mlkv.CorruptionError as e:\n"
        "        print('CORRUPT', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout} {r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("t0.slab" in ln and "slots need" in ln for ln in lines), r.stdout
    fds = len(os.listdir("/proc/self/fd"))  # in process too (safe now): a failed open leaks nothing
    for readonly in (True, False):
        with pytest.raises(mlkv.CorruptionError, match="slots need"):
            mlkv.open(path, readonly=readonly)
    assert len(os.listdir("/proc/self/fd")) == fds
