"""Crash loop: a multi-threaded, training-like writer killed with SIGKILL at random moments, each recovery
compared bit for bit with a model of the last checkpoint, and `mlkv check` run on it.

The writer (`python -m mlkv.bench.fault_crash PATH ENGINE STATE SEED SEGMENT [RESUME]`, started by the
campaign) runs THREADS worker threads and a checkpointing main thread on one store. Worker t owns tables
a{t} (Adam, dim 8), g{t} (Adagrad, dim 4) and x{t} (SGD, dim 2, created and dropped as it goes), and runs
ops 0, 1, 2, ...: op i is a pure function of (segment seed, t, i) and the state of t's own tables (train =
get + update, put, delete, untracked get, get + release, lookahead + get + release, create/drop/update x{t},
flush). Exactly one store call of an op changes state, so after any prefix of ops a thread's tables are
well defined. The write-back thread, look-ahead I/O threads and a tiny memory tier run all the time.

Each worker publishes its op count in STATE/counts (a shared mapping: it survives SIGKILL). The main thread
checkpoints at random intervals with metadata {"lo": counts read just before checkpoint(), "seg": SEGMENT}
and, once checkpoint() returned, appends {"id", "lo", "hi": counts read just after} to STATE/journal. A
checkpoint is one consistent cut in which each store call is wholly in or out (API.md), so thread t's
committed state is its state after some c ops, lo[t] <= c <= hi[t] + 1 (the op running when `hi` was read
may be in). The oracle replays each thread's ops on a memory store and looks for that c; no c matching bit
for bit is a failure. A checkpoint that returned (journaled) but is not what recovery gives is a failure.
The campaign then restarts the writer on the recovered store with a new segment seed, resuming each thread
at its c, so leftovers of a crashed checkpoint meet fresh writes, and kills it again.

The writer prints "started" after its first checkpoint (a process's first ops are slow while compiled
kernels load; the kill delay counts from there). Environment: MLKV_FAULT_CKPT_GAP (mean seconds between
checkpoints, default 0.05); MLKV_FAULT_SHADOW (a directory: record durable state for the power-loss
campaign, see fault_powerloss.install_shadow).

A trial is one kill and its recovery check. Thread-safety: trials run in parallel threads of the campaign;
each has its own directories and oracle store.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

from .fault_common import SPAWN_LOCK, Tally, dump_difference, run_check, store_dump

THREADS = 3
CACHE_BYTES = 40 * 1024  # ~400 Adam rows of 96 bytes shared by 6-9 tables of ~1000 keys: constant eviction
KEY_SPACE = 1000
BIG_BATCH = 700  # larger than a table's share of the memory tier: rows spill past it
START_TIMEOUT = 300.0  # seconds a writer may take to print "started" (its first checkpoint)
LOOKAHEAD_MAX = 400  # distinct keys under one look-ahead chunk (512): its rows are admitted in one step
OPS = ("train",) * 4 + ("put", "delete", "peek", "read", "lookahead", "lookahead", "tmp", "flush")


# ---- the workload (shared by the writer and the oracle) --------------------------------------------------
def thread_tables(t: int) -> tuple[str, str, str]:
    return f"a{t}", f"g{t}", f"x{t}"


def open_tables(store, threads: int = THREADS) -> None:
    """Create (or open) every worker's two permanent tables."""
    import mlkv

    for t in range(threads):
        a, g, _ = thread_tables(t)
        store.table(a, dim=8, optimizer=mlkv.optim.Adam(lr=0.01))
        store.table(g, dim=4, optimizer=mlkv.optim.Adagrad(lr=0.05), init=mlkv.init.Uniform(-0.1, 0.1))


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n keys (duplicates likely) from a ~KEY_SPACE pool; one in ten is a hashed id with the top bit set."""
    k = rng.integers(0, KEY_SPACE, n).astype(np.uint64)
    hi = rng.random(n) < 0.1
    with np.errstate(over="ignore"):
        k[hi] = (k[hi] * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1 << 63)
    return k


def run_op(store, t: int, seed: int, i: int) -> None:
    """Op i of worker t: a pure function of (seed, t, i) and the state of t's tables; exactly one of its
    store calls changes that state (the others read rows that exist, or release)."""
    import mlkv

    rng = np.random.default_rng([seed, t, i])
    kind = OPS[int(rng.integers(len(OPS)))]
    a, g, x = thread_tables(t)
    tab = store.table(a if rng.random() < 0.5 else g)
    k = _keys(rng, BIG_BATCH if rng.random() < 0.03 else int(rng.integers(1, 48)))
    if kind == "train":  # read what exists (tracked), then the update creates the rest and writes
        seen = k[tab.contains(k)]
        if len(seen):
            tab.get(seen)
        tab.update(k, rng.standard_normal((len(k), tab.dim)).astype(np.float32))
    elif kind == "put":
        tab.put(k, rng.standard_normal((len(k), tab.dim)).astype(np.float32))
    elif kind == "delete":
        tab.delete(k[: max(1, len(k) // 4)])
    elif kind == "peek":
        tab.get(k, track=False)
    elif kind == "read":
        tab.get(k)
        tab.release(k)
    elif kind == "lookahead":  # the I/O thread or the get creates the new rows: the same rows either way
        k = k[:LOOKAHEAD_MAX]
        tab.lookahead(k)
        tab.get(k)
        tab.release(k)
    elif kind == "tmp":
        if x not in store.tables():
            store.table(x, dim=2, optimizer=mlkv.optim.SGD(lr=0.1), init=mlkv.init.Zeros())
        elif rng.random() < 0.25:
            store.drop_table(x)
        else:
            kx = _keys(rng, 8)
            store.table(x).update(kx, rng.standard_normal((len(kx), 2)).astype(np.float32))
    else:
        store.flush()


# ---- the writer process -------------------------------------------------------------------------------
def _writer_main(argv: list[str]) -> None:
    path, engine, state, seed, segment = argv[0], argv[1], Path(argv[2]), int(argv[3]), int(argv[4])
    resume = [int(c) for c in argv[5].split(",")] if len(argv) > 5 else [0] * THREADS
    if os.environ.get("MLKV_FAULT_SHADOW"):
        from .fault_powerloss import install_shadow

        install_shadow(os.environ["MLKV_FAULT_SHADOW"])
    import mlkv

    counts = np.memmap(state / "counts", dtype=np.int64, mode="r+", shape=(THREADS,))
    counts[:] = resume
    store = mlkv.open(path, engine=engine, cache_bytes=CACHE_BYTES)
    open_tables(store)
    journal = open(state / "journal", "a")  # noqa: SIM115 - open until the process is killed
    ckpt_gap = float(os.environ.get("MLKV_FAULT_CKPT_GAP", "0.05"))

    def worker(t: int) -> None:
        try:
            i = int(counts[t])
            while True:
                run_op(store, t, seed, i)
                i += 1
                counts[t] = i
        except BaseException:
            sys.stderr.write(f"worker {t} failed:\n{traceback.format_exc()}")
            sys.stderr.flush()
            os._exit(3)

    for t in range(THREADS):
        threading.Thread(target=worker, args=(t,), daemon=True).start()
    rng = random.Random(seed)
    try:
        for n in range(1 << 62):
            time.sleep(rng.uniform(0.2, 1.8) * ckpt_gap)
            lo = counts.tolist()
            cid = store.checkpoint({"lo": lo, "seg": segment})
            hi = counts.tolist()
            journal.write(json.dumps({"seg": segment, "id": cid, "lo": lo, "hi": hi}) + "\n")
            journal.flush()
            if n == 0:  # the kill delay counts from here: the first ops of a process are slow (kernel loads)
                print("started", flush=True)
    except BaseException:
        sys.stderr.write(f"checkpointer failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(3)


# ---- the oracle ---------------------------------------------------------------------------------------
class Oracle:
    """Every worker's ops replayed one by one on a memory store with room for every row."""

    def __init__(self):
        import mlkv

        self.store = mlkv.open(f"/oracle/{uuid.uuid4().hex}", engine="memory", cache_bytes="1GiB")
        open_tables(self.store)
        self.pos = [0] * THREADS  # ops of each worker replayed so far
        self.last_id: int | None = None  # the checkpoint the last recovery matched

    def dump(self, t: int) -> dict:
        return store_dump(self.store, thread_tables(t))

    def match(self, t: int, seed: int, lo: int, hi: int, got: dict) -> tuple[int | None, str]:
        """Replay worker t (ops of `seed`) until its tables equal `got`, trying c = lo .. hi; return (c or
        None, the difference at lo)."""
        if self.pos[t] > lo:
            return (
                None,
                f"worker {t}: checkpoint records {lo} ops, the last recovery already had {self.pos[t]}",
            )
        while self.pos[t] < lo:
            run_op(self.store, t, seed, self.pos[t])
            self.pos[t] += 1
        first = None
        while True:
            diff = dump_difference(got, self.dump(t))
            if diff is None:
                return self.pos[t], ""
            first = first or f"worker {t} at op {self.pos[t]}: {diff}"
            if self.pos[t] >= hi:
                return None, first
            run_op(self.store, t, seed, self.pos[t])
            self.pos[t] += 1

    def close(self) -> None:
        self.store.close()


