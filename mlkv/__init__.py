"""mlkv: train embedding tables far larger than RAM, with PyTorch, on a local disk-based store."""

import os

from . import init, optim
from .errors import (
    ApplierError,
    CorruptionError,
    MlkvError,
    ReadOnlyError,
    SchemaError,
    StalenessTimeout,
    StorageError,
    StorageFullError,
    StorageIOError,
    StoreClosedError,
    StoreLockedError,
)
from .store import Store, Table
from .store.store import DEFAULT_IO_THREADS, rollback


def open(  # noqa: A001 - mlkv.open is the public name, as in the design contract
    path: str | os.PathLike,
    *,
    cache_bytes: int | str = "1GiB",
    engine: str = "slab",
    staleness_bound: int = 0,
    staleness_timeout: float = 60.0,
    create: bool = True,
    readonly: bool = False,
    io_threads: int = DEFAULT_IO_THREADS,
    keep_checkpoints: int | None = None,
    checkpoint: int | None = None,
) -> Store:
    r"""Open (or create) the store at `path`: a set of embedding tables on disk behind one memory tier.

    A store holds named tables (``store.table(name, dim=...)``), keeps the hot rows of all of them in a
    memory tier of at most `cache_bytes` bytes, writes evicted rows back to disk in the background, and
    makes every write durable at ``store.checkpoint()``. Opening a store whose process died (kill -9,
    power loss) recovers exactly its last completed checkpoint. As a context manager
    (``with mlkv.open(path) as store:``) it closes when the block ends: a clean exit checkpoints
    outstanding writes (``close()``); an exception closes without checkpointing, so reopening gives the
    last checkpoint taken before it.

    Args:
        path (str or os.PathLike): the store directory (created if missing and `create` is true). With
            ``engine="memory"`` it is only a name.
        cache_bytes (int or str): byte budget of the memory tier shared by all tables, an int or a string
            such as ``"512MiB"``, ``"4GB"``, ``"100k"``. A row costs ``4 * (dim + optimizer state)`` bytes
            of it; ``stats()["memory_tier_bytes"]`` never exceeds it. Default: ``"1GiB"``.
        engine (str): where rows live: ``"slab"`` (fixed-width slot files, the default and fastest),
            ``"rocksdb"`` (RocksDB through rocksdict) or ``"memory"`` (nothing on disk, for tests and
            baselines). A store directory remembers its engine; opening it with another raises
            :class:`SchemaError`.
        staleness_bound (int): default for every table: how many updates of a row a tracked ``get`` may
            miss. ``0`` (the default) is exact: every read sees every earlier update, and training gives
            the same numbers as in memory. A table may override it (``store.table(..., staleness_bound=)``).
        staleness_timeout (float): seconds a tracked ``get`` waits for the bound before it raises
            :class:`StalenessTimeout`. Default: ``60.0``.
        create (bool): create the store when `path` holds none. With ``create=False`` a missing store
            raises ``FileNotFoundError``. Default: ``True``.
        readonly (bool): open for reading only, under a shared lock: many readonly opens may hold a
            store at once, but not beside a writer (:class:`StoreLockedError`). Writes raise
            :class:`ReadOnlyError`; keys never stored read as their ``init`` rows without being created.
            Default: ``False``.
        io_threads (int): threads that read rows announced by ``Table.lookahead`` in the background.
            Default: one per core, at most 4 (more would take the training thread's cores; cold reads get
            their device depth from the engine's own fault threads).
        keep_checkpoints (int, optional): how many of the last checkpoints the store keeps (``>= 1``);
            ``store.checkpoints()`` lists them and :func:`mlkv.rollback` returns to one. Given to a
            writable open, the value is stored with the store (lowering it drops the oldest at once);
            ``None`` keeps the stored value (1 for a new store: only the last checkpoint, as always).
            Slab stores pay per kept checkpoint for what changed since the one before it. The rocksdb
            engine keeps only 1 (:class:`UnsupportedError` otherwise). Default: ``None``.
        checkpoint (int, optional): with ``readonly=True``, open the store as it was at this kept
            checkpoint. Slab and memory stores take no lock for this, so it works while a writer has the
            store open and continues; the view holds while the checkpoint stays kept (a writer drops it
            `keep_checkpoints` checkpoints later). An id that is not kept raises
            :class:`InvalidArgumentError` listing the kept ids. Default: ``None`` (the last checkpoint).

    Returns:
        Store: the open store (see :class:`mlkv.Store` for its methods).

    Raises:
        StoreLockedError: another writer (process, or another ``open`` in this process) holds the store;
            the message names its pid.
        CorruptionError: the directory is damaged (a manifest, index log or marker fails its checks);
            the message names the file and offset.
        SchemaError: the directory is a store of another engine.
        InvalidArgumentError: an argument has a wrong value (a ``ValueError``), e.g. ``engine="lmdb"``,
            ``keep_checkpoints=0``, ``checkpoint=`` without ``readonly=True`` or of an id not kept.
        InvalidTypeError: an argument has a wrong type (a ``TypeError``).
        UnsupportedError: ``keep_checkpoints > 1`` with ``engine="rocksdb"`` (a ``NotImplementedError``).
        FileNotFoundError: no store at `path` and ``create=False`` or ``readonly=True``.

    Example::

        >>> store = mlkv.open("/data/ctr-store", cache_bytes="4GiB")
        >>> user = store.table("user", dim=64, optimizer=mlkv.optim.Adagrad(lr=0.05))
        >>> rows = user.get([3, 7, 7])          # float32, shape (3, 64); new keys come from init
        >>> user.update([3, 7], grads)          # grads: (2, 64); the optimizer runs inside the store
        >>> store.checkpoint({"epoch": 1})      # durable from here on
        >>> store.close()
    """
    return Store(
        path,
        cache_bytes=cache_bytes,
        engine=engine,
        staleness_bound=staleness_bound,
        staleness_timeout=staleness_timeout,
        create=create,
        readonly=readonly,
        io_threads=io_threads,
        keep_checkpoints=keep_checkpoints,
        checkpoint=checkpoint,
    )


__version__ = "0.1.0"

__all__ = [
    "ApplierError",
    "CorruptionError",
    "MlkvError",
    "ReadOnlyError",
    "SchemaError",
    "StalenessTimeout",
    "StorageError",
    "StorageFullError",
    "StorageIOError",
    "StoreClosedError",
    "StoreLockedError",
    "Store",
    "Table",
    "init",
    "open",
    "optim",
    "rollback",
]
