"""Checks at the public boundary: each names what was expected and what came, before anything changes."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError


def _to_numpy(x):
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x


def _int_list(keys) -> np.ndarray | None:
    """A 1-D sequence of Python/numpy ints as uint64 bit patterns; None if any item is not an int.
    Ints outside [-2**63, 2**64) raise InvalidTypeError."""
    try:
        items = list(keys)
    except TypeError:
        return None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in items):
        return None
    if not all(-(2**63) <= int(x) < 2**64 for x in items):
        raise InvalidTypeError("keys must be integers in the int64 or uint64 range")
    return np.array([int(x) % 2**64 for x in items], dtype=np.uint64)


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
        if arr.dtype == object or (arr.dtype.kind == "f" and arr.ndim == 1):
            # numpy types a list holding an int >= 2**63 beside other ints as float64 (or object): take
            # Python ints exactly, as their 64-bit patterns; real floats still fail the dtype check below
            ints = _int_list(keys)
            if ints is not None:
                arr = ints
            elif arr.dtype == object:
                raise InvalidTypeError("keys must be integers in the int64 or uint64 range")
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
