"""Criteo click logs: the text format, a chunked vectorised reader, and a writer for look-alike files.

The format of the Criteo Kaggle `train.txt` and Terabyte `day_N` files: one sample per line, 40 fields
separated by tabs: the label (0/1), I1..I13 integer features (counts; a few may be negative), C1..C26
categorical features as 32-bit hashes written in 8 hex digits. Any feature may be empty (missing).

The reader never loops over fields in Python. `parse_lines` runs one compiled pass (numba, `nogil`) over the
bytes of a chunk; a chunk it does not accept goes to the column-wise numpy parser, the reference, which
names the malformed line (or parses the rare valid field the compiled pass is stricter about, such as a
19-digit count): the positions of all tabs and newlines give every field's start and length, and digits
are accumulated column by column (Horner's rule) over all lines at once. The writer is the exact inverse
of the latter, built the same way. Synthetic files come from `criteo_synth`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..engine.kernel import kernel
from ..errors import InvalidArgumentError

N_DENSE = 13
N_CAT = 26
N_FIELDS = 1 + N_DENSE + N_CAT
CAT_COLUMNS = tuple(f"C{i}" for i in range(1, N_CAT + 1))
#: Distinct values per categorical column of the Criteo Kaggle training set, as published with DLRM.
KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
#: The key of an empty categorical field: outside the 32-bit hash range, so it never collides with an id.
MISSING_KEY = 1 << 32
#: The value of an empty integer field (below every real count, so clamping at 0 maps it to 0).
DENSE_MISSING = np.iinfo(np.int64).min

_TAB, _NL, _MINUS = 9, 10, ord("-")
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_VALUE = np.full(256, -1, dtype=np.int64)
_HEX_VALUE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_MAX_INT_CHARS = 19  # '-' and 18 digits: every value an int64 holds without overflow


@dataclass
class CriteoBatch:
    """Samples as arrays: labels float32 (n,), dense int64 (n, 13) raw counts (DENSE_MISSING when empty),
    cats int64 (n, 26) hash values (MISSING_KEY when empty)."""

    labels: np.ndarray
    dense: np.ndarray
    cats: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, sl: slice) -> CriteoBatch:
        return CriteoBatch(self.labels[sl], self.dense[sl], self.cats[sl])

    @staticmethod
    def concat(parts: list[CriteoBatch]) -> CriteoBatch:
        if len(parts) == 1:
            return parts[0]
        return CriteoBatch(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("labels", "dense", "cats"))
        )


# ---- parsing --------------------------------------------------------------------------------------------
def _bad(source: str, line: int, what: str) -> ValueError:
    return InvalidArgumentError(f"{source}:{line}: not Criteo format: {what}")


def _field_bounds(a: np.ndarray, source: str, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths (n, 40) of every field of every line in `a` (which ends with a newline)."""
    delim = np.flatnonzero((a == _TAB) | (a == _NL))
    newlines = np.flatnonzero(a[delim] == _NL)
    per_line = np.diff(newlines, prepend=-1)
    if (per_line != N_FIELDS).any():
        bad = int(np.argmax(per_line != N_FIELDS))
        raise _bad(source, first_line + bad, f"{per_line[bad]} tab-separated fields, expected {N_FIELDS}")
    ends = delim.reshape(len(newlines), N_FIELDS)
    starts = np.empty_like(ends)
    starts[:, 1:] = ends[:, :-1] + 1
    starts[0, 0] = 0
    starts[1:, 0] = ends[:-1, -1] + 1
    return starts, ends - starts


def _line_of(mask: np.ndarray, first_line: int) -> int:
    return first_line + int(np.argmax(mask.any(axis=1)))


def _parse_ints(a, starts, lens, source, first_line) -> np.ndarray:
    """Signed decimal fields -> int64; empty fields -> DENSE_MISSING."""
    if (lens > _MAX_INT_CHARS).any():
        raise _bad(source, _line_of(lens > _MAX_INT_CHARS, first_line), "integer field too long")
    neg = (lens > 0) & (a[np.minimum(starts, len(a) - 1)] == _MINUS)
    pos, left = starts + neg, lens - neg
    value = np.zeros(starts.shape, dtype=np.int64)
    for j in range(int(left.max(initial=0))):
        live = j < left
        digit = a[np.where(live, pos + j, 0)].astype(np.int64) - ord("0")
        if ((digit < 0) | (digit > 9))[live].any():
            raise _bad(source, _line_of(live & ((digit < 0) | (digit > 9)), first_line), "bad integer")
        value = np.where(live, value * 10 + digit, value)
    if (neg & (left == 0)).any():
        raise _bad(source, _line_of(neg & (left == 0), first_line), "bad integer '-'")
    value = np.where(neg, -value, value)
    return np.where(lens == 0, DENSE_MISSING, value)


