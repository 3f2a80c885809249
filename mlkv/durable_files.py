"""File operations whose crash behaviour the store relies on, in one place for every layer.

`replace_atomically` is the write-temp, fsync, rename, fsync-directory sequence: a crash leaves the old
file or the new one, never a mix. `drop_from_page_cache` is how benchmarks and `evict_page_cache` make
the next read come from the device: fsync first (dirty pages cannot be dropped), then DONTNEED.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str, write: Callable, before_rename: Callable[[], None] | None = None) -> None:
    """Write `path` through `write(file)` into a temp file, then make it durable and visible atomically.

    `before_rename` runs after the temp file is durable (a fault-injection point for crash tests)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def drop_from_page_cache(files: Iterable[str]) -> None:
    """fsync each file, then ask the kernel to drop its cached pages; files gone meanwhile are skipped."""
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:  # RocksDB may delete a file between listing and opening
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
