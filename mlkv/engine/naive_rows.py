"""The row store of the rocksdb-naive baselines (`mlkv bench train`, `mlkv train dlrm --rocksdb-baseline`):
what an engineer writes to keep embedding rows in RocksDB by hand, with no mlkv in between.

Rows are float32 `[embedding | optimizer state]` values under big-endian keys (an optional prefix, then
the int64 key), in a rocksdict database opened in raw mode without compression, written with one
WriteBatch per call. Not an mlkv engine: no checkpoints, no checksums, no recovery. Torch-free.
"""

from __future__ import annotations

import numpy as np


def rocks_options():
    """rocksdict Options: raw byte keys and values, created if missing, no compression."""
    from rocksdict import DBCompressionType, Options

    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_compression_type(DBCompressionType.none())
    return opts


def key_bytes(keys: np.ndarray, prefix: bytes = b"") -> list[bytes]:
    """RocksDB keys of int64 keys: `prefix` then the key's 8 bytes big-endian, one buffer sliced."""
    n, width = len(keys), len(prefix) + 8
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    buf[:, len(prefix) :] = np.asarray(keys).astype(">i8").view(np.uint8).reshape(n, 8)
    raw = buf.tobytes()
    return [raw[o : o + width] for o in range(0, n * width, width)]


def write_rows(db, keys: list[bytes], rows: np.ndarray) -> None:
    """Put float32 `rows` under `keys` (from key_bytes) with one WriteBatch."""
    from rocksdict import WriteBatch

    wb = WriteBatch(raw_mode=True)
    for k, v in zip(keys, rows, strict=True):
        wb.put(k, v.tobytes())
    db.write(wb)


__all__ = ["key_bytes", "rocks_options", "write_rows"]
