"""`mlkv bench store`: batched get/update throughput of each engine, beside the memory and disk limits.

For every engine the same table (N hashed keys, dim floats + Adagrad state per row) is loaded, then timed
(`get` is untracked, `get(keys, track=False)`: a loop of reads that are never updated or released is not
how tracked reads are used; the tracked read path is timed as get + release):
  cached get   whole table in the memory tier (cache_bytes > table), after one warm-up pass over all keys
  cached get + release (tracked)   the same, through the staleness accounting a training step pays
  warm get     memory tier = 5% of the table; engine reads served from the OS page cache
  cold get     the same tier, engine files evicted from the page cache before every timed batch
  warm update  Adagrad through the 5% tier (read, apply, write back dirty rows on eviction)
  engine read  the engine alone (no tier), the distinct keys of each batch, page cache warm: what the
               tier's misses cost, and the engine-to-engine comparison without the shared tier cost
Baselines timed in the same run on the same rows and the same key batches: numpy fancy indexing of an
in-memory (N, dim) array (the memory limit), and a memory-mapped flat file of the stored rows, warm and
cold (the disk limit). Cold means random reads: the slot file's whole-file read-in of a cold, small table
(`slot_file.READ_IN_SHARE`) is off for the whole bench, look-ahead included, or the first cold read would
bring the table in sequentially and the rest would be warm. Results go to stdout (a table, or JSON);
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

import mlkv

from ..engine import ENGINES, slot_file
from ..engine.key_index import hash64
from ..errors import InvalidArgumentError
from ..store.store import DEFAULT_IO_THREADS
from . import lookahead_bench
from .keys import DISTRIBUTIONS, KeyStream
from .lookahead_bench import evict_store
from .timing import (
    COLD_METHOD,
    Timing,
    evict_files,
    measure_cold,
    measure_interleaved,
    measure_warm,
    warm_files,
)

TABLE = "emb"
LOAD_BATCH = 65536

#: (numerator, denominator, target) of the ratios the store is held to; None: reported, no target
RATIOS = (
    (("slab", "cached get"), ("numpy", "in-memory gather"), 0.5),
    (("slab", "cold get"), ("memmap", "cold gather"), 0.5),
    (("slab", "warm get, interleaved"), ("rocksdb", "warm get, interleaved"), 10.0),
    (("slab", "warm get"), ("rocksdb", "warm get"), None),
    (("slab", "warm engine read"), ("rocksdb", "warm engine read"), None),
    (("slab", "cached get+release, tracked"), ("numpy", "in-memory gather"), None),
    (("slab", "cached get"), ("memory", "cached get"), None),
)


@dataclass
class BenchConfig:
    keys: int = 1_000_000
    dim: int = 64
    batch: int = 4096
    dist: str = "zipf"
    alpha: float = 1.05
    engines: tuple[str, ...] = ("slab", "rocksdb", "memory")
    seconds: float = 1.0  # per warm measurement
    cold_seconds: float = 3.0  # per cold measurement
    small_tier: float = 0.05  # memory tier of the warm/cold runs, as a fraction of the table bytes
    path: str | None = None
    seed: int = 0
    progress: bool = True
    only: str | None = None  # "store" (the get/update measurements) or "lookahead"; None: both
    # the look-ahead part (lookahead_bench): depths K, trainer threads T, simulated compute per batch
    depths: tuple[int, ...] = (0, 1, 8, 64)
    threads: int = 1
    compute_ms: float = 20.0
    la_batches: int = 48  # timed batches per run
    la_warmup: int = 32  # untimed batches before each run
    la_regimes: tuple[str, ...] = ("warm", "cold")
    la_repeats: int = 1
    la_engine: str = "slab"
    io_threads: int = DEFAULT_IO_THREADS


@dataclass
class Result:
    subject: str  # "numpy", "memmap" or an engine name
    measurement: str
    keys_per_s: float
    hit_rate: float | None = None  # memory-tier hit rate during the timed batches
    batches: int = 0
    seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    note: str = ""
    numpy_keys_per_s: float | None = None  # the numpy gather, timed interleaved with this measurement


def _result(subject: str, measurement: str, t: Timing, hit_rate=None, note="") -> Result:
    samples = [round(s, 1) for s in t.samples]
    return Result(subject, measurement, t.keys_per_s, hit_rate, t.batches, t.seconds, samples, note)


class _Data:
    """The benchmark's rows: embeddings (the in-memory baseline) and the full stored rows' width."""

    def __init__(self, cfg: BenchConfig):
        rng = np.random.default_rng(cfg.seed)
        self.keys = hash64(np.arange(cfg.keys, dtype=np.uint64))  # distinct, spread like hashed ids
        self.emb = rng.standard_normal((cfg.keys, cfg.dim), dtype=np.float32)
        self.emb *= np.float32(0.1)
        self.optimizer = mlkv.optim.Adagrad(lr=0.01)
        self.width = cfg.dim + self.optimizer.state_width(cfg.dim)
        self.row_bytes = 4 * self.width
        self.table_bytes = cfg.keys * self.row_bytes


class _FlatFile:
    """The stored rows ([embedding | Adagrad state], float32) in one flat file, read through a memory map."""

    def __init__(self, path: str, data: _Data, advice: int):
        self.path, self.shape, self.advice = path, (len(data.keys), data.width), advice
        with open(path, "wb") as f:
            for i in range(0, len(data.emb), LOAD_BATCH):
                part = data.emb[i : i + LOAD_BATCH]
                state = np.zeros((len(part), data.width - part.shape[1]), np.float32)
                f.write(np.hstack([part, state]).tobytes())
        self.mm: mmap.mmap | None = None
        self.open()

    def open(self) -> None:
        """A fresh mapping (what np.memmap builds), with the given madvise."""
        self.close()
        with open(self.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mm.madvise(self.advice)
        self.rows = np.frombuffer(self.mm, dtype=np.float32).reshape(self.shape)

    def close(self) -> None:
        if self.mm is not None:
            self.rows = None
            self.mm.close()
            self.mm = None

    def evict(self) -> None:
        self.close()
        evict_files(self.path)
        self.open()


def _baselines(cfg: BenchConfig, data: _Data, stream: KeyStream, root: str, step) -> list[Result]:
    pos, emb = stream.positions, data.emb
    step("numpy in-memory gather")
    out = [
        _result(
            "numpy",
            "in-memory gather",
            measure_warm(lambda i: len(emb[pos[i]]), stream.batches(), cfg.seconds),
            note=f"arr[idx], arr = ({cfg.keys}, {cfg.dim}) float32 in RAM",
        )
    ]
    flat_path = os.path.join(root, "flat.f32")
    for advice, label in ((mmap.MADV_RANDOM, ""), (mmap.MADV_NORMAL, ", MADV_NORMAL")):
        flat = _FlatFile(flat_path, data, advice)
        try:
            gather = lambda i, flat=flat: len(flat.rows[pos[i]])  # noqa: E731
            if not label:
                step("memmap warm gather")
                warm_files(flat_path)
                measure_warm(gather, stream.batches(), cfg.seconds / 4, repeats=1)  # warm-up
                t = measure_warm(gather, stream.batches(), cfg.seconds)
                note = f"mmap of a flat ({cfg.keys}, {data.width}) float32 file, MADV_RANDOM, page cache warm"
                out.append(_result("memmap", "warm gather", t, note=note))
            step(f"memmap cold gather{label}")
            t = measure_cold(gather, stream.batches(), cfg.cold_seconds, flat.evict)
            note = "fresh mapping after eviction" + (" (np.memmap's default advice)" if label else "")
            out.append(_result("memmap", f"cold gather{label}", t, note=note))
        finally:
            flat.close()
    os.remove(flat_path)
    return out


def _reader(table: mlkv.Table, stream: KeyStream):
    """Untracked get of pool batch i (the tracked path is timed separately, with its release)."""

    def run(i: int) -> int:
        return len(table.get(stream.keys[i], track=False))

    return run


def _hit_rate(store: mlkv.Store) -> float:
    return float(store.stats()["hit_rate"])


def _bench_engine(
    engine: str, cfg: BenchConfig, data: _Data, stream: KeyStream, root: str, step, bar_opts
) -> list[Result]:
    path = os.path.join(root, engine)
    on_disk = engine != "memory"
    small = max(int(cfg.small_tier * data.table_bytes), data.row_bytes)
    whole = int(data.table_bytes * 1.25) + (1 << 20)
    keys, dim, out = data.keys, cfg.dim, []
    small_note = f"tier {cfg.small_tier:.0%} of the table"

    step(f"{engine}: load")
    start = time.perf_counter()
    with mlkv.open(path, engine=engine, cache_bytes=small) as store:
        t = store.table(TABLE, dim=dim, optimizer=data.optimizer)
        with tqdm(total=len(keys), desc=f"{engine} load", unit="row", unit_scale=True, **bar_opts) as bar:
            for i in range(0, len(keys), LOAD_BATCH):
                t.put(keys[i : i + LOAD_BATCH], data.emb[i : i + LOAD_BATCH])
                bar.update(len(keys[i : i + LOAD_BATCH]))
        put_s = time.perf_counter() - start
        store.checkpoint({"bench": "store", "step": 0})
        load_s = time.perf_counter() - start
        disk = store.disk_bytes()
    load = Timing(len(keys) / load_s, [len(keys) / load_s], -(-len(keys) // LOAD_BATCH), load_s)
    note = f"put {put_s:.1f}s + checkpoint {load_s - put_s:.1f}s; {disk / 2**20:.0f} MiB on disk"
    out.append(_result(engine, "load (put + checkpoint)", load, note=note))

    step(f"{engine}: cached get")
    with mlkv.open(path, engine=engine, cache_bytes=whole) as store:
        t = store.table(TABLE)
        for i in range(0, len(keys), LOAD_BATCH):  # the warm-up pass: every row into the memory tier
            t.get(keys[i : i + LOAD_BATCH], track=False)
        first = stream.next_index()
        if not np.array_equal(t.get(stream.keys[first], track=False), data.emb[stream.positions[first]]):
            raise mlkv.MlkvError(f"{engine}: get returned rows that differ from the rows put")
        store.reset_stats()
        emb, pos = data.emb, stream.positions
        timing, beside = measure_interleaved(
            [_reader(t, stream), lambda i: len(emb[pos[i]])], stream.batches(), 2 * cfg.seconds, repeats=6
        )
        hits = _hit_rate(store)
        note = f"whole table in the tier; numpy gather interleaved: {_rate(beside.keys_per_s)}/s"
        out.append(_result(engine, "cached get", timing, hits, note))
        out[-1].numpy_keys_per_s = beside.keys_per_s

        def tracked(i: int) -> int:
            n = len(t.get(stream.keys[i]))
            t.release(stream.keys[i])
            return n

        step(f"{engine}: cached get + release")
        store.reset_stats()
        timing = measure_warm(tracked, stream.batches(), cfg.seconds)
        note = "whole table in the tier, staleness accounting on"
        out.append(_result(engine, "cached get+release, tracked", timing, _hit_rate(store), note))

    with mlkv.open(path, engine=engine, cache_bytes=small) as store:
        t = store.table(TABLE)
        get = _reader(t, stream)
        step(f"{engine}: warm get")
        if engine == "rocksdb":
            store._engine.compact()  # RocksDB at its best for reads, not mid background compaction
        if on_disk:
            warm_files(path)
        measure_warm(get, stream.batches(), cfg.seconds / 2, repeats=1)  # warm-up: fill the tier
        store.reset_stats()
        timing = measure_warm(get, stream.batches(), cfg.seconds)
        out.append(_result(engine, "warm get", timing, _hit_rate(store), small_note + ", page cache warm"))

        if on_disk:
            step(f"{engine}: cold get")

            store.reset_stats()
            timing = measure_cold(get, stream.batches(), cfg.cold_seconds, lambda: evict_store(store, path))
            out.append(_result(engine, "cold get", timing, _hit_rate(store), small_note + ", " + COLD_METHOD))
            warm_files(path)

        step(f"{engine}: warm update")
        rng = np.random.default_rng(cfg.seed + 1)
        grads = [np.float32(0.01) * rng.standard_normal((cfg.batch, dim), dtype=np.float32) for _ in range(8)]

        def update(i: int) -> int:
            t.update(stream.keys[i], grads[i % len(grads)])
            return cfg.batch

        measure_warm(update, stream.batches(), cfg.seconds / 4, repeats=1)  # warm-up: dirty rows in the tier
        store.reset_stats()
        timing = measure_warm(update, stream.batches(), cfg.seconds)
        out.append(_result(engine, "warm update", timing, _hit_rate(store), small_note + ", Adagrad"))

        step(f"{engine}: warm engine read")
        store.flush()
        if on_disk:
            warm_files(path)
        distinct = [np.unique(k) for k in stream.keys[: min(len(stream.keys), 64)]]

        def read(i: int) -> int:
            k = distinct[i % len(distinct)]
            store._engine.read(TABLE, k)
            return len(k)

        timing = measure_warm(read, stream.batches(), cfg.seconds)
        note = "engine.read of each batch's distinct keys, no memory tier, page cache warm"
        out.append(_result(engine, "warm engine read", timing, note=note))
    return out


def _warm_get_side_by_side(cfg: BenchConfig, data: _Data, stream: KeyStream, root: str, step) -> list[Result]:
    """Warm get on slab and RocksDB with both stores open, their repeats alternating: the target ratio,
    steady against load that comes and goes between the two engines' own phases. Each repeat starts by
    reading the engine's files again (untimed): this VM pages out file pages idle for ~1 s (a DAMON
    `pageout` scheme), which would turn the rarely read rows of a "warm" run into disk reads."""
    step("slab vs rocksdb: warm get, interleaved")
    small = max(int(cfg.small_tier * data.table_bytes), data.row_bytes)
    paths = [os.path.join(root, e) for e in ("slab", "rocksdb")]
    with (
        mlkv.open(paths[0], engine="slab", cache_bytes=small) as slab,
        mlkv.open(paths[1], engine="rocksdb", cache_bytes=small) as rocks,
    ):
        stores = (slab, rocks)
        rocks._engine.compact()  # the update phase left L0 files and a compaction due: settle it first
        readers = [_reader(s.table(TABLE), stream) for s in stores]
        for path, get in zip(paths, readers, strict=True):
            warm_files(path)
            measure_warm(get, stream.batches(), cfg.seconds / 2, repeats=1)  # warm-up: fill the tier
        for s in stores:
            s.reset_stats()
        rewarm = [lambda p=p: warm_files(p) for p in paths]
        timings = measure_interleaved(readers, stream.batches(), 2 * cfg.seconds, repeats=6, prepare=rewarm)
        note = "as warm get, both stores open, repeats alternating, files re-read before each"
        out = [
            _result(e, "warm get, interleaved", t, _hit_rate(s), note)
            for e, s, t in zip(("slab", "rocksdb"), stores, timings, strict=True)
        ]
    return out


def _ratios(results: list[Result]) -> list[dict]:
    """The RATIOS; against numpy, a measurement timed interleaved with the numpy gather uses that run."""
    by = {(r.subject, r.measurement): r for r in results}
    out = []
    for num, den, target in RATIOS:
        if num in by and den in by:
            name = f"{num[0]} {num[1]} / {den[0]} {den[1]}"
            paired = by[num].numpy_keys_per_s if den[0] == "numpy" else None
            value = by[num].keys_per_s / (paired or by[den].keys_per_s)
            out.append(
                {
                    "name": name + (" (interleaved)" if paired else ""),
                    "value": value,
                    "target": target,
                    "meets": None if target is None else value >= target,
                }
            )
    return out


def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _disk_of(path: str) -> str | None:
    """The device and filesystem holding `path` (longest mount point prefix in /proc/mounts)."""
    path, best = os.path.realpath(path), None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fs = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and (
                    best is None or len(mnt) > len(best[1])
                ):
                    best = (dev, mnt, fs)
    except OSError:
        return None
    return f"{best[0]} ({best[2]}, mounted at {best[1]})" if best else None


def machine(root: str) -> dict:
    return {
        "cpu": _read_first("/proc/cpuinfo", "model name") or platform.processor(),
        "cpus": os.cpu_count(),
        "memory": _read_first("/proc/meminfo", "MemTotal"),
        "disk": _disk_of(root),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "mlkv": mlkv.__version__,
    }


def _check(cfg: BenchConfig) -> None:
    for e in cfg.engines:
        if e not in ENGINES:
            raise InvalidArgumentError(f"unknown engine {e!r}; engines: {', '.join(ENGINES)}")
    if cfg.keys < 1 or cfg.dim < 1 or cfg.batch < 1:
        raise InvalidArgumentError("--keys, --dim and --batch must be positive")
    if cfg.seconds <= 0 or cfg.cold_seconds <= 0 or not 0 < cfg.small_tier <= 1:
        raise InvalidArgumentError("--seconds and --cold-seconds must be > 0 and --small-tier in (0, 1]")
    if cfg.only not in (None, "store", "lookahead"):
        raise InvalidArgumentError(f"--only must be 'store' or 'lookahead', got {cfg.only!r}")
    if not cfg.depths or min(cfg.depths) < 0 or 0 not in cfg.depths:
        raise InvalidArgumentError(f"--lookahead must list depths >= 0 including 0, got {cfg.depths}")
    if cfg.threads < 1 or cfg.io_threads < 1 or cfg.la_repeats < 1 or cfg.la_warmup < 0:
        raise InvalidArgumentError("--threads, --io-threads and --la-repeats must be >= 1, --la-warmup >= 0")
    if cfg.la_batches < cfg.threads or cfg.compute_ms < 0:
        raise InvalidArgumentError("--la-batches must be >= --threads and --compute-ms >= 0")
    if not cfg.la_regimes or any(r not in lookahead_bench.REGIMES for r in cfg.la_regimes):
        raise InvalidArgumentError(
            f"--la-regimes must be a comma list of {', '.join(lookahead_bench.REGIMES)}"
        )
    if cfg.la_engine not in lookahead_bench.ENGINES:
        raise InvalidArgumentError(f"--la-engine must be one of {', '.join(lookahead_bench.ENGINES)}")


def run_store_bench(cfg: BenchConfig) -> dict:
    """Run every measurement; return a JSON-able report (config, machine, results, ratios, lookahead)."""
    _check(cfg)
    do_store, do_lookahead = cfg.only in (None, "store"), cfg.only in (None, "lookahead")
    if cfg.path is not None:
        os.makedirs(cfg.path, exist_ok=True)
    root = tempfile.mkdtemp(prefix="mlkv-bench-", dir=cfg.path)
    bar_opts = {"file": sys.stderr, "disable": not cfg.progress, "leave": False, "dynamic_ncols": True}
    total_steps = 1
    if do_store:
        total_steps += 4 + sum(6 if e == "memory" else 7 for e in cfg.engines)
        total_steps += {"slab", "rocksdb"} <= set(cfg.engines)
    if do_lookahead:
        total_steps += lookahead_bench.steps(cfg)
    results: list[Result] = []
    lookahead = None
    read_in, slot_file.READ_IN_SHARE = slot_file.READ_IN_SHARE, 0.0  # cold = random reads (header)
    try:
        with tqdm(total=total_steps, desc="bench store", unit="step", **bar_opts) as steps:
            started = [False]

            def step(what: str) -> None:
                if started[0]:
                    steps.update(1)
                started[0] = True
                steps.set_postfix_str(what)

            step("generating rows and key batches")
            data = _Data(cfg)
            stream = KeyStream(data.keys, cfg.batch, cfg.dist, cfg.alpha, cfg.seed)
            if do_store:
                results = _baselines(cfg, data, stream, root, step)
                for engine in cfg.engines:
                    results += _bench_engine(engine, cfg, data, stream, root, step, bar_opts)
                if {"slab", "rocksdb"} <= set(cfg.engines):
                    results += _warm_get_side_by_side(cfg, data, stream, root, step)
            if do_lookahead:
                lookahead = lookahead_bench.run_lookahead_bench(cfg, data, stream, root, step, bar_opts)
            steps.update(1)
        info = machine(root)
    finally:
        slot_file.READ_IN_SHARE = read_in
        shutil.rmtree(root, ignore_errors=True)
    config = asdict(cfg)
    config.update(row_bytes=data.row_bytes, table_bytes=data.table_bytes, optimizer="adagrad")
    report = {
        "config": config,
        "machine": info,
        "cold": COLD_METHOD,
        "results": [asdict(r) for r in results],
        "ratios": _ratios(results),
    }
    if lookahead is not None:
        report["lookahead"] = lookahead
    return report


# ---- presentation ---------------------------------------------------------------------------------------
def _rate(x: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def format_report(report: dict) -> str:
    c, m = report["config"], report["machine"]
    dist = f"zipf(alpha={c['alpha']})" if c["dist"] == "zipf" else "uniform"
    lines = [
        f"mlkv bench store: {c['keys']:,} keys, dim {c['dim']} ({c['row_bytes']} B rows incl. Adagrad state, "
        f"{c['table_bytes'] / 2**20:.0f} MiB), batch {c['batch']}, {dist}",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']}; disk {m['disk']}",
        f"cold = {report['cold']}",
        "",
        f"{'subject':<8} {'measurement':<28} {'keys/s':>10} {'hit rate':>9}  note",
    ]
    if not report["results"]:
        lines = lines[:2]  # --only lookahead: no store measurements
    for r in report["results"]:
        hit = "" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(
            f"{r['subject']:<8} {r['measurement']:<28} {_rate(r['keys_per_s']):>10} {hit:>9}  {r['note']}"
        )
    if report["ratios"]:
        lines += ["", f"{'ratio':<62} {'value':>8} {'target':>8}  verdict"]
        for q in report["ratios"]:
            if q["target"] is None:
                target, verdict = "-", "(for reference)"
            else:
                target, verdict = f">= {q['target']}", "meets" if q["meets"] else "MISSES"
            lines.append(f"{q['name']:<62} {q['value']:>8.3f} {target:>8}  {verdict}")
    if report.get("lookahead"):
        lines += ["", lookahead_bench.format_lookahead(report["lookahead"], _rate)]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------
def _engines(text: str) -> tuple[str, ...]:
    names = tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"engines must be a comma list of {', '.join(ENGINES)}, got {text!r}"
        )
    return names


def _count(text: str) -> int:
    """A positive count such as 1000000, 1M or 250k (decimal suffixes)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        n = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 1000000 or 1M, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return n


