"""Criteo click logs streamed from plain or gzip files, parsed in worker processes, in bounded memory.

Input: one or several files in the Criteo text format (see `criteo`: the Kaggle `train.txt`, the Terabyte
`day_0` .. `day_23`), each plain or gzip-compressed (recognised by its first two bytes, not its name), read
in the order given; `expand_paths` turns patterns such as `day_*.gz` into files in natural order
(day_2 before day_10).

Keys (reproducible offline): column Cj (j = 1..26) goes to its own table `dlrm.Cj`; a field's key is its
hex string read as an unsigned integer, `int(field, 16)` (Criteo's fields are already 32-bit hashes of the
raw values, at most 8 hex digits, so keys lie in [0, 2**32)); an empty field has the key
`MISSING_KEY = 2**32`, which no hash reaches. Within a table this map is injective: it adds no collisions,
and the keys are those earlier versions of mlkv stored. Dense features: the raw integers (empty: missing);
the DLRM workload feeds `log(1 + max(x, 0))` (missing and negative counts count as 0).

Pipeline (`workers >= 1`): a reader process opens the files in turn, decompresses, and cuts the bytes into
chunks of whole lines (`chunk_bytes`), counting lines so errors name the file's true line number; it hands
chunk i to parser i mod `workers`; each parser turns text into arrays (`criteo.parse_lines`) and puts them
on its own queue; the consumer takes chunk i from queue i mod `workers`, so the order of the samples never
depends on the number of workers. Every queue holds at most `queue_depth` chunks: at most
`workers * (2 * queue_depth + 1)` chunks are read ahead of the consumer (`max_chunks_ahead`), whatever the
size of the files. `workers = 0` reads and parses in the consumer's own thread (no processes).

Errors: a malformed line raises InvalidArgumentError "FILE:LINE: not Criteo format: ..." at the point of
the stream where it occurs (batches before it are delivered); an unreadable or corrupt (e.g. truncated
gzip) file raises CriteoReadError naming the file. Nothing is skipped silently.

Processes: started by the first iteration (forkserver where the platform has it, else spawn; never fork,
the training process has threads), ended by `close()`: called when the iteration ends, stops early
(`max_samples`, `break`, the generator dropped), raises, or the stream is garbage-collected or the
interpreter exits. Workers also exit by themselves when the consumer's process dies. A CriteoStream is
iterated once; it is not thread-safe (one consumer).
"""

from __future__ import annotations

import glob
import gzip
import multiprocessing as mp
import os
import queue
import re
import signal
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError, MlkvError
from .criteo import CriteoBatch, line_start_at_or_after, parse_lines, rebatch

CHUNK_BYTES = 1 << 20
QUEUE_DEPTH = 4
#: A line longer than this is not Criteo (its lines are ~250 bytes): the reader stops instead of buffering.
MAX_LINE_BYTES = 1 << 20
_POLL_S = 0.2
_GZIP_MAGIC = b"\x1f\x8b"


class CriteoReadError(MlkvError, OSError):
    """A Criteo input file could not be opened, read or decompressed (the message names the file)."""


class CriteoFileNotFound(CriteoReadError, FileNotFoundError):  # noqa: N818 - reads as what happened
    """A Criteo input file (or glob pattern) names no existing file."""


@dataclass(frozen=True)
class Span:
    """Bytes [start, stop) of a Criteo file (stop None: to the end). Both ends must be line starts; a
    gzip file can only be read whole (start 0, stop None)."""

    path: str
    start: int = 0
    stop: int | None = None


