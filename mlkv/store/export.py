"""Table export: a table's keys and embeddings, sorted by key, in a file numpy, safetensors or torch loads.

The path's suffix picks the format (EXPORT_FORMATS):

- ``.safetensors``: tensors ``keys`` (int64, (n,)) and ``weights`` (float32, (n, dim)); the header's
  ``__metadata__`` names the table, its dim and the order (``"keys ascending"``).
- ``.npy``: ``OUT.npy`` holds the weights (float32, (n, dim)) and ``OUT.keys.npy`` beside it the keys
  (int64, (n,)), so ``np.load("OUT.npy")`` is the embedding matrix (memory-mappable with ``mmap_mode="r"``).
- ``.pt``: ``torch.save`` of ``{"keys": int64 tensor (n,), "weights": float32 tensor (n, dim)}``; this one
  holds the whole table in memory while it is written (the other two stream into the file).

Row ``i`` of ``weights`` is the embedding of ``keys[i]``, and ``keys`` is strictly ascending (as int64).
Only the embedding columns are exported, not the optimizer state. Files are written under a temporary name
and renamed into place, so a failed export leaves no partial file under the requested name. The table is
scanned twice (keys, then rows into their sorted places); if it changes between the scans the export fails
with nothing written.
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgumentError, MlkvError, PathNotFoundError

if TYPE_CHECKING:
    from .table import Table

EXPORT_FORMATS = {".safetensors": "safetensors", ".npy": "npy", ".pt": "pt"}  # suffix -> format


def export_format(path: str) -> str:
    """The format the suffix of `path` names; InvalidArgumentError naming the supported suffixes if none."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in EXPORT_FORMATS:
        raise InvalidArgumentError(
            f"cannot tell the export format of {path!r}: its suffix must be one of "
            f"{', '.join(EXPORT_FORMATS)}, got {suffix or 'none'!r}"
        )
    return EXPORT_FORMATS[suffix]


def keys_path(path: str) -> str:
    """Where a ``.npy`` export keeps its keys: ``OUT.npy`` -> ``OUT.keys.npy``."""
    return os.path.splitext(path)[0] + ".keys.npy"


def _as_int64(keys: np.ndarray) -> np.ndarray:
    """Keys as signed int64 (engines may hand back the same 64-bit patterns as uint64)."""
    return np.ascontiguousarray(keys).view(np.int64)


def _sorted_keys(table: Table) -> np.ndarray:
    parts = [_as_int64(keys).copy() for keys, _ in table.items()]
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def _fill(table: Table, keys: np.ndarray, weights) -> None:
    """weights[i] = the embedding of keys[i] (keys sorted), from a second scan of the table."""
    written = 0
    for batch, rows in table.items():
        batch_keys = _as_int64(batch)
        at = np.searchsorted(keys, batch_keys)
        if (at >= len(keys)).any() or (keys[np.minimum(at, len(keys) - 1)] != batch_keys).any():
            written = -1
            break
        weights[at] = rows
        written += len(batch_keys)
    if written != len(keys):
        raise MlkvError(
            f"table {table.name!r} changed during export (rows were added or deleted); nothing written"
        )


def _write_safetensors(table: Table, keys: np.ndarray, tmp: str) -> None:
    n, dim = len(keys), table.dim
    header = {
        "keys": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
        "weights": {"dtype": "F32", "shape": [n, dim], "data_offsets": [8 * n, 8 * n + 4 * n * dim]},
        "__metadata__": {"table": table.name, "dim": str(dim), "order": "keys ascending"},
    }
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.write(keys.astype("<i8").tobytes())
        f.truncate(base + 8 * n + 4 * n * dim)
    if n and dim:
        weights = np.memmap(tmp, dtype="<f4", mode="r+", offset=base + 8 * n, shape=(n, dim))
        _fill(table, keys, weights)
        weights.flush()
        del weights
    else:
        _fill(table, keys, np.empty((n, dim), dtype=np.float32))


def _write_npy(table: Table, keys: np.ndarray, tmp: str, tmp_keys: str) -> None:
    n, dim = len(keys), table.dim
    with open(tmp_keys, "wb") as f:
        np.save(f, keys)
    if n and dim:
        weights = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        _fill(table, keys, weights)
        weights.flush()
        del weights
    else:
        weights = np.empty((n, dim), dtype=np.float32)
        _fill(table, keys, weights)
        with open(tmp, "wb") as f:
            np.save(f, weights)


def _write_pt(table: Table, keys: np.ndarray, tmp: str) -> None:
    import torch  # only this format needs it

    weights = np.empty((len(keys), table.dim), dtype=np.float32)
    _fill(table, keys, weights)
    torch.save({"keys": torch.from_numpy(keys), "weights": torch.from_numpy(weights)}, tmp)


def export_table(table: Table, path: str | os.PathLike) -> int:
    """Write `table` to `path` in the format its suffix names (see the module docstring); return the rows."""
    path = os.fspath(path)
    fmt = export_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PathNotFoundError(f"cannot export to {path}: directory {folder} does not exist")
    keys = _sorted_keys(table)
    tmp = f"{path}.tmp"
    temps = [tmp]
    try:
        if fmt == "safetensors":
            _write_safetensors(table, keys, tmp)
        elif fmt == "pt":
            _write_pt(table, keys, tmp)
        else:
            tmp_keys = f"{keys_path(path)}.tmp"
            temps.append(tmp_keys)
            _write_npy(table, keys, tmp, tmp_keys)
            os.replace(tmp_keys, keys_path(path))
        os.replace(tmp, path)
    except BaseException:
        for name in temps:
            if os.path.exists(name):
                os.remove(name)
        raise
    return len(keys)


__all__ = ["EXPORT_FORMATS", "export_format", "export_table", "keys_path"]
