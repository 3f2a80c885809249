"""The durable key -> slot map of a slab table: a snapshot file plus an append-only log of deltas.

A checkpoint appends one record with the (key, slot) pairs that changed since the previous checkpoint
(slot -1: deleted), so its cost follows what changed, not the table size. When the log outgrows the
snapshot, the next checkpoint writes a fresh snapshot instead (amortised O(changes)). Recovery streams the
snapshot into the key index part by part and replays the log up to the length the manifest committed: a
sequential read at disk speed. Neither a checkpoint nor a recovery holds a copy of every pair: a snapshot
is written from the index table and read into it in parts of 4M pairs (1.6 GB of pairs at 100M keys).
Both files carry magic/version and CRC-32s over header and payload. Each record (version 2) also names
the manifest's id of its table, checked on load: a snapshot or log of another table (files swapped or
restored under the wrong name) is a CorruptionError naming the file, never another table's index. Version-1
records (written before mlkv recorded the id; a log may hold both versions) load unchecked.

Durability: each write ends with an fsync of the file; the directory entry of a new file is made durable by
the manifest commit that follows (replace_atomically fsyncs the directory). A failed write (full disk: a
StorageFullError; EIO: StorageIOError) leaves nothing the manifest commits changed: a snapshot is removed,
and a log's partial record past the committed length is cut off (here, or by the next append).
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterable

import numpy as np

from ..durable_files import pwrite_all, storage_errors
from ..errors import CorruptionError
from .key_index import KeyIndex, as_u64, unique_inverse

SNAP_MAGIC = b"MLKVSNAP"
LOG_MAGIC = b"MLKVILOG"
VERSION = 2
# magic, version, checkpoint id, pair count, payload CRC-32, table id (below 2**32); the header's own
# CRC-32 follows (40 bytes in all: the payload's words are aligned)
_REC = struct.Struct("<8sIQQII")
_REC_BYTES = _REC.size + 4
_REC_V1 = struct.Struct("<8sIQQI")  # version 1: no table id
SNAPSHOT_PART_PAIRS = 1 << 22  # pairs a recovery reads of a snapshot at a time (64 MiB)


def _pack(magic: bytes, ckpt: int, keys: np.ndarray, slots: np.ndarray, table_id: int) -> bytes:
    payload = keys.astype(np.uint64).tobytes() + slots.astype(np.int64).tobytes()
    head = _REC.pack(magic, VERSION, ckpt, len(keys), zlib.crc32(payload), table_id)
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def _head(path: str, buf, off: int, magic: bytes, table_id: int | None) -> tuple[int, int, int, int]:
    """The header of the record at `off` of `buf` (at least its header's bytes): (checkpoint id, pair
    count, payload CRC-32, offset of the payload). `table_id`: the id the record must name (None: not
    checked; a version-1 record names none)."""
    if off + 12 > len(buf):
        raise CorruptionError(path, off, "record header truncated")
    m, version = struct.unpack_from("<8sI", buf, off)
    if m != magic or version not in (1, VERSION):
        raise CorruptionError(path, off, f"bad magic/version {m!r}/{version}")
    rec = _REC if version == VERSION else _REC_V1
    if off + rec.size + 4 > len(buf):
        raise CorruptionError(path, off, "record header truncated")
    head = bytes(buf[off : off + rec.size])
    if zlib.crc32(head) != struct.unpack_from("<I", buf, off + rec.size)[0]:
        raise CorruptionError(path, off, "record header CRC-32 mismatch")
    _, _, ckpt, n, crc, *tid = rec.unpack(head)
    if tid and table_id is not None and tid[0] != table_id:
        raise CorruptionError(
            path, off, f"record of table id {tid[0]}; the manifest names this file for table {table_id}"
        )
    return ckpt, n, crc, off + rec.size + 4


def _unpack(
    path: str, buf: memoryview, off: int, magic: bytes, table_id: int | None
) -> tuple[int, np.ndarray, np.ndarray, int]:
    """One record at `off`: (checkpoint id, keys, slots, offset after it). `table_id`: as for `_head`."""
    ckpt, n, crc, start = _head(path, buf, off, magic, table_id)
    end = start + 16 * n
    if end > len(buf):
        raise CorruptionError(path, off, f"record of {n} pairs truncated")
    if zlib.crc32(buf[start:end]) != crc:
        raise CorruptionError(path, start, "record payload CRC-32 mismatch")
    keys = np.frombuffer(buf, dtype=np.uint64, count=n, offset=start)
    slots = np.frombuffer(buf, dtype=np.int64, count=n, offset=start + 8 * n)
    return ckpt, keys, slots, end


def write_snapshot(path: str, ckpt: int, keys: np.ndarray, slots: np.ndarray, *, table_id: int) -> None:
    """The record `_pack` would make, written from the arrays themselves: no copy of the pairs (a snapshot
    of 100M keys is 1.6 GB; packing it into one bytes object took two more such copies)."""
    write_snapshot_parts(path, ckpt, len(keys), [(keys, slots)], table_id=table_id)


def write_snapshot_parts(path: str, ckpt: int, n: int, parts: Iterable, *, table_id: int) -> None:
    """The record `_pack` would make of `n` pairs that `parts` yields as (keys, slots) arrays, in order.
    No more than one part is held at a time: a key index streams its pairs straight from its table
    (`KeyIndex.live_parts`), so a snapshot of 100M keys does not copy the 1.6 GB of pairs first. The CRC
    covers every key before the first slot: the keys' and the slots' CRCs are summed over the arrays as
    they are written and joined by `crc32_combine`."""
    size = _REC_BYTES + 16 * n
    try:
        with storage_errors(path, "writing an index snapshot", size):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with storage_errors(path, "writing an index snapshot", size):
                crc_k = crc_s = done = 0
                for k, s in parts:
                    k, s = as_u64(k), np.ascontiguousarray(s, dtype=np.int64)
                    if len(s) != len(k) or done + len(k) > n:
                        raise ValueError(f"snapshot parts disagree with the {n} pairs announced")
                    kb, sb = memoryview(k).cast("B"), memoryview(s).cast("B")
                    crc_k, crc_s = zlib.crc32(kb, crc_k), zlib.crc32(sb, crc_s)
                    pwrite_all(fd, kb, _REC_BYTES + 8 * done)
                    pwrite_all(fd, sb, _REC_BYTES + 8 * (n + done))
                    done += len(k)
                if done != n:
                    raise ValueError(f"snapshot parts hold {done} pairs, {n} announced")
                head = _REC.pack(SNAP_MAGIC, VERSION, ckpt, n, crc32_combine(crc_k, crc_s, 8 * n), table_id)
                pwrite_all(fd, head + struct.pack("<I", zlib.crc32(head)), 0)
            with storage_errors(path, "syncing an index snapshot", size, sync=True):
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):  # no manifest names it yet: free the space
            os.remove(path)
        raise


def create_log(path: str) -> None:
    """A new, empty index log (the first of a snapshot's generation)."""
    with storage_errors(path, "creating an index log", 0):
        open(path, "wb").close()


def append_log(
    path: str, ckpt: int, keys: np.ndarray, slots: np.ndarray, committed: int | None = None, *, table_id: int
) -> int:
    """Append one durable record of table `table_id`; return the log's new length (what the manifest
    commits).

    `committed`: the length the manifest committed. Anything past it is the record of a checkpoint that
    crashed (or failed) before its manifest commit; it is cut off first, or the next commit would cover it.
    """
    record = _pack(LOG_MAGIC, ckpt, keys, slots, table_id)
    with storage_errors(path, "appending to an index log", len(record)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        if committed is not None and end != committed:
            if end < committed:
                raise CorruptionError(path, end, f"log shorter than the committed {committed} bytes")
            os.ftruncate(fd, committed)
            end = committed
        try:
            with storage_errors(path, "appending to an index log", len(record)):
                pwrite_all(fd, record, end)
        except BaseException:
            with contextlib.suppress(OSError):  # free the space of the partial record now
                os.ftruncate(fd, end)
            raise
        with storage_errors(path, "syncing an index log", len(record), sync=True):
            os.fsync(fd)
        return end + len(record)
    finally:
        os.close(fd)


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc1 = crc32(A), crc2 = crc32(B) and len(B) (zlib's crc32_combine, which
    Python's zlib does not expose): a snapshot's keys and slots are summed in two streams."""
    op = [0xEDB88320] + [1 << n for n in range(31)]  # the GF(2) operator that appends one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # ... one zero byte
    while len2 > 0:  # append len2 zero bytes to A: the operator for 2^i bytes for each bit i of len2
        if len2 & 1:
            crc1 = _gf2_times(op, crc1)
        len2 >>= 1
        if len2:
            op = _gf2_square(op)
    return crc1 ^ crc2


def load_snapshot_into(path: str, index: KeyIndex, n_slots: int, table_id: int | None = None) -> int:
    """Insert a snapshot's pairs into an empty `index`, reading it part by part (SNAPSHOT_PART_PAIRS pairs:
    two 32 MiB reads) instead of whole: a recovery of 100M keys holds the index, not the index plus the
    1.6 GB file. Returns the pair count. CorruptionError naming the file for a bad header, a short or long
    file, a slot at or past `n_slots`, or a payload CRC mismatch (found after the last part: the caller
    discards the index then)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptionError(path, 0, "index snapshot named by the manifest is missing") from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _REC_BYTES, 0)
        _, n, crc, start = _head(path, head, 0, SNAP_MAGIC, table_id)
        if size != start + 16 * n:
            what = "truncated" if size < start + 16 * n else "followed by trailing bytes"
            raise CorruptionError(path, start, f"snapshot of {n} pairs {what} ({size} bytes)")
        index.reserve(n)
        crc_k = crc_s = 0
        for lo in range(0, n, SNAPSHOT_PART_PAIRS):
            m = min(SNAPSHOT_PART_PAIRS, n - lo)
            keys, slots = np.empty(m, np.uint64), np.empty(m, np.int64)
            for arr, off in ((keys, start + 8 * lo), (slots, start + 8 * (n + lo))):
                if os.preadv(fd, [memoryview(arr).cast("B")], off) != arr.nbytes:
                    raise CorruptionError(path, off, "snapshot shorter than its header says")
            crc_k = zlib.crc32(memoryview(keys).cast("B"), crc_k)
            crc_s = zlib.crc32(memoryview(slots).cast("B"), crc_s)
            if m and int(slots.max()) >= n_slots:
                raise CorruptionError(path, start, "index names a slot past the table end")
            if m and int(slots.min()) < 0:
                raise CorruptionError(path, start, "snapshot names a negative slot")
            index.insert_new(keys, slots)
        if crc32_combine(crc_k, crc_s, 8 * n) != crc:
            raise CorruptionError(path, start, "record payload CRC-32 mismatch")
        return n
    finally:
        os.close(fd)


def replay_log_into(
    log: str, log_len: int, index: KeyIndex, n_slots: int, table_id: int | None = None
) -> None:
    """Apply the first `log_len` bytes of an index log to `index` (loaded from the log's snapshot, or
    empty): each key takes the slot of its last record, a slot of -1 deletes it."""
    if not log_len:
        return
    uk, us = _log_pairs(log, log_len, table_id)
    if len(us) and int(us.max()) >= n_slots:
        raise CorruptionError(log, 0, "index names a slot past the table end")
    index.remove(uk[us < 0])
    index.assign(uk[us >= 0], us[us >= 0])


def _log_pairs(log: str, log_len: int, table_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, the slot of each key's last record, -1: deleted) of a log's first `log_len` bytes."""
    try:
        with open(log, "rb") as f:
            buf = memoryview(f.read(log_len))
    except FileNotFoundError:
        raise CorruptionError(log, 0, f"index log missing; the manifest commits {log_len} bytes") from None
    if len(buf) < log_len:
        raise CorruptionError(log, len(buf), f"log shorter than the committed {log_len} bytes")
    parts_k, parts_s, off = [], [], 0
    while off < log_len:
        _, k, s, off = _unpack(log, buf, off, LOG_MAGIC, table_id)
        parts_k.append(k)
        parts_s.append(s)
    lk, ls = np.concatenate(parts_k), np.concatenate(parts_s)
    uk, _, at = unique_inverse(lk[::-1])  # over the reversed sequence: each key's last record
    return uk, ls[::-1][at]


def load(
    snapshot: str | None, log: str | None, log_len: int, table_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Replay snapshot + the first `log_len` bytes of the log into final (keys, slots), deletions dropped.
    `table_id`: the manifest's id of the table, checked against every record that names one (None: not
    checked); CorruptionError naming the file on a mismatch. (A recovery streams the current state into
    its index instead: `load_snapshot_into`, `replay_log_into`.)"""
    snap_k, snap_s = np.empty(0, np.uint64), np.empty(0, np.int64)
    if snapshot:
        try:
            with open(snapshot, "rb") as f:
                # into a writable buffer (the arrays made over it go on into the index), not zero-filled
                # first as a bytearray would be (2-3 s for a 1.6 GB snapshot)
                buf = memoryview(np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8))
                f.readinto(buf)
        except FileNotFoundError:
            raise CorruptionError(snapshot, 0, "index snapshot named by the manifest is missing") from None
        _, snap_k, snap_s, end = _unpack(snapshot, buf, 0, SNAP_MAGIC, table_id)
        if end != len(buf):
            raise CorruptionError(snapshot, end, "trailing bytes after snapshot")
    if not (log and log_len):
        return snap_k, snap_s  # a snapshot alone: distinct keys, every slot live
    uk, us = _log_pairs(log, log_len, table_id)
    live = us >= 0
    if not snapshot:
        return uk[live], us[live]
    # a snapshot's keys that the log names are replaced, found with a hash lookup of the (usually far
    # fewer) logged keys instead of a dedup of everything
    logged = KeyIndex(len(uk))
    logged.insert_new(uk, np.zeros(len(uk), dtype=np.int64))
    kept = logged.lookup(snap_k) < 0
    return np.concatenate([snap_k[kept], uk[live]]), np.concatenate([snap_s[kept], us[live]])
