"""Engines: durable fixed-width records by 64-bit key. `open_engine` picks one by name."""

from __future__ import annotations

import os

from ..errors import InvalidArgumentError, UnsupportedError
from .base import Engine


def check_kept(engine: Engine, checkpoint: int) -> None:
    """InvalidArgumentError (closing `engine`) unless `checkpoint` is its committed checkpoint's id: for an
    engine that keeps only its last checkpoint."""
    ids = [m.get("checkpoint_id") for m in engine.checkpoints()]
    if ids != [checkpoint]:
        engine.close()
        raise InvalidArgumentError(f"checkpoint {checkpoint!r} is not kept; kept checkpoints: {ids}")


ENGINES = ("slab", "rocksdb", "memory")


def open_engine(
    name: str, path: str, readonly: bool = False, keep: int | None = None, checkpoint: int | None = None
) -> Engine:
    """Open engine `name` over the store directory `path` (the engine owns its files there).

    `keep`: checkpoints to keep (None: as stored; a new store keeps 1). `checkpoint` (with readonly): open
    the kept checkpoint of that id instead of the last one."""
    if name == "slab":
        from .slab import SlabEngine

        return SlabEngine(path, readonly, keep, checkpoint)
    if name == "rocksdb":
        from .rocksdb import RocksDBEngine

        if keep is not None and keep != 1:
            raise UnsupportedError(
                f"keep_checkpoints={keep}: the rocksdb engine keeps only its last checkpoint "
                "(use engine='slab' or 'memory' for a checkpoint history)"
            )
        engine = RocksDBEngine(os.path.join(path, "rocksdb"), readonly)
        if checkpoint is not None:
            check_kept(engine, checkpoint)
        return engine
    if name == "memory":
        from .memory import MemoryEngine

        return MemoryEngine(path, readonly, keep, checkpoint)
    raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {name!r}")


__all__ = ["ENGINES", "Engine", "open_engine"]
