"""Deterministic row initialisers: a new key's initial row is a pure function of (seed, table salt, key).

Rows are drawn from a counter-based hash RNG (splitmix64) instead of a stateful generator, so the same key
gets the same row in every run and process, whatever batch it first appears in, and many keys are
initialised with a few vectorised numpy passes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .engine.key_index import hash64
from .errors import InvalidArgumentError, InvalidTypeError

#: (keys: uint64 array, dim, salt) -> float32 (len(keys), dim)
InitFn = Callable[[np.ndarray, int, int], np.ndarray]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment
_FLOAT32_MAX = float(np.finfo(np.float32).max)


_mix64 = hash64  # splitmix64's finaliser: a bijection on uint64 with good avalanche


def _mix_int(x: int) -> int:
    return int(_mix64(np.array([x & _MASK64], dtype=np.uint64))[0])


def _as_keys(keys: Any) -> np.ndarray:
    """Keys as a 1-D uint64 array; int64 keys are reinterpreted bit for bit (hashed ids may be negative)."""
    arr = np.asarray(keys)
    if arr.ndim == 1 and arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"keys must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidTypeError(f"keys must be int64 or uint64, got {arr.dtype}")
    return arr.astype(np.int64, copy=False).view(np.uint64)


def _check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dim must be an integer >= 1, got {dim!r}")
    return int(dim)


def hash_bits(keys: np.ndarray, width: int, seed: int, salt: int) -> np.ndarray:
    """(len(keys), width) uint64: word j of key k is the j-th output of a splitmix64 stream keyed by k."""
    base = np.uint64(_mix_int(_mix_int(seed + _GOLDEN) ^ (salt & _MASK64)))
    stream = _mix64(keys ^ base)
    counters = np.arange(1, width + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
    return _mix64(stream[:, None] + counters[None, :])


def _real(name: str, value: Any) -> float:
    """`value` as a float that float32 rows can hold, or ValueError naming expected and received value."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and abs(float(value)) <= _FLOAT32_MAX):
        raise InvalidArgumentError(f"{name} must be a finite float32 number, got {value!r}")
    return float(value)


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _MASK64:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {value!r}")
    return int(value)


class Initializer(ABC):
    """A builtin initialiser: deterministic in (seed, salt, key), described by a JSON-able config."""

    kind: ClassVar[str]

    @abstractmethod
    def __call__(self, keys: np.ndarray, dim: int, salt: int = 0) -> np.ndarray:
        """Initial rows of `keys`, float32 (len(keys), dim); `salt` separates tables."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able `{"kind": ..., **parameters}`, persisted in the store schema."""


@dataclass(frozen=True)
class Normal(Initializer):
    """N(mean, std**2) per weight: Box-Muller on the 32-bit halves of one hash word per pair of columns."""

    mean: float = 0.0
    std: float = 0.01
    seed: int = 0

    kind: ClassVar[str] = "normal"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _real("mean", self.mean))
        object.__setattr__(self, "std", _real("std", self.std))
        if self.std < 0:
            raise InvalidArgumentError(f"std must be >= 0, got {self.std!r}")
        object.__setattr__(self, "seed", _seed(self.seed))

    def __call__(self, keys: np.ndarray, dim: int, salt: int = 0) -> np.ndarray:
        keys, dim = _as_keys(keys), _check_dim(dim)
        pairs = (dim + 1) // 2
        bits = hash_bits(keys, pairs, self.seed, salt)
        u1 = (bits >> np.uint64(32)).astype(np.uint32).astype(np.float64)
        u1 += 0.5
        u1 *= 2.0**-32  # in (0, 1), so the log is finite
        radius = np.log(u1)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        radius = (radius * self.std).astype(np.float32)
        # float32 cos/sin: numpy's float64 ones are ~10x slower, and 24 bits of angle are plenty
        angle = bits.astype(np.uint32).astype(np.float32)
        angle *= np.float32(2.0 * math.pi * 2.0**-32)
        out = np.empty((len(keys), pairs, 2), dtype=np.float32)
        np.multiply(np.cos(angle), radius, out=out[:, :, 0])
        np.multiply(np.sin(angle), radius, out=out[:, :, 1])
        out += np.float32(self.mean)
        return np.ascontiguousarray(out.reshape(len(keys), 2 * pairs)[:, :dim])

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "seed": self.seed}


