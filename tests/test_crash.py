"""Durability by killing processes: after kill -9 at any moment, `mlkv.open` recovers exactly the last
completed checkpoint (rows, optimizer state, Adam step, row counts, table set) and nothing later.

A writer subprocess (tests/crash_writer.py) runs a deterministic workload: step s depends only on
(seed, s) and the store state. It is killed with SIGKILL at a random moment, or kills itself at a fault
point of mlkv.faults. The test then reopens the store, reads `last_checkpoint()` -> (id, {"step": c}),
replays steps 0..c in process on an unbounded `engine="memory"` store (the oracle) and compares every
row and every optimizer state bit for bit. The writer is then restarted on the recovered store (it resumes
at step c + 1) with a new seed, so the work after a recovery differs from the work the crash lost (a
replay of the same steps would rewrite the same keys into the same slots and hide leftovers of the crashed
checkpoint), and killed again; finally the test writes and checkpoints in process and reopens.

Damaged files (flipped bytes, truncation) must raise mlkv.CorruptionError naming the file, on open or on
read, and never return rows that differ from the undamaged store.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import mlkv
from mlkv.engine import index_log, slab
from mlkv.engine.slot_file import HEADER_BYTES, slot_bytes_for
from mlkv.faults import POINTS

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WRITER = HERE / "crash_writer.py"

_spec = importlib.util.spec_from_file_location("crash_writer", WRITER)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)

# fault points by engine; the rocksdb engine's own points are not (yet) listed in mlkv.faults.POINTS
_ENGINE_PREFIXES = {"slab": ("checkpoint", "slab", "manifest"), "rocksdb": ("checkpoint", "rocksdb")}
_EXTRA_POINTS = {"rocksdb": ("rocksdb:before_commit", "rocksdb:after_commit")}
ENGINES = ("slab", "rocksdb")


def fault_points(engine: str) -> list[str]:
    pts = [p for p in POINTS if p.split(":")[0] in _ENGINE_PREFIXES[engine]]
    return pts + [p for p in _EXTRA_POINTS.get(engine, ()) if p not in pts]


def committed_at(point: str) -> bool:
    """Whether a crash at `point` comes after the checkpoint's commit point (it must then be visible)."""
    return point.endswith(("after_rename", "after_commit"))


RANDOM_TRIALS = {"slab": 16, "rocksdb": 6}  # each trial kills its writer KILLS_PER_TRIAL times
KILLS_PER_TRIAL = 3
FAULT_ARM_AFTER = 3  # the fault point fires during the writer's 4th checkpoint


# ---- the writer subprocess ------------------------------------------------------------------------------
# Trials run in two threads. A child forked by one thread holds copies of the other thread's open files
# until it execs, among them the store's flock'd LOCK file: a store closed in that window stays locked for a
# moment and reopening it fails with StoreLockedError. So spawning and closing stores take turns.
_SPAWN_LOCK = threading.Lock()


@contextlib.contextmanager
def opened(path: Path, engine: str = "slab", **kwargs):
    store = mlkv.open(path, engine=engine, **kwargs)
    try:
        yield store
    finally:
        with _SPAWN_LOCK:
            store.close()


