"""The streamed Criteo reader: plain and gzip files, several files and globs, parsed by worker processes.

Oracle: lines written with Python string formatting (missing fields, negative counts, short and upper-case
hex) and parsed by `reference` below, a plain split/int(). Also: read-ahead bounded by the queues,
--max-samples exact, no worker left after the stream ends early or raises, malformed lines named by file and
line, and `mlkv train dlrm --data ...` end to end.
"""

from __future__ import annotations

import gc
import gzip
import io
import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from mlkv.errors import InvalidArgumentError, MlkvError
from mlkv.workloads import criteo_stream
from mlkv.workloads.criteo import DENSE_MISSING, MISSING_KEY, CriteoBatch
from mlkv.workloads.criteo_stream import (
    CriteoFileNotFound,
    CriteoReadError,
    CriteoStream,
    Span,
    expand_paths,
    tail_split,
)


def make_lines(seed: int, n: int) -> list[str]:
    """Criteo-format lines (no newline) with every kind of field the real files have."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        dense = [
            "" if rng.random() < 0.2 else str(rng.randint(-3, 10 ** rng.randint(0, 9))) for _ in range(13)
        ]
        cats = [
            "" if rng.random() < 0.2 else format(rng.getrandbits(32), rng.choice(["08x", "08x", "x", "X"]))
            for _ in range(26)
        ]
        lines.append("\t".join([str(rng.randint(0, 1)), *dense, *cats]))
    return lines


def reference(lines: list[str]) -> CriteoBatch:
    """The documented meaning of a line, computed the obvious way."""
    labels, dense, keys = [], [], []
    for line in lines:
        f = line.split("\t")
        assert len(f) == 40
        labels.append(float(f[0]))
        dense.append([int(x) if x else DENSE_MISSING for x in f[1:14]])
        keys.append([int(x, 16) if x else 1 << 32 for x in f[14:]])
    return CriteoBatch(np.array(labels, np.float32), np.array(dense, np.int64), np.array(keys, np.int64))


def write(path, lines: list[str], gz: bool = False, final_newline: bool = True) -> str:
    text = ("\n".join(lines) + ("\n" if final_newline else "")).encode()
    with gzip.open(path, "wb") if gz else open(path, "wb") as f:
        f.write(text)
    return str(path)


def assert_same(got: CriteoBatch, want: CriteoBatch) -> None:
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.dense, want.dense)
    np.testing.assert_array_equal(got.cats, want.cats)


def gone(processes, timeout: float = 10.0) -> bool:
    """Whether every process has ended and been reaped (no /proc entry, or at least not running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(not p.is_alive() and not _running(p.pid) for p in processes):
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    """A plain file without a final newline, a gzip file, and a plain file: (paths, lines of each)."""
    d = tmp_path_factory.mktemp("criteo")
    parts = [make_lines(1, 700), make_lines(2, 500), make_lines(3, 300)]
    paths = [
        write(d / "part_0.txt", parts[0], final_newline=False),
        write(d / "part_1.txt.gz", parts[1], gz=True),
        write(d / "part_2.txt", parts[2]),
    ]
    return paths, parts


# ---- what is read ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_stream_of_plain_and_gzip_files_matches_the_reference_parser(three_files, workers):
    paths, parts = three_files
    want = reference(parts[0] + parts[1] + parts[2])
    # small chunks: lines straddle chunk boundaries, and chunks go round-robin to the parsers
    stream = CriteoStream(paths, batch_size=37, workers=workers, chunk_bytes=3000, queue_depth=2)
    batches = list(stream)
    assert [len(b) for b in batches[:-1]] == [37] * (len(batches) - 1) and 0 < len(batches[-1]) <= 37
    assert_same(CriteoBatch.concat(batches), want)
    assert stream.chunks_received > 3 * len(paths)


def test_keys_and_missing_values_are_as_documented(tmp_path):
    line = "\t".join(["1", "", "-2", "7", *[""] * 10, "0000001a", "", "FFFFFFFF", "3", *["ab"] * 22])
    (b,) = CriteoStream([write(tmp_path / "one.txt", [line])], 8, workers=0)
    assert b.labels.tolist() == [1.0]
    assert b.dense[0, :3].tolist() == [DENSE_MISSING, -2, 7]
    assert b.cats[0, :4].tolist() == [0x1A, MISSING_KEY, 0xFFFFFFFF, 3] and MISSING_KEY == 1 << 32
    from mlkv.workloads.dlrm import to_batch

    dense = to_batch(b)["dense"][0, :3].tolist()  # log(1 + max(x, 0)), missing counts as 0
    assert dense == pytest.approx([0.0, 0.0, math.log(8)])


def test_fields_the_compiled_loop_leaves_to_the_column_parser_still_parse(tmp_path):
    """The compiled pass accepts at most 18 digits and no signed label; such valid lines are still read."""
    base = make_lines(30, 3)
    f = base[1].split("\t")
    f[0], f[1], f[2] = "-0", "1234567890123456789", "-123456789012345678"
    lines = [base[0], "\t".join(f), base[2]]
    got = CriteoBatch.concat(list(CriteoStream([write(tmp_path / "edge.txt", lines)], 2, workers=0)))
    assert_same(got, reference(lines))
    assert got.dense[1, :2].tolist() == [1234567890123456789, -123456789012345678]


def test_glob_patterns_expand_in_natural_order(tmp_path):
    for day in (10, 2, 0, 1):
        write(tmp_path / f"day_{day}.gz", make_lines(day, 3), gz=True)
    write(tmp_path / "other.txt", make_lines(9, 3))
    expected = [str(tmp_path / f"day_{d}.gz") for d in (0, 1, 2, 10)]
    assert expand_paths([str(tmp_path / "day_*.gz")]) == expected
    assert expand_paths([str(tmp_path / "other.txt"), str(tmp_path / "day_1*")]) == [
        str(tmp_path / "other.txt"),
        *expected[1:2],
        expected[3],
    ]
    assert expand_paths(str(tmp_path / "day_1*")) == expand_paths(tmp_path / "day_1.gz") + expected[3:]
    with pytest.raises(CriteoFileNotFound, match=r"no such Criteo file: .*nothing_\*") as e:
        expand_paths([str(tmp_path / "nothing_*")])
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, MlkvError)