@dataclass(frozen=True)
class Uniform(Initializer):
    """U(low, high) per weight, from one 32-bit half of a hash word per column; values lie in [low, high]."""

    low: float
    high: float
    seed: int = 0

    kind: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        object.__setattr__(self, "low", _real("low", self.low))
        object.__setattr__(self, "high", _real("high", self.high))
        if not self.low <= self.high:
            raise InvalidArgumentError(f"Uniform needs low <= high, got low={self.low!r}, high={self.high!r}")
        object.__setattr__(self, "seed", _seed(self.seed))

    def __call__(self, keys: np.ndarray, dim: int, salt: int = 0) -> np.ndarray:
        keys, dim = _as_keys(keys), _check_dim(dim)
        pairs = (dim + 1) // 2
        bits = hash_bits(keys, pairs, self.seed, salt)
        u = np.empty((len(keys), pairs, 2), dtype=np.float64)
        u[:, :, 0] = (bits >> np.uint64(32)).astype(np.uint32)
        u[:, :, 1] = bits.astype(np.uint32)
        u += 0.5
        u *= (self.high - self.low) * 2.0**-32
        u += self.low
        return u.reshape(len(keys), 2 * pairs)[:, :dim].astype(np.float32)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "seed": self.seed}


@dataclass(frozen=True)
class Zeros(Initializer):
    """All-zero rows."""

    kind: ClassVar[str] = "zeros"

    def __call__(self, keys: np.ndarray, dim: int, salt: int = 0) -> np.ndarray:
        return np.zeros((len(_as_keys(keys)), _check_dim(dim)), dtype=np.float32)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}


INITIALIZERS: dict[str, type[Initializer]] = {cls.kind: cls for cls in (Normal, Uniform, Zeros)}


def init_from_config(cfg: dict[str, Any]) -> Initializer:
    """The builtin initialiser described by `cfg`; a user callable cannot be rebuilt: pass it again."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise InvalidArgumentError(f"init config must be a dict with a 'kind' key, got {cfg!r}")
    params = dict(cfg)
    kind = params.pop("kind")
    if kind == "callable":
        raise InvalidArgumentError(
            f"init {params.get('repr', '?')} was a Python callable; pass it again as init="
        )
    if kind not in INITIALIZERS:
        raise InvalidArgumentError(
            f"unknown init kind {kind!r}; expected one of {sorted(INITIALIZERS)} or 'callable'"
        )
    try:
        return INITIALIZERS[kind](**params)
    except TypeError as e:
        raise InvalidArgumentError(f"bad {kind} init config {cfg!r}: {e}") from None


def _wrap_callable(fn: Callable[[np.ndarray, int], Any]) -> InitFn:
    """Adapt a user `(keys, dim) -> rows` callable to the store's signature, checking what it returns."""

    def init(keys: np.ndarray, dim: int, salt: int = 0) -> np.ndarray:
        keys = _as_keys(keys)
        rows = np.asarray(fn(keys, dim))
        expected = (len(keys), dim)
        if rows.shape != expected:
            raise InvalidArgumentError(
                f"init {fn!r} must return shape {expected} (len(keys), dim), got {rows.shape}"
            )
        if not (np.issubdtype(rows.dtype, np.floating) or np.issubdtype(rows.dtype, np.integer)):
            raise InvalidTypeError(f"init {fn!r} must return real numbers, got dtype {rows.dtype}")
        with np.errstate(over="ignore"):
            rows = rows.astype(np.float32)
        if not np.isfinite(rows).all():
            raise InvalidArgumentError(
                f"init {fn!r} returned non-finite values (nan/inf, or too large for float32)"
            )
        return rows

    return init


def resolve_init(
    init: Initializer | Callable[[np.ndarray, int], Any] | None,
) -> tuple[InitFn, dict[str, Any]]:
    """The store's `(keys, dim, salt) -> rows` function and the config to persist for a table's `init=`."""
    if init is None:
        init = Normal(0.0, 0.01)
    if isinstance(init, Initializer):
        return init, init.config()
    if isinstance(init, type) and issubclass(init, Initializer):
        raise InvalidTypeError(
            f"init must be an instance such as {init.__name__}(...), got the class {init.__name__}"
        )
    if callable(init):
        return _wrap_callable(init), {"kind": "callable", "repr": repr(init)}
    raise InvalidTypeError(
        f"init must be mlkv.init.Normal/Uniform/Zeros, a callable (keys, dim) -> rows, or None; got {init!r}"
    )