def _parse_hex(a, starts, lens, source, first_line) -> np.ndarray:
    """Hex fields of up to 8 digits -> int64 in [0, 2**32); empty fields -> MISSING_KEY."""
    if (lens > 8).any():
        raise _bad(source, _line_of(lens > 8, first_line), "categorical field longer than 8 hex digits")
    value = np.zeros(starts.shape, dtype=np.int64)
    for j in range(int(lens.max(initial=0))):
        live = j < lens
        nibble = _HEX_VALUE[a[np.where(live, starts + j, 0)]]
        if (live & (nibble < 0)).any():
            raise _bad(
                source, _line_of(live & (nibble < 0), first_line), "bad hex digit in a categorical field"
            )
        value = np.where(live, value * 16 + nibble, value)
    return np.where(lens == 0, MISSING_KEY, value)


def parse_lines(data: bytes | np.ndarray, source: str = "<bytes>", first_line: int = 1) -> CriteoBatch:
    """Parse complete Criteo lines (the last may lack its newline).

    Args:
        data: the text, as bytes or a uint8 array.
        source: the file name used in error messages.
        first_line: the line number of the first line of `data` in `source`.

    Returns:
        CriteoBatch with one sample per line.

    Raises:
        InvalidArgumentError: a malformed line; the message names `source:line` and what is wrong.
    """
    a = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if len(a) == 0:
        return CriteoBatch(
            np.zeros(0, np.float32), np.zeros((0, N_DENSE), np.int64), np.zeros((0, N_CAT), np.int64)
        )
    if a[-1] != _NL:
        a = np.append(a, np.uint8(_NL))
    n = int(np.count_nonzero(a == _NL))
    labels = np.empty(n, np.float32)
    dense = np.empty((n, N_DENSE), np.int64)
    cats = np.empty((n, N_CAT), np.int64)
    if _parse_kernel(a, labels, dense, cats, _HEX_VALUE):
        return CriteoBatch(labels, dense, cats)
    # a line the compiled loop does not accept: the column-wise parser says what is wrong (or, for the rare
    # valid line the loop is stricter about, e.g. a 19-digit count, parses it)
    return _parse_columns(a, source, first_line)


@kernel
def _parse_kernel(a, labels, dense, cats, hex_value) -> bool:  # pragma: no cover - compiled
    """One pass over the bytes of `a` (complete lines): False at the first line it does not accept."""
    i, size = 0, len(a)
    for line in range(len(labels)):
        for f in range(N_FIELDS):
            start = i
            if f <= N_DENSE:  # the label and the integer features: optional '-', then at most 18 digits
                neg = 1 if i < size and a[i] == _MINUS else 0
                i += neg
                value = 0
                while i < size and a[i] != _TAB and a[i] != _NL:
                    digit = np.int64(a[i]) - 48
                    if digit < 0 or digit > 9 or i - start - neg >= 18:
                        return False
                    value = value * 10 + digit
                    i += 1
                if neg and i == start + 1:
                    return False
                if f == 0:
                    if i == start or neg or value > 1:
                        return False
                    labels[line] = value
                else:
                    dense[line, f - 1] = DENSE_MISSING if i == start else (-value if neg else value)
            else:  # a categorical feature: at most 8 hex digits
                value = 0
                while i < size and a[i] != _TAB and a[i] != _NL:
                    nibble = hex_value[a[i]]
                    if nibble < 0 or i - start >= 8:
                        return False
                    value = value * 16 + nibble
                    i += 1
                cats[line, f - 1 - N_DENSE] = MISSING_KEY if i == start else value
            if i >= size or a[i] != (_NL if f == N_FIELDS - 1 else _TAB):
                return False
            i += 1
    return i == size


def warm_up() -> None:
    """Compile (or load from numba's cache) the parse loop for the array types it meets, now."""
    line = b"1" + b"\t" * (N_FIELDS - 1)
    parse_lines(line + b"\n")  # read-only input: a chunk of a file
    parse_lines(line)  # a copy with the newline added: the last line of a file


def _parse_columns(a: np.ndarray, source: str, first_line: int) -> CriteoBatch:
    """The column-wise numpy parser of complete lines (`a` ends with a newline); the reference for errors."""
    starts, lens = _field_bounds(a, source, first_line)
    label = _parse_ints(a, starts[:, :1], lens[:, :1], source, first_line)[:, 0]
    if ((label != 0) & (label != 1)).any():
        raise _bad(source, first_line + int(np.argmax((label != 0) & (label != 1))), "label must be 0 or 1")
    dense = _parse_ints(a, starts[:, 1 : 1 + N_DENSE], lens[:, 1 : 1 + N_DENSE], source, first_line)
    cats = _parse_hex(a, starts[:, 1 + N_DENSE :], lens[:, 1 + N_DENSE :], source, first_line)
    return CriteoBatch(label.astype(np.float32), dense, cats)