class Writer:
    def __init__(self, seed: int, path: Path, engine: str, **env: str):
        self.err = path.parent / f"writer-{uuid.uuid4().hex[:8]}.err"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        if "MLKV_CRASH_AT" not in env:
            full_env.pop("MLKV_CRASH_AT", None)
        with open(self.err, "wb") as err, _SPAWN_LOCK:
            self.proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(seed), str(path), engine],
                stdout=subprocess.PIPE,
                stderr=err,
                env=full_env,
                text=True,
            )
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "started":
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"writer did not start ({line}); stderr:\n{self.stderr()}")
        self.first_step = int(line[1])

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL a writer that must still be running (one that died on its own is a failure)."""
        rc = self.proc.poll()
        if rc is not None:
            pytest.fail(f"writer exited on its own with {rc}; stderr:\n{self.stderr()}")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()

    def wait(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"writer still running after {timeout}s; stderr:\n{self.stderr()}")
        self.proc.stdout.close()
        return rc


# ---- the oracle and the comparison ----------------------------------------------------------------------
class Oracle:
    """The same workload on an in-memory store with room for every row: no eviction, no disk."""

    def __init__(self):
        self.store = mlkv.open(f"/oracle/{uuid.uuid4().hex}", engine="memory", cache_bytes="1GiB")
        self.tables = cw.open_tables(self.store)
        self.next_step = 0

    def advance_to(self, step: int, seed: int) -> None:
        """Replay steps up to and including `step` with the seed of the writer that ran them (checkpoints
        are not needed for the state)."""
        assert step >= self.next_step - 1, f"recovered step {step} is older than one already recovered"
        for s in range(self.next_step, step + 1):
            cw.run_step(self.store, self.tables, seed, s)
        self.next_step = step + 1

    def close(self) -> None:
        self.store.close()


def table_dump(t) -> dict[str, np.ndarray]:
    """Everything a table holds, as exact bit patterns, keys sorted."""
    parts = list(t.items(batch_size=333))
    keys = np.concatenate([k for k, _ in parts]) if parts else np.empty(0, np.uint64)
    rows = np.concatenate([r for _, r in parts]) if parts else np.empty((0, t.dim), np.float32)
    order = np.argsort(keys)
    keys, rows = keys[order], rows[order]
    assert len(np.unique(keys)) == len(keys), f"table {t.name}: items() yields a key twice"
    out = {"keys": keys, "rows": rows.view(np.uint32)}
    for name, state in t.optimizer_state(keys).items():
        out[f"state.{name}"] = state.view(np.uint32)
    out["len"] = np.array([len(t)])
    out["step"] = np.array([t.step])
    return out


def store_dump(store) -> dict[str, dict[str, np.ndarray]]:
    return {name: table_dump(store.table(name)) for name in store.tables()}


def assert_same_dump(got: dict, want: dict, context: str) -> None:
    assert sorted(got) == sorted(want), f"{context}: tables {sorted(got)} != {sorted(want)}"
    for name in want:
        g, w = got[name], want[name]
        assert sorted(g) == sorted(w), f"{context}: table {name}: fields {sorted(g)} != {sorted(w)}"
        for field in w:
            a, b = g[field], w[field]
            if np.array_equal(a, b):
                continue
            if a.ndim == 2 and a.shape == b.shape:
                bad = np.flatnonzero((a != b).any(axis=1))
                detail = f"{len(bad)} of {len(b)} rows differ, first keys {w['keys'][bad[:5]]}"
            else:
                detail = f"got {a.ravel()[:8]} (size {a.size}), want {b.ravel()[:8]} (size {b.size})"
            pytest.fail(f"{context}: table {name!r} field {field!r} differs: {detail}")


def expected_last(step: int) -> tuple[int, dict] | None:
    return None if step < 0 else (cw.checkpoint_id_of(step), {"step": step})


def recover_and_check(path: Path, engine: str, oracle: Oracle, seed: int, context: str) -> int:
    """Open (recover) the store, advance the oracle to its checkpoint with the seed of the writer that ran
    since the last recovery, compare everything; return the recovered step."""
    with opened(path, engine, cache_bytes=cw.CACHE_BYTES) as store:
        last = store.last_checkpoint()
        step = -1 if last is None else last[1]["step"]
        assert last == expected_last(step), f"{context}: last_checkpoint {last}"
        oracle.advance_to(step, seed)
        # before the first checkpoint nothing is durable, not even the tables the writer created
        want = store_dump(oracle.store) if step >= 0 else {}
        assert_same_dump(store_dump(store), want, f"{context} (recovered step {step})")
    return step


def continue_after_recovery(path: Path, engine: str, oracle: Oracle, seed: int) -> None:
    """The recovered store is fully usable: write, checkpoint, reopen, compare."""
    steps = 2 * cw.CKPT_EVERY
    with opened(path, engine, cache_bytes=cw.CACHE_BYTES) as store:
        tables = cw.open_tables(store)
        first = cw.resume_step(store)
        assert first == oracle.next_step
        last = first + steps - 1
        last += cw.CKPT_EVERY - 1 - last % cw.CKPT_EVERY  # end on a checkpoint step
        for s in range(first, last + 1):
            cw.run_step(store, tables, seed, s)
            if cw.is_checkpoint_step(s):
                assert store.checkpoint({"step": s}) == cw.checkpoint_id_of(s)
    recover_and_check(path, engine, oracle, seed, "after continuing in process")


# ---- random kills ----------------------------------------------------------------------------------------
def crash_debris(path: Path) -> str:
    """What an interrupted slab checkpoint left behind, seen before recovery cleans it (for the report)."""
    if not (path / "MANIFEST").exists():
        return "no checkpoint yet"
    if (path / "MANIFEST.tmp").exists():
        return "MANIFEST.tmp"
    files = committed_files(path)
    for name in os.listdir(path):
        if name in files and name.endswith(".log") and (path / name).stat().st_size > files[name][1]:
            return "uncommitted log record"
        if name.split(".")[-1] in ("slab", "snap", "log") and name not in files:
            return "uncommitted file"
    return "none"


def random_kill_trial(engine: str, seed: int, tmp: Path) -> list[tuple[int, str]]:
    """Kill the writer KILLS_PER_TRIAL times at random moments, checking recovery after each kill."""
    rng = random.Random(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "store"
    env = {"MLKV_SMALL_LOG": "1"} if seed % 2 == 0 else {}
    oracle = Oracle()
    steps = []
    try:
        for kill in range(KILLS_PER_TRIAL):
            run_seed = 10 * seed + kill
            w = Writer(run_seed, path, engine, **env)
            assert w.first_step == oracle.next_step, "writer resumed at the wrong step"
            delay = rng.uniform(0.05, 1.5)
            time.sleep(delay)
            w.kill()
            debris = crash_debris(path) if engine == "slab" else "?"
            context = f"{engine} seed {seed} kill {kill} after {delay:.2f}s"
            steps.append((recover_and_check(path, engine, oracle, run_seed, context), debris))
        continue_after_recovery(path, engine, oracle, 10 * seed + 9)
    finally:
        oracle.close()
    return steps


@pytest.mark.parametrize("engine", ENGINES)
def test_random_kills(engine, tmp_path):
    """Seeds run two at a time: one trial's writer runs while the other trial replays and compares."""
    if engine == "rocksdb":
        pytest.importorskip("rocksdict")
    seeds = [1000 * (ENGINES.index(engine) + 1) + i for i in range(RANDOM_TRIALS[engine])]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: random_kill_trial(engine, s, tmp_path / str(s)), seeds))
    recovered = [s for steps in results for s, _ in steps]
    debris = collections.Counter(d for steps in results for _, d in steps)
    print(f"{engine}: {len(recovered)} random kills, recovered steps {recovered}")
    print(f"{engine}: what the kills left behind: {dict(debris)}")
    assert len(recovered) == RANDOM_TRIALS[engine] * KILLS_PER_TRIAL
    # the kills must land in a running workload, not all before the first checkpoint
    assert sum(s >= 0 for s in recovered) >= len(recovered) // 2