@pytest.mark.parametrize("workers", [0, 1])
def test_max_samples_stops_exactly(three_files, workers):
    paths, parts = three_files
    everything = reference(parts[0] + parts[1] + parts[2])
    for limit in (0, 1, 36, 37, 38, 1199, len(everything), len(everything) + 5):
        stream = CriteoStream(paths, 37, max_samples=limit, workers=workers, chunk_bytes=5000)
        got = list(stream)
        n = min(limit, len(everything))
        assert sum(len(b) for b in got) == n
        if n:
            assert_same(CriteoBatch.concat(got), everything[:n])
        assert stream.processes == []


def test_tail_split_holds_out_whole_lines_and_refuses_gzip(three_files, tmp_path):
    lines = make_lines(4, 400)
    path = write(tmp_path / "train.txt", lines)
    head, tail = tail_split(path, 0.25)
    got_head = CriteoBatch.concat(list(CriteoStream([head], 1000, workers=0)))
    got_tail = CriteoBatch.concat(list(CriteoStream([tail], 1000, workers=1)))
    assert 80 <= len(got_tail) <= 120
    assert_same(CriteoBatch.concat([got_head, got_tail]), reference(lines))
    with pytest.raises(InvalidArgumentError, match=r"gzip-compressed.*--test-data"):
        tail_split(three_files[0][1], 0.1)
    with pytest.raises(InvalidArgumentError, match=r"must be in \(0, 1\), got 1.5"):
        tail_split(path, 1.5)


