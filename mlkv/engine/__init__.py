"""Engines: durable fixed-width records by 64-bit key. `open_engine` picks one by name."""

from __future__ import annotations

import os

from ..errors import InvalidArgumentError
from .base import Engine

ENGINES = ("slab", "rocksdb", "memory")


def open_engine(name: str, path: str, readonly: bool = False) -> Engine:
    """Open engine `name` over the store directory `path` (the engine owns its files there)."""
    if name == "slab":
        from .slab import SlabEngine

        return SlabEngine(path, readonly)
    if name == "rocksdb":
        from .rocksdb import RocksDBEngine

        return RocksDBEngine(os.path.join(path, "rocksdb"), readonly)
    if name == "memory":
        from .memory import MemoryEngine

        return MemoryEngine(path, readonly)
    raise InvalidArgumentError(f"engine must be one of {ENGINES}, got {name!r}")


__all__ = ["ENGINES", "Engine", "open_engine"]
