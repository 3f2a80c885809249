"""SlotFile: one table's rows in fixed-width slots of a memory-mapped file.

Layout: a 4 KiB header (magic, version, row/slot width, table id, CRC-32), then slot i at
4096 + i * slot_bytes. The table id (version 2) is the manifest's id of the table the file belongs to: an
open checks it, so a slab file of another table of the same width (files swapped or restored under the
wrong name) is a CorruptionError, not another table's rows. A version-1 file (written before mlkv recorded
the id) opens unchecked and keeps its header.
A slot is [key u64 | check u64 | row bytes, zero-padded to a multiple of 8]. Storing the key lets a read
prove the slot belongs to the key it was asked for; `check` is a 64-bit multiply-sum hash of key and row
computed over a whole batch in one compiled loop, and any single flipped bit or torn/zeroed slot fails it.
Reads gather from the mapping and verify in that same loop (numba, `nogil`: an I/O thread reading rows does
not hold up the trainer), so a row is touched once; writes are sorted by slot so dirty pages are touched in
file order. Durability is the caller's: `sync()` fsyncs (msync of the mapping).

Full disk: the file grows sparse (ftruncate, so the mapping can grow by doubling), but a slot is written
through the mapping only once its bytes are reserved on the device (`posix_fallocate` of the slots in use,
in `ensure_capacity`): storing into an unreserved page of a full file system would kill the process with
SIGBUS, while a failed reservation is a StorageFullError raised before anything changed. (Guaranteed where
fallocate reserves blocks: ext4, xfs, tmpfs; not on copy-on-write file systems such as btrfs or ZFS.) A
mapped read past the end of the file would SIGBUS too, so an open checks the file holds every slot the
manifest names. Thread-safety: none; the engine's lock serialises writers against readers.

Memory users can see: every page of the mapping a read or write touches counts as the process's
file-backed RSS (RssFile) until it is unmapped, so a long run of random reads over a table larger than RAM
would show RSS growing towards the table's size although the kernel may reclaim those pages at will. The
file therefore counts the pages its reads and writes may map (a read fault of a cached page maps its
neighbours too: the kernel's fault-around, 64 KiB; a write fault maps one page) and, past MAPPED_WINDOW_BYTES,
drops its mapped pages (MADV_DONTNEED; for a shared file mapping the pages, dirty ones included, stay in
the page cache and the next access maps them again, a minor fault): its RssFile stays below about
MAPPED_WINDOW_BYTES plus one batch. The count is an upper bound (64 KiB a read, though hot rows share
pages), so when it passes the window the file first asks the kernel: it drops its pages only if the
process's file-backed RSS really grew by the window since the last drop (or the open). Dropping on the
count alone turned every read of a 2M-row table into a page fault: its 540 MiB mapping was dropped every
8,192 row reads, about every other training step, which cost 1.6 us a row read.
A file small next to memory (allocated bytes at most READ_IN_SHARE of `memory_for_files()`, the rule of
the read-in below) is never unmapped: a table a little larger than the window, read at random, would
otherwise map back what it dropped one 64 KiB fault at a time (1,000 minor faults a training step on a
615 MiB table with the 512 MiB window, a fifth of the step's CPU). Its pages are in the page cache
anyway; mapped, they show in RssFile too, up to the file's size.

Reads from the device: a read of a page that is not in the page cache is a page fault that waits for one
device read, and a thread takes its faults one at a time, while a disk or SSD serves random reads many
times faster with many in flight. A large read therefore gathers its first _PROBE rows in the calling
thread and checks whether any of them waited for the device (the thread's major-fault count, or where the
OS keeps none, a time above _COLD_NS a row); if so, the rest of the read is split over up to FAULT_THREADS
threads of one process-wide pool (each a GIL-free gather of its part), so that many faults, hence device
reads, are in flight at once. Reads served from the page cache stay on the calling thread: splitting them
would only add hand-offs. The fault threads start on the first such read and stop when the process's last
slot file closes.

A restarted job whose table is small next to free memory: random faults would bring it in one page at a
time, while the device reads it sequentially many times faster. So the first read of an open file that
finds it cold also starts, when the file's allocated bytes are at most READ_IN_SHARE of the memory the page
cache may take (`memory_for_files`: MemAvailable capped by the cgroup's limit), a background read-in of the
whole file (POSIX_FADV_WILLNEED in 128 KiB steps: the kernel reads ahead sequentially, nothing is copied
or mapped), and the mapping's advice turns from MADV_RANDOM (a fault reads its own page only: right for a
table larger than memory) to MADV_NORMAL (a fault reads the pages around it too, as torch over np.memmap
gets; 0.60x -> 0.90x torch-mmap on `mlkv bench train --regimes cold`). Once per open; close() stops it.
A table larger than that share is left to random reads.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import resource
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..durable_files import storage_errors
from ..errors import CorruptionError, InternalError, PathNotFoundError
from .kernel import inline_kernel, kernel
from .key_index import KeyIndex, as_u64, hash64
from .prefetch import prefetch_at, prefetch_for_write_at
from .process_memory import memory_for_files, process_memory

MAGIC = b"MLKVSLAB"
VERSION = 2
HEADER_BYTES = 4096
_HEADER = struct.Struct("<8sIIII")  # magic, version, row_bytes, slot_bytes, table id; CRC-32 follows
_HEADER_V1 = struct.Struct("<8sIII")  # version 1: no table id
_MIN_SLOTS = 1 << 12
MAPPED_WINDOW_BYTES = 512 << 20  # RssFile one slot file may add before it unmaps its pages (header)
_READ_MAPS = 64 << 10  # bytes one slot read may map: Linux's fault_around_bytes
_WRITE_MAPS = mmap.PAGESIZE
_WRITE_BATCH = 1 << 16  # slots one step of `write` copies into records (17 MiB at dim 32 + Adagrad)
_RESERVE_STEP = 1 << 20  # reservations are rounded up to this many bytes: one fallocate per MiB of growth
FAULT_THREADS = 32  # device reads in flight for a read whose rows are not in the page cache (header)
_PROBE = 32  # rows a large read gathers first, to tell device reads from page-cache hits
_COLD_NS = 4000  # without a major-fault count: a probe slower than this a row read from the device
_PART_ROWS = 16  # fewest rows one fault thread gathers
READ_IN_SHARE = 0.125  # a cold file up to this share of memory_for_files() is read in whole (header)
_READ_IN_STEP = 128 << 10  # bytes one POSIX_FADV_WILLNEED asks for: the kernel reads at most the device's
# read-ahead (read_ahead_kb, 128 KiB by default) or largest request per call, and ignores the rest

_C1 = hash64(np.arange(1, 4097, dtype=np.uint64))
_C2 = hash64(np.arange(5001, 9097, dtype=np.uint64)) | np.uint64(1)  # odd: every bit flip shows


_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)
_pool: ThreadPoolExecutor | None = None
_open_files = 0  # slot files open in this process: the last one to close stops the fault threads
_pool_lock = threading.Lock()


def _major_faults() -> int:
    """Page faults of the calling thread that waited for the device (0 where the OS does not count them)."""
    return resource.getrusage(_RUSAGE_THREAD).ru_majflt if _RUSAGE_THREAD is not None else 0


def _probe_cold(faults: int, start_ns: int) -> bool:
    """Whether a probe's rows came from the device: this thread's major faults (faults that waited for a
    device read) grew since `faults`; where the OS does not count them, whether it took longer than _COLD_NS
    a row since `start_ns` (which a wait for the GIL can also make it)."""
    if _RUSAGE_THREAD is not None:
        return _major_faults() > faults
    return time.perf_counter_ns() - start_ns >= _PROBE * _COLD_NS


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads, and may have forked while another thread held the
    lock: it starts with no pool, a fresh lock and no open files of its own."""
    global _pool, _pool_lock, _open_files
    _pool, _pool_lock, _open_files = None, threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _fault_pool() -> ThreadPoolExecutor:
    """The process-wide pool of FAULT_THREADS threads that take device reads' page faults together (a forked
    child makes its own: `_after_fork_in_child`). Its threads start on the first read from the device and
    stop when the last slot file of the process closes."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FAULT_THREADS, thread_name_prefix="mlkv-fault")
        return _pool


def _count_open(delta: int) -> None:
    global _pool, _open_files
    with _pool_lock:
        _open_files = max(0, _open_files + delta)  # a child closing files it inherited counts none
        pool = _pool if _open_files == 0 else None
        if pool is not None:
            _pool = None
    if pool is not None:
        pool.shutdown(wait=True)  # idle by now: no file is open to read through it


def slot_bytes_for(row_bytes: int) -> int:
    return 16 + (row_bytes + 7) // 8 * 8


@inline_kernel
def _mix(z):
    """hash64 (splitmix64's finaliser) of one uint64."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@inline_kernel
def _check(acc, key):
    """A slot's check word: its row words' weighted sum `acc` (of (w ^ c1[j]) * c2[j]) bound to its key."""
    return _mix(acc ^ _mix(key))


_AHEAD = 6  # slots prefetched ahead of the one being copied


@kernel
def _put_records(words, slots, order, keys, rows, c1, c2):
    """words[slots[i]] = [keys[i] | check | rows[i]] for each i of `order`, the check computed as the row
    words are stored: rows (n, words per slot - 2) uint64, a row's bytes then zero padding. The lines of
    the slot _AHEAD on are prefetched for writing, so the random stores overlap."""
    n, m = order.shape[0], rows.shape[1]
    for t in range(n):
        if t + _AHEAD < n:
            for j in range(0, words.shape[1], 8):
                prefetch_for_write_at(words, slots[order[t + _AHEAD]], j)
        i = order[t]
        s = slots[i]
        acc = np.uint64(0)
        for j in range(m):
            w = rows[i, j]
            words[s, j + 2] = w
            acc += (w ^ c1[j]) * c2[j]
        words[s, 0] = keys[i]
        words[s, 1] = _check(acc, keys[i])


@kernel
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
        if words[s, 0] != keys[i] or words[s, 1] != _check(acc, keys[i]):
            bad += 1
            if first < 0:
                first = i
    return first, bad


@kernel
def _expected_keys(tkeys, tvals, key_at, live):
    """For each entry of a key index's table (tkeys, tvals: key -> slot, -1 empty) key_at[slot] = key and
    live[slot] = True: the key each live slot must hold, in one pass over the table. Returns how many
    entries name a slot past the end (none are marked)."""
    past = 0
    for p in range(tvals.shape[0]):
        s = tvals[p]
        if s >= key_at.shape[0]:
            past += 1
        elif s >= 0:
            key_at[s] = tkeys[p]
            live[s] = True
    return past


@kernel
def _expected_pairs(keys, slots, key_at, live):
    """key_at[slots[i]] = keys[i] for the slots not marked live yet (then marked); returns how many name a
    slot past the end."""
    past = 0
    for i in range(keys.shape[0]):
        s = slots[i]
        if s >= key_at.shape[0]:
            past += 1
        elif s >= 0 and not live[s]:
            key_at[s] = keys[i]
            live[s] = True
    return past


@kernel
def _verify_run(words, first, key_at, live, c1, c2, bad):
    """Check the records `words` of slots first, first+1, ...: each live one must hold its key and
    checksum. Slot numbers of the failures go to `bad` (as many as fit); returns how many failed."""
    nbad, m = 0, words.shape[1] - 2
    for i in range(words.shape[0]):
        s = first + i
        if not live[s]:
            continue
        acc = np.uint64(0)
        for j in range(m):
            acc += (words[i, j + 2] ^ c1[j]) * c2[j]
        k = key_at[s]
        if words[i, 0] != k or words[i, 1] != _check(acc, k):
            if nbad < bad.shape[0]:
                bad[nbad] = s
            nbad += 1
    return nbad


VERIFY_CHUNK_BYTES = 32 << 20  # one sequential read of `verify`; two such buffers are in use at a time
_DIRECT_ALIGN = 4096  # offset, length and buffer alignment of verify's reads (O_DIRECT needs them)
MAX_REPORTED = 100  # bad slots described one by one by `verify`; the rest are counted


class SlotFile:
    def __init__(self, path: str, row_bytes: int, readonly: bool = False, *, table_id: int):
        """`table_id`: the manifest's id of the table (below 2**32), recorded in a new file's header and
        checked against an existing one's (CorruptionError naming the file when it differs)."""
        self.path = path
        self.table_id = table_id
        self.row_bytes = row_bytes
        self.slot_bytes = slot_bytes_for(row_bytes)
        self.readonly = readonly
        exists = os.path.exists(path)
        if not exists and readonly:
            raise PathNotFoundError(f"slot file {path} does not exist (opening readonly creates nothing)")
        self._advice = mmap.MADV_RANDOM  # a fault reads its page alone; MADV_NORMAL once read in (header)
        self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if exists:
                self._check_header()
            else:
                self._write_header()
            # bytes [0, reserved) are allocated on the device: the first hole (a file without one: its size)
            self.reserved = os.lseek(self.fd, 0, os.SEEK_HOLE)
            self._map()
        except BaseException:
            os.close(self.fd)
            raise
        self._read_in_lock = threading.Lock()
        self._read_in: threading.Thread | None = None  # the background read-in, once per open
        self._read_in_tried = False
        self._closing = threading.Event()
        _count_open(1)

    def _header_bytes(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.row_bytes, self.slot_bytes, self.table_id)
        return body + struct.pack("<I", zlib.crc32(body))

    def _write_header(self) -> None:
        with storage_errors(self.path, "creating the slab file", HEADER_BYTES):
            os.ftruncate(self.fd, HEADER_BYTES + _MIN_SLOTS * self.slot_bytes)
            os.pwrite(self.fd, self._header_bytes(), 0)

    def _check_header(self) -> None:
        size = os.fstat(self.fd).st_size
        if size < HEADER_BYTES:  # mapping the slots after a short header would fail (ValueError)
            raise CorruptionError(
                self.path, size, f"file is {size} bytes, shorter than its {HEADER_BYTES}-byte header"
            )
        raw = os.pread(self.fd, _HEADER.size + 4, 0)
        magic, version = struct.unpack_from("<8sI", raw)
        if magic != MAGIC:
            raise CorruptionError(self.path, 0, f"bad magic {magic!r}")
        if version not in (1, VERSION):
            raise CorruptionError(self.path, 8, f"slab version {version}, this mlkv reads 1 and {VERSION}")
        head = _HEADER if version == VERSION else _HEADER_V1
        if struct.unpack_from("<I", raw, head.size)[0] != zlib.crc32(raw[: head.size]):
            raise CorruptionError(self.path, 0, "header CRC-32 mismatch")
        _, _, row_bytes, slot_bytes, *table_id = head.unpack_from(raw)
        if (row_bytes, slot_bytes) != (self.row_bytes, self.slot_bytes):
            raise CorruptionError(self.path, 12, f"row width {row_bytes}, manifest says {self.row_bytes}")
        if table_id and table_id[0] != self.table_id:  # version 1 records none
            raise CorruptionError(
                self.path,
                20,
                f"the file belongs to table id {table_id[0]}; the manifest names it as table {self.table_id}",
            )

    def _map(self) -> None:
        size = os.fstat(self.fd).st_size
        self.capacity = (size - HEADER_BYTES) // self.slot_bytes
        access = mmap.ACCESS_READ if self.readonly else mmap.ACCESS_WRITE
        self.mm = mmap.mmap(self.fd, HEADER_BYTES + self.capacity * self.slot_bytes, access=access)
        self.mm.madvise(self._advice)
        self._touched = 0  # bytes of pages mapped since the last unmapping (an upper bound)
        self._mapped_base = process_memory()[1] or 0  # the process's RssFile after the last unmapping
        self.slots = np.frombuffer(self.mm, dtype=np.uint8, offset=HEADER_BYTES).reshape(-1, self.slot_bytes)
        self.words = self.slots.view(np.uint64)  # the same slots as uint64 words, for the kernels

    def check_size(self, n_slots: int) -> None:
        """CorruptionError unless the file holds `n_slots` slots (the manifest's count): a mapped read of a
        slot past the end of the file would kill the process with SIGBUS."""
        size = os.fstat(self.fd).st_size
        if size < self.offset_of(n_slots):
            raise CorruptionError(
                self.path,
                size,
                f"file is {size} bytes, the manifest's {n_slots} slots need {self.offset_of(n_slots)}",
            )

    def ensure_capacity(self, n_slots: int) -> None:
        """Make slots [0, n_slots) writable: grow the mapping, then reserve their bytes on the device.

        Raises StorageFullError (nothing written, the slots in use unchanged) when the device is full."""
        if n_slots > self.capacity:
            cap = max(self.capacity, _MIN_SLOTS)
            while cap < n_slots:
                cap *= 2
            with storage_errors(self.path, "growing the slab file", (cap - self.capacity) * self.slot_bytes):
                os.ftruncate(self.fd, HEADER_BYTES + cap * self.slot_bytes)
            self._map()  # the old mapping is released once no array views it
        end = self.offset_of(n_slots)
        if end > self.reserved and not self.readonly:
            # rounded up (within the file) so that growing one slot at a time costs one call per MiB
            stop = min(-(-end // _RESERVE_STEP) * _RESERVE_STEP, self.offset_of(self.capacity))
            with storage_errors(self.path, f"reserving slots up to {n_slots}", stop - self.reserved):
                os.posix_fallocate(self.fd, self.reserved, stop - self.reserved)
            self.reserved = stop

    def offset_of(self, slot: int) -> int:
        return HEADER_BYTES + int(slot) * self.slot_bytes

    def read(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Rows (n, row_bytes) of `keys` stored at `slots`, zeros where a slot is -1; CorruptionError if any
        slot fails its checks."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        out = np.empty((len(keys), self.words.shape[1] - 2), dtype=np.uint64)
        first, bad = self._gather(keys, slots, out)
        if bad:
            self._raise_corrupt(keys, slots, first, bad)
        self._touch(len(keys) * _READ_MAPS)
        return out.view(np.uint8)[:, : self.row_bytes]

    def _gather(self, keys: np.ndarray, slots: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """_gather of every row, with its device reads in flight together when the rows are not in the page
        cache (module header). Returns (index of the first bad slot or -1, number of bad slots)."""
        n = len(keys)
        if n < 4 * _PROBE:
            return _gather(self.words, keys, slots, _C1, _C2, out)
        faults, start = _major_faults(), time.perf_counter_ns()
        parts = [(0, _gather(self.words, keys[:_PROBE], slots[:_PROBE], _C1, _C2, out[:_PROBE]))]
        if not _probe_cold(faults, start):
            parts.append((_PROBE, _gather(self.words, keys[_PROBE:], slots[_PROBE:], _C1, _C2, out[_PROBE:])))
        else:
            self._start_read_in()
            count = max(1, min(FAULT_THREADS, (n - _PROBE) // _PART_ROWS))
            bounds = np.linspace(_PROBE, n, count + 1).astype(np.int64).tolist()
            pool = _fault_pool()
            futures = [
                (a, pool.submit(_gather, self.words, keys[a:b], slots[a:b], _C1, _C2, out[a:b]))
                for a, b in itertools.pairwise(bounds)
            ]
            parts += [(a, f.result()) for a, f in futures]
        first = next((a + f for a, (f, _) in parts if f >= 0), -1)
        return first, sum(b for _, (_, b) in parts)

    def _start_read_in(self) -> None:
        """On the first cold read of this open: read the whole file into the page cache in the background
        when it is small next to the memory for it (module header)."""
        with self._read_in_lock:
            if self._read_in_tried:
                return
            self._read_in_tried = True
            room = memory_for_files()
            if room is None or self.reserved > READ_IN_SHARE * room:
                return
            self._advice = mmap.MADV_NORMAL  # faults meanwhile read around their page, as the read-in does
            self.mm.madvise(self._advice)
            self._read_in = threading.Thread(
                target=self._read_in_run, args=(self.reserved,), name="mlkv-readin", daemon=True
            )
            self._read_in.start()

    def _read_in_run(self, size: int) -> None:
        with contextlib.suppress(OSError, AttributeError):  # advice only
            for offset in range(0, size, _READ_IN_STEP):
                if self._closing.is_set():
                    return
                os.posix_fadvise(self.fd, offset, min(_READ_IN_STEP, size - offset), os.POSIX_FADV_WILLNEED)

    def _touch(self, nbytes: int) -> None:
        """Count `nbytes` more mapped; past MAPPED_WINDOW_BYTES, unmap every page (the page cache keeps
        them; module header)."""
        self._touched += nbytes
        if self._touched > MAPPED_WINDOW_BYTES and len(self.mm) > MAPPED_WINDOW_BYTES:
            self._touched = 0
            room = memory_for_files()
            if room is not None and self.reserved <= READ_IN_SHARE * room:
                return  # small next to memory: the whole file may stay mapped (module header)
            mapped = process_memory()[1]
            if mapped is None or mapped - self._mapped_base > MAPPED_WINDOW_BYTES:
                self.mm.madvise(mmap.MADV_DONTNEED)
                after = process_memory()[1]  # what the rest of the process maps (other files, libraries)
                self._mapped_base = after if after is not None else 0
            else:  # others unmapped meanwhile: measure from the lower level
                self._mapped_base = min(self._mapped_base, mapped)

    def _raise_corrupt(self, keys: np.ndarray, slots: np.ndarray, i: int, bad: int) -> None:
        stored = int(self.words[slots[i], 0])
        what = "key mismatch" if stored != int(keys[i]) else "row checksum mismatch"
        detail = f"{what} for key {int(keys[i])} ({bad} bad)"
        raise CorruptionError(self.path, self.offset_of(slots[i]), detail)

    def write(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write rows into distinct slots, in slot order; every slot lies below an `ensure_capacity` (its
        bytes are reserved: a store into the mapping cannot meet a full device)."""
        keys, slots = as_u64(keys), np.ascontiguousarray(slots, dtype=np.int64)
        if rows.shape != (len(keys), self.row_bytes) or len(slots) != len(keys):
            raise InternalError(  # the kernel does not check bounds: refuse what would overrun a slot
                f"slot file write of {len(keys)} keys, {len(slots)} slots and rows of shape "
                f"{rows.shape}; rows must be ({len(keys)}, {self.row_bytes}) bytes"
            )
        order = np.argsort(slots, kind="stable")
        whole = self.row_bytes % 8 == 0  # rows of whole words are stored straight from `rows`
        row_words = np.ascontiguousarray(rows).view(np.uint64) if whole else None
        for i in range(0, len(order), _WRITE_BATCH):  # _touch may unmap between parts
            part = order[i : i + _WRITE_BATCH]
            if whole:
                _put_records(self.words, slots, part, keys, row_words, _C1, _C2)
            else:  # zero-padded to whole words, a part at a time (a tier flush writes GiBs at once)
                padded = np.zeros((len(part), self.slot_bytes - 16), dtype=np.uint8)
                padded[:, : self.row_bytes] = rows[part]
                at = np.arange(len(part))
                _put_records(self.words, slots[part], at, keys[part], padded.view(np.uint64), _C1, _C2)
            self._touch(len(part) * _WRITE_MAPS)

    def verify(
        self, n_slots: int, index: KeyIndex, keys: np.ndarray | None = None, slots: np.ndarray | None = None
    ) -> list[str]:
        """Check that every slot the key -> slot `index` names holds its key with a sound checksum, and so do
        slots[i] -> keys[i] of slots the index does not name (kept checkpoints' slots), reading the
        file once in slot order: large sequential `preadv`s into two reused buffers (the next read runs
        on a helper thread while a compiled, GIL-free loop checks the current one), so it runs at about the
        device's sequential speed and maps nothing (RSS grows by the buffers and two per-slot arrays, 9
        bytes per slot). Returns one description per bad slot (the first MAX_REPORTED, then a count)."""
        key_at = np.empty(n_slots, dtype=np.uint64)
        live = np.zeros(n_slots, dtype=bool)
        tkeys, tvals, _ = index.kernel_args()
        past = _expected_keys(tkeys, tvals, key_at, live)
        if keys is not None and len(keys):
            past += _expected_pairs(as_u64(keys), np.ascontiguousarray(slots, dtype=np.int64), key_at, live)
        per = max(1, VERIFY_CHUNK_BYTES // self.slot_bytes)
        size = -(-(per * self.slot_bytes + _DIRECT_ALIGN) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        # anonymous mappings: page-aligned, as O_DIRECT wants (unmapped once the arrays over them go)
        bufs = [np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8) for _ in range(2)]
        fd = self._direct_fd()
        bad = np.empty(MAX_REPORTED, dtype=np.int64)
        found: list[int] = []
        nbad = 0
        with contextlib.suppress(AttributeError, OSError):  # advice only
            os.posix_fadvise(self.fd, HEADER_BYTES, n_slots * self.slot_bytes, os.POSIX_FADV_SEQUENTIAL)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="mlkv-verify") as reader:
                pending = reader.submit(self._read_slots, fd, bufs[0], 0, min(per, n_slots))
                for k, first in enumerate(range(0, n_slots, per)):
                    words = pending.result()
                    after = first + per
                    if after < n_slots:
                        pending = reader.submit(
                            self._read_slots, fd, bufs[(k + 1) % 2], after, min(per, n_slots - after)
                        )
                    got = _verify_run(words, first, key_at, live, _C1, _C2, bad)
                    found += bad[: min(got, MAX_REPORTED - len(found))].tolist()
                    nbad += got
        finally:
            if fd != self.fd:
                os.close(fd)
        problems = [self._describe(int(s), int(key_at[s])) for s in found]
        if past:
            problems.append(f"{self.path}: the index names {past} slots past the {n_slots} in use")
        if nbad > len(found):
            problems.append(f"{self.path}: {nbad - len(found)} more bad slots ({nbad} in all)")
        return problems

    def _read_slots(self, fd: int, buf: np.ndarray, first: int, n: int) -> np.ndarray:
        """The records of slots [first, first + n), read into the page-aligned byte buffer `buf` with reads
        aligned to _DIRECT_ALIGN (what an O_DIRECT `fd` needs; a buffered one takes them too). A file
        shorter than that is a CorruptionError (the manifest names those slots)."""
        offset = self.offset_of(first)
        start = offset - offset % _DIRECT_ALIGN
        need = offset + n * self.slot_bytes - start
        view = memoryview(buf[: -(-need // _DIRECT_ALIGN) * _DIRECT_ALIGN])
        done = 0
        with storage_errors(self.path, "reading slots to verify them"):
            while done < need:
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    at = offset + max(0, done - (offset - start))
                    slot = first + (at - offset) // self.slot_bytes
                    raise CorruptionError(self.path, at, f"file ends inside slot {slot}")
                done += got
        skip = offset - start
        return buf[skip : skip + n * self.slot_bytes].view(np.uint64).reshape(n, self.slot_bytes // 8)

    def _direct_fd(self) -> int:
        """A descriptor of the file that bypasses the page cache (O_DIRECT: the device writes into the
        buffer, no copy and no cache to evict; the kernel writes dirty cached pages of a range back before
        reading it), or this file's own where O_DIRECT is not supported (tmpfs, some file systems)."""
        try:
            return os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            return self.fd

    def _describe(self, slot: int, key: int) -> str:
        stored = int.from_bytes(os.pread(self.fd, 8, self.offset_of(slot)), "little")
        what = "key mismatch" if stored != key else "row checksum mismatch"
        return str(CorruptionError(self.path, self.offset_of(slot), f"{what} for key {key} (slot {slot})"))

    def sync(self) -> None:
        with storage_errors(self.path, "syncing the slab file", sync=True):
            self.mm.flush()

    def drop_page_cache(self) -> None:
        self.mm.flush()
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def disk_bytes(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        if self._read_in is not None:
            self._read_in.join()  # before the descriptor it advises on is closed (and maybe reused)
        self.slots = self.words = None
        try:
            with contextlib.suppress(BufferError):  # a caller still holds a view; the mapping goes with it
                self.mm.close()
            os.close(self.fd)
        finally:
            _count_open(-1)
