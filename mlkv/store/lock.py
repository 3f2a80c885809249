"""One writer per store path: an exclusive flock on PATH/LOCK (shared for readonly opens).

flock locks belong to an open file description, so a second `open` in the same process conflicts just like
another process does. The holder's pid is written into the file so the error can name it. The memory
engine has no directory; its stores are locked in a process-wide table instead. A readonly open of a store
on a read-only file system takes no lock (no writer can exist there); a writable one there, or without
write permission, raises ReadOnlyError.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from ..errors import ReadOnlyError, StoreLockedError

_MEMORY_WRITERS: set[str] = set()
_MEMORY_LOCK = threading.Lock()


class StoreLock:
    def __init__(self, path: str, readonly: bool, on_disk: bool):
        self.key = os.path.abspath(path)
        self.on_disk = on_disk
        self.readonly = readonly
        self.fd = -1
        if not on_disk:
            if not readonly:
                with _MEMORY_LOCK:
                    if self.key in _MEMORY_WRITERS:
                        raise StoreLockedError(
                            f"{path} is already open for writing in this process (pid {os.getpid()})"
                        )
                    _MEMORY_WRITERS.add(self.key)
            return
        self.fd = self._open(path, readonly)
        if self.fd < 0:
            return
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            mode = "a writer" if readonly else "another opener"
            raise StoreLockedError(f"{path} is locked by {mode} (pid {holder})") from None
        if not readonly:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    @staticmethod
    def _open(path: str, readonly: bool) -> int:
        """The LOCK file's descriptor; -1 for a readonly open on a read-only file system (no writer can
        exist there, and the file cannot be created). A writer that cannot write the directory gets a
        ReadOnlyError naming why."""
        lock = os.path.join(path, "LOCK")
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if readonly and e.errno in (errno.EROFS, errno.EACCES):
                try:
                    return os.open(lock, os.O_RDONLY)  # a shared flock needs no write access
                except FileNotFoundError:
                    if e.errno == errno.EROFS:
                        return -1
                    raise e from None
            if e.errno == errno.EROFS:
                raise ReadOnlyError(
                    f"cannot open {path} for writing: it is on a read-only file system "
                    "(open it with readonly=True to read it)"
                ) from e
            if e.errno == errno.EACCES:
                raise ReadOnlyError(
                    f"cannot open {path} for writing: permission denied on {lock} "
                    "(open it with readonly=True to read it)"
                ) from e
            raise

    def release(self) -> None:
        if not self.on_disk:
            if not self.readonly:
                with _MEMORY_LOCK:
                    _MEMORY_WRITERS.discard(self.key)
            return
        if self.fd >= 0:
            os.close(self.fd)  # closing the description drops the flock
            self.fd = -1
