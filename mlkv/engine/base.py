"""The engine interface: durable fixed-width records addressed by 64-bit key.

An engine knows nothing of caching, staleness, optimizers or torch. It stores, per table, rows of exactly
`row_bytes` bytes under uint64 keys, and makes everything written so far durable, atomically, at
`checkpoint(meta)`. After a crash, opening the engine again yields exactly the state of the last completed
checkpoint, and `committed_meta()` returns the `meta` dict stored with it (the store keeps its schema and
checkpoint id there). Writes between checkpoints are visible to reads at once but are not durable.

Batches: `keys` are 1-D uint64 arrays; `rows` are C-contiguous uint8 arrays of shape (len(keys), row_bytes).
`write` and `delete` take distinct keys (the store deduplicates before it calls them).

Checkpoint history: an engine may keep its last `keep_checkpoints` checkpoints (`checkpoints()` lists their
metas, oldest first), open an older kept one readonly, and `rollback` to one. The default implementation
keeps only the last checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedError


def check_keep(keep) -> None:
    """InvalidArgumentError unless `keep` (keep_checkpoints) is an int >= 1."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgumentError(f"keep_checkpoints must be an int >= 1, got {keep!r}")


class Engine(ABC):
    name: str = "?"
    #: seconds the last open spent recovering (index load and replay), reported by `mlkv info`
    recovery_seconds: float = 0.0
    #: how many of the last checkpoints the engine keeps
    keep_checkpoints: int = 1

    @abstractmethod
    def create_table(self, table: str, row_bytes: int) -> None:
        """Create an empty table (a no-op when it exists with the same row_bytes)."""

    @abstractmethod
    def drop_table(self, table: str) -> None: ...

    @abstractmethod
    def tables(self) -> dict[str, int]:
        """Table name -> row_bytes."""

    @abstractmethod
    def read(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `keys` (zeros where absent) and a bool mask of which keys were found. The rows are a new
        array that the caller owns (the store keeps and modifies it without copying)."""

    @abstractmethod
    def write(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None: ...

    @abstractmethod
    def delete(self, table: str, keys: np.ndarray) -> None: ...

    @abstractmethod
    def contains(self, table: str, keys: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def count(self, table: str) -> int: ...

    @abstractmethod
    def scan(self, table: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (keys, rows) of the table, in batches."""

    @abstractmethod
    def checkpoint(self, meta: dict) -> None:
        """Make all writes durable together with `meta`, atomically."""

    @abstractmethod
    def committed_meta(self) -> dict | None:
        """The meta of the last completed checkpoint, or None for a new engine."""

    def checkpoints(self) -> list[dict]:
        """The metas of the kept checkpoints, oldest first (the last one is `committed_meta()`)."""
        meta = self.committed_meta()
        return [] if meta is None else [meta]

    def rollback(self, checkpoint_id: int) -> list[dict]:
        """Make the kept checkpoint `checkpoint_id` the committed one and close the engine; return the metas
        of the later checkpoints it dropped, oldest first."""
        raise UnsupportedError(f"the {self.name} engine keeps only its last checkpoint: no rollback")

    @abstractmethod
    def verify(self) -> list[str]:
        """Check every checksum; return a description of each problem found (empty when sound)."""

    @abstractmethod
    def disk_bytes(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    def evict_page_cache(self) -> None:  # noqa: B027 - optional hook, engines without files have none
        """Drop this engine's files from the OS page cache (benchmarks of cold reads)."""
