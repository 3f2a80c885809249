"""`mlkv bench train`: one DLRM-like training workload under every way of holding its table, side by side.

The workload: one embedding table (`--rows` x `--dim`, Zipf(`--zipf`) ids over a random permutation of
the rows), bags of `--bag` ids summed per sample (`--batch` samples per step), an MLP dim-256-64-1 on the
bag, binary cross-entropy against fixed random labels; the table trained by `--optimizer` (Adagrad by
default), the MLP by torch's Adagrad. Every configuration trains on the same batches:

  torch-memory      nn.EmbeddingBag(sparse=True) + torch.optim sparse optimizer: the table in RAM
  torch-mmap        the same, with weight and optimizer state tensors over np.memmap files (paged by the
                    OS, no durability): the cheapest thing a user can do when the table is too big for RAM
  rocksdb-naive     rocksdict multi_get of the batch's distinct rows (embedding + state) before forward, a
                    WriteBatch of the updated rows after, synchronously
  slab-naive        the same loop over mlkv's slab engine directly: no memory tier, no look-ahead
  mlkv-nolookahead  mlkv.torch.EmbeddingBag + SparseOptimizer over a Store with a memory tier of the budget
  mlkv              the same plus a Prefetcher announcing batches `--lookahead` steps ahead, at
                    staleness bound 0 and at `--bound`

Budgets (`--budgets`) are fractions of the table bytes (embedding + optimizer state); "mlkv" also runs
with everything cached (tier larger than the table). Regimes: warm (every file read into the page cache
and `--warmup` untimed steps first) and cold (a restarted job: files dropped from the page cache with
fsync + POSIX_FADV_DONTNEED, no warm-up). Each run is a separate process, so its peak resident memory,
anonymous (RssAnon) and file-backed (RssFile, the pages of mapped files), is its own; with `--repeats`
the runs are repeated in alternating order and medians reported. `--memory-limit` runs them in a cgroup v1
memory group (root only) so a table larger than the page cache may keep can be tried without huge files;
every file is dropped from the page cache before each run, as a page is charged to the group that first
cached it (pages the load left cached would sit outside the limit).
With the cold regime or `--memory-limit` (where misses go to the device) the run also measures how fast
misses are served against what the device can do, in one child process: the device's random 4 KiB read
rate with O_DIRECT at the depth of the slab's fault threads (`device_rate`), then `get` of
COLD_READ_ROWS random rows of the evicted slab through a store with the smallest budget's (empty) tier.
The report goes to stdout (a table, `--json` adds the JSON as the last line); progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..engine.key_index import hash64
from ..engine.naive_rows import key_bytes, rocks_options, write_rows
from ..engine.process_memory import process_memory
from ..errors import InvalidArgumentError, MlkvError
from ..store.sizes import parse_bytes
from .timing import evict_files, warm_files

TABLE = "emb"
LOAD_BATCH = 65536
CONFIGS = ("torch-memory", "torch-mmap", "rocksdb-naive", "slab-naive", "mlkv-nolookahead", "mlkv")
OPTIMIZERS = ("adagrad", "sgd")
REGIMES = ("warm", "cold")
CGROUP_ROOT = "/sys/fs/cgroup/memory"
COLD_READ_ROWS = 20_000  # random rows the cold-read probe gets from the evicted slab
LR = 0.05


@dataclass
class TrainConfig:
    rows: int = 2_000_000
    dim: int = 32
    batch: int = 4096
    bag: int = 8
    zipf: float = 1.1
    optimizer: str = "adagrad"
    steps: int = 30
    warmup: int = 100  # untimed steps (warm runs): the tuning Prefetcher's probes while the tier fills
    threads: int = 2
    budgets: tuple[float, ...] = (0.05, 0.10, 0.25)
    lookahead: int = 8
    bound: int = 2
    regimes: tuple[str, ...] = ("warm",)
    configs: tuple[str, ...] = CONFIGS
    repeats: int = 1
    memory_limit: int | None = None
    path: str | None = None
    seed: int = 0
    progress: bool = True
    tune_threads: bool = True  # mlkv runs: the Prefetcher times n and n - 1 torch threads, keeps the faster


@dataclass
class Run:
    """One configuration to time; `budget` None: not a tiered store, "all": tier larger than the table."""

    config: str
    regime: str
    budget: float | str | None = None
    staleness: int = 0
    lookahead: int = 0

    @property
    def label(self) -> str:
        parts = [self.config]
        if self.budget is not None:
            parts.append("cached" if self.budget == "all" else f"{self.budget:.0%}")
        if self.config == "mlkv":
            parts.append(f"K={self.lookahead} s={self.staleness}")
        return " ".join(parts)


@dataclass
class RunResult:
    config: str
    regime: str
    budget: float | str | None
    staleness: int
    lookahead: int
    label: str
    samples_per_s: float  # median over repeats
    ratio_torch_memory: float | None  # samples/s over torch-memory's (same regime warm), medians
    hit_rate: float | None  # memory-tier hits / lookups (mlkv); None where there is no tier
    stall_share: float | None  # share of the timed wall time spent waiting for rows
    peak_rss_anon: int  # bytes, max over the repeats
    peak_rss_file: int
    cpu_ms_per_step: float | None = None  # CPU time of all the run's threads per timed step, median
    main_cpu_ms_per_step: float | None = None  # of the training thread alone
    lookahead_dropped: int | None = None  # announced rows that found no room in the tier (mlkv), max
    torch_threads: list[int] = field(default_factory=list)  # intra-op threads at the end of each repeat
    repeats: list[float] = field(default_factory=list)  # samples/s of each repeat
    hit_rate_steps: list[float] = field(default_factory=list)  # per timed step, first repeat
    stall_steps: list[float] = field(default_factory=list)
    skipped: str | None = None


# ---- the workload -----------------------------------------------------------------------------------
def table_bytes(cfg: TrainConfig) -> int:
    """Bytes of the table's rows: embedding plus optimizer state (Adagrad: one float per weight)."""
    width = cfg.dim * (2 if cfg.optimizer == "adagrad" else 1)
    return 4 * width * cfg.rows


