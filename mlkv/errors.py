"""Every error mlkv raises derives from MlkvError, and from the matching builtin where one fits."""

import errno


class MlkvError(Exception):
    """Base class of all mlkv errors."""


class SchemaError(MlkvError, ValueError):
    """A table was opened with a schema (dim, dtype, optimizer kind) different from the stored one."""


class CorruptionError(MlkvError):
    """An on-disk structure failed its magic, version, length or checksum test."""

    def __init__(
        self, file: str, offset: int | None, what: str, *, table: str | None = None, key: int | None = None
    ):
        where = "" if offset is None else f" at offset {offset}"  # None: no byte offset applies
        super().__init__(f"{file}: corrupt{where}: {what}")
        self.file = file
        self.offset = offset
        self.table = table  # the table and row key the damage was found in, where known
        self.key = key


class StoreLockedError(MlkvError):
    """Another writer holds the store."""


class StoreClosedError(MlkvError, RuntimeError):
    """The store (or one of its tables) was used after close()."""


class ReadOnlyError(MlkvError, PermissionError):
    """A write was attempted on a store opened with readonly=True, or a writable open found the store's
    directory not writable (a read-only file system, or no permission)."""


class StalenessTimeout(MlkvError, TimeoutError):  # noqa: N818 - the public name in API.md
    """A tracked read waited longer than staleness_timeout for outstanding reads to resolve."""


class InvalidArgumentError(MlkvError, ValueError):
    """An argument has the right type but a wrong value or shape (the message names expected and received)."""


class InvalidTypeError(MlkvError, TypeError):
    """An argument has the wrong type or dtype (the message names expected and received)."""


class UnsupportedError(MlkvError, NotImplementedError):
    """An argument or mode that torch offers but mlkv does not support (the message names it)."""


class InternalError(MlkvError, RuntimeError):
    """mlkv cannot go on: an internal limit is exhausted or one of its threads ended without a result."""


class UnknownTableError(MlkvError, KeyError):
    """No table of that name exists in the store (the message lists the tables)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class PathNotFoundError(MlkvError, FileNotFoundError):
    """A file or directory the call needs does not exist (the message names it)."""


class MissingDependencyError(MlkvError, ImportError):
    """An optional package a feature needs is not installed (the message says what to install)."""


class StorageError(MlkvError, OSError):
    """The device under the store failed a write, reservation or fsync (base of the two kinds below).

    An ``OSError`` whose ``errno`` says what happened and whose ``filename`` is the file being written.
    After one, the store still serves reads and can be closed; the last completed checkpoint is intact on
    disk, and reopening the store (after making room) continues from it. See docs/reliability.md."""

    code = 0
    #: True when the failed call was an fsync/msync: the kernel may then have dropped the unsynced pages,
    #: so this process never checkpoints the store again (reopen it); otherwise a checkpoint may be retried
    fsync_failed = False

    def __init__(self, file: str, message: str):
        super().__init__(self.code, message, file)
        self.message = message

    def __str__(self) -> str:  # OSError would print "[Errno 28] message: 'file'"
        return self.message


class StorageFullError(StorageError):
    """The device holding the store is full (``errno.ENOSPC``); the message names the file and the bytes
    that were wanted."""

    code = errno.ENOSPC


class StorageIOError(StorageError):
    """The device reported an I/O error (``errno.EIO``) while the store wrote or synced a file."""

    code = errno.EIO


class ApplierError(MlkvError, RuntimeError):
    """An asynchronous update (staleness bound >= 1) failed in the background; raised by the next call that
    waits for the applier (update, step, zero_grad, flush, checkpoint, close). Later updates were not
    applied; the last checkpoint is intact."""