# ---- one trial ----------------------------------------------------------------------------------------
def _spawn(args: list[str], env: dict, err: Path) -> subprocess.Popen:
    with open(err, "wb") as f, SPAWN_LOCK:
        return subprocess.Popen(
            [sys.executable, "-m", "mlkv.bench.fault_crash", *args],
            stdout=subprocess.PIPE,
            stderr=f,
            env=env,
            text=True,
        )


def run_writer_until_killed(
    path: Path, engine: str, state: Path, seed: int, segment: int, resume: list[int], delay: float, **env
) -> str | None:
    """Start the writer, SIGKILL it `delay` seconds after its threads started; an error text if it did not
    run until then."""
    err = state / f"writer-{segment}.err"
    repo = str(Path(__file__).resolve().parents[2])
    full_env = {**os.environ, "PYTHONPATH": repo, **env}
    args = [str(path), engine, str(state), str(seed), str(segment), ",".join(map(str, resume))]
    proc = _spawn(args, full_env, err)
    watchdog = threading.Timer(START_TIMEOUT, proc.kill)  # a writer that never starts must not hang us
    watchdog.start()
    try:
        line = proc.stdout.readline().strip()
    finally:
        watchdog.cancel()
    if line != "started":
        proc.kill()
        proc.wait()
        proc.stdout.close()
        return f"writer did not start ({line!r}): {err.read_text(errors='replace')[-2000:]}"
    time.sleep(delay)
    rc = proc.poll()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    if rc is not None:
        return f"writer exited on its own with {rc}: {err.read_text(errors='replace')[-2000:]}"
    return None