def is_gzip(path: str) -> bool:
    """Whether `path` starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by `patterns` (one or several), in order: an existing path stands for itself, anything
    else is a glob pattern whose matches are taken in natural order (numbers by value: day_2 before day_10).

    Raises:
        CriteoFileNotFound: a pattern matches no file.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in map(os.fspath, patterns):
        if os.path.isfile(pattern):
            paths.append(pattern)
            continue
        matches = sorted((p for p in glob.glob(pattern) if os.path.isfile(p)), key=_natural)
        if not matches:
            raise CriteoFileNotFound(f"no such Criteo file: {pattern} (and no file matches it as a pattern)")
        paths.extend(matches)
    return paths


def tail_split(path: str, fraction: float) -> tuple[Span, Span]:
    """(head, tail) of a plain file: the tail is the last `fraction` of its bytes, cut at a line start.

    Raises:
        InvalidArgumentError: `fraction` is not in (0, 1), or `path` is gzip (it cannot be cut unread).
    """
    if not 0 < fraction < 1:
        raise InvalidArgumentError(f"the held-out fraction must be in (0, 1), got {fraction}")
    if is_gzip(path):
        raise InvalidArgumentError(
            f"{path} is gzip-compressed: its tail cannot be held out without decompressing it whole; "
            "give the test data separately (--test-data) or several files (the last one is held out)"
        )
    size = os.path.getsize(path)
    cut = line_start_at_or_after(path, int(size * (1 - fraction)))
    return Span(path, 0, cut), Span(path, cut, size)


# ---- reading and parsing (run in the worker processes, or inline with workers=0) -------------------------
@dataclass
class _RawChunk:
    span: Span
    first_line: int  # of the span's text (1-based)
    data: bytes


def _open(span: Span):
    if is_gzip(span.path):
        if span.start != 0 or span.stop is not None:
            raise InvalidArgumentError(f"{span.path} is gzip-compressed: it can only be read whole")
        return gzip.open(span.path, "rb")
    f = open(span.path, "rb")  # noqa: SIM115 - closed by the caller's with
    f.seek(span.start)
    return f


def _raw_chunks(spans: Sequence[Span], chunk_bytes: int) -> Iterator[_RawChunk]:
    """Chunks of whole lines (the last line of a span may lack its newline), in order."""
    for span in spans:
        try:
            with _open(span) as f:
                yield from _span_chunks(span, f, chunk_bytes)
        except (OSError, EOFError, zlib.error) as e:
            raise CriteoReadError(f"{span.path}: cannot read: {type(e).__name__}: {e}") from None


def _span_chunks(span: Span, f, chunk_bytes: int) -> Iterator[_RawChunk]:
    left = None if span.stop is None else span.stop - span.start
    pending, line = b"", 1
    while True:
        want = chunk_bytes if left is None else min(chunk_bytes, left)
        block = f.read(want) if want > 0 else b""
        if left is not None:
            left -= len(block)
        if not block:
            if pending:
                yield _RawChunk(span, line, pending)
            return
        data = pending + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) > MAX_LINE_BYTES:
                raise InvalidArgumentError(
                    f"{span.path}:{_absolute_line(span, line)}: not Criteo format: "
                    f"a line longer than {MAX_LINE_BYTES} bytes"
                )
            pending = data
            continue
        yield _RawChunk(span, line, data[:cut])
        line += data.count(b"\n", 0, cut)
        pending = data[cut:]


def _absolute_line(span: Span, line: int) -> int:
    """The file's line number of line `line` of `span` (counts the lines before the span: errors only)."""
    if span.start == 0:
        return line
    before, left = 0, span.start
    with open(span.path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 24))
            before += block.count(b"\n")
            left -= len(block)
    return before + line


def _parse(raw: _RawChunk) -> CriteoBatch:
    try:
        return parse_lines(raw.data, raw.span.path, raw.first_line)
    except InvalidArgumentError:
        if raw.span.start == 0:
            raise
        # parse again with the file's own line numbers, so the message names the right line
        return parse_lines(raw.data, raw.span.path, _absolute_line(raw.span, raw.first_line))


_ERRORS = {"invalid": InvalidArgumentError, "read": CriteoReadError, "internal": MlkvError}


def _error_item(e: BaseException) -> tuple[str, str, str]:
    if isinstance(e, InvalidArgumentError):
        return ("error", "invalid", str(e))
    if isinstance(e, CriteoReadError):
        return ("error", "read", str(e))
    return ("error", "internal", f"Criteo reader worker failed: {type(e).__name__}: {e}")


# A worker never outlives its consumer: whenever it waits (a full queue, an empty one, its last arrays still
# in the pipe) it checks every _POLL_S that the consumer's process is alive, and if not, leaves at once with
# os._exit: a normal exit would wait for its queues' feeder threads, which may be blocked forever writing to
# a pipe that nobody reads (the worker itself holds the pipe's read end, so the write never fails).
def _leave_if_orphaned() -> None:
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():
        os._exit(0)


def _put(q, item) -> None:
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            _leave_if_orphaned()


def _get(q):
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            _leave_if_orphaned()