def make_batches(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids (steps, batch, bag) int64 row numbers, labels (steps, batch) float32), warm-up steps first."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.rows
    total = (cfg.warmup + cfg.steps) * cfg.batch * cfg.bag
    by_rank = rng.permutation(n)
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(total), side="right"), n - 1)
    ids = by_rank[ranks].reshape(cfg.warmup + cfg.steps, cfg.batch, cfg.bag).astype(np.int64)
    labels = (rng.random((cfg.warmup + cfg.steps, cfg.batch)) < 0.25).astype(np.float32)
    return ids, labels


def store_keys(ids: np.ndarray) -> np.ndarray:
    """The store key of row number i: a hashed 64-bit id (as a real job's hashed features), as int64."""
    return hash64(ids.astype(np.uint64)).view(np.int64)


def initial_rows(cfg: TrainConfig, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of the initial table: N(0, 0.01) embeddings (by row number), zero optimizer state."""
    rng = np.random.default_rng([cfg.seed, lo])
    emb = (rng.standard_normal((hi - lo, cfg.dim), dtype=np.float32) * 0.01).astype(np.float32)
    if cfg.optimizer == "adagrad":
        return np.concatenate([emb, np.zeros_like(emb)], axis=1)
    return emb


def _mlkv_optimizer(cfg: TrainConfig):
    import mlkv

    return mlkv.optim.Adagrad(LR) if cfg.optimizer == "adagrad" else mlkv.optim.SGD(LR)


def _torch_sparse_optimizer(cfg: TrainConfig, params):
    import torch

    return (
        torch.optim.Adagrad(params, lr=LR) if cfg.optimizer == "adagrad" else torch.optim.SGD(params, lr=LR)
    )


# ---- preparing the stores (parent process) ----------------------------------------------------------
def prepare(cfg: TrainConfig, root: str, step) -> None:
    """Write the batches and every file-backed copy of the initial table under `root`."""
    ids, labels = make_batches(cfg)
    np.save(os.path.join(root, "ids.npy"), ids)
    np.save(os.path.join(root, "labels.npy"), labels)
    configs = set(cfg.configs)
    width = cfg.dim * (2 if cfg.optimizer == "adagrad" else 1)
    chunks = [(lo, min(lo + LOAD_BATCH, cfg.rows)) for lo in range(0, cfg.rows, LOAD_BATCH)]
    if "torch-mmap" in configs:
        step("torch-mmap files")
        w = np.lib.format.open_memmap(os.path.join(root, "weight.npy"), "w+", np.float32, (cfg.rows, cfg.dim))
        s = None
        if cfg.optimizer == "adagrad":
            s = np.lib.format.open_memmap(
                os.path.join(root, "state.npy"), "w+", np.float32, (cfg.rows, cfg.dim)
            )
        for lo, hi in chunks:
            rows = initial_rows(cfg, lo, hi)
            w[lo:hi] = rows[:, : cfg.dim]
            if s is not None:
                s[lo:hi] = rows[:, cfg.dim :]
        w.flush()
        del w, s
    if "rocksdb-naive" in configs:
        step("rocksdb-naive load")
        from rocksdict import Rdict

        db = Rdict(os.path.join(root, "rocks"), rocks_options())
        for lo, hi in chunks:
            write_rows(db, key_bytes(store_keys(np.arange(lo, hi))), initial_rows(cfg, lo, hi))
        db.flush()
        db.compact_range(None, None)
        db.close()
    if configs & {"slab-naive", "mlkv-nolookahead", "mlkv"}:
        step("slab load")
        import mlkv

        with mlkv.open(os.path.join(root, "slab"), cache_bytes=LOAD_BATCH * 8 * width) as store:
            t = store.table(TABLE, dim=cfg.dim, optimizer=_mlkv_optimizer(cfg))
            for lo, hi in chunks:
                rows = initial_rows(cfg, lo, hi)
                t.put(store_keys(np.arange(lo, hi)), rows[:, : cfg.dim])
            store.checkpoint({"bench": "train"})
    del width


# ---- one run (child process) ------------------------------------------------------------------------
class _Peak:
    def __init__(self):
        self.anon = self.file = 0

    def sample(self) -> None:
        anon, file = process_memory()
        self.anon = max(self.anon, anon or 0)
        self.file = max(self.file, file or 0)


def _mlp(dim: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 1))


class _NaiveTable:
    """The hand-written loop a user glues to a KV store: read distinct rows, train, write them back."""

    def __init__(self, cfg: TrainConfig, read, write):
        self.cfg, self._read, self._write = cfg, read, write
        self.opt = _mlkv_optimizer(cfg)
        self.read_seconds = 0.0
        self.n_step = 0

    def step(self, keys, bag_fn):
        """keys (batch, bag) int64 store keys; bag_fn(bags) -> loss. Returns the loss."""
        import torch

        uk, inv = np.unique(keys, return_inverse=True)
        t0 = time.perf_counter()
        rows = self._read(uk)
        self.read_seconds += time.perf_counter() - t0
        w = torch.from_numpy(np.ascontiguousarray(rows[:, : self.cfg.dim])).requires_grad_(True)
        idx = torch.from_numpy(inv.reshape(keys.shape))
        bags = torch.nn.functional.embedding_bag(idx, w, mode="sum")
        loss = bag_fn(bags)
        self.n_step += 1
        self.opt.apply(rows, w.grad.numpy(), self.n_step)
        t0 = time.perf_counter()
        self._write(uk, rows)
        self.read_seconds += time.perf_counter() - t0
        return loss


def _join_cgroup(path: str | None) -> None:
    if path:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def run_child(spec: dict) -> dict:
    """Time one Run (spec: {"cfg", "run", "root", "cgroup"}); returns its measurements."""
    _join_cgroup(spec.get("cgroup"))
    import torch

    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["cfg"].items()})
    run = Run(**spec["run"])
    root = spec["root"]
    torch.set_num_threads(cfg.threads)
    ids = np.load(os.path.join(root, "ids.npy"))
    labels = torch.from_numpy(np.load(os.path.join(root, "labels.npy")))
    keys = store_keys(ids)
    mlp = _mlp(cfg.dim)
    dense_opt = torch.optim.Adagrad(mlp.parameters(), lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    peak = _Peak()
    warm = run.regime == "warm"
    n_warm = cfg.warmup if warm else 0
    first = cfg.warmup  # timed steps are always batches warmup.., so every run times the same batches
    cleanup = []
    pf = None  # the mlkv runs' Prefetcher
    stats = None  # () -> (hits, lookups, stall seconds): mlkv runs
    stall = None  # () -> seconds spent waiting for rows so far: naive and mlkv runs

    def bag_loss(i):
        def f(bags):
            loss = loss_fn(mlp(bags).squeeze(1), labels[i])
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            return loss

        return f

    if run.config in ("torch-memory", "torch-mmap"):
        from torch import nn

        emb = nn.EmbeddingBag(cfg.rows, cfg.dim, mode="sum", sparse=True)
        if run.config == "torch-memory":
            with torch.no_grad():
                for lo in range(0, cfg.rows, LOAD_BATCH):
                    hi = min(lo + LOAD_BATCH, cfg.rows)
                    emb.weight[lo:hi] = torch.from_numpy(initial_rows(cfg, lo, hi)[:, : cfg.dim])
        files = [
            os.path.join(root, n)
            for n in ("weight.npy", "state.npy")
            if os.path.exists(os.path.join(root, n))
        ]
        if run.config == "torch-mmap":
            (warm_files if warm else evict_files)(root + "/weight.npy")
            if len(files) > 1:
                (warm_files if warm else evict_files)(files[1])
            emb.weight = nn.Parameter(torch.from_numpy(np.load(files[0], mmap_mode="r+")))
        sparse_opt = _torch_sparse_optimizer(cfg, emb.parameters())
        if run.config == "torch-mmap" and cfg.optimizer == "adagrad":
            sparse_opt.state[emb.weight]["sum"] = torch.from_numpy(np.load(files[1], mmap_mode="r+"))
        idx_all = torch.from_numpy(ids)

        def train(i):
            out = emb(idx_all[i])
            bag_loss(i)(out)
            sparse_opt.step()
            sparse_opt.zero_grad()

        batches = range(first - n_warm, cfg.warmup + cfg.steps)
        it = iter(batches)
    elif run.config in ("rocksdb-naive", "slab-naive"):
        width = cfg.dim * (2 if cfg.optimizer == "adagrad" else 1)
        if run.config == "rocksdb-naive":
            from rocksdict import Rdict

            path = os.path.join(root, "rocks")
            (warm_files if warm else evict_files)(path)
            db = Rdict(path, rocks_options())
            cleanup.append(db.close)

            def read(uk):
                vals = db[key_bytes(uk)]
                return np.frombuffer(b"".join(vals), dtype=np.float32).reshape(len(uk), width).copy()

            def write(uk, rows):
                write_rows(db, key_bytes(uk), rows)
        else:
            from ..engine import open_engine

            path = os.path.join(root, "slab")
            engine = open_engine("slab", path)
            cleanup.append(engine.close)  # no checkpoint: the next run starts from the loaded state
            if warm:
                warm_files(path)
            else:
                engine.evict_page_cache()
                evict_files(path)

            def read(uk):
                raw, _ = engine.read(TABLE, uk.view(np.uint64))
                return np.ascontiguousarray(raw).view(np.float32).reshape(len(uk), width)

            def write(uk, rows):
                engine.write(TABLE, uk.view(np.uint64), rows.view(np.uint8))

        naive = _NaiveTable(cfg, read, write)

        def train(i):
            naive.step(keys[i], bag_loss(i))

        it = iter(range(first - n_warm, cfg.warmup + cfg.steps))

        def stall():
            return naive.read_seconds
    else:
        import mlkv
        from mlkv.torch import EmbeddingBag, Prefetcher, SparseOptimizer

        from ..torch.thread_tuner import PROBE_STEPS
        from .lookahead_bench import evict_store

        path = os.path.join(root, "slab")
        tb = table_bytes(cfg)
        cache = 2 * tb + (64 << 20) if run.budget == "all" else max(1 << 20, int(run.budget * tb))
        store = mlkv.open(path, cache_bytes=cache, staleness_bound=run.staleness)
        cleanup.append(lambda: store.close(checkpoint=False))
        table = store.table(TABLE, optimizer=_mlkv_optimizer(cfg))
        if warm:
            warm_files(path)
        emb = EmbeddingBag(table, mode="sum")
        sparse_opt = SparseOptimizer([emb])
        keys_t = torch.from_numpy(keys)

        def train(i):
            out = emb(keys_t[i])
            bag_loss(i)(out)
            sparse_opt.step()
            sparse_opt.zero_grad()

        order = range(first - n_warm, cfg.warmup + cfg.steps)
        if run.lookahead > 0:
            pf = Prefetcher(
                order,
                lambda i: {TABLE: keys_t[i]},
                store,
                depth=run.lookahead,
                # tuned only where the first probe ends in the warm-up; frozen before the timed steps
                tune_threads=cfg.tune_threads and n_warm >= PROBE_STEPS,
            )
            cleanup.append(pf.close)
            it = iter(pf)
        else:
            it = iter(order)
        if run.budget == "all" and warm:  # fully cached: read every row into the tier first
            for lo in range(0, cfg.rows, LOAD_BATCH):
                table.get(store_keys(np.arange(lo, min(lo + LOAD_BATCH, cfg.rows))), track=False)
        if not warm:
            evict_store(store, path)

        def stats():
            s = store.stats()
            return s["hits"], s["hits"] + s["misses"], s["stall_seconds"], s["lookahead_dropped"]

        def stall():
            return stats()[2]

    for _ in range(n_warm):
        train(next(it))
    if pf is not None and pf.tuner is not None:
        pf.tuner.freeze()
    peak.sample()
    hit_steps, stall_steps = [], []
    prev = first_stats = stats() if stats else None
    s0 = stall() if stall else 0.0
    t0, cpu0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(cfg.steps):
        ts = time.perf_counter()
        train(next(it))
        if stats:
            now = stats()
            looked = now[1] - prev[1]
            hit_steps.append((now[0] - prev[0]) / looked if looked else 1.0)
            stall_steps.append((now[2] - prev[2]) / (time.perf_counter() - ts))
            prev = now
        peak.sample()
    wall = time.perf_counter() - t0
    cpu, main_cpu = time.process_time() - cpu0, time.thread_time() - main0
    torch_threads = torch.get_num_threads()  # this thread's: what a tuning Prefetcher kept
    stall_s = (stall() - s0) if stall else None
    hits = dropped = None
    if stats:
        now = stats()
        hits = (now[0] - first_stats[0]) / max(1, now[1] - first_stats[1])
        dropped = now[3] - first_stats[3]
    for f in reversed(cleanup):
        f()
    return {
        "samples_per_s": cfg.batch * cfg.steps / wall,
        "wall_s": wall,
        "cpu_ms_per_step": 1e3 * cpu / cfg.steps,
        "main_cpu_ms_per_step": 1e3 * main_cpu / cfg.steps,
        "hit_rate": hits,
        "lookahead_dropped": dropped,
        "stall_share": stall_s / wall if stall_s is not None else None,
        "peak_rss_anon": peak.anon,
        "peak_rss_file": peak.file,
        "hit_rate_steps": hit_steps,
        "stall_steps": stall_steps,
        "torch_threads": torch_threads,
    }


# ---- the parent: runs, repeats, report --------------------------------------------------------------
def cold_read_child(spec: dict) -> dict:
    """Misses against the device (spec: {"cfg", "root", "cgroup"}): the random-read rate of the slab file
    (O_DIRECT, FAULT_THREADS in flight) before and after `get` of COLD_READ_ROWS random rows with the
    store's files evicted, random reads only (the whole-file read-in of a small cold table is off). Rows
    per second over device reads per second; the rows' distinct pages say how many device reads the get
    needed at least."""
    _join_cgroup(spec.get("cgroup"))
    import mlkv
    from mlkv.engine.slot_file import HEADER_BYTES

    from .device_rate import cold_get_against_device

    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["cfg"].items()})
    path = os.path.join(spec["root"], "slab")
    rng = np.random.default_rng(cfg.seed + 7)
    rows = rng.choice(cfg.rows, min(COLD_READ_ROWS, cfg.rows), replace=False)
    keys = store_keys(rows)
    others = store_keys(np.setdiff1d(np.arange(min(cfg.rows, 2 * len(rows))), rows)[:512])
    cache = max(1 << 20, int(min(cfg.budgets) * table_bytes(cfg)))
    with mlkv.open(path, cache_bytes=cache) as store:
        table = store.table(TABLE, optimizer=_mlkv_optimizer(cfg))
        slab = store._engine._tables[TABLE]  # a benchmark may look inside: the rows' slots
        pages = np.unique((HEADER_BYTES + slab.index.lookup(keys) * slab.file.slot_bytes) // 4096)
        out = cold_get_against_device(table, keys, cfg.batch, warm_keys=others)
    return {**out, "distinct_pages": len(pages)}


def plan(cfg: TrainConfig) -> list[Run]:
    runs: list[Run] = []
    c = set(cfg.configs)
    if "torch-memory" in c:
        runs.append(Run("torch-memory", "warm"))
    for regime in cfg.regimes:
        for name in ("torch-mmap", "rocksdb-naive", "slab-naive"):
            if name in c:
                runs.append(Run(name, regime))
        for b in cfg.budgets:
            if "mlkv-nolookahead" in c:
                runs.append(Run("mlkv-nolookahead", regime, b))
            if "mlkv" in c:
                runs.append(Run("mlkv", regime, b, 0, cfg.lookahead))
                if cfg.bound > 0:
                    runs.append(Run("mlkv", regime, b, cfg.bound, cfg.lookahead))
    if "mlkv" in c:
        runs.append(Run("mlkv", "warm", "all", 0, cfg.lookahead))
    return runs


def _spawn(spec: dict, mode: str = "--child") -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "mlkv.bench.train_bench", mode, json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        what = Run(**spec["run"]).label if "run" in spec else "the cold-read probe"
        raise MlkvError(f"run {what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Cgroup:
    """A cgroup v1 memory child group with a limit, removed on exit (children join it themselves)."""

    def __init__(self, limit: int):
        if not os.path.isdir(CGROUP_ROOT):
            raise InvalidArgumentError(
                f"--memory-limit needs the cgroup v1 memory controller at {CGROUP_ROOT}"
            )
        self.path = os.path.join(CGROUP_ROOT, f"mlkv-bench-{os.getpid()}")
        try:
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
        except PermissionError:
            raise InvalidArgumentError(f"--memory-limit needs root (cannot create {self.path})") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a child still in it (killed run): the group stays, empty later
            os.rmdir(self.path)


def run_train_bench(cfg: TrainConfig) -> dict:
    runs = plan(cfg)
    root = tempfile.mkdtemp(prefix="mlkv-bench-train-", dir=cfg.path)
    group = _Cgroup(cfg.memory_limit) if cfg.memory_limit else None

    def step(what: str) -> None:
        if cfg.progress:
            print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    started = time.time()
    cold_reads = None
    try:
        prepare(cfg, root, step)
        samples: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
        skipped: dict[int, str] = {}
        if cfg.memory_limit:
            for i, r in enumerate(runs):  # in-memory runs that cannot fit: the cgroup would kill them
                # the fully cached tier doubles up to 2x the table and holds old and new while it resizes
                cached = r.config == "mlkv" and r.budget == "all"
                need = 3 if cached else 1 if r.config == "torch-memory" else 0
                if need and need * table_bytes(cfg) > 0.8 * cfg.memory_limit:
                    skipped[i] = "the table does not fit in the memory limit"
        for rep in range(cfg.repeats):
            order = list(range(len(runs)))
            if rep % 2:
                order.reverse()
            for i in order:
                if i in skipped:
                    continue
                step(f"repeat {rep + 1}/{cfg.repeats}: {runs[i].regime} {runs[i].label}")
                if group:
                    # a page is charged to the cgroup that first brought it into the page cache: the pages
                    # the load (or an earlier run) left cached would let the run keep the whole table in
                    # memory outside its limit (torch-mmap read 47K samples/s instead of thrashing at 6.5K)
                    evict_files(root)
                spec = {
                    "cfg": asdict(cfg),
                    "run": asdict(runs[i]),
                    "root": root,
                    "cgroup": group and group.path,
                }
                samples[i].append(_spawn(spec))
        if ("cold" in cfg.regimes or cfg.memory_limit) and set(cfg.configs) & {"mlkv", "mlkv-nolookahead"}:
            step("cold-read probe: device random reads, then mlkv misses")
            cold_reads = _spawn(
                {"cfg": asdict(cfg), "root": root, "cgroup": group and group.path}, "--cold-reads"
            )
    finally:
        if group:
            group.close()
        shutil.rmtree(root, ignore_errors=True)
    base = [i for i, r in enumerate(runs) if r.config == "torch-memory" and i not in skipped]
    base_rate = statistics.median(s["samples_per_s"] for s in samples[base[0]]) if base else None
    results = []
    for i, r in enumerate(runs):
        got = samples[i]
        if not got:
            results.append(
                RunResult(
                    **asdict(r),
                    label=r.label,
                    samples_per_s=0.0,
                    ratio_torch_memory=None,
                    hit_rate=None,
                    stall_share=None,
                    peak_rss_anon=0,
                    peak_rss_file=0,
                    skipped=skipped.get(i),
                )
            )
            continue
        rate = statistics.median(s["samples_per_s"] for s in got)
        stats_run = r.config.startswith("mlkv")

        def med(name, got=got):
            vals = [s[name] for s in got if s[name] is not None]
            return statistics.median(vals) if vals else None

        results.append(
            RunResult(
                **asdict(r),
                label=r.label,
                samples_per_s=rate,
                ratio_torch_memory=rate / base_rate if base_rate else None,
                hit_rate=med("hit_rate"),
                stall_share=med("stall_share"),
                cpu_ms_per_step=med("cpu_ms_per_step"),
                main_cpu_ms_per_step=med("main_cpu_ms_per_step"),
                lookahead_dropped=max((s["lookahead_dropped"] or 0) for s in got) if stats_run else None,
                peak_rss_anon=max(s["peak_rss_anon"] for s in got),
                peak_rss_file=max(s["peak_rss_file"] for s in got),
                repeats=[s["samples_per_s"] for s in got],
                torch_threads=[s.get("torch_threads", cfg.threads) for s in got],
                hit_rate_steps=got[0]["hit_rate_steps"],
                stall_steps=got[0]["stall_steps"],
            )
        )
    return {
        "bench": "train",
        "workload": "dlrm",
        "shape": {k: v for k, v in asdict(cfg).items() if k not in ("path", "progress")},
        "table_bytes": table_bytes(cfg),
        "seconds": time.time() - started,
        "results": [asdict(r) for r in results],
        "cold_reads": cold_reads,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def format_report(report: dict) -> str:
    sh = report["shape"]
    lines = [
        f"train bench: {sh['rows']:,} rows x dim {sh['dim']} ({_mib(report['table_bytes'])} MiB with "
        f"{sh['optimizer']} state), batch {sh['batch']} x bag {sh['bag']}, Zipf {sh['zipf']}, "
        f"{sh['steps']} timed steps, torch threads {sh['threads']}"
        + (" (warm mlkv runs: the Prefetcher tunes them, n or n - 1)" if sh.get("tune_threads") else "")
        + f", repeats {sh['repeats']}"
        + (f", memory limit {_mib(sh['memory_limit'])} MiB" if sh["memory_limit"] else ""),
        f"{'regime':6} {'configuration':28} {'samples/s':>10} {'x torch-mem':>11} {'hit rate':>8} "
        f"{'stall':>6} {'cpu ms/step':>11} {'anon MiB':>9} {'file MiB':>9}",
    ]
    for r in report["results"]:
        if r["skipped"]:
            lines.append(f"{r['regime']:6} {r['label']:28} skipped: {r['skipped']}")
            continue
        ratio = f"{r['ratio_torch_memory']:.2f}" if r["ratio_torch_memory"] is not None else "-"
        hit = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
        stall = f"{r['stall_share']:.0%}" if r["stall_share"] is not None else "-"
        tuned = r.get("torch_threads") or []
        threads = (
            f"  torch threads {'/'.join(map(str, tuned))}"
            if tuned and r["lookahead"] and r["regime"] == "warm" and sh.get("tune_threads")
            else ""
        )
        lines.append(
            f"{r['regime']:6} {r['label']:28} {r['samples_per_s']:>10,.0f} {ratio:>11} {hit:>8} {stall:>6} "
            f"{r['cpu_ms_per_step']:>11.1f} {_mib(r['peak_rss_anon']):>9} {_mib(r['peak_rss_file']):>9}"
            + threads
        )
    lines.append(
        "stall = share of the timed wall time waiting for rows (mlkv: stats()['stall_seconds']; naive: its "
        "reads and writes); cpu = CPU time of all the run's threads per step (steadier than samples/s on a "
        "busy machine); anon/file = peak RssAnon / RssFile of the run's process"
    )
    c = report.get("cold_reads")
    if c:
        lines.append(
            f"cold reads: mlkv get of {c['rows']:,} random rows ({c['distinct_pages']:,} pages) of the "
            f"evicted slab {c['rows_per_s']:,.0f} rows/s; device random 4 KiB reads at depth {c['depth']} "
            f"({'O_DIRECT' if c['direct'] else 'page cache dropped'}) {c['device_reads_per_s']:,.0f}/s: "
            f"{c['ratio_device']:.2f}x the device"
        )
    return "\n".join(lines)


def plot(report: dict, out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib)"
        ) from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    res = [r for r in report["results"] if not r["skipped"]]
    budgets = sorted({r["budget"] for r in res if isinstance(r["budget"], float)})
    for r in res:
        if not isinstance(r["budget"], float):
            style = ":" if r["regime"] == "cold" else "--"
            if r["budget"] is None:
                a.axhline(
                    r["samples_per_s"], linestyle=style, linewidth=1, label=f"{r['regime']} {r['label']}"
                )
    curves: dict[str, list] = {}
    for r in res:
        if isinstance(r["budget"], float):
            name = f"{r['regime']} {r['config']}" + (f" s={r['staleness']}" if r["config"] == "mlkv" else "")
            curves.setdefault(name, []).append((r["budget"], r["samples_per_s"]))
    for name, pts in curves.items():
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a.set_xlabel("memory tier budget (fraction of table bytes)")
    a.set_ylabel("samples/s")
    a.set_xticks(budgets)
    a.legend(fontsize=7)
    a.set_title("throughput vs budget")
    for r in res:
        if r["hit_rate_steps"]:
            b.plot(r["hit_rate_steps"], label=f"hit {r['regime']} {r['label']}")
            b.plot(r["stall_steps"], linestyle="--", label=f"stall {r['regime']} {r['label']}")
    b.set_xlabel("timed step")
    b.set_ylabel("hit rate / stall share")
    b.legend(fontsize=6)
    b.set_title("hit rate and stall over steps")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ---- command line -----------------------------------------------------------------------------------
def _fractions(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions such as 0.05,0.1, got {text!r}"
        ) from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"budgets must be fractions in (0, 1], got {text!r}")
    return vals


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        vals = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [v for v in vals if v not in allowed]
        if not vals or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}"
            )
        return vals

    return parse


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--rows", type=_positive, default=d.rows, help=f"table rows (default {d.rows:,})")
    p.add_argument("--dim", type=_positive, default=d.dim, help=f"embedding dim (default {d.dim})")
    p.add_argument("--batch", type=_positive, default=d.batch, help=f"samples per step (default {d.batch})")
    p.add_argument("--bag", type=_positive, default=d.bag, help=f"ids per sample (default {d.bag})")
    p.add_argument("--zipf", type=float, default=d.zipf, help=f"Zipf exponent of the ids (default {d.zipf})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="the table's optimizer")
    p.add_argument(
        "--steps", type=_positive, default=d.steps, help=f"timed steps per run (default {d.steps})"
    )
    p.add_argument(
        "--warmup", type=int, default=d.warmup, help=f"untimed steps first, warm runs ({d.warmup})"
    )
    p.add_argument("--threads", type=_positive, default=d.threads, help="torch intra-op threads")
    p.add_argument(
        "--budgets", type=_fractions, default=d.budgets, help="tier budgets, fractions of table bytes"
    )
    p.add_argument("--lookahead", type=int, default=d.lookahead, help="look-ahead depth K of the mlkv runs")
    p.add_argument(
        "--bound", type=int, default=d.bound, help="the staleness bound of the second mlkv run (0: none)"
    )
    p.add_argument("--regimes", type=_choices(REGIMES), default=d.regimes, help="warm,cold (default warm)")
    p.add_argument(
        "--configs", type=_choices(CONFIGS), default=d.configs, help="subset of " + ",".join(CONFIGS)
    )
    p.add_argument(
        "--repeats", type=_positive, default=d.repeats, help="repeats (alternating order; medians)"
    )
    p.add_argument("--memory-limit", type=_bytes, default=None, help="run in a cgroup v1 memory group (root)")
    p.add_argument("--workload", choices=("dlrm",), default="dlrm", help="the training workload")
    p.add_argument("--path", default=None, help="directory for the temporary stores (default: system temp)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--plot", default=None, metavar="OUT.png", help="throughput and hit-rate plots (matplotlib)"
    )
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--no-tune-threads",
        action="store_true",
        help="mlkv runs keep --threads torch threads (default: the Prefetcher keeps n or n - 1, the faster)",
    )


def main(args: argparse.Namespace) -> int:
    if args.warmup < 0 or args.lookahead < 0 or args.bound < 0:
        raise InvalidArgumentError("--warmup, --lookahead and --bound must be >= 0")
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InvalidArgumentError(
                "--plot needs matplotlib, which is not installed (pip install matplotlib)"
            ) from None
    cfg = TrainConfig(
        rows=args.rows, dim=args.dim, batch=args.batch, bag=args.bag, zipf=args.zipf,
        optimizer=args.optimizer, steps=args.steps, warmup=args.warmup, threads=args.threads,
        budgets=args.budgets, lookahead=args.lookahead, bound=args.bound, regimes=args.regimes,
        configs=args.configs, repeats=args.repeats, memory_limit=args.memory_limit, path=args.path,
        seed=args.seed, progress=not args.no_progress, tune_threads=not args.no_tune_threads,
    )  # fmt: skip
    report = run_train_bench(cfg)
    print(format_report(report))
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(run_child(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--cold-reads":
        print(json.dumps(cold_read_child(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: mlkv bench train (this module's own entry point is for its child runs)")