# ---- injected faults -------------------------------------------------------------------------------------
FAULT_CASES = [(e, p) for e in ENGINES for p in fault_points(e)]


@pytest.mark.parametrize(("engine", "point"), FAULT_CASES, ids=[f"{e}-{p}" for e, p in FAULT_CASES])
def test_crash_at_fault_point(engine, point, tmp_path):
    if engine == "rocksdb":
        pytest.importorskip("rocksdict")
    seed = 7 + FAULT_CASES.index((engine, point))
    path = tmp_path / "store"
    oracle = Oracle()
    try:
        w = Writer(seed, path, engine, MLKV_CRASH_AT=point, MLKV_CRASH_AFTER=str(FAULT_ARM_AFTER))
        rc = w.wait()
        assert rc == -signal.SIGKILL, f"writer exited with {rc}, not at {point}; stderr:\n{w.stderr()}"
        visible = committed_at(point)
        ckpt = FAULT_ARM_AFTER + 1 if visible else FAULT_ARM_AFTER
        want = ckpt * cw.CKPT_EVERY - 1
        step = recover_and_check(path, engine, oracle, seed, f"crash at {point}")
        assert step == want, f"crash at {point}: recovered step {step}, expected {want} (checkpoint {ckpt})"
        # the debris the crash left (uncommitted log records, slots, files) must not leak into later
        # checkpoints: run a few more checkpoints to a clean stop and compare again
        stop = want + 3 * cw.CKPT_EVERY
        w = Writer(seed + 1000, path, engine, MLKV_WRITER_STOP=str(stop))
        assert w.first_step == want + 1
        assert w.wait() == 0, w.stderr()
        assert recover_and_check(path, engine, oracle, seed + 1000, f"resumed after crash at {point}") == stop
        continue_after_recovery(path, engine, oracle, seed + 2000)
    finally:
        oracle.close()


def test_fault_points_cover_the_checkpoint():
    """Every point of mlkv.faults is exercised by some engine's fault test."""
    covered = {p for e in ENGINES for p in fault_points(e)}
    assert set(POINTS) <= covered, f"fault points without a crash test: {set(POINTS) - covered}"