def _depths(text: str) -> tuple[int, ...]:
    try:
        depths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of depths like 0,1,8,64, got {text!r}"
        ) from None
    if not depths or depths[0] < 0:
        raise argparse.ArgumentTypeError(f"depths must be ints >= 0, got {text!r}")
    return tuple(sorted({0, *depths}))  # ratios are to K = 0, so it is always measured


def _regimes(text: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names or any(r not in lookahead_bench.REGIMES for r in names):
        raise argparse.ArgumentTypeError(f"regimes must be a comma list of warm,cold, got {text!r}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--keys", type=_count, default=d.keys, help="table rows, e.g. 1000000 or 1M (%(default)s)")
    p.add_argument("--dim", type=int, default=d.dim, help="embedding dim (%(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="keys per get/update (%(default)s)")
    p.add_argument("--dist", choices=DISTRIBUTIONS, default=d.dist, help="key distribution (%(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Zipf exponent (%(default)s)")
    p.add_argument(
        "--engines", type=_engines, default=d.engines, help="comma list (default: slab,rocksdb,memory)"
    )
    p.add_argument("--seconds", type=float, default=d.seconds, help="per warm measurement (%(default)s)")
    p.add_argument(
        "--cold-seconds", type=float, default=d.cold_seconds, help="per cold measurement (%(default)s)"
    )
    p.add_argument(
        "--small-tier", type=float, default=d.small_tier, help="small tier, fraction of table (%(default)s)"
    )
    p.add_argument("--path", default=None, help="directory for the stores (default: a temp dir); cleaned up")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--only",
        choices=("store", "lookahead"),
        default=None,
        help="run only the get/update measurements or only the look-ahead loop (default: both)",
    )
    la = p.add_argument_group(
        "look-ahead",
        "a training loop (lookahead(batch i+K), get(batch i), sleep compute-ms, update(batch i)) over "
        "the same key batches, warm and cold, for each depth K and trainer thread count; "
        "ratios to K=0 and T=1",
    )
    la.add_argument(
        "--lookahead", type=_depths, default=d.depths, metavar="K[,K...]",
        help="look-ahead depths in batches; 0 is always included (default: 0,1,8,64)",
    )  # fmt: skip
    la.add_argument(
        "--threads", type=int, default=d.threads, metavar="T",
        help="trainer threads; T > 1 also runs T = 1 for the ratio (%(default)s)",
    )  # fmt: skip
    la.add_argument(
        "--compute-ms", type=float, default=d.compute_ms, help="simulated compute per batch (%(default)s)"
    )
    la.add_argument(
        "--la-batches", type=int, default=d.la_batches, help="timed batches per run (%(default)s)"
    )
    la.add_argument(
        "--la-warmup", type=int, default=d.la_warmup, help="untimed batches before each run (%(default)s)"
    )
    la.add_argument(
        "--la-regimes", type=_regimes, default=d.la_regimes, help="comma list of warm,cold (default: both)"
    )
    la.add_argument(
        "--la-repeats", type=int, default=d.la_repeats, help="runs of every setting; medians (%(default)s)"
    )
    la.add_argument(
        "--la-engine",
        choices=lookahead_bench.ENGINES,
        default=d.la_engine,
        help="engine of the look-ahead store (%(default)s)",
    )
    la.add_argument(
        "--io-threads",
        type=int,
        default=d.io_threads,
        help="the store's look-ahead I/O threads (%(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def main(args: argparse.Namespace) -> int:
    cfg = BenchConfig(
        keys=args.keys,
        dim=args.dim,
        batch=args.batch,
        dist=args.dist,
        alpha=args.alpha,
        engines=args.engines,
        seconds=args.seconds,
        cold_seconds=args.cold_seconds,
        small_tier=args.small_tier,
        path=args.path,
        seed=args.seed,
        progress=not args.no_progress,
        only=args.only,
        depths=args.lookahead,
        threads=args.threads,
        compute_ms=args.compute_ms,
        la_batches=args.la_batches,
        la_warmup=args.la_warmup,
        la_regimes=args.la_regimes,
        la_repeats=args.la_repeats,
        la_engine=args.la_engine,
        io_threads=args.io_threads,
    )
    report = run_store_bench(cfg)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
