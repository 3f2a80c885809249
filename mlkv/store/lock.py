"""One writer per store path: an exclusive flock on PATH/LOCK (shared for readonly opens).

flock locks belong to an open file description, so a second `open` in the same process conflicts just like
another process does. The holder's pid is written into the file so the error can name it. The memory
engine has no directory; its stores are locked in a process-wide table instead.
"""

from __future__ import annotations

import fcntl
import os
import threading

from ..errors import StoreLockedError

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
        self.fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
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

    def release(self) -> None:
        if not self.on_disk:
            if not self.readonly:
                with _MEMORY_LOCK:
                    _MEMORY_WRITERS.discard(self.key)
            return
        if self.fd >= 0:
            os.close(self.fd)  # closing the description drops the flock
            self.fd = -1