# ---- damaged files ---------------------------------------------------------------------------------------
def build_store(path: Path, seed: int = 99, steps: int = 48) -> dict:
    """A checkpointed slab store with an index snapshot and a log; return its dump."""
    old = slab._MIN_LOG_BYTES
    slab._MIN_LOG_BYTES = 4096
    try:
        with mlkv.open(path, cache_bytes=cw.CACHE_BYTES) as store:
            tables = cw.open_tables(store)
            for s in range(steps):
                cw.run_step(store, tables, seed, s)
                if cw.is_checkpoint_step(s):
                    store.checkpoint({"step": s})
    finally:
        slab._MIN_LOG_BYTES = old
    with mlkv.open(path, readonly=True) as store:
        return store_dump(store)


def committed_files(path: Path) -> dict[str, tuple[int, int]]:
    """File name -> (start, end) of the bytes the committed checkpoint depends on."""
    manifest = json.loads((path / "MANIFEST").read_bytes().partition(b"\n")[2])
    out = {"MANIFEST": (0, (path / "MANIFEST").stat().st_size)}
    for t in manifest["tables"].values():
        tid, gen = t["id"], t["gen"]
        if t["has_snapshot"]:
            out[f"t{tid}.{gen}.snap"] = (0, (path / f"t{tid}.{gen}.snap").stat().st_size)
        if t["log_len"]:
            out[f"t{tid}.{gen}.log"] = (0, t["log_len"])
        out[f"t{tid}.slab"] = (0, HEADER_BYTES + t["n_slots"] * slot_bytes_for(t["row_bytes"]))
    return out


