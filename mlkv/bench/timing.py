"""Timing loops and page-cache control for benchmarks.

Warm: batches run back to back for a time budget, split into repeats; the result is the median repeat's
keys/s. Cold: before every timed batch, `evict` drops the data from the OS page cache (fsync, then
POSIX_FADV_DONTNEED, which only drops clean pages), so each timed batch starts with none of its rows in
memory; the result is the median batch's keys/s.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..durable_files import drop_from_page_cache

COLD_METHOD = "fsync + POSIX_FADV_DONTNEED before every timed batch"


@dataclass
class Timing:
    keys_per_s: float  # median over the repeats
    samples: list[float] = field(default_factory=list)  # keys/s of each repeat
    batches: int = 0
    seconds: float = 0.0  # timed seconds in all


def measure_warm(
    run: Callable[[int], int], batches: Iterator[int], seconds: float, repeats: int = 5
) -> Timing:
    """`run(i)` processes pool batch i and returns its key count; repeats of seconds/repeats each."""
    per = seconds / repeats
    out = Timing(0.0)
    for _ in range(repeats):
        keys, start = 0, time.perf_counter()
        while True:
            keys += run(next(batches))
            out.batches += 1
            took = time.perf_counter() - start
            if took >= per:
                break
        out.samples.append(keys / took)
        out.seconds += took
    out.keys_per_s = statistics.median(out.samples)
    return out


def measure_interleaved(
    runs: list[Callable[[int], int]],
    batches: Iterator[int],
    seconds: float,
    repeats: int = 5,
    prepare: list[Callable[[], object]] | None = None,
) -> list[Timing]:
    """measure_warm of several runs, their repeats alternating (A B A B ...), so a ratio between them is
    not skewed by load that comes and goes during the measurement (other processes on a small machine).
    `prepare[k]()`, if given, runs untimed before each repeat of run k."""
    out = [Timing(0.0) for _ in runs]
    for _ in range(repeats):
        for k, (run, timing) in enumerate(zip(runs, out, strict=True)):
            if prepare is not None:
                prepare[k]()
            one = measure_warm(run, batches, seconds / repeats, repeats=1)
            timing.samples += one.samples
            timing.batches += one.batches
            timing.seconds += one.seconds
    for timing in out:
        timing.keys_per_s = statistics.median(timing.samples)
    return out


def measure_cold(
    run: Callable[[int], int],
    batches: Iterator[int],
    seconds: float,
    evict: Callable[[], None],
    min_repeats: int = 3,
    max_repeats: int = 50,
) -> Timing:
    """Like measure_warm, but `evict()` (untimed) precedes every timed batch; one batch per repeat."""
    out = Timing(0.0)
    deadline = time.perf_counter() + seconds
    while len(out.samples) < min_repeats or (
        len(out.samples) < max_repeats and time.perf_counter() < deadline
    ):
        evict()
        start = time.perf_counter()
        keys = run(next(batches))
        took = time.perf_counter() - start
        out.samples.append(keys / took)
        out.batches += 1
        out.seconds += took
    out.keys_per_s = statistics.median(out.samples)
    return out


def files_under(path: str) -> list[str]:
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            f = os.path.join(root, name)
            if os.path.isfile(f) and not os.path.islink(f):
                found.append(f)
    return found


def evict_files(path: str) -> None:
    """fsync every file under `path` (a file or a directory), then drop it from the page cache."""
    drop_from_page_cache(files_under(path) if os.path.isdir(path) else [path])


def warm_files(path: str, chunk: int = 8 << 20) -> int:
    """Read every file under `path` once so the page cache holds it; returns the bytes read."""
    total = 0
    for f in files_under(path) if os.path.isdir(path) else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            while block := os.read(fd, chunk):
                total += len(block)
        finally:
            os.close(fd)
    return total