# ---- bounded memory -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("workers", "depth"), [(1, 2), (2, 1)])
def test_read_ahead_stops_at_the_queue_bound(tmp_path, workers, depth):
    path = write(tmp_path / "many.txt", make_lines(5, 3000))  # ~700 KiB in chunks of ~1 KiB
    stream = CriteoStream([path], 1, workers=workers, chunk_bytes=1024, queue_depth=depth)
    it = iter(stream)
    next(it)
    ahead, last, deadline = 0, -1, time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the reader is blocked by full queues
        ahead = stream.chunks_read - stream.chunks_received
        if ahead == last:
            break
        last = ahead
        time.sleep(0.5)
    assert stream.max_chunks_ahead == workers * (2 * depth + 1)
    assert 0 < ahead <= stream.max_chunks_ahead
    if workers == 1:  # one parser: the pipeline fills to exactly the bound, and no further
        assert ahead == stream.max_chunks_ahead
    it.close()


# ---- the workers end -------------------------------------------------------------------------------------
def test_workers_end_when_the_stream_is_closed_early(three_files):
    paths, _ = three_files
    stream = CriteoStream(paths, 10, workers=2, chunk_bytes=2000)
    it = iter(stream)
    next(it)
    procs = list(stream.processes)
    assert len(procs) == 3 and all(p.is_alive() for p in procs)
    stream.close()
    assert gone(procs) and stream.processes == []


def test_workers_end_when_the_loop_breaks_or_raises(three_files):
    paths, _ = three_files
    seen = []

    def consume(fail: bool) -> None:
        stream = CriteoStream(paths, 10, workers=1, chunk_bytes=2000)
        for _ in stream:
            seen.append(list(stream.processes))
            if fail:
                raise RuntimeError("the training step failed")
            break

    consume(fail=False)
    gc.collect()
    assert gone(seen[-1])
    with pytest.raises(RuntimeError, match="training step failed"):
        consume(fail=True)
    gc.collect()
    assert gone(seen[-1])


def test_workers_exit_by_themselves_when_the_training_process_is_killed(tmp_path):
    """Two streams whose worker processes are in different places when the consumer dies: one blocked on a
    full queue, one done with its chunks but not yet delivered (its arrays, larger than a pipe's buffer,
    still in the pipe); none may be left behind."""
    path = write(tmp_path / "many.txt", make_lines(5, 3000))  # ~750 KB: 12 chunks of 64 KiB
    code = (
        "import os, time\n"
        "from mlkv.workloads.criteo_stream import CriteoStream\n"
        f"blocked = CriteoStream([{path!r}], 1, workers=2, chunk_bytes=1 << 16, queue_depth=1)\n"
        f"finished = CriteoStream([{path!r}], 1, workers=2, chunk_bytes=1 << 16, queue_depth=8)\n"
        "its = [iter(blocked), iter(finished)]\n"
        "for it in its:\n"
        "    next(it)\n"
        "deadline = time.monotonic() + 60\n"
        "while finished.processes[0].exitcode is None and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)  # its reader has handed over every chunk\n"
        "print(' '.join(str(p.pid) for s in (blocked, finished) for p in s.processes), flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pids = [int(x) for x in done.stdout.split()]
    assert done.returncode == -9 and len(pids) == 6, done.stderr[-2000:]
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # do not leave them to the rest of the test session
        os.kill(pid, 9)
    assert not left


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, workers):
    good, lines = make_lines(6, 200), make_lines(7, 900)
    lines[733] = lines[733].rsplit("\t", 1)[0]  # 39 fields on line 734
    first = write(tmp_path / "day_0.gz", good, gz=True)
    bad = write(tmp_path / "day_1.gz", lines, gz=True)
    stream = CriteoStream([first, bad], 1, workers=workers, chunk_bytes=4000)
    delivered = []
    with pytest.raises(InvalidArgumentError, match=f"{bad}:734: not Criteo format: 39 tab-separated fields"):
        for b in stream:
            delivered.append(b)
            if workers:
                procs = list(stream.processes)
    # the samples before the bad chunk came through, in order
    assert 200 < len(delivered) <= 200 + 733
    assert_same(CriteoBatch.concat(delivered), reference(good + lines[:733])[: len(delivered)])
    if workers:
        assert gone(procs)
    # in the held-out tail of a plain file, the line number is still the file's
    plain = write(tmp_path / "train.txt", lines)
    _, tail = tail_split(plain, 0.5)
    with pytest.raises(InvalidArgumentError, match=f"{plain}:734: "):
        list(CriteoStream([tail], 64, workers=workers, chunk_bytes=4000))