def live_slot_offsets(path: Path, table: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(slab file, keys, byte offsets of their slots) of a table's committed rows."""
    with mlkv.open(path, readonly=True) as store:
        st = store._engine._tables[table]
        keys, slots = st.index.items()
        return st.file.path, keys.copy(), np.array([st.file.offset_of(s) for s in slots])


def flip(file: Path, offset: int, mask: int = 0x10) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def read_back(path: Path, want: dict, context: str) -> str:
    """Open and read everything: either identical to `want`, or CorruptionError naming a store file."""
    try:
        with mlkv.open(path, cache_bytes=cw.CACHE_BYTES) as store:
            got = store_dump(store)
    except mlkv.CorruptionError as e:
        assert Path(e.file).resolve().parent == path.resolve(), f"{context}: error names {e.file}"
        assert os.path.basename(e.file) in str(e) and "offset" in str(e)
        return os.path.basename(e.file)
    assert_same_dump(got, want, context)
    return ""


@pytest.fixture(scope="module")
def damaged_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("damage") / "base"
    want = build_store(base)
    files = committed_files(base)
    assert any(f.endswith(".snap") for f in files) and any(f.endswith(".log") for f in files)
    return base, want, files


def _copy(base: Path, tmp_path: Path) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(base, path)
    return path


@pytest.mark.parametrize("kind", ["MANIFEST", ".log", ".snap", "slab-header"])
def test_damaged_metadata_raises_on_open(damaged_base, tmp_path, kind):
    """A flipped byte anywhere in the committed part of MANIFEST, index log/snapshot or slab header."""
    base, _, files = damaged_base
    names = (
        [f for f in files if f == kind or f.endswith(kind)]
        if kind != "slab-header"
        else [f for f in files if f.endswith(".slab")]
    )
    assert names
    for name in names:
        start, end = files[name]
        if kind == "slab-header":
            end = 24  # magic, version, widths, CRC-32
        for offset in sorted({start, start + 1, (start + end) // 2, end - 1}):
            path = _copy(base, tmp_path / f"{name}-{offset}")
            flip(path / name, offset)
            with pytest.raises(mlkv.CorruptionError) as e:
                mlkv.open(path).close()
            assert os.path.basename(e.value.file) == name, str(e.value)
            assert name in str(e.value)


@pytest.mark.parametrize("kind", ["MANIFEST", ".log", ".snap"])
def test_truncated_metadata_raises_on_open(damaged_base, tmp_path, kind):
    base, _, files = damaged_base
    name = next(f for f in files if f == kind or f.endswith(kind))
    start, end = files[name]
    for cut in (end - 1, (start + end) // 2, 3):
        path = _copy(base, tmp_path / f"{cut}")
        os.truncate(path / name, cut)
        with pytest.raises(mlkv.CorruptionError) as e:
            mlkv.open(path).close()
        assert os.path.basename(e.value.file) == name


@pytest.mark.parametrize(("field", "at"), [("key", 3), ("check", 12), ("row", 16 + 5), ("row-end", -1)])
def test_damaged_slot_raises_on_read(damaged_base, tmp_path, field, at):
    """A flipped bit in a live slot: reading that key (or scanning the table) raises CorruptionError naming
    the slab file; the other keys still read back exactly."""
    base, want, _ = damaged_base
    path = _copy(base, tmp_path)
    slab_file, keys, offsets = live_slot_offsets(path, "adam")
    i = len(keys) // 3
    slot_bytes = slot_bytes_for(4 * 24)  # Adam dim 8: weights, exp_avg, exp_avg_sq
    where = offsets[i] + (at if at >= 0 else slot_bytes - 1)
    flip(Path(slab_file), int(where), 0x01)
    with mlkv.open(path, cache_bytes=cw.CACHE_BYTES) as store:
        t = store.table("adam")
        with pytest.raises(mlkv.CorruptionError) as e:
            t.get(keys[i : i + 1])
        assert os.path.basename(e.value.file) == os.path.basename(slab_file)
        assert str(int(keys[i])) in str(e.value)
        with pytest.raises(mlkv.CorruptionError):
            list(t.items())
        with pytest.raises(mlkv.CorruptionError):
            t.optimizer_state(keys[i : i + 1])
        others = np.delete(keys, i)[:200]
        pos = np.searchsorted(want["adam"]["keys"], others)
        got = t.get(others, track=False)
        assert np.array_equal(got.view(np.uint32), want["adam"]["rows"][pos])


def test_random_damage_never_returns_wrong_rows(damaged_base, tmp_path):
    """Random byte flips and truncations in any store file: the store either reads back exactly as it was,
    or raises CorruptionError naming the damaged file (bytes no checkpoint depends on may be ignored)."""
    base, want, files = damaged_base
    rng = random.Random(5)
    names = sorted(f for f in os.listdir(base) if f not in ("LOCK",))
    raised = 0
    for trial in range(60):
        name = rng.choice(names)
        path = _copy(base, tmp_path / str(trial))
        size = (path / name).stat().st_size
        lo, hi = files.get(name, (0, size))
        if rng.random() < 0.85:
            offset = rng.randrange(lo, hi) if rng.random() < 0.8 else rng.randrange(size)
            flip(path / name, offset, 1 << rng.randrange(8))
            what = f"flip {name}@{offset}"
        else:
            cut = rng.randrange(size)
            os.truncate(path / name, cut)
            what = f"truncate {name} to {cut}"
        try:
            hit = read_back(path, want, what)
        except mlkv.MlkvError as e:  # e.g. the engine marker: an error, but not the corruption error
            pytest.fail(f"{what}: {type(e).__name__} instead of CorruptionError: {e}")
        if hit:
            raised += 1
            assert hit == name, f"{what}: CorruptionError names {hit}"
    assert raised > 20


def test_uncommitted_log_tail_is_ignored(damaged_base, tmp_path):
    """Bytes past the committed length of an index log (what a checkpoint that crashed before its manifest
    commit leaves) are never replayed: not on open, and not after the next checkpoint appends to the log.
    The tail here is the worst case: a well-formed record with valid CRCs (a copy of an old one), which
    would point keys back at slots that have since been reused."""
    base, want, files = damaged_base
    damaged, clean = _copy(base, tmp_path / "damaged"), _copy(base, tmp_path / "clean")
    for name in (f for f in files if f.endswith(".log")):
        raw = (damaged / name).read_bytes()
        n = index_log._REC.unpack_from(raw)[3]  # pair count of the first record
        with open(damaged / name, "ab") as f:
            f.write(raw[: index_log._REC_BYTES + 16 * n])
    assert read_back(damaged, want, "valid-looking uncommitted tail") == ""
    for path in (damaged, clean):
        with mlkv.open(path, cache_bytes=cw.CACHE_BYTES) as store:
            tables = cw.open_tables(store)
            for s in range(1000, 1000 + 2 * cw.CKPT_EVERY):  # a fresh stretch of the workload
                cw.run_step(store, tables, 99, s)
            store.checkpoint({"step": -2})
    with mlkv.open(clean, readonly=True) as store:
        want_after = store_dump(store)
    assert read_back(damaged, want_after, "after appending past an uncommitted tail") == ""
