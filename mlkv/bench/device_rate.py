"""The device's random-read rate, measured beside the benchmark that compares itself with it.

`random_read_rate(path)` reads 4 KiB blocks at uniformly random aligned offsets of a file with O_DIRECT
(nothing comes from the page cache, nothing is added to it), from `depth` threads that each keep one read
in flight (a compiled loop of libc `pread`, GIL released), for `seconds`: the rate a miss path could reach
on this device at that depth. Where O_DIRECT is not supported (tmpfs) it reads through the page cache after
dropping the file from it, and says so (`direct: False`). Nothing is written. `misses_against_device`
times a read of rows that all miss in memory between two such probes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Callable

import numba
import numpy as np

from ..durable_files import drop_from_page_cache

BLOCK = 4096
DEPTH = 32
_STEP = 256  # reads one call of the compiled loop makes before the thread looks at the clock again

_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.restype = ctypes.c_ssize_t
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_ssize_t]
_errno = _libc.__errno_location
_errno.restype = ctypes.POINTER(ctypes.c_int)
_errno.argtypes = []


@numba.njit(nogil=True, cache=False)
def _read_blocks(fd, addr, offsets):
    """pread BLOCK bytes at each offset into the buffer at `addr`, GIL released (a Python loop of preads
    from 32 threads measures the GIL, not the device: 65K against 90K reads/s here). Returns the errno of
    the first failed read, 0 if all succeeded."""
    for i in range(offsets.shape[0]):
        if _pread(fd, addr, BLOCK, offsets[i]) != BLOCK:
            return max(1, _errno()[0])
    return 0


def random_read_rate(
    path: str, *, depth: int = DEPTH, seconds: float = 1.0, seed: int = 0, span: int | None = None
) -> dict:
    """Random BLOCK-byte reads of `path` per second with `depth` reads in flight.

    Args:
        path (str): an existing file of at least one block.
        span (int, optional): read only bytes [0, span): the allocated part of a sparse file (a read of a
            hole returns zeros without touching the device). Default: the whole file.
        depth (int): reader threads, each with one read in flight.
        seconds (float): how long to read.
        seed (int): seed of the offsets.

    Returns:
        dict: ``reads_per_s``, ``depth``, ``block``, ``direct`` (whether O_DIRECT bypassed the page cache),
        ``reads``, ``seconds``.
    """
    size = os.path.getsize(path) if span is None else min(span, os.path.getsize(path))
    blocks = size // BLOCK
    if blocks < 1:
        raise ValueError(f"{path} is {size} bytes, shorter than one {BLOCK}-byte block")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        direct = hasattr(os, "O_DIRECT")
    except OSError:
        drop_from_page_cache([path])
        fd, direct = os.open(path, os.O_RDONLY), False
    counts = [0] * depth
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(k: int) -> None:
        buf = np.frombuffer(mmap.mmap(-1, BLOCK), dtype=np.uint8)  # page-aligned, as O_DIRECT wants
        offsets = np.random.default_rng([seed, k]).integers(0, blocks, 1 << 16) * BLOCK
        i = 0
        try:
            while not stop.is_set():
                at = i % len(offsets)
                failed = _read_blocks(fd, buf.ctypes.data, offsets[at : at + _STEP])
                if failed:
                    raise OSError(failed, f"pread of {path}: {os.strerror(failed)}")
                i += len(offsets[at : at + _STEP])
        except OSError as e:
            errors.append(e)
        finally:
            counts[k] = i

    scratch = np.frombuffer(mmap.mmap(-1, BLOCK), dtype=np.uint8)
    _read_blocks(fd, scratch.ctypes.data, np.zeros(1, dtype=np.int64))  # compiled before the clock starts
    threads = [threading.Thread(target=reader, args=(k,), name=f"mlkv-devprobe-{k}") for k in range(depth)]
    try:
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        took = time.perf_counter() - start
    finally:
        stop.set()
        os.close(fd)
    if errors:
        raise errors[0]
    reads = sum(counts)
    return {
        "reads_per_s": reads / took,
        "depth": depth,
        "block": BLOCK,
        "direct": direct,
        "reads": reads,
        "seconds": took,
    }


def misses_against_device(
    read: Callable[[], int], path: str, evict: Callable[[], None], depth: int = DEPTH, span: int | None = None
) -> dict:
    """Time `read()` (it reads rows that all miss in memory and returns how many) between two
    `random_read_rate` probes of `path` (bytes [0, span)) at `depth`, calling `evict()` (drop the files from
    the page cache) before it. The device's rate drifts on a shared host, so the ratio is against the mean
    of the probes.

    Returns:
        dict: ``rows``, ``rows_per_s``, ``device_reads_per_s`` (the mean of the probes),
        ``device_reads_per_s_before_after``, ``depth``, ``direct``, ``ratio_device`` (rows/s over reads/s).
    """
    before = random_read_rate(path, depth=depth, seconds=1.0, seed=1, span=span)
    evict()
    start = time.perf_counter()
    rows = read()
    took = time.perf_counter() - start
    after = random_read_rate(path, depth=depth, seconds=1.0, seed=2, span=span)
    device = (before["reads_per_s"] + after["reads_per_s"]) / 2
    return {
        "rows": rows,
        "rows_per_s": rows / took,
        "device_reads_per_s": device,
        "device_reads_per_s_before_after": [before["reads_per_s"], after["reads_per_s"]],
        "depth": depth,
        "direct": before["direct"],
        "ratio_device": rows / took / device,
    }


def cold_get_against_device(table, keys: np.ndarray, batch: int = 4096, warm_keys=None) -> dict:
    """Misses of a slab table against the device: with the store's files evicted, `table.get` (untracked)
    of `keys` in batches, between two probes of the table's slot file. Random reads only: the whole-file
    read-in of a small cold table is off meanwhile. `warm_keys`, read untimed first (files evicted), load
    the kernels and start the fault threads. A benchmark helper: it looks inside the store for the file.

    Returns:
        dict: what `misses_against_device` returns.
    """
    from ..engine import slot_file
    from .timing import evict_files

    store = table.store
    file = store._engine._tables[table.name].file
    read_in, slot_file.READ_IN_SHARE = slot_file.READ_IN_SHARE, 0.0
    try:

        def evict() -> None:
            file.drop_page_cache()
            evict_files(store.path)

        def read() -> int:
            for lo in range(0, len(keys), batch):
                table.get(keys[lo : lo + batch], track=False)
            return len(keys)

        if warm_keys is not None:
            evict()
            table.get(warm_keys, track=False)
        return misses_against_device(read, file.path, evict, slot_file.FAULT_THREADS, file.reserved)
    finally:
        slot_file.READ_IN_SHARE = read_in