# ---- reading files in chunks ----------------------------------------------------------------------------
def line_start_at_or_after(path: str, offset: int) -> int:
    """The byte offset of the first line that starts at or after `offset` (file size if none does)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        while True:
            block = f.read(1 << 16)
            if not block:
                return os.path.getsize(path)
            nl = block.find(b"\n")
            if nl >= 0:
                return f.tell() - len(block) + nl + 1


def read_chunks(
    path: str, start: int = 0, stop: int | None = None, chunk_bytes: int = 4 << 20
) -> Iterator[CriteoBatch]:
    """Parsed samples of the lines in bytes [start, stop) of `path`; both ends must be line starts."""
    stop = os.path.getsize(path) if stop is None else stop
    source = path if start == 0 else f"{path} (counting lines from byte {start})"
    line = 1
    with open(path, "rb") as f:
        f.seek(start)
        pos, tail = start, b""
        while pos < stop:
            block = f.read(min(chunk_bytes, stop - pos))
            if not block:
                break
            pos += len(block)
            data = tail + block
            cut = data.rfind(b"\n") + 1 if pos < stop else len(data)
            data, tail = data[:cut], data[cut:]
            if data:
                batch = parse_lines(data, source=source, first_line=line)
                line += len(batch)
                yield batch


def read_batches(
    path: str, batch_size: int, start: int = 0, stop: int | None = None, max_samples: int | None = None
) -> Iterator[CriteoBatch]:
    """Batches of `batch_size` samples (the last may be smaller) from bytes [start, stop) of `path`."""
    return rebatch(read_chunks(path, start, stop), batch_size, max_samples)


def rebatch(
    chunks: Iterable[CriteoBatch], batch_size: int, max_samples: int | None = None
) -> Iterator[CriteoBatch]:
    """Cut parsed chunks into batches of `batch_size` (the last may be smaller), stopping after exactly
    `max_samples` samples (None: all). Holds at most one chunk and one batch at a time."""
    pending: list[CriteoBatch] = []
    have = 0
    left = max_samples if max_samples is not None else -1
    if left == 0:
        return
    for chunk in chunks:
        if left >= 0:
            chunk = chunk[:left]
            left -= len(chunk)
        pending.append(chunk)
        have += len(chunk)
        if have >= batch_size:
            merged = CriteoBatch.concat(pending)
            full = have // batch_size * batch_size
            for i in range(0, full, batch_size):
                yield merged[i : i + batch_size]
            pending, have = [merged[full:]], have - full
        if left == 0:
            break
    if have:
        yield CriteoBatch.concat(pending)


# ---- writing --------------------------------------------------------------------------------------------
def _decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Characters (n, w) and lengths (n,) of the signed decimal form of int64 `values`."""
    neg = values < 0
    mag = np.abs(values)
    ndig = np.ones(len(values), dtype=np.int64)
    rest = mag // 10
    while rest.any():
        ndig += rest > 0
        rest //= 10
    lens = ndig + neg
    width = int(lens.max(initial=1))
    chars = np.zeros((len(values), width), dtype=np.uint8)
    chars[neg, 0] = _MINUS
    for j in range(width):
        power = ndig - 1 - (j - neg)  # the power of ten written at position j
        live = (j >= neg) & (power >= 0)
        digit = (mag // 10 ** np.maximum(power, 0)) % 10
        chars[live, j] = (digit[live] + ord("0")).astype(np.uint8)
    return chars, lens


def _hex8(values: np.ndarray) -> np.ndarray:
    shifts = np.arange(28, -4, -4, dtype=np.int64)
    return _HEX_DIGITS[(values[:, None] >> shifts) & 15]


def format_lines(batch: CriteoBatch) -> bytes:
    """The Criteo text of `batch` (the inverse of parse_lines): empty fields for missing values."""
    n = len(batch)
    if n == 0:
        return b""
    fields: list[tuple[np.ndarray, np.ndarray]] = [_decimal(batch.labels.astype(np.int64))]
    for j in range(N_DENSE):
        v = batch.dense[:, j]
        chars, lens = _decimal(np.where(v == DENSE_MISSING, 0, v))
        fields.append((chars, np.where(v == DENSE_MISSING, 0, lens)))
    for j in range(N_CAT):
        v = batch.cats[:, j]
        fields.append((_hex8(v), np.where(v == MISSING_KEY, 0, 8)))
    line_len = sum(lens for _, lens in fields) + N_FIELDS
    line_start = np.concatenate([[0], np.cumsum(line_len)[:-1]])
    out = np.empty(int(line_len.sum()), dtype=np.uint8)
    pos = line_start.copy()
    for f, (chars, lens) in enumerate(fields):
        for j in range(chars.shape[1]):
            live = j < lens
            out[pos[live] + j] = chars[live, j]
        pos += lens
        out[pos] = _NL if f == N_FIELDS - 1 else _TAB
        pos += 1
    return out.tobytes()


__all__ = [
    "CAT_COLUMNS",
    "DENSE_MISSING",
    "KAGGLE_CARDINALITIES",
    "MISSING_KEY",
    "N_CAT",
    "N_DENSE",
    "CriteoBatch",
    "format_lines",
    "line_start_at_or_after",
    "parse_lines",
    "read_batches",
    "read_chunks",
    "rebatch",
    "warm_up",
]
