"""File operations whose crash behaviour the store relies on, in one place for every layer.

`replace_atomically` is the write-temp, fsync, rename, fsync-directory sequence: a crash leaves the old
file or the new one, never a mix; a failed write (full disk, I/O error) removes the temp file and leaves the
old file as it was. `storage_errors` turns the OSErrors of a full or failing device into StorageFullError /
StorageIOError naming the file and the bytes wanted, so every layer reports them the same way.
`drop_from_page_cache` is how benchmarks and `evict_page_cache` make the next read come from the device:
fsync first (dirty pages cannot be dropped), then DONTNEED.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable, Iterator

from .errors import StorageError, StorageFullError, StorageIOError

#: errno values reported as StorageFullError (EDQUOT: a quota is a full disk for this user)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def storage_error(
    exc: OSError, file: str, doing: str, wanted: int | None = None, sync: bool = False
) -> OSError:
    """The mlkv error for an OSError raised while `doing` (e.g. "reserving slots") to `file`: a
    StorageFullError for ENOSPC/EDQUOT, a StorageIOError for EIO, else `exc` itself. `sync`: the failed
    call was an fsync/msync (the error's `fsync_failed` is set)."""
    if isinstance(exc, StorageError):
        return exc
    amount = "an unknown number of" if wanted is None else str(wanted)
    if exc.errno in FULL_ERRNOS:
        err = StorageFullError(file, f"{file}: no space left on device while {doing} ({amount} bytes wanted)")
    elif exc.errno == errno.EIO:
        err = StorageIOError(file, f"{file}: I/O error while {doing}")
    else:
        return exc
    err.fsync_failed = sync
    return err


@contextlib.contextmanager
def storage_errors(file: str, doing: str, wanted: int | None = None, sync: bool = False) -> Iterator[None]:
    """Re-raise the OSErrors of the block as `storage_error` maps them (others unchanged)."""
    try:
        yield
    except OSError as exc:
        err = storage_error(exc, file, doing, wanted, sync)
        if err is exc:
            raise
        raise err from exc


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_dir(path: str) -> None:
    with storage_errors(path, "syncing the directory", sync=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_atomically(
    path: str,
    write: Callable,
    before_rename: Callable[[], None] | None = None,
    after_rename: Callable[[], None] | None = None,
    size: int | None = None,
) -> None:
    """Write `path` through `write(file)` into a temp file, then make it durable and visible atomically.

    `before_rename` runs after the temp file is durable (a fault-injection point for crash tests);
    `after_rename` runs once the new file is visible, before the directory fsync (which may still fail:
    the caller must then treat the new file as the current one). `size`: the bytes `write` writes, named
    by a StorageFullError. Raises StorageFullError / StorageIOError with the old file untouched."""
    tmp = path + ".tmp"
    try:
        with storage_errors(tmp, "writing", size), open(tmp, "wb") as f:
            write(f)
            f.flush()
            with storage_errors(tmp, "syncing", size, sync=True):
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    if after_rename is not None:
        after_rename()
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
