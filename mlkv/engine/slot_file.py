"""SlotFile: one table's rows in fixed-width slots of a memory-mapped file.

Layout: a 4 KiB header (magic, version, row/slot width, CRC-32), then slot i at 4096 + i * slot_bytes.
A slot is [key u64 | check u64 | row bytes, zero-padded to a multiple of 8]. Storing the key lets a read
prove the slot belongs to the key it was asked for; `check` is a 64-bit multiply-sum hash of key and row
computed with numpy over a whole batch at once (a per-row CRC would need a Python loop), and any single
flipped bit or torn/zeroed slot fails it. Reads gather with numpy fancy indexing on the mapping; writes are
sorted by slot so dirty pages are touched in file order. Durability is the caller's: `sync()` fsyncs.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib

import numpy as np

from ..errors import CorruptionError
from .key_index import hash64

MAGIC = b"MLKVSLAB"
VERSION = 1
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sIII")  # magic, version, row_bytes, slot_bytes; CRC-32 follows
_MIN_SLOTS = 1 << 12

_C1 = hash64(np.arange(1, 4097, dtype=np.uint64))
_C2 = hash64(np.arange(5001, 9097, dtype=np.uint64)) | np.uint64(1)  # odd: every bit flip shows


def slot_bytes_for(row_bytes: int) -> int:
    return 16 + (row_bytes + 7) // 8 * 8


def row_checks(keys: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Check words of (n, slot_bytes) records whose key field is `keys`, ignoring their stored check."""
    words = records[:, 16:].view(np.uint64)
    w = words.shape[1]
    with np.errstate(over="ignore"):
        s = ((words ^ _C1[:w]) * _C2[:w]).sum(axis=1, dtype=np.uint64)
        return hash64(s ^ hash64(keys))


class SlotFile:
    def __init__(self, path: str, row_bytes: int, readonly: bool = False):
        self.path = path
        self.row_bytes = row_bytes
        self.slot_bytes = slot_bytes_for(row_bytes)
        self.readonly = readonly
        exists = os.path.exists(path)
        if not exists and readonly:
            raise FileNotFoundError(path)
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
        if exists:
            self._check_header()
        else:
            self._write_header()
        self._map()

    def _header_bytes(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.row_bytes, self.slot_bytes)
        return body + struct.pack("<I", zlib.crc32(body))

    def _write_header(self) -> None:
        os.ftruncate(self.fd, HEADER_BYTES + _MIN_SLOTS * self.slot_bytes)
        os.pwrite(self.fd, self._header_bytes(), 0)

    def _check_header(self) -> None:
        raw = os.pread(self.fd, _HEADER.size + 4, 0)
        if len(raw) < _HEADER.size + 4:
            raise CorruptionError(self.path, 0, "file shorter than its header")
        magic, version, row_bytes, slot_bytes = _HEADER.unpack(raw[: _HEADER.size])
        if magic != MAGIC:
            raise CorruptionError(self.path, 0, f"bad magic {magic!r}")
        if struct.unpack("<I", raw[_HEADER.size :])[0] != zlib.crc32(raw[: _HEADER.size]):
            raise CorruptionError(self.path, 0, "header CRC-32 mismatch")
        if version != VERSION:
            raise CorruptionError(self.path, 8, f"slab version {version}, this mlkv reads {VERSION}")
        if (row_bytes, slot_bytes) != (self.row_bytes, self.slot_bytes):
            raise CorruptionError(self.path, 12, f"row width {row_bytes}, manifest says {self.row_bytes}")

    def _map(self) -> None:
        size = os.fstat(self.fd).st_size
        self.capacity = (size - HEADER_BYTES) // self.slot_bytes
        access = mmap.ACCESS_READ if self.readonly else mmap.ACCESS_WRITE
        self.mm = mmap.mmap(self.fd, HEADER_BYTES + self.capacity * self.slot_bytes, access=access)
        self.mm.madvise(mmap.MADV_RANDOM)
        self.slots = np.frombuffer(self.mm, dtype=np.uint8, offset=HEADER_BYTES).reshape(-1, self.slot_bytes)

    def ensure_capacity(self, n_slots: int) -> None:
        if n_slots <= self.capacity:
            return
        cap = max(self.capacity, _MIN_SLOTS)
        while cap < n_slots:
            cap *= 2
        os.ftruncate(self.fd, HEADER_BYTES + cap * self.slot_bytes)
        self._map()  # the old mapping is released once no array views it

    def offset_of(self, slot: int) -> int:
        return HEADER_BYTES + int(slot) * self.slot_bytes

    def read(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Rows (n, row_bytes) of `keys` stored at `slots`; CorruptionError if any slot fails its checks."""
        records = self.slots[slots]
        self._verify(keys, slots, records)
        return records[:, 16 : 16 + self.row_bytes]

    def _verify(self, keys: np.ndarray, slots: np.ndarray, records: np.ndarray) -> None:
        stored_keys = records[:, :8].copy().view(np.uint64).ravel()
        stored_checks = records[:, 8:16].copy().view(np.uint64).ravel()
        bad = (stored_keys != keys) | (stored_checks != row_checks(keys, records))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "key mismatch" if stored_keys[i] != keys[i] else "row checksum mismatch"
            raise CorruptionError(
                self.path, self.offset_of(slots[i]), f"{what} for key {int(keys[i])} ({int(bad.sum())} bad)"
            )

    def write(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write rows into distinct slots, in slot order."""
        order = np.argsort(slots, kind="stable")
        keys, slots = keys[order], slots[order]
        records = np.zeros((len(keys), self.slot_bytes), dtype=np.uint8)
        records[:, :8] = keys.view(np.uint8).reshape(-1, 8)
        records[:, 16 : 16 + self.row_bytes] = rows[order]
        records[:, 8:16] = row_checks(keys, records).view(np.uint8).reshape(-1, 8)
        self.slots[slots] = records

    def verify_slots(self, keys: np.ndarray, slots: np.ndarray, batch: int = 65536) -> list[str]:
        problems = []
        for i in range(0, len(keys), batch):
            k, s = keys[i : i + batch], slots[i : i + batch]
            try:
                self._verify(k, s, self.slots[s])
            except CorruptionError as e:
                problems.append(str(e))
        return problems

    def sync(self) -> None:
        self.mm.flush()

    def drop_page_cache(self) -> None:
        self.mm.flush()
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def disk_bytes(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        self.slots = None
        with contextlib.suppress(BufferError):  # a caller still holds a view; the mapping goes when it does
            self.mm.close()
        os.close(self.fd)
