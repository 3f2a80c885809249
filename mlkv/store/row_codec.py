"""RowCodec: how a table's rows are laid out in the engine and the memory tier, by the table's dtype.

A table works on float32 rows ``[embedding (dim) | optimizer state | age column?]`` everywhere (the
optimizer, the write-back queue of a float32 table, ``get``). What is *stored* depends on the dtype:

- ``"float32"``: the row as it is, ``4 * width`` bytes; the tier's ``emb`` is float32 (no codec work).
- ``"float16"`` / ``"bfloat16"``: the embedding as 16-bit patterns (``uint16``), the rest unchanged as
  float32 words: ``2 * dim + 4 * (width - dim)`` bytes per row, in the engine and in the tier. numba has
  no float16 and numpy no bfloat16, so the tier keeps ``uint16`` bit patterns and decodes them with a
  65536-entry float32 lookup table (``lut[bits]``, also inside numba kernels).

Rounding (float32 -> 16 bits) happens once, where a row is stored (`round_embeddings`): round to nearest,
ties to even (what ``torch.tensor(x).to(torch.float16 / torch.bfloat16)`` does), or stochastic rounding
(``stochastic_rounding=True``): ``x`` becomes its upper neighbour ``hi`` with probability
``(x - lo) / (hi - lo)``, else ``lo``, so the rounding is unbiased. The random bits are a hash of (table
seed, key, table step, column): the same update on the same table gives the same rows whatever the batch
order, thread timing or process, and runs are reproducible. NaN stays NaN; values beyond the 16-bit
range become +-inf as in torch.

Stateless after construction: safe to share between threads.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _float16_lut() -> np.ndarray:
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


def _bfloat16_lut() -> np.ndarray:
    return (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): well-spread 64-bit hashes."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _uniform(keys: np.ndarray, dim: int, seed: int, step: int) -> np.ndarray:
    """(len(keys), dim) float64 uniforms in [0, 1), a pure function of (seed, key, step, column)."""
    with np.errstate(over="ignore"):
        base = _mix(keys.astype(np.uint64) ^ _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(step)))
        cols = np.arange(1, dim + 1, dtype=np.uint64) * _GOLDEN
        h = _mix(base[:, None] + cols[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def encode_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even; NaN stays NaN."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # quiet NaN, same sign
    return out


def encode_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 bit patterns (uint16), round to nearest, ties to even (IEEE, as numpy/torch)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


class RowCodec:
    """The stored layout of one table's rows (see the module docstring).

    Args:
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        dim: embedding width.
        width: float32 words of a decoded row (embedding, optimizer state, age column).
        stochastic: stochastic rounding instead of round-to-nearest-even when storing.
        seed: the stochastic rounding seed (the table's).
    """

    def __init__(self, dtype: str, dim: int, width: int, stochastic: bool = False, seed: int = 0):
        self.dtype, self.dim, self.width = dtype, dim, width
        self.half = dtype != "float32"
        self.stochastic = stochastic and self.half
        self.seed = seed
        self.emb_itemsize = 2 if self.half else 4
        self.row_bytes = self.emb_itemsize * dim + 4 * (width - dim)
        # decodes a 16-bit pattern to float32; None for float32 tables (the tier kernels' pruned branch)
        self.lut = None if not self.half else _float16_lut() if dtype == "float16" else _bfloat16_lut()
        self.encode = None if not self.half else encode_float16 if dtype == "float16" else encode_bfloat16

    def decode(self, bits: np.ndarray) -> np.ndarray:
        """16-bit patterns -> float32 values (exact): a shift for bfloat16, else `lut.take` (~2x faster
        than `lut[bits]`)."""
        if self.dtype == "bfloat16":
            return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return self.lut.take(bits)

    def round_nearest(self, x: np.ndarray) -> np.ndarray:
        """float32 values rounded to the dtype (nearest, ties to even), as float32; float32: `x` itself."""
        return self.decode(self.encode(x)) if self.half else x

    def round_embeddings(self, rows: np.ndarray, keys: np.ndarray, step: int) -> np.ndarray | None:
        """Round the embedding columns of float32 `rows` (n, width) in place, the one rounding of a store:
        to nearest even, or stochastically by (seed, key, `step`, column). Returns their 16-bit patterns
        (n, dim), so that storing them needs no second encoding; float32: no-op, returns None."""
        if not self.half:
            return None
        emb = rows[:, : self.dim]
        bits = self.encode(emb)
        near = self.decode(bits)
        if self.stochastic:
            x = emb.astype(np.float64)
            other = self._neighbour(near, x > near)
            with np.errstate(invalid="ignore"):
                p = np.abs(x - near) / np.abs(other.astype(np.float64) - near)  # inf/nan: nan, keep near
            near = np.where(_uniform(keys, self.dim, self.seed, step) < p, other, near)
            bits = self.encode(near)
        emb[:] = near
        return bits

    def _neighbour(self, near: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The representable value next to `near` (exact, float32) towards +inf where `up`, else -inf."""
        if self.dtype == "float16":
            h = near.astype(np.float16)
            return np.nextafter(h, np.where(up, np.float16(np.inf), np.float16(-np.inf))).astype(np.float32)
        bits = self.encode(near).astype(np.int32)
        negative = bits >= 0x8000
        away = up != negative  # moving away from zero adds one to the magnitude's pattern
        mag = (bits & 0x7FFF) + np.where(away, 1, -1)
        zero = mag < 0  # below zero: the neighbour is the smallest value of the other sign
        bits = np.where(zero, (bits ^ 0x8000) & 0x8000 | 1, (bits & 0x8000) | mag)
        return self.decode(bits.astype(np.uint16))

    # ---- engine bytes -------------------------------------------------------------------------------
    def to_bytes(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows (n, width), embeddings already rounded -> engine rows (n, row_bytes) uint8."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not self.half:
            return rows.view(np.uint8)
        n, d = len(rows), self.dim
        out = np.empty((n, self.row_bytes), dtype=np.uint8)
        out[:, : 2 * d] = self.encode(rows[:, :d]).view(np.uint8).reshape(n, 2 * d)
        out[:, 2 * d :] = rows[:, d:].view(np.uint8).reshape(n, 4 * (self.width - d))
        return out

    def from_bytes(self, raw: np.ndarray) -> np.ndarray:
        """Engine rows (n, row_bytes) uint8 -> float32 rows (n, width)."""
        raw = np.ascontiguousarray(raw)
        n = len(raw)
        if not self.half:
            return raw.view(np.float32).reshape(n, self.width)
        d = self.dim
        out = np.empty((n, self.width), dtype=np.float32)
        out[:, :d] = self.decode(np.ascontiguousarray(raw[:, : 2 * d]).view(np.uint16))
        out[:, d:] = np.ascontiguousarray(raw[:, 2 * d :]).view(np.float32)
        return out

    def words(self, raw: np.ndarray) -> np.ndarray:
        """The float32-sized words after the embedding of engine rows, as uint32 (n, width - dim)."""
        raw = np.ascontiguousarray(raw)
        return np.ascontiguousarray(raw[:, self.emb_itemsize * self.dim :]).view(np.uint32)