def read_journal(state: Path) -> dict[tuple[int, int], dict]:
    """(segment, checkpoint id) -> journal entry; a torn last line (the kill) is skipped."""
    out = {}
    if (state / "journal").exists():
        for line in (state / "journal").read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            out[(e["seg"], e["id"])] = e
    return out


def match_checkpoint(
    oracle: Oracle, journal: dict, dead: list[int], seed: int, segment: int, last, got: list, tables: list
) -> tuple[str, str | None]:
    """Whether a recovered store (`last` = its last_checkpoint(), `got` = each worker's dump, `tables` =
    its table names) is the state of a checkpoint the writer of `segment` took, or of the one the previous
    recovery matched. Returns (outcome, failure or None); on success the oracle stands at that cut."""
    returned = [cid for (seg, cid) in journal if seg == segment]
    if last is None:
        if oracle.last_id is not None or tables:
            return (
                "failed",
                f"no checkpoint recovered (tables {tables}); expected checkpoint {oracle.last_id}",
            )
        if returned:
            return "failed", f"no checkpoint recovered, but checkpoint {max(returned)} had returned"
        return "no checkpoint yet", None
    cid, meta = last
    if returned and cid < max(returned):
        return "failed", f"recovered checkpoint {cid}, but checkpoint {max(returned)} had returned"
    if cid == oracle.last_id:
        for t in range(THREADS):
            diff = dump_difference(got[t], oracle.dump(t))
            if diff:
                return "failed", f"checkpoint {cid} (matched before), but worker {t}: {diff}"
    elif meta.get("seg") != segment:
        return "failed", f"recovered checkpoint {cid} of segment {meta.get('seg')}, now {segment}"
    else:
        entry = journal.get((segment, cid))
        hi = entry["hi"] if entry else dead
        for t in range(THREADS):
            c, why = oracle.match(t, seed, meta["lo"][t], hi[t] + 1, got[t])
            if c is None:
                return "failed", f"checkpoint {cid}: no cut in [{meta['lo'][t]}, {hi[t] + 1}]: {why}"
        oracle.last_id = cid
    if (segment, cid) in journal:
        return "recovered the last checkpoint", None
    return "recovered a checkpoint not yet journaled", None


