"""SlotFile: one table's rows in fixed-width slots of a memory-mapped file.

Layout: a 4 KiB header (magic, version, row/slot width, CRC-32), then slot i at 4096 + i * slot_bytes.
A slot is [key u64 | check u64 | row bytes, zero-padded to a multiple of 8]. Storing the key lets a read
prove the slot belongs to the key it was asked for; `check` is a 64-bit multiply-sum hash of key and row
computed over a whole batch in one compiled loop, and any single flipped bit or torn/zeroed slot fails it.
Reads gather from the mapping and verify in that same loop (numba, `nogil`: an I/O thread reading rows does
not hold up the trainer), so a row is touched once; writes are sorted by slot so dirty pages are touched in
file order. Durability is the caller's: `sync()` fsyncs.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib

import numba
import numpy as np

from ..errors import CorruptionError
from .key_index import hash64
from .prefetch import prefetch_at

MAGIC = b"MLKVSLAB"
VERSION = 1
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sIII")  # magic, version, row_bytes, slot_bytes; CRC-32 follows
_MIN_SLOTS = 1 << 12

_C1 = hash64(np.arange(1, 4097, dtype=np.uint64))
_C2 = hash64(np.arange(5001, 9097, dtype=np.uint64)) | np.uint64(1)  # odd: every bit flip shows


def slot_bytes_for(row_bytes: int) -> int:
    return 16 + (row_bytes + 7) // 8 * 8


@numba.njit(nogil=True, cache=True, inline="always")
def _mix(z):
    """hash64 (splitmix64's finaliser) of one uint64."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _set_checks(words, c1, c2):
    """Fill the check word of slot records (uint64 words [key | check | row]) from their key and row."""
    for i in range(words.shape[0]):
        acc = np.uint64(0)
        for j in range(2, words.shape[1]):
            acc += (words[i, j] ^ c1[j - 2]) * c2[j - 2]
        words[i, 1] = _mix(acc ^ _mix(words[i, 0]))


_AHEAD = 6  # slots prefetched ahead of the one being copied


@numba.njit(nogil=True, cache=True)
def _gather(words, keys, slots, c1, c2, out):
    """out[i] = row words of slot slots[i] (zeros where slots[i] < 0), each verified against keys[i] while
    it is copied (explicit loops: numba's slice copies are ~3x slower here). Every line of the slot
    _AHEAD keys on is prefetched, so the random reads overlap.
    Returns (index of the first bad slot or -1, number of bad slots)."""
    first, bad = -1, 0
    n, m = keys.shape[0], out.shape[1]
    for i in range(n):
        if i + _AHEAD < n and slots[i + _AHEAD] >= 0:
            for j in range(0, words.shape[1], 8):
                prefetch_at(words, slots[i + _AHEAD], j)
        s = slots[i]
        if s < 0:
            for j in range(m):
                out[i, j] = 0
            continue
        acc = np.uint64(0)
        for j in range(m):
            w = words[s, j + 2]
            out[i, j] = w
            acc += (w ^ c1[j]) * c2[j]
        if words[s, 0] != keys[i] or words[s, 1] != _mix(acc ^ _mix(keys[i])):
            bad += 1
            if first < 0:
                first = i
    return first, bad


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
        self.words = self.slots.view(np.uint64)  # the same slots as uint64 words, for the kernels

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
        """Rows (n, row_bytes) of `keys` stored at `slots`, zeros where a slot is -1; CorruptionError if any
        slot fails its checks."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        out = np.empty((len(keys), self.words.shape[1] - 2), dtype=np.uint64)
        first, bad = _gather(self.words, keys, slots, _C1, _C2, out)
        if bad:
            self._raise_corrupt(keys, slots, first, bad)
        return out.view(np.uint8)[:, : self.row_bytes]

    def _raise_corrupt(self, keys: np.ndarray, slots: np.ndarray, i: int, bad: int) -> None:
        stored = int(self.words[slots[i], 0])
        what = "key mismatch" if stored != int(keys[i]) else "row checksum mismatch"
        detail = f"{what} for key {int(keys[i])} ({bad} bad)"
        raise CorruptionError(self.path, self.offset_of(slots[i]), detail)

    def write(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write rows into distinct slots, in slot order."""
        order = np.argsort(slots, kind="stable")
        keys, slots = keys[order], slots[order]
        records = np.zeros((len(keys), self.slot_bytes), dtype=np.uint8)
        records[:, 16 : 16 + self.row_bytes] = rows[order]
        words = records.view(np.uint64)
        words[:, 0] = keys
        _set_checks(words, _C1, _C2)
        self.slots[slots] = records

    def verify_slots(self, keys: np.ndarray, slots: np.ndarray, batch: int = 65536) -> list[str]:
        problems = []
        for i in range(0, len(keys), batch):
            try:
                self.read(keys[i : i + batch], slots[i : i + batch])
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
        self.slots = self.words = None
        with contextlib.suppress(BufferError):  # a caller still holds a view; the mapping goes when it does
            self.mm.close()
        os.close(self.fd)