def test_corrupt_gzip_and_non_criteo_files_are_clear_errors(tmp_path):
    whole = gzip.compress(("\n".join(make_lines(8, 2000)) + "\n").encode())
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CriteoReadError, match=f"{truncated}: cannot read: EOFError") as e:
        list(CriteoStream([str(truncated)], 100, workers=1))
    assert isinstance(e.value, OSError)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"x" * (criteo_stream.MAX_LINE_BYTES + 10))
    with pytest.raises(InvalidArgumentError, match=f"{binary}:1: not Criteo format: a line longer than"):
        list(CriteoStream([str(binary)], 100, workers=0, chunk_bytes=1 << 16))
    with pytest.raises(InvalidArgumentError, match="gzip-compressed: it can only be read whole"):
        list(CriteoStream([Span(str(tmp_path / "cut.gz"), 10, 20)], 100, workers=0))
    with pytest.raises(InvalidArgumentError, match="workers must be >= 0, got -1"):
        CriteoStream([str(binary)], 100, workers=-1)


# ---- end to end -----------------------------------------------------------------------------------------
def _train(argv: list[str]) -> dict:
    import argparse
    import contextlib

    from mlkv.workloads.cli import add_train_parsers, cmd_train

    parser = argparse.ArgumentParser(prog="mlkv")
    add_train_parsers(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cmd_train(parser.parse_args(["train", "dlrm", *argv, "--json", "--no-progress"])) == 0
    return json.loads(out.getvalue().splitlines()[-1])


@pytest.mark.slow
def test_train_dlrm_on_gzip_days_holds_out_the_last_day(tmp_path):
    for day in range(3):
        write(tmp_path / f"day_{day}.gz", make_lines(10 + day, 800 if day < 2 else 400), gz=True)
    r = _train(["--data", str(tmp_path / "day_*.gz"), "--batch-size", "256", "--cache-bytes", "256KiB"])
    assert r["samples"] == 1600 and r["dataset"] == "criteo"
    assert r["train_file"] == [str(tmp_path / "day_0.gz"), str(tmp_path / "day_1.gz")]
    assert r["test_file"] == str(tmp_path / "day_2.gz") and 0 <= r["auc"] <= 1
    capped = _train(["--data", str(tmp_path / "day_0.gz"), str(tmp_path / "day_1.gz"), "--max-samples",
                     "1000", "--test-data", str(tmp_path / "day_2.gz"), "--batch-size", "256"])  # fmt: skip
    assert capped["samples"] == 1000
    parsed = _train(["--data", str(tmp_path / "day_*.gz"), "--parse-only", "--data-workers", "2"])
    assert parsed["lines"] == 2000 and parsed["lines_per_s"] > 0  # --parse-only reads every file whole
    one_gz = _train(["--data", str(tmp_path / "day_2.gz"), "--parse-only", "--data-workers", "0"])
    assert one_gz["lines"] == 400
    with pytest.raises(InvalidArgumentError, match=r"gzip-compressed.*--test-data"):
        _train(["--data", str(tmp_path / "day_0.gz")])


@pytest.mark.slow
def test_mlkv_train_dlrm_data_file_json_end_to_end(tmp_path):
    """The command a user runs, in a fresh interpreter; its JSON is the last line of stdout."""
    path = write(tmp_path / "train.txt", make_lines(20, 2000))
    cmd = [sys.executable, "-m", "mlkv", "train", "dlrm", "--data", path, "--json", "--no-progress",
           "--batch-size", "256", "--cache-bytes", "256KiB", "--data-workers", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout.splitlines()[-1])
    assert r["dataset"] == "criteo" and r["train_file"] == path and 1750 <= r["samples"] <= 1850
