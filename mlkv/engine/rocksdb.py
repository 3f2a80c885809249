"""RocksDBEngine: the engine interface over RocksDB (through rocksdict), the "industrial KV store" baseline.

Key layout, raw bytes in the default column family; keys are big-endian so byte order is key order and each
table is one contiguous, sorted range:

    b"D" + table id (u32 BE) + key (u64 BE)   committed rows; changed only by a checkpoint
    b"S" + table id (u32 BE) + key (u64 BE)   rows and delete tombstones staged since the last checkpoint
    b"M"                                      the committed table registry, row counts and user meta (JSON)

Guarantee: D and M change only in the single WriteBatch a checkpoint writes with sync=True. That batch moves
every staged entry into D, range-deletes the staging space and the D ranges of dropped tables, and replaces
M. Opening discards all staging with one range delete and loads the registry from M, so after a crash the
state is exactly that of the last completed checkpoint, table creations and drops included. Staged writes
skip the WAL: nothing ever needs them after a crash. Checkpoint cost follows the staged entries, not the
table sizes, but every row is written twice (staging, then D), the checkpoint's batch holds all staged
values in memory, and the dead staging copies stay on disk until RocksDB's background compaction drops
them (right after a checkpoint of 1 M rows the directory was ~3x the data for a while). Table ids are never
reused, so a dropped table's rows cannot resurface under a new table. Only a database directory that does
not exist is created: one without RocksDB's CURRENT file raises CorruptionError (RocksDB would start an
empty database over it and then delete the old files), and a readonly open of a missing one does too.

Commit record (what RocksDB's own recovery cannot tell): M holds a commit sequence number (`seq`, one
more per checkpoint), and after each checkpoint's synced batch the file COMMITTED in the database directory
is replaced atomically (durable_files.replace_atomically) with that number. RocksDB recovers from a damaged
tail of its MANIFEST or WAL by treating the damage as the end of its log: it opens an older state, or an
empty one, exactly and silently, and a writable open then deletes the SST files the lost MANIFEST edits
named. So an open first opens RocksDB read-only (which deletes nothing), reads M's seq, and raises
CorruptionError if it is older than COMMITTED's; only then does a writable open run. COMMITTED is written
after the batch, so a crash between the two leaves it one behind RocksDB (fine: RocksDB is newer), never
ahead. A writable open of a database without COMMITTED (a new one, or one written before mlkv kept it)
writes it before any commit; a database whose M has a seq but no COMMITTED beside it is refused.

Reads do one multi-get per batch, one key per requested key: an in-memory index of the keys staged since
the last checkpoint (KeyIndex: key -> row or tombstone) says which space holds each key's current value,
and staged deletes need no lookup at all. Counts: committed counts live in M; the count of a table with
staged entries is derived from its staging range on demand (cached until the next write to it), rather
than paying a read on every write to learn whether a key is new.

Value framing: header (magic, version, kind, 0), payload, then the CRC-32 of header + payload, little-endian.
A CRC-32 run over a message followed by its own CRC is the constant 0x2144DF1C, so a value is checked with
one zlib.crc32 call and no slicing.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from itertools import islice

import numpy as np
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    DBRecoveryMode,
    Options,
    Rdict,
    RdictIter,
    WriteBatch,
    WriteOptions,
)

from ..durable_files import drop_from_page_cache, replace_atomically
from ..errors import (
    CorruptionError,
    InternalError,
    InvalidArgumentError,
    InvalidTypeError,
    ReadOnlyError,
    SchemaError,
    StorageFullError,
    StorageIOError,
    StoreClosedError,
    UnknownTableError,
)
from ..faults import crash_point
from .base import Engine
from .key_index import KeyIndex

MAGIC = 0xE7
VERSION = 1
KIND_ROW, KIND_TOMBSTONE, KIND_META = 0, 1, 2
FORMAT = 1  # version of the JSON layout stored under b"M"

_CRC_RESIDUE = 0x2144DF1C
_FRAME_BYTES = 8  # 4-byte header + 4-byte CRC-32
_DATA, _STAGE, _META_KEY = b"D", b"S", b"M"
_STAGE_END = b"T"  # first byte after the staging space
_KEY_BYTES = 13  # space + table id + key
_MAX_TABLE_ID = 2**32 - 2
_CHUNK = 4096  # staged entries per multi-get while counting or checkpointing
_BLOCK_CACHE_BYTES = 64 << 20
_STAGED_TOMBSTONE, _STAGED_ROW = 0, 1
_ROW_HEAD = np.array([MAGIC, VERSION, KIND_ROW, 0], dtype=np.uint8)
COMMITTED = "COMMITTED"  # the commit record's file name, in the database directory
_COMMITTED = struct.Struct("<8sIQ")  # magic, version, commit seq; CRC-32 follows
_COMMITTED_MAGIC = b"MLKVRCMT"


def _frame(kind: int, payload: bytes) -> bytes:
    body = bytes((MAGIC, VERSION, kind, 0)) + payload
    return body + zlib.crc32(body).to_bytes(4, "little")


_TOMBSTONE = _frame(KIND_TOMBSTONE, b"")


def _frame_rows(rows: np.ndarray) -> list[bytes]:
    """Framed values of (n, row_bytes) uint8 rows."""
    n, row_bytes = rows.shape
    width = row_bytes + _FRAME_BYTES
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, :4] = _ROW_HEAD
    buf[:, 4 : width - 4] = rows
    flat = memoryview(buf.reshape(-1))
    crcs = [zlib.crc32(flat[o : o + width - 4]) for o in range(0, n * width, width)]
    buf[:, width - 4 :] = np.array(crcs, dtype="<u4").view(np.uint8).reshape(n, 4)
    raw = buf.tobytes()
    return [raw[o : o + width] for o in range(0, n * width, width)]


def _storage_failure(exc: Exception, path: str, doing: str, wanted: int | None = None) -> Exception:
    """The mlkv error for a rocksdict exception raised while `doing`: RocksDB reports a full or failing
    device as a bare Exception whose message is its status ("IO error: No space left on device: While
    appending to file: ..."), mapped to StorageFullError / StorageIOError; anything else is returned as is."""
    msg = str(exc)
    amount = "an unknown number of" if wanted is None else str(wanted)
    if "No space left on device" in msg or "Disk quota exceeded" in msg:
        return StorageFullError(
            path, f"{path}: no space left on device while {doing} ({amount} bytes): {msg}"
        )
    if msg.startswith("IO error"):
        return StorageIOError(path, f"{path}: I/O error while {doing}: {msg}")
    return exc


def _prefix(space: bytes, table_id: int) -> bytes:
    return space + table_id.to_bytes(4, "big")


def _encode_keys(space: bytes | np.ndarray, table_id: int, keys: np.ndarray) -> list[bytes]:
    """DB keys of `keys` in one table; `space` is one space byte or a uint8 array with one per key."""
    n = len(keys)
    buf = np.empty((n, _KEY_BYTES), dtype=np.uint8)
    buf[:, 0] = np.frombuffer(space, dtype=np.uint8) if isinstance(space, bytes) else space
    buf[:, 1:5] = np.frombuffer(table_id.to_bytes(4, "big"), dtype=np.uint8)
    buf[:, 5:] = keys.astype(">u8").view(np.uint8).reshape(n, 8)
    raw = buf.tobytes()
    return [raw[o : o + _KEY_BYTES] for o in range(0, n * _KEY_BYTES, _KEY_BYTES)]


def _decode_keys(db_keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(k[5:] for k in db_keys), dtype=">u8").astype(np.uint64)


def _frame_problem(value: bytes) -> str | None:
    """Why `value` is not a sound frame (length, magic, version, CRC-32); None if it is."""
    if len(value) < _FRAME_BYTES:
        return f"value of {len(value)} bytes is shorter than its frame"
    if value[0] != MAGIC:
        return f"bad magic 0x{value[0]:02x}"
    if value[1] != VERSION:
        return f"value version {value[1]}, this mlkv reads {VERSION}"
    if zlib.crc32(value) != _CRC_RESIDUE:
        return "CRC-32 mismatch"
    return None


def _value_problem(value: bytes, row_bytes: int, tombstone_ok: bool) -> str | None:
    """Why `value` is not a sound row (or tombstone, where allowed) of `row_bytes` bytes; None if it is."""
    problem = _frame_problem(value)
    if problem is not None:
        return problem
    if value[2] == KIND_TOMBSTONE and tombstone_ok and len(value) == _FRAME_BYTES:
        return None
    if value[2] != KIND_ROW:
        return f"unexpected value kind {value[2]}"
    if len(value) != row_bytes + _FRAME_BYTES:
        return f"row of {len(value) - _FRAME_BYTES} bytes, table rows are {row_bytes}"
    return None


def _merge_staged(data: Iterator, staged: Iterator) -> Iterator[tuple[bytes, bytes]]:
    """Merge two sorted (db key, value) streams of one table; staged entries win, tombstones drop out."""
    d = next(data, None)
    s = next(staged, None)
    while d is not None or s is not None:
        if s is None or (d is not None and d[0][1:] < s[0][1:]):
            yield d
            d = next(data, None)
            continue
        if d is not None and d[0][1:] == s[0][1:]:
            d = next(data, None)
        if s[1] != _TOMBSTONE:
            yield s
        s = next(staged, None)


class RocksDBEngine(Engine):
    name = "rocksdb"

    def __init__(self, path: str, readonly: bool = False):
        start = time.perf_counter()
        self.path = os.path.abspath(path)
        self.readonly = readonly
        self._check_database(readonly)
        self._block_cache = Cache(_BLOCK_CACHE_BYTES)
        recorded = self._read_committed()
        self._db: Rdict | None = None
        if not readonly and recorded:  # a writable open may delete files: first check read-only
            self._db = self._open_db(readonly=True)
            try:
                self._load_committed()
                self._check_committed(recorded)
            finally:
                self._db.close()
        self._db = self._open_db(readonly)
        self._stage_opts = WriteOptions()
        self._stage_opts.disable_wal = True
        self._commit_opts = WriteOptions()
        self._commit_opts.sync = True
        self._lock = threading.RLock()
        # per table with entries staged since the last checkpoint: key -> _STAGED_ROW or _STAGED_TOMBSTONE,
        # so a read asks RocksDB for exactly one key per requested key; and cached counts of such tables
        self._staged: dict[int, KeyIndex] = {}
        self._count_cache: dict[int, int] = {}
        try:
            self._load_committed()
            self._check_committed(recorded)
        except BaseException:
            self._db.close()
            raise
        if not readonly:
            if recorded is None:  # from here on every commit has its record
                self._write_committed()
            # entries staged after the last checkpoint died with the process that wrote them
            self._db.delete_range(_STAGE, _STAGE_END, write_opt=self._stage_opts)
        self.recovery_seconds = time.perf_counter() - start

    def _open_db(self, readonly: bool) -> Rdict:
        access = AccessType.read_only() if readonly else AccessType.read_write()
        try:
            return Rdict(self.path, self._options(), access_type=access)
        except Exception as exc:  # rocksdict raises a bare Exception, with RocksDB's status as message
            # a damaged SST, MANIFEST or WAL, or a file that CURRENT or the MANIFEST names is missing
            if "Corruption" in str(exc) or "No such file or directory" in str(exc):
                raise CorruptionError(self.path, None, f"RocksDB open: {exc}") from exc
            failure = _storage_failure(exc, self.path, "opening (RocksDB replays its log into a table)")
            if failure is exc:
                raise
            raise failure from exc

    def _read_committed(self) -> int | None:
        """The commit seq that COMMITTED records; None where there is no such file."""
        path = os.path.join(self.path, COMMITTED)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        n = _COMMITTED.size
        if len(raw) != n + 4 or zlib.crc32(raw[:n]) != int.from_bytes(raw[n:], "little"):
            raise CorruptionError(path, 0, f"commit record of {len(raw)} bytes fails its CRC-32 or length")
        magic, version, seq = _COMMITTED.unpack(raw[:n])
        if magic != _COMMITTED_MAGIC or version != 1:
            raise CorruptionError(path, 0, f"bad magic/version {magic!r}/{version}")
        return seq

    def _check_committed(self, recorded: int | None) -> None:
        """CorruptionError unless RocksDB recovered the recorded commit or a later one (see the module
        header); a database whose meta has a seq needs the record."""
        if recorded is None and self._seq:
            raise CorruptionError(
                os.path.join(self.path, COMMITTED),
                None,
                f"the commit record is missing, but RocksDB's meta record is of commit {self._seq}; not "
                "opened: restore the file from a backup (without it a damaged RocksDB log goes unnoticed)",
            )
        if recorded is not None and self._seq < recorded:
            raise CorruptionError(
                self.path,
                None,
                f"RocksDB recovered commit {self._seq}, but commit {recorded} completed ({COMMITTED}): "
                "RocksDB's MANIFEST or write-ahead log lost its tail; not opened (a writable open would "
                "delete the files the lost records name)",
            )

    def _write_committed(self) -> None:
        """Replace COMMITTED with the current commit seq, durably (temp file, fsync, rename, fsync)."""
        body = _COMMITTED.pack(_COMMITTED_MAGIC, 1, self._seq)
        data = body + zlib.crc32(body).to_bytes(4, "little")
        replace_atomically(os.path.join(self.path, COMMITTED), lambda f: f.write(data), size=len(data))

    def _check_database(self, readonly: bool) -> None:
        """Refuse a database directory that holds RocksDB data files (tables *.sst, write-ahead logs
        <number>.log) but not CURRENT, RocksDB's root: given create_if_missing, RocksDB would start an empty
        database there and its next open would delete those files as obsolete. A directory without data
        files (a new store, or one whose creation a crash cut short) is created; readonly needs CURRENT."""
        current = os.path.join(self.path, "CURRENT")
        if os.path.exists(current):
            return
        names = os.listdir(self.path) if os.path.isdir(self.path) else []
        data = sorted(f for f in names if f.endswith(".sst") or (f.endswith(".log") and f[:-4].isdigit()))
        if data:
            raise CorruptionError(
                current,
                None,
                f"RocksDB's CURRENT file is missing, but the database directory holds its data files "
                f"({', '.join(data[:4])}); not opened (RocksDB would start a new database and delete them)",
            )
        if readonly:
            if not names:
                raise FileNotFoundError(f"no RocksDB database at {self.path}")
            raise CorruptionError(
                current, None, f"RocksDB's CURRENT file is missing ({len(names)} other files)"
            )
        os.makedirs(self.path, exist_ok=True)

    def _options(self) -> Options:
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(self._block_cache)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_block_based_table_factory(table)
        opts.set_compression_type(DBCompressionType.none())  # embedding rows do not compress
        opts.set_wal_recovery_mode(DBRecoveryMode.point_in_time())  # a torn last batch is dropped whole
        return opts

    def _load_committed(self) -> None:
        raw = self._db.get(_META_KEY)
        self._meta_json: str | None = None
        # name -> (table id, row_bytes): committed, and as changed since by create/drop
        self._committed_tables: dict[str, tuple[int, int]] = {}
        self._committed_counts: dict[int, int] = {}
        self._next_table_id = 1
        self._seq = 0  # commits so far; 0 also for a meta record written before mlkv counted them
        if raw is not None:
            problem = _frame_problem(raw)
            if problem is None and raw[2] != KIND_META:
                problem = f"value kind {raw[2]}"
            if problem is not None:
                raise CorruptionError(self.path, None, f"meta record: {problem}")
            state = json.loads(raw[4:-4])
            if state.get("format") != FORMAT:
                raise CorruptionError(
                    self.path, None, f"meta format {state.get('format')}, expected {FORMAT}"
                )
            self._meta_json = json.dumps(state["meta"])
            self._next_table_id = state["next_table_id"]
            self._seq = state.get("seq", 0)
            for name, (table_id, row_bytes, count) in state["tables"].items():
                self._committed_tables[name] = (table_id, row_bytes)
                self._committed_counts[table_id] = count
        self._tables = dict(self._committed_tables)

    # -- helpers ---------------------------------------------------------------------------------------

    def _live_db(self) -> Rdict:
        if self._db is None:
            raise StoreClosedError(f"RocksDBEngine at {self.path} is closed")
        return self._db

    def _writable_db(self) -> Rdict:
        db = self._live_db()
        if self.readonly:
            raise ReadOnlyError(f"RocksDBEngine at {self.path} was opened with readonly=True")
        return db

    def _table(self, table: str) -> tuple[int, int]:
        try:
            return self._tables[table]
        except KeyError:
            raise UnknownTableError(f"no table {table!r} in {self.path}") from None

    @staticmethod
    def _keys(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys)
        if keys.ndim != 1:
            raise InvalidArgumentError(f"keys must be 1-D, got shape {keys.shape}")
        if keys.dtype == np.uint64:
            return keys
        if keys.size and not (keys.dtype.kind in "iu" and keys.min() >= 0):
            raise InvalidTypeError(f"keys must be uint64 (or non-negative integers), got {keys.dtype}")
        return keys.astype(np.uint64)

    def _decode_rows(
        self, table: str, keys: np.ndarray, values: list, row_bytes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and found mask from raw values (None: absent); raises CorruptionError on a bad value."""
        n = len(values)
        rows = np.zeros((n, row_bytes), dtype=np.uint8)
        found = np.zeros(n, dtype=bool)
        live_at = [i for i, v in enumerate(values) if v is not None]
        if not live_at:
            return rows, found
        live = [values[i] for i in live_at]
        width = row_bytes + _FRAME_BYTES
        bad = [j for j, v in enumerate(live) if len(v) != width or zlib.crc32(v) != _CRC_RESIDUE]
        if not bad:
            framed = np.frombuffer(b"".join(live), dtype=np.uint8).reshape(len(live), width)
            heads_ok = (framed[:, :4] == _ROW_HEAD).all(axis=1)
            bad = np.flatnonzero(~heads_ok).tolist()
        if bad:
            j = bad[0]
            key = int(keys[live_at[j]])
            what = _value_problem(live[j], row_bytes, tombstone_ok=False) or "bad row header"
            raise CorruptionError(self.path, None, f"table {table!r} key {key}: {what}", table=table, key=key)
        rows[live_at] = framed[:, 4 : width - 4]
        found[live_at] = True
        return rows, found

    def _range_items(self, space: bytes, table_id: int) -> Iterator[tuple[bytes, bytes]]:
        """(db key, value) of one table's range in one space, in key order, as of now (an iterator pins
        its snapshot when created). The range end is checked here, not with ReadOptions.set_iterate_*_bound:
        with rocksdict 0.3.29 such bounds were seen to end iteration early once the bytes given to them
        were freed."""
        prefix = _prefix(space, table_id)
        it = self._live_db().iter()
        it.seek(prefix)
        return self._walk(it, prefix)

    def _walk(self, it: RdictIter, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        while it.valid():
            db_key = it.key()
            if not db_key.startswith(prefix):
                return
            yield db_key, it.value()
            it.next()
        try:  # an iterator stops at a damaged block as it does at the end; only its status tells them apart
            it.status()
        except Exception as exc:
            raise CorruptionError(self.path, None, f"RocksDB iterator: {exc}") from exc

    def _multi_get(self, db: Rdict, db_keys: list[bytes]) -> list:
        try:
            return db[db_keys]
        except Exception as exc:  # rocksdict raises a bare Exception, with RocksDB's status as message
            if "Corruption" in str(exc):
                raise CorruptionError(self.path, None, f"RocksDB read: {exc}") from exc
            raise

    def _staged_chunks(self, table_id: int) -> Iterator[tuple[list[bytes], list[bytes], list]]:
        """(staged db keys, staged values, committed values of the same keys) in chunks of _CHUNK."""
        db = self._live_db()
        items = self._range_items(_STAGE, table_id)
        while True:
            chunk = list(islice(items, _CHUNK))
            if not chunk:
                return
            staged_keys = [k for k, _ in chunk]
            data_keys = [_DATA + k[1:] for k in staged_keys]
            yield data_keys, [v for _, v in chunk], self._multi_get(db, data_keys)

    # -- tables ----------------------------------------------------------------------------------------

    def create_table(self, table: str, row_bytes: int) -> None:
        self._live_db()
        with self._lock:
            if table in self._tables:
                existing = self._tables[table][1]
                if existing != row_bytes:
                    raise SchemaError(f"table {table!r} has row_bytes={existing}, asked for {row_bytes}")
                return
            self._writable_db()
            if not isinstance(table, str) or not table:
                raise InvalidArgumentError(f"table name must be a non-empty str, got {table!r}")
            if int(row_bytes) != row_bytes or row_bytes <= 0:
                raise InvalidArgumentError(f"row_bytes must be a positive int, got {row_bytes!r}")
            if self._next_table_id > _MAX_TABLE_ID:
                raise InternalError(f"table ids exhausted: {self.path} has created {_MAX_TABLE_ID} tables")
            self._tables[table] = (self._next_table_id, int(row_bytes))
            self._next_table_id += 1

    def drop_table(self, table: str) -> None:
        db = self._writable_db()
        with self._lock:
            table_id, _ = self._table(table)
            del self._tables[table]
            if table_id in self._staged:
                db.delete_range(_prefix(_STAGE, table_id), _prefix(_STAGE, table_id + 1), self._stage_opts)
                del self._staged[table_id]
            self._count_cache.pop(table_id, None)
            # its committed rows go in the next checkpoint's batch, so a crash before then keeps them

    def tables(self) -> dict[str, int]:
        self._live_db()
        return {name: row_bytes for name, (_, row_bytes) in self._tables.items()}

    # -- rows ------------------------------------------------------------------------------------------

    def read(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        db = self._live_db()
        keys = self._keys(keys)
        with self._lock:  # a checkpoint moving staged rows must not slip between index lookup and get
            table_id, row_bytes = self._table(table)
            if len(keys) == 0:
                return np.zeros((0, row_bytes), dtype=np.uint8), np.zeros(0, dtype=bool)
            staged = self._staged.get(table_id)
            if staged is None:
                values = self._multi_get(db, _encode_keys(_DATA, table_id, keys))
            else:
                state = staged.lookup(keys)
                fetch = np.flatnonzero(state != _STAGED_TOMBSTONE)
                space = np.where(state[fetch] == _STAGED_ROW, _STAGE[0], _DATA[0]).astype(np.uint8)
                values = [None] * len(keys)
                for i, value in zip(
                    fetch.tolist(),
                    self._multi_get(db, _encode_keys(space, table_id, keys[fetch])),
                    strict=True,
                ):
                    values[i] = value
        return self._decode_rows(table, keys, values, row_bytes)

    def _stage(self, table: str, keys: np.ndarray, values: list[bytes], state: int) -> None:
        db = self._writable_db()
        with self._lock:
            table_id, _ = self._table(table)
            batch = WriteBatch(raw_mode=True)
            for key, value in zip(_encode_keys(_STAGE, table_id, keys), values, strict=True):
                batch.put(key, value)
            try:
                db.write(batch, self._stage_opts)
            except Exception as exc:  # the batch is atomic: on failure nothing was staged
                wanted = sum(len(v) for v in values) + _KEY_BYTES * len(values)
                failure = _storage_failure(exc, self.path, "staging rows", wanted)
                if failure is exc:
                    raise
                raise failure from exc
            self._staged.setdefault(table_id, KeyIndex()).assign(keys, np.full(len(keys), state))
            self._count_cache.pop(table_id, None)

    def write(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None:
        self._writable_db()
        _, row_bytes = self._table(table)
        keys = self._keys(keys)
        rows = np.asarray(rows)
        if rows.dtype != np.uint8:
            raise InvalidTypeError(f"rows must be uint8, got {rows.dtype}")
        if rows.shape != (len(keys), row_bytes):
            raise InvalidArgumentError(f"rows must have shape ({len(keys)}, {row_bytes}), got {rows.shape}")
        if len(keys):
            self._stage(table, keys, _frame_rows(np.ascontiguousarray(rows)), _STAGED_ROW)

    def delete(self, table: str, keys: np.ndarray) -> None:
        self._writable_db()
        self._table(table)
        keys = self._keys(keys)
        if len(keys):
            self._stage(table, keys, [_TOMBSTONE] * len(keys), _STAGED_TOMBSTONE)

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        return self.read(table, keys)[1]

    def count(self, table: str) -> int:
        self._live_db()
        with self._lock:
            table_id, _ = self._table(table)
            committed = self._committed_counts.get(table_id, 0)
            if table_id not in self._staged:
                return committed
            if table_id not in self._count_cache:
                delta = 0
                for _, staged, before in self._staged_chunks(table_id):
                    delta += sum(v != _TOMBSTONE for v in staged) - sum(b is not None for b in before)
                self._count_cache[table_id] = committed + delta
            return self._count_cache[table_id]

    def scan(self, table: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        self._live_db()
        with self._lock:  # both iterators see the same state (a checkpoint holds the lock)
            table_id, row_bytes = self._table(table)
            items = self._range_items(_DATA, table_id)
            if table_id in self._staged:
                items = _merge_staged(items, self._range_items(_STAGE, table_id))
        return self._scan_batches(table, items, row_bytes, batch_size)

    def _scan_batches(
        self, table: str, items: Iterator, row_bytes: int, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            chunk = list(islice(items, batch_size))
            if not chunk:
                return
            keys = _decode_keys([k for k, _ in chunk])
            rows, _ = self._decode_rows(table, keys, [v for _, v in chunk], row_bytes)
            yield keys, rows

    # -- durability ------------------------------------------------------------------------------------

    def checkpoint(self, meta: dict) -> None:
        db = self._writable_db()
        meta_json = json.dumps(meta)  # fail before touching anything if meta is not JSON
        with self._lock:
            batch = WriteBatch(raw_mode=True)
            live_ids = {table_id for table_id, _ in self._tables.values()}
            counts = {tid: n for tid, n in self._committed_counts.items() if tid in live_ids}
            for table_id, row_bytes in sorted(self._tables.values()):
                if table_id in self._staged:
                    counts[table_id] = counts.get(table_id, 0) + self._move_staged(batch, table_id, row_bytes)
            batch.delete_range(_STAGE, _STAGE_END)
            for table_id, _ in self._committed_tables.values():
                if table_id not in live_ids:
                    batch.delete_range(_prefix(_DATA, table_id), _prefix(_DATA, table_id + 1))
            state = {
                "format": FORMAT,
                "seq": self._seq + 1,
                "next_table_id": self._next_table_id,
                "tables": {
                    name: [table_id, row_bytes, counts.get(table_id, 0)]
                    for name, (table_id, row_bytes) in self._tables.items()
                },
                "meta": json.loads(meta_json),
            }
            batch.put(_META_KEY, _frame(KIND_META, json.dumps(state).encode()))
            crash_point("rocksdb:before_commit")
            try:
                db.write(batch, self._commit_opts)
            except Exception as exc:  # RocksDB then refuses writes itself until reopened
                failure = _storage_failure(exc, self.path, "committing a checkpoint")
                if failure is exc:
                    raise
                raise failure from exc
            crash_point("rocksdb:after_commit")
            self._seq += 1
            self._meta_json = meta_json
            self._committed_tables = dict(self._tables)
            self._committed_counts = {
                table_id: counts.get(table_id, 0) for table_id, _ in self._tables.values()
            }
            self._staged.clear()
            self._count_cache.clear()
            # after the commit: a crash before this leaves the record one behind RocksDB, never ahead. A
            # failure here (full disk) raises with the checkpoint committed; the next one writes the record
            self._write_committed()

    def _move_staged(self, batch: WriteBatch, table_id: int, row_bytes: int) -> int:
        """Add the moves of a table's staged entries into its D range to `batch`; return the count delta."""
        delta = 0
        for data_keys, staged, before in self._staged_chunks(table_id):
            for data_key, value, old in zip(data_keys, staged, before, strict=True):
                if value == _TOMBSTONE:
                    if old is not None:
                        batch.delete(data_key)
                        delta -= 1
                    continue
                if zlib.crc32(value) != _CRC_RESIDUE or len(value) != row_bytes + _FRAME_BYTES:
                    key = int.from_bytes(data_key[5:], "big")
                    name = next((n for n, (i, _) in self._tables.items() if i == table_id), f"id {table_id}")
                    what = (
                        f"staged row of table {name!r} key {key}: {_value_problem(value, row_bytes, False)}"
                    )
                    raise CorruptionError(self.path, None, what, table=name, key=key)
                batch.put(data_key, value)
                delta += old is None
        return delta

    def committed_meta(self) -> dict | None:
        self._live_db()
        return None if self._meta_json is None else json.loads(self._meta_json)

    def verify(self) -> list[str]:
        db = self._live_db()
        problems: list[str] = []
        with self._lock:
            committed = {tid: (name, rb) for name, (tid, rb) in self._committed_tables.items()}
            working = {tid: (name, rb) for name, (tid, rb) in self._tables.items()}
            seen: dict[int, int] = {}
            it = db.iter()
            it.seek_to_first()
            try:
                for db_key, value in self._walk(it, b""):
                    if db_key == _META_KEY:
                        continue  # checked when the engine opened
                    space = db_key[:1]
                    if space not in (_DATA, _STAGE) or len(db_key) != _KEY_BYTES:
                        problems.append(f"unexpected key {db_key.hex()}")
                        continue
                    if space == _STAGE and self.readonly:
                        continue  # a crashed writer's staging; the next writer discards it
                    table_id = int.from_bytes(db_key[1:5], "big")
                    key = int.from_bytes(db_key[5:], "big")
                    owner = (committed if space == _DATA else working).get(table_id)
                    if owner is None:
                        problems.append(f"key {key} of unknown table id {table_id} ({space.decode()})")
                        continue
                    name, row_bytes = owner
                    problem = _value_problem(value, row_bytes, tombstone_ok=space == _STAGE)
                    if problem is not None:
                        where = "staged" if space == _STAGE else "committed"
                        problems.append(f"table {name!r} {where} key {key}: {problem}")
                    if space == _DATA:
                        seen[table_id] = seen.get(table_id, 0) + 1
            except CorruptionError as exc:  # RocksDB's own block checksums fail here
                problems.append(str(exc))
                return problems
            for table_id, (name, _) in committed.items():
                expected, found = self._committed_counts.get(table_id, 0), seen.get(table_id, 0)
                if expected != found:
                    problems.append(f"table {name!r}: {found} committed rows, meta records {expected}")
        return problems

    # -- files -----------------------------------------------------------------------------------------

    def _files(self) -> Iterator[str]:
        for root, _, names in os.walk(self.path):
            for name in names:
                yield os.path.join(root, name)

    def disk_bytes(self) -> int:
        total = 0
        for file in self._files():
            with contextlib.suppress(FileNotFoundError):  # a compaction may remove files meanwhile
                total += os.path.getsize(file)
        return total

    def compact(self) -> None:
        """Compact the whole key range now (RocksDB otherwise compacts in the background, on its own time):
        drops dead staging copies and leaves reads one file per level to check."""
        with self._lock:
            self._db.compact_range(None, None)

    def level0_files(self) -> int:
        return int(self._db.property_int_value("rocksdb.num-files-at-level0") or 0)

    def evict_page_cache(self) -> None:
        capacity = _BLOCK_CACHE_BYTES
        self._block_cache.set_capacity(0)
        self._block_cache.set_capacity(capacity)
        drop_from_page_cache(self._files())

    def close(self) -> None:
        with self._lock:
            if self._db is None:
                return
            db, self._db = self._db, None
            try:
                db.close()
            except Exception as exc:
                # a memtable flush that meets a full disk loses nothing a reopen needs: committed batches
                # are in the synced WAL, and staged rows are discarded at open anyway
                if _storage_failure(exc, self.path, "closing") is exc:
                    raise
