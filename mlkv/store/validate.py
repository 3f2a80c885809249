"""Checks at the public boundary: each names what was expected and what came, before anything changes."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError


def _to_numpy(x):
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x


def as_keys(keys) -> np.ndarray:
    """1-D uint64 keys. int64 keys are taken bit for bit (two's complement), so hashed ids keep 64 bits."""
    arr = _to_numpy(keys)
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except (OverflowError, ValueError) as e:
            raise InvalidTypeError(
                f"keys must be a 1-D integer array of int64 or uint64 values: {e}"
            ) from None
        if arr.dtype == object:
            try:
                arr = np.asarray(keys, dtype=np.uint64)
            except (OverflowError, TypeError, ValueError):
                raise InvalidTypeError("keys must be integers in the int64 or uint64 range") from None
        if arr.size == 0:
            arr = arr.astype(np.uint64)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise InvalidTypeError(f"keys must have an integer dtype (int64 or uint64), got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgumentError(f"keys must be 1-D of shape (n,), got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype == np.int64:
        return arr.view(np.uint64)
    if arr.dtype.kind == "i":
        return arr.astype(np.int64).view(np.uint64)
    return arr.astype(np.uint64)


def as_rows(values, n: int, dim: int, what: str) -> np.ndarray:
    """(n, dim) finite float32 values."""
    arr = _to_numpy(values)
    if not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    if arr.dtype != np.float32:
        raise InvalidTypeError(f"{what} must have dtype float32, got {arr.dtype}")
    if arr.shape != (n, dim):
        raise InvalidArgumentError(f"{what} must have shape ({n}, {dim}) for {n} keys, got {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise InvalidArgumentError(
            f"{what} hold NaN or inf in {len(bad)} rows (first: row {int(bad[0])}); nothing was written"
        )
    return arr
