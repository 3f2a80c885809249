"""`mlkv bench store --only lookahead`: how much disk time look-ahead hides behind a training step.

A training-like loop over pre-generated key batches (the bench's KeyStream, so the same draws every run):

    pre-announce batches 0..K-1                     (K > 0)
    for batch i:  t.lookahead(keys[i + K])          (K > 0, while i + K is still in the run)
                  rows = t.get(keys[i])             (tracked)
                  sleep(compute_ms)                 (stands in for the model's forward/backward)
                  t.update(keys[i], grads)          (Adagrad)

on one table of N rows whose memory tier holds `small_tier` of the table bytes. Every run (one regime, one
depth K, one thread count T) starts alike: reopen the store (empty tier), read its files into the page cache,
run `warmup` untimed batches (get + update, no compute) so the tier holds a steady-state hot set, flush the
dirty rows. Then, in the cold regime only, the engine's files are evicted from the page cache once
(`store.flush()`, the engine's own `evict_page_cache()` = msync + MADV_DONTNEED + POSIX_FADV_DONTNEED of its
mapping, then fsync + POSIX_FADV_DONTNEED of every file under the store). The timed loop then runs over the
next `batches` batches, the same ones for every run; a row missed during the run is read from the device the
first time its page is touched. Whether the misses really went to the device is measured, not assumed: the
process's `read_bytes` in /proc/self/io (bytes the kernel fetched from the block device for this process,
page faults on the engine's mapping included) is reported per engine row read (`disk pages/row`: ~1 means
every row read from the engine went to the device, 0 means all came from the page cache).

With T > 1 trainer threads, thread j runs the same loop (its own look-ahead at depth K) over its own
contiguous slice of the timed batches; `staleness_bound` is 1 in every run (Hogwild-style; one reader never
waits for itself, so T = 1 is unaffected). Throughput is compared with T = 1 in the same run.

Every run reopens the store at the checkpoint written by the load and closes it without a checkpoint: the
slab engine writes an updated row to a fresh slot, so committing a run would repack the rows it touched and
change how many device pages the next run reads per row (by up to 3x with Zipf keys).

Reported per run: batches/s, keys/s, `stats()["stall_seconds"]` (time get/update waited for the engine, as
the store counts it), the loop's own wall time inside lookahead + get + update ("store ms/batch": engine
waits, store-lock waits and the CPU work of the store alike), the memory tier hit rate, lookahead_rows /
lookahead_dropped, engine bytes read and device bytes read. "Disk time hidden" at depth K is
1 - stall(K) / stall(0) from `stall_seconds`, as the issue defines it, and, as a cross-check that does not
depend on what the store counts, from wall time: 1 - (store ms/batch cold - warm)(K) / (store ms/batch
cold - warm)(0), i.e. the share of the time the loop loses to cold rows at K = 0 that it no longer loses.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

import mlkv

from .keys import KeyStream
from .timing import evict_files, warm_files

TABLE = "emb"
LOAD_BATCH = 65536
REGIMES = ("warm", "cold")
ENGINES = ("slab", "rocksdb")  # engines with files: every run reopens the store at its loaded checkpoint
#: the issue's target: in the cold regime, depth 8 hides at least 90 % of the disk time depth 0 stalls on
TARGET_DEPTH, TARGET_HIDDEN = 8, 0.9
COLD_ONCE = (
    "once before the timed loop: store.flush(), engine.evict_page_cache() (msync + MADV_DONTNEED + "
    "POSIX_FADV_DONTNEED), fsync + POSIX_FADV_DONTNEED of every file under the store"
)


@dataclass
class LookaheadRun:
    regime: str
    depth: int
    threads: int
    repeat: int
    batches: int
    seconds: float  # wall time of the timed loop (all threads)
    batches_per_s: float
    keys_per_s: float
    compute_s: float  # summed over threads: time in the simulated compute (sleep)
    lookahead_s: float  # summed over threads: time inside t.lookahead
    get_s: float
    update_s: float
    store_ms_per_batch: float  # (lookahead + get + update) / batches
    stall_seconds: float  # stats()["stall_seconds"]
    stall_ms_per_batch: float
    staleness_waits: int
    staleness_wait_seconds: float
    hit_rate: float
    hits: int
    misses: int
    lookahead_rows: int
    lookahead_dropped: int
    evictions: int
    bytes_read: int  # stats(): rows read from the engine x row bytes
    engine_rows_read: int
    disk_read_bytes: int  # /proc/self/io read_bytes during the loop: what the block device delivered
    disk_pages_per_row: float | None  # disk_read_bytes / 4096 / engine_rows_read
    per_thread_batches: list[int] = field(default_factory=list)


def proc_read_bytes() -> int | None:
    """Bytes this process (all threads) caused to be read from block devices, or None where unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def evict_store(store: mlkv.Store, path: str) -> None:
    """Drop every file of an open store from the page cache (dirty rows written and synced first)."""
    store.flush()
    db = getattr(store._engine, "_db", None)  # RocksDB: rows still in its memtable -> SST files
    if db is not None:
        db.flush()
    store._engine.evict_page_cache()
    evict_files(path)