def _flush(queues) -> None:
    """Wait until everything this process put is in the pipes, so that its exit does not block."""
    for q in queues:
        q.close()
        joiner = threading.Thread(target=q.join_thread, daemon=True)
        joiner.start()
        while joiner.is_alive():
            joiner.join(_POLL_S)
            _leave_if_orphaned()


def _worker_signals() -> None:
    # Ctrl-C reaches the whole process group: the consumer decides when its workers end (close())
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reader_main(spans, chunk_bytes, inqs, chunks_read) -> None:
    _worker_signals()
    n = len(inqs)
    i = 0
    try:
        for raw in _raw_chunks(spans, chunk_bytes):
            _put(inqs[i % n], raw)
            i += 1
            with chunks_read.get_lock():
                chunks_read.value += 1
    except BaseException as e:  # delivered in order: the consumer raises it after the chunks before it
        _put(inqs[i % n], _error_item(e))
    for k in range(n):  # the end, to every parser, starting with the one the next chunk would have gone to
        _put(inqs[(i + k) % n], None)
    _flush(inqs)


def _parser_main(inq, outq) -> None:
    _worker_signals()
    while True:
        raw = _get(inq)
        if raw is None:  # the end
            break
        if isinstance(raw, tuple):  # an error from the reader: pass it on
            _put(outq, raw)
            continue
        try:
            b = _parse(raw)
            item: Any = ("batch", b.labels, b.dense, b.cats)
        except BaseException as e:
            item = _error_item(e)
        _put(outq, item)
    _put(outq, None)
    _flush([outq])


def _context():
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":  # workers fork from a server that has imported them and compiled the parser
        ctx.set_forkserver_preload(["__main__", __name__, f"{__package__}.criteo_preload"])
    return ctx