def verify_recovery(
    path: Path, engine: str, state: Path, oracle: Oracle, seed: int, segment: int
) -> tuple[str, str | None]:
    """Open the killed writer's store as a user would (writable), compare each worker's tables with the
    oracle at the checkpoint's cut, run `mlkv check`. Returns (outcome, failure text or None); on success
    the oracle stands at the recovered cut."""
    import mlkv

    journal = read_journal(state)
    dead = np.fromfile(state / "counts", dtype=np.int64).tolist()
    store = mlkv.open(path, engine=engine, cache_bytes=CACHE_BYTES)
    try:
        last = store.last_checkpoint()
        got = [store_dump(store, thread_tables(t)) for t in range(THREADS)]
        tables = store.tables()
    finally:
        with SPAWN_LOCK:
            store.close()
    outcome, failure = match_checkpoint(oracle, journal, dead, seed, segment, last, got, tables)
    if failure is not None:
        return "failed", failure
    rc, text = run_check(str(path))
    if rc != 0:
        return "failed", f"mlkv check exited {rc} on the recovered store: {text.strip()[-500:]}"
    return outcome, None


def crash_trials(engine: str, seed: int, workdir: Path, kills: int, tally: Tally, delays=(0.1, 1.5)) -> None:
    """One writer store killed `kills` times (each kill one trial), checking every recovery."""
    rng = random.Random(seed)
    root = workdir / f"{engine}-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    state = root / "state"
    state.mkdir(parents=True)
    path = root / "store"
    np.zeros(THREADS, dtype=np.int64).tofile(state / "counts")
    oracle = Oracle()
    try:
        for segment in range(kills):
            seg_seed = 100 * seed + segment
            delay = rng.uniform(*delays)
            repro = f"{engine} seed {seed} kill {segment} after {delay:.2f}s"
            problem = run_writer_until_killed(path, engine, state, seg_seed, segment, list(oracle.pos), delay)
            if problem:
                tally.add("failed", f"{repro}: {problem}")
                for _ in range(segment + 1, kills):
                    tally.add("not run: an earlier kill of its store failed")
                return
            try:
                outcome, failure = verify_recovery(path, engine, state, oracle, seg_seed, segment)
            except Exception as e:
                outcome, failure = "failed", f"{type(e).__name__}: {e}"
            tally.add(outcome, None if failure is None else f"{repro}: {failure}")
            if failure is not None:  # the oracle no longer knows where the store stands
                for _ in range(segment + 1, kills):
                    tally.add("not run: an earlier kill of its store failed")
                return
    finally:
        oracle.close()
    shutil.rmtree(root, ignore_errors=True)


def campaign(
    trials: int,
    engines: tuple[str, ...],
    workdir: Path,
    seed: int = 0,
    kills_per_store: int = 2,
    parallel: int = 2,
    delays=(0.1, 1.5),
) -> Tally:
    """`trials` kills in all, over stores of each engine in turn (`kills_per_store` kills each)."""
    from concurrent.futures import ThreadPoolExecutor

    tally = Tally("crash loop")
    runs = -(-trials // kills_per_store)
    jobs = [(engines[i % len(engines)], seed + i) for i in range(runs)]
    last_kills = trials - kills_per_store * (runs - 1)
    with ThreadPoolExecutor(parallel) as pool:
        futures = [
            pool.submit(
                crash_trials, e, s, workdir, last_kills if i == runs - 1 else kills_per_store, tally, delays
            )
            for i, (e, s) in enumerate(jobs)
        ]
        for f in futures:
            f.result()
    return tally


if __name__ == "__main__":
    _writer_main(sys.argv[1:])