def load_table(path: str, engine: str, data, cache_bytes: int, bar_opts: dict) -> None:
    """A store at `path` holding the bench's rows in table TABLE, checkpointed."""
    keys = data.keys
    with mlkv.open(path, engine=engine, cache_bytes=cache_bytes) as store:
        t = store.table(TABLE, dim=data.emb.shape[1], optimizer=data.optimizer)
        with tqdm(total=len(keys), desc="lookahead load", unit="row", unit_scale=True, **bar_opts) as bar:
            for i in range(0, len(keys), LOAD_BATCH):
                t.put(keys[i : i + LOAD_BATCH], data.emb[i : i + LOAD_BATCH])
                bar.update(len(keys[i : i + LOAD_BATCH]))
        store.checkpoint({"bench": "lookahead", "step": 0})


def _slices(ids: list[int], threads: int) -> list[list[int]]:
    return [list(part) for part in np.array_split(np.asarray(ids, dtype=np.int64), threads)]


def _trainer(t: mlkv.Table, keys: np.ndarray, ids: list[int], depth: int, compute_s: float, grads, out: dict):
    """The training-like loop over pool batches `ids`; accumulates its timers into `out`."""
    pc = time.perf_counter
    n = len(ids)
    la = gs = us = cs = 0.0
    a = pc()
    for j in range(min(depth, n)):  # pre-announce the first K batches
        t.lookahead(keys[ids[j]])
    la += pc() - a
    for j in range(n):
        k = keys[ids[j]]
        a = pc()
        if depth and j + depth < n:
            t.lookahead(keys[ids[j + depth]])
        b = pc()
        t.get(k)
        c = pc()
        if compute_s > 0:
            time.sleep(compute_s)
        d = pc()
        t.update(k, grads[: len(k)])
        e = pc()
        la += b - a
        gs += c - b
        cs += d - c
        us += e - d
    out.update(lookahead_s=la, get_s=gs, compute_s=cs, update_s=us, batches=n)


def run_once(
    path: str,
    engine: str,
    cache_bytes: int,
    io_threads: int,
    stream: KeyStream,
    regime: str,
    depth: int,
    threads: int,
    compute_ms: float,
    warmup: int,
    batches: int,
    grads: np.ndarray,
    repeat: int = 0,
) -> LookaheadRun:
    """One timed run; see the module docstring for the protocol."""
    keys = stream.keys
    pool = len(keys)
    warm_ids = [i % pool for i in range(warmup)]
    timed = [(warmup + i) % pool for i in range(batches)]
    store = mlkv.open(path, engine=engine, cache_bytes=cache_bytes, staleness_bound=1, io_threads=io_threads)
    try:
        t = store.table(TABLE)
        warm_files(path)
        for i in warm_ids:  # untimed: the tier reaches its steady-state hot set
            t.get(keys[i])
            t.update(keys[i], grads[: len(keys[i])])
        store.flush()
        if regime == "cold":
            evict_store(store, path)
        store.reset_stats()
        outs = [{} for _ in range(threads)]
        parts = _slices(timed, threads)
        go = threading.Barrier(threads + 1)
        errors: list[BaseException] = []

        def body(j: int) -> None:
            try:
                go.wait()
                _trainer(t, keys, parts[j], depth, compute_ms / 1000.0, grads, outs[j])
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        workers = [threading.Thread(target=body, args=(j,), name=f"trainer-{j}") for j in range(threads)]
        for w in workers:
            w.start()
        io0 = proc_read_bytes()
        go.wait()
        start = time.perf_counter()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - start
        io1 = proc_read_bytes()
        if errors:
            raise errors[0]
        s = store.stats()
    finally:
        # no checkpoint: the slab engine writes updated rows to fresh slots, so a committed run would change
        # the file layout (and the device reads per row) that the next run starts from
        store.close(checkpoint=False)
    row_bytes = t.tier.row_bytes
    engine_rows = int(s["bytes_read"]) // row_bytes
    disk = None if io0 is None or io1 is None else io1 - io0
    done = sum(o["batches"] for o in outs)
    store_s = sum(o["lookahead_s"] + o["get_s"] + o["update_s"] for o in outs)
    return LookaheadRun(
        regime=regime,
        depth=depth,
        threads=threads,
        repeat=repeat,
        batches=done,
        seconds=seconds,
        batches_per_s=done / seconds,
        keys_per_s=done * stream.keys.shape[1] / seconds,
        compute_s=sum(o["compute_s"] for o in outs),
        lookahead_s=sum(o["lookahead_s"] for o in outs),
        get_s=sum(o["get_s"] for o in outs),
        update_s=sum(o["update_s"] for o in outs),
        store_ms_per_batch=1000 * store_s / done,
        stall_seconds=float(s["stall_seconds"]),
        stall_ms_per_batch=1000 * float(s["stall_seconds"]) / done,
        staleness_waits=int(s["staleness_waits"]),
        staleness_wait_seconds=float(s["staleness_wait_seconds"]),
        hit_rate=float(s["hit_rate"]),
        hits=int(s["hits"]),
        misses=int(s["misses"]),
        lookahead_rows=int(s["lookahead_rows"]),
        lookahead_dropped=int(s["lookahead_dropped"]),
        evictions=int(s["evictions"]),
        bytes_read=int(s["bytes_read"]),
        engine_rows_read=engine_rows,
        disk_read_bytes=-1 if disk is None else disk,
        disk_pages_per_row=None if disk is None or not engine_rows else disk / 4096 / engine_rows,
        per_thread_batches=[o["batches"] for o in outs],
    )


