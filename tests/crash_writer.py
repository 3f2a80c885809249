"""Crash-test writer: a deterministic training-like workload on an mlkv store, meant to be killed.

    python tests/crash_writer.py SEED PATH ENGINE

Opens (or recovers) the store at PATH, resumes right after the step of its last checkpoint, prints
``started <first step>`` and then runs steps forever. Step s is a pure function of (SEED, s) and of the
store's state after step s - 1: random get / update / put / delete / lookahead batches on two tables
(Adam dim 8, Adagrad dim 4), plus a third table that is created and dropped periodically, and after every
CKPT_EVERY-th step ``store.checkpoint({"step": s})``. So whatever checkpoint a crash leaves, the test can
replay steps 0..s in process on a memory store and must get the same rows bit for bit. (The test restarts
the writer after each crash with another SEED: the steps after a recovery then differ from the ones the
crash lost, which is what exposes leftovers of a crashed checkpoint.)

The cache is a few hundred rows while each table holds ~1000 keys, so rows are evicted and written back
all the time, and some batches are larger than the whole memory tier.

A multi-threaded variant (three workers, checkpoints taken while they run) drives the crash campaign of
mlkv/bench/fault_crash.py (`python -m mlkv.bench.faults crash`).

Environment (read once at start, before anything can crash):
    MLKV_CRASH_AT       a fault point of mlkv.faults; armed only after MLKV_CRASH_AFTER checkpoints
    MLKV_CRASH_AFTER    checkpoints this process completes before it arms MLKV_CRASH_AT (default 0)
    MLKV_WRITER_STOP    stop (os._exit(0), without closing the store) after the checkpoint of this step
    MLKV_SMALL_LOG      "1": tiny index-log threshold, so checkpoints often rewrite the index snapshot
"""

from __future__ import annotations

import os
import sys

import numpy as np

CACHE_BYTES = 24 * 1024  # ~250 Adam rows of 96 bytes, shared by all tables
CKPT_EVERY = 4
KEY_SPACE = 1000
BIG_BATCH = 700  # larger than any table's share of the memory tier: rows spill past it
TMP_PERIOD, TMP_CREATE, TMP_DROP = 40, 5, 25  # table "tmp" lives during steps [5, 25) of every 40


def is_checkpoint_step(step: int) -> bool:
    return step % CKPT_EVERY == CKPT_EVERY - 1


def checkpoint_id_of(step: int) -> int:
    """The id of the checkpoint taken after `step` (ids count completed checkpoints, from 1)."""
    assert is_checkpoint_step(step)
    return step // CKPT_EVERY + 1


def open_tables(store) -> dict:
    import mlkv

    return {
        "adam": store.table("adam", dim=8, optimizer=mlkv.optim.Adam(lr=0.01)),
        "adagrad": store.table(
            "adagrad", dim=4, optimizer=mlkv.optim.Adagrad(lr=0.05), init=mlkv.init.Uniform(-0.1, 0.1)
        ),
    }


def _keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n keys (duplicates likely) from a ~KEY_SPACE pool; one in ten is a hashed id with the top bit set."""
    k = rng.integers(0, KEY_SPACE, n).astype(np.uint64)
    hi = rng.random(n) < 0.1
    with np.errstate(over="ignore"):
        k[hi] = (k[hi] * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1 << 63)
    return k


def _batch(rng: np.random.Generator) -> np.ndarray:
    return _keys(rng, BIG_BATCH if rng.random() < 0.05 else int(rng.integers(1, 48)))


def _table_ops(rng: np.random.Generator, t) -> None:
    """A few random operations on table t; the first one always writes."""
    for i in range(int(rng.integers(1, 4))):
        op = "update" if i == 0 else rng.choice(["update", "put", "delete", "peek", "lookahead", "release"])
        k = _batch(rng)
        if op == "update":  # a training step: read, gradient depends on what was read, write
            rows = t.get(k)
            grads = rng.standard_normal((len(k), t.dim)).astype(np.float32) + np.float32(0.5) * rows
            t.update(k, grads)
        elif op == "put":
            t.put(k, rng.standard_normal((len(k), t.dim)).astype(np.float32))
        elif op == "delete":
            t.delete(k[: max(1, len(k) // 4)])
        elif op == "peek":
            t.get(k, track=False)
            t.contains(k)
        elif op == "lookahead":
            t.lookahead(k)
            t.get(k)
            t.release(k)
        else:
            t.get(k)
            t.release(k)


def run_step(store, tables: dict, seed: int, step: int) -> None:
    """The operations of `step` (no checkpoint): a pure function of (seed, step) and the store state."""
    import mlkv

    rng = np.random.default_rng([seed, step])
    for name in ("adam", "adagrad"):
        _table_ops(rng, tables[name])
    phase = step % TMP_PERIOD
    if TMP_CREATE <= phase < TMP_DROP:
        t = store.table("tmp", dim=2, optimizer=mlkv.optim.SGD(lr=0.1), init=mlkv.init.Zeros())
        k = _keys(rng, 8)
        t.update(k, rng.standard_normal((len(k), 2)).astype(np.float32))
    elif phase == TMP_DROP:
        store.drop_table("tmp")
    if rng.random() < 0.05:
        store.flush()


def resume_step(store) -> int:
    """The first step to run on a store recovered at its last checkpoint."""
    last = store.last_checkpoint()
    return 0 if last is None else last[1]["step"] + 1


def warm_up(engine: str, seed: int) -> None:
    """One checkpointed stretch of the workload on a throwaway store, so that the compiled kernels are
    loaded before "started" is printed: the kill delays then count from a warm process, and a loaded
    machine does not push every random kill before the first checkpoint (fault points are not armed yet)."""
    import shutil
    import tempfile

    import mlkv

    tmp = tempfile.mkdtemp(prefix="mlkv-crash-warm-")
    try:
        with mlkv.open(os.path.join(tmp, "s"), engine=engine, cache_bytes=CACHE_BYTES) as store:
            tables = open_tables(store)
            for step in range(CKPT_EVERY):
                run_step(store, tables, seed, step)
            store.checkpoint({"step": CKPT_EVERY - 1})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    seed, path, engine = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    point = os.environ.pop("MLKV_CRASH_AT", None)  # armed later, see below
    arm_after = int(os.environ.get("MLKV_CRASH_AFTER", "0"))
    stop = int(os.environ.get("MLKV_WRITER_STOP", "-1"))
    warm_up(engine, seed)
    if point and arm_after == 0:
        os.environ["MLKV_CRASH_AT"] = point

    import mlkv

    if os.environ.get("MLKV_SMALL_LOG") == "1":
        from mlkv.engine import slab

        slab._MIN_LOG_BYTES = 4096

    store = mlkv.open(path, engine=engine, cache_bytes=CACHE_BYTES)
    tables = open_tables(store)
    step = resume_step(store)
    print(f"started {step}", flush=True)
    done = 0
    while True:
        run_step(store, tables, seed, step)
        if is_checkpoint_step(step):
            assert store.checkpoint({"step": step}) == checkpoint_id_of(step)
            done += 1
            if point and done == arm_after:
                os.environ["MLKV_CRASH_AT"] = point
            if step == stop:
                print(f"stopped {step}", flush=True)
                os._exit(0)  # no close(): as abrupt as a crash, right after a completed checkpoint
        step += 1


if __name__ == "__main__":
    main()