def _stop(processes: list, queues: list) -> None:
    started = [p for p in processes if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join()
    for q in queues:
        q.cancel_join_thread()
        q.close()


# ---- the consumer ----------------------------------------------------------------------------------------
class CriteoStream:
    """Batches of Criteo samples from `spans`, read and parsed by worker processes.

    Args:
        spans: files or parts of files (Span, or a path for a whole file), read in this order.
        batch_size: samples per batch; the last batch may be smaller.
        max_samples: stop after exactly this many samples (None: read everything).
        workers: parser processes (besides one reader process); 0 reads and parses in the calling thread.
        chunk_bytes: bytes of text per chunk handed to a parser.
        queue_depth: chunks each queue holds at most (the bound on read-ahead, see `max_chunks_ahead`).

    Raises:
        InvalidArgumentError: bad sizes or counts; during iteration, a malformed line ("FILE:LINE: ...").
        CriteoReadError: during iteration, a file that cannot be read or decompressed.

    Example::

        with CriteoStream(expand_paths(["day_*.gz"]), 4096, workers=2) as stream:
            for batch in stream:  # CriteoBatch: labels (n,), dense (n, 13), cats (n, 26)
                ...
    """

    def __init__(
        self,
        spans: Sequence[Span | str],
        batch_size: int,
        max_samples: int | None = None,
        workers: int = 1,
        chunk_bytes: int = CHUNK_BYTES,
        queue_depth: int = QUEUE_DEPTH,
    ):
        for name, v, low in (("batch_size", batch_size, 1), ("workers", workers, 0),
                             ("chunk_bytes", chunk_bytes, 1), ("queue_depth", queue_depth, 1)):  # fmt: skip
            if v < low:
                raise InvalidArgumentError(f"{name} must be >= {low}, got {v}")
        if max_samples is not None and max_samples < 0:
            raise InvalidArgumentError(f"max_samples must be >= 0 or None, got {max_samples}")
        self.spans = [s if isinstance(s, Span) else Span(os.fspath(s)) for s in spans]
        self.batch_size, self.max_samples, self.workers = batch_size, max_samples, workers
        self.chunk_bytes, self.queue_depth = chunk_bytes, queue_depth
        #: the worker processes (reader first) of the running iteration; empty before and after
        self.processes: list = []
        #: chunks the consumer has received so far
        self.chunks_received = 0
        self._chunks_read: Any = None
        self._queues: list = []
        self._started = False
        self._finalizer: weakref.finalize | None = None

    @property
    def max_chunks_ahead(self) -> int:
        """At most this many chunks are read but not yet received by the consumer."""
        return self.workers * (2 * self.queue_depth + 1)

    @property
    def chunks_read(self) -> int:
        """Chunks the reader has handed to the parsers so far."""
        return self._chunks_read.value if self._chunks_read is not None else self.chunks_received

    def __iter__(self) -> Iterator[CriteoBatch]:
        if self._started:
            raise InvalidArgumentError("a CriteoStream is iterated once; make a new one for another pass")
        self._started = True
        chunks = self._inline() if self.workers == 0 else self._from_workers()
        try:
            yield from rebatch(chunks, self.batch_size, self.max_samples)
        finally:
            chunks.close()
            self.close()

    def _inline(self) -> Iterator[CriteoBatch]:
        for raw in _raw_chunks(self.spans, self.chunk_bytes):
            self.chunks_received += 1
            yield _parse(raw)

    def _start(self) -> None:
        ctx = _context()
        inqs = [ctx.Queue(self.queue_depth) for _ in range(self.workers)]
        outqs = [ctx.Queue(self.queue_depth) for _ in range(self.workers)]
        self._chunks_read = ctx.Value("q", 0)
        self._queues = inqs + outqs
        self.processes = [
            ctx.Process(target=_reader_main, args=(self.spans, self.chunk_bytes, inqs, self._chunks_read),
                        name="mlkv-criteo-reader", daemon=True),
            *(ctx.Process(target=_parser_main, args=(inqs[k], outqs[k]), name=f"mlkv-criteo-parser-{k}",
                          daemon=True) for k in range(self.workers)),
        ]  # fmt: skip
        self._finalizer = weakref.finalize(self, _stop, self.processes, self._queues)
        for p in self.processes:
            p.start()

    def _from_workers(self) -> Iterator[CriteoBatch]:
        self._start()
        outqs = self._queues[self.workers :]
        while True:
            item = self._get(outqs[self.chunks_received % self.workers])
            if item is None:
                return
            if item[0] == "error":
                raise _ERRORS[item[1]](item[2])
            self.chunks_received += 1
            yield CriteoBatch(item[1], item[2], item[3])

    def _get(self, q):
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    try:  # it may have delivered its last item just before dying
                        return q.get(timeout=_POLL_S)
                    except queue.Empty:
                        p = dead[0]
                        raise MlkvError(
                            f"Criteo worker {p.name} (pid {p.pid}) died with exit code {p.exitcode}"
                        ) from None

    def close(self) -> None:
        """End the worker processes and wait for them (idempotent; the iteration calls it when done)."""
        if self._finalizer is not None:
            self._finalizer()
        self.processes = []

    def __enter__(self) -> CriteoStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- measuring -------------------------------------------------------------------------------------------
def measure_parse(
    spans: Sequence[Span | str], workers: int = 1, max_samples: int | None = None, batch_size: int = 4096
) -> dict[str, float]:
    """Read and parse `spans` through a CriteoStream without training, as a training loop would consume it.

    Returns:
        lines; seconds (wall, all of it); startup_seconds (to the first batch: starting the processes,
        loading the parser); lines_per_s (after the first batch: the rate a running loop is fed; with a
        single batch, overall); workers; consumer_cpu_seconds (the CPU time of the consuming process:
        receiving and batching the arrays, with workers=0 also reading and parsing: the cost left on the
        training process).
    """
    start, cpu = time.perf_counter(), time.process_time()
    lines = first = 0
    first_at = start
    for b in CriteoStream(spans, batch_size, max_samples=max_samples, workers=workers):
        if not lines:
            first, first_at = len(b), time.perf_counter()
        lines += len(b)
    end = time.perf_counter()
    steady = lines > first  # more than one batch: measure after the first
    return {
        "lines": lines,
        "seconds": end - start,
        "startup_seconds": first_at - start,
        "lines_per_s": (lines - first) / (end - first_at) if steady else lines / (end - start),
        "workers": workers,
        "consumer_cpu_seconds": time.process_time() - cpu,
    }


__all__ = [
    "CHUNK_BYTES",
    "MAX_LINE_BYTES",
    "QUEUE_DEPTH",
    "CriteoFileNotFound",
    "CriteoReadError",
    "CriteoStream",
    "Span",
    "expand_paths",
    "is_gzip",
    "measure_parse",
    "tail_split",
]