# ---- summary --------------------------------------------------------------------------------------------
_MEDIAN_FIELDS = (
    "batches_per_s", "keys_per_s", "store_ms_per_batch", "stall_seconds", "stall_ms_per_batch", "hit_rate",
    "lookahead_rows", "lookahead_dropped", "misses", "engine_rows_read", "disk_read_bytes",
    "disk_pages_per_row", "staleness_waits", "seconds",
)  # fmt: skip


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> list[dict]:
    """Median over repeats per (regime, depth, threads), with the ratios to depth 0 and to one thread."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["regime"], r["depth"], r["threads"]), []).append(r)
    rows = {}
    for key, rs in groups.items():
        row = {"regime": key[0], "depth": key[1], "threads": key[2], "repeats": len(rs)}
        for f in _MEDIAN_FIELDS:
            row[f] = _median([r[f] for r in rs])
        rows[key] = row
    for (regime, depth, threads), row in rows.items():
        base = rows.get((regime, 0, threads))
        one = rows.get((regime, depth, 1))
        row["throughput_vs_k0"] = row["batches_per_s"] / base["batches_per_s"] if base else None
        row["stall_vs_k0"] = (
            row["stall_seconds"] / base["stall_seconds"] if base and base["stall_seconds"] > 0 else None
        )
        row["hidden_stall"] = None if row["stall_vs_k0"] is None else 1.0 - row["stall_vs_k0"]
        row["throughput_vs_t1"] = row["batches_per_s"] / one["batches_per_s"] if one else None
        row["disk_ms_per_batch"] = None
        row["hidden_wall"] = None
    for (regime, depth, threads), row in rows.items():  # wall-time disk share: cold minus warm
        if regime != "cold" or ("warm", depth, threads) not in rows:
            continue
        row["disk_ms_per_batch"] = (
            row["store_ms_per_batch"] - rows["warm", depth, threads]["store_ms_per_batch"]
        )
    for (regime, _depth, threads), row in rows.items():
        base = rows.get((regime, 0, threads))
        if row["disk_ms_per_batch"] is not None and base and (base["disk_ms_per_batch"] or 0) > 0:
            row["hidden_wall"] = 1.0 - row["disk_ms_per_batch"] / base["disk_ms_per_batch"]
    order = {r: i for i, r in enumerate(REGIMES)}
    return sorted(rows.values(), key=lambda r: (order.get(r["regime"], 9), r["threads"], r["depth"]))


def verdict(summary: list[dict]) -> dict:
    """The issue's target (cold, depth 8, one thread: >= 90 % hidden), by both definitions of hidden; None
    values where that run is not part of this report."""
    row = next(
        (r for r in summary if (r["regime"], r["depth"], r["threads"]) == ("cold", TARGET_DEPTH, 1)), {}
    )
    out = {"depth": TARGET_DEPTH, "target": TARGET_HIDDEN}
    for name in ("hidden_stall", "hidden_wall"):
        v = row.get(name)
        out[name] = v
        out[name.replace("hidden", "meets")] = None if v is None else v >= TARGET_HIDDEN
    return out


# ---- the whole measurement ------------------------------------------------------------------------------
def run_lookahead_bench(cfg, data, stream: KeyStream, root: str, step, bar_opts: dict) -> dict:
    """Every (regime, depth, threads) run, `cfg.la_repeats` times, rotating the order within a repeat."""
    engine = cfg.la_engine
    path = os.path.join(root, f"lookahead-{engine}")
    small = max(int(cfg.small_tier * data.table_bytes), data.row_bytes)
    step(f"lookahead: load {engine}")
    load_table(path, engine, data, small, bar_opts)
    rng = np.random.default_rng(cfg.seed + 2)
    grads = np.float32(0.01) * rng.standard_normal((stream.keys.shape[1], cfg.dim), dtype=np.float32)
    regimes = list(cfg.la_regimes)
    thread_counts = [1] if cfg.threads == 1 else [1, cfg.threads]
    runs = []
    try:
        for rep in range(cfg.la_repeats):
            for regime in regimes:
                for threads in thread_counts:
                    depths = list(cfg.depths)
                    if rep % 2:  # alternate the order, so drifting load does not favour one depth
                        depths.reverse()
                    for depth in depths:
                        step(f"lookahead: {regime} K={depth} T={threads} ({rep + 1}/{cfg.la_repeats})")
                        run = run_once(
                            path, engine, small, cfg.io_threads, stream, regime, depth, threads,
                            cfg.compute_ms, cfg.la_warmup, cfg.la_batches, grads, rep,
                        )  # fmt: skip
                        runs.append(asdict(run))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    summary = summarize(runs)
    return {
        "config": {
            "engine": engine,
            "depths": list(cfg.depths),
            "threads": thread_counts,
            "compute_ms": cfg.compute_ms,
            "batches": cfg.la_batches,
            "warmup": cfg.la_warmup,
            "regimes": regimes,
            "io_threads": cfg.io_threads,
            "repeats": cfg.la_repeats,
            "staleness_bound": 1,
            "cache_bytes": small,
            "cold": COLD_ONCE,
        },
        "runs": runs,
        "summary": summary,
        "target": verdict(summary),
    }


def steps(cfg) -> int:
    return 1 + cfg.la_repeats * len(cfg.la_regimes) * len(cfg.depths) * (1 if cfg.threads == 1 else 2)


# ---- presentation ---------------------------------------------------------------------------------------
def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def format_lookahead(report: dict, rate) -> str:
    c = report["config"]
    lines = [
        f"look-ahead: {c['engine']} engine, tier {c['cache_bytes'] / 2**20:.1f} MiB, "
        f"compute {c['compute_ms']:g} ms per batch (sleep), {c['batches']} timed batches after "
        f"{c['warmup']} warm-up batches, "
        f"io_threads {c['io_threads']}, staleness_bound 1, median of {c['repeats']} repeat(s)",
        f"cold = {c['cold']}",
        "",
        f"{'regime':<6} {'K':>3} {'T':>2} {'batch/s':>8} {'keys/s':>9} {'xK=0':>6} {'xT=1':>6} "
        f"{'stall s':>8} {'stall/b':>8} {'store/b':>8} {'hit':>6} {'la rows':>8} {'dropped':>8} "
        f"{'disk MiB':>9} {'pg/row':>6} {'hidden':>7} {'hid.wall':>8}",
    ]
    for r in report["summary"]:
        disk = r["disk_read_bytes"]
        lines.append(
            f"{r['regime']:<6} {r['depth']:>3} {r['threads']:>2} {r['batches_per_s']:>8.2f} "
            f"{rate(r['keys_per_s']):>9} {_f(r['throughput_vs_k0'], '6.2f'):>6} "
            f"{_f(r['throughput_vs_t1'], '6.2f'):>6} {r['stall_seconds']:>8.3f} "
            f"{r['stall_ms_per_batch']:>6.1f}ms {r['store_ms_per_batch']:>6.1f}ms {r['hit_rate']:>6.3f} "
            f"{r['lookahead_rows']:>8.0f} {r['lookahead_dropped']:>8.0f} "
            f"{_f(None if disk is None or disk < 0 else disk / 2**20, '9.1f'):>9} "
            f"{_f(r['disk_pages_per_row'], '6.2f'):>6} {_f(r['hidden_stall'], '7.1%'):>7} "
            f"{_f(r['hidden_wall'], '8.1%'):>8}"
        )
    lines += [
        "",
        "stall = stats()['stall_seconds'] (get/update waiting for the engine, as the store counts it); "
        "store/b = loop wall time in lookahead+get+update per batch;",
        "hidden = 1 - stall(K)/stall(0); hid.wall = 1 - (store/b cold - warm)(K) / (store/b cold - warm)(0); "
        "pg/row = device pages read per engine row read.",
    ]
    v = report["target"]
    parts = []
    for name, label in (("hidden_stall", "by stall_seconds"), ("hidden_wall", "by wall time")):
        if v[name] is not None:
            meets = "meets" if v[name.replace("hidden", "meets")] else "MISSES"
            parts.append(f"{label} {v[name]:.1%} ({meets})")
    lines.append(
        f"target: cold, K={v['depth']}, T=1 hides >= {v['target']:.0%} of the K=0 disk time: "
        + ("; ".join(parts) if parts else "not measured in this run")
    )
    return "\n".join(lines)
