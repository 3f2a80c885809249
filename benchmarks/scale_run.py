"""Scale run: one table far larger than RAM, created, trained, checkpointed, reopened, inspected, verified.

    df -h /tmp                      # ~25 GB free per 100M rows (dim 32 + Adagrad state: 272 B a slot)
    python benchmarks/scale_run.py --rows 100000000 --dim 32 --cache-bytes 2GiB [--path DIR] [--keep]

Phases, each timed, in one process (the CLI commands as subprocesses, as a user runs them):
  load        every one of --rows hashed 64-bit keys gets one Adagrad `update`, in batches of --batch:
              rows created from the table's init and written back through the memory tier (rows/s)
  train       --steps steps of a Zipf(--zipf) id stream (--step-ids ids a step, deduplicated): `get` of
              the step's rows then `update` with gradients, as a sparse training step does (steps/s)
  checkpoint  the first checkpoint after the load: slot files fsynced, the index snapshot written
  reopen      close, evict every file of the store from the page cache (fsync + POSIX_FADV_DONTNEED),
              `mlkv.open` again: recovery is reading the index snapshot and building the key index
  cold get    after the reopen, files evicted: `get` of --cold-keys random known keys (4,096 a call)
              against the device's random 4 KiB read rate at the same depth (O_DIRECT, probed before and
              after; mlkv.bench.device_rate)
  info        `python -m mlkv info --json PATH` (answers from the MANIFEST)
  check       `python -m mlkv check --json PATH`, cold; its verify part in MB/s of slots, next to a
              dd-style sequential read (8 MiB preadv) of the same slab file, cold
Memory: peak RssAnon / RssFile of this process sampled every 0.2 s per phase (a mapped slab's pages are
file-backed RSS); the index's bytes per key from the key index's table. The store is deleted at the end
unless --keep. The last stdout line is the JSON of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

import mlkv
from mlkv.bench.device_rate import cold_get_against_device
from mlkv.durable_files import drop_from_page_cache
from mlkv.engine.key_index import hash64
from mlkv.engine.process_memory import process_memory

CHUNK = 8 << 20


def parse_bytes(text: str) -> int:
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    t = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


class RssSampler:
    """Peak RssAnon / RssFile of this process per phase, sampled on a daemon thread."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> dict[str, int]:
        anon, file = process_memory()
        return {"anon": anon or 0, "file": file or 0}

    def sample(self) -> None:
        now = self.read()
        peak = self.peaks.setdefault(self.phase, {"anon": 0, "file": 0})
        for k, v in now.items():
            peak[k] = max(peak[k], v)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


def store_files(path: str) -> list[str]:
    return [os.path.join(path, f) for f in os.listdir(path)]


def sequential_read(file: str) -> tuple[int, float]:
    """(bytes, seconds) of reading `file` start to end in CHUNK preadv calls into one buffer."""
    buf = memoryview(bytearray(CHUNK))
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        t0, off = time.perf_counter(), 0
        while True:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        return off, time.perf_counter() - t0
    finally:
        os.close(fd)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_cli(*argv: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlkv", *argv], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        sys.exit(f"mlkv {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return dt, json.loads(done.stdout)


def cold_get(store, args) -> dict:
    """`get` of --cold-keys random known keys, files evicted, between two probes of the device's random-read
    rate at the slab's fault-thread depth (mlkv.bench.device_rate)."""
    ids = np.random.default_rng(3).choice(args.rows, min(args.cold_keys, args.rows), replace=False)
    warm = hash64(np.arange(256, dtype=np.uint64))  # untimed: kernels, fault threads
    return cold_get_against_device(store.table("emb"), hash64(ids.astype(np.uint64)), warm_keys=warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--cache-bytes", type=parse_bytes, default=parse_bytes("2GiB"))
    ap.add_argument("--path", default="/tmp/mlkv-scale-run", help="store directory (must not exist)")
    ap.add_argument("--batch", type=int, default=65536, help="keys per load update")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--step-ids", type=int, default=32768, help="ids per training step (before dedup)")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--cold-keys", type=int, default=50_000, help="random known keys the cold get reads")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = ap.parse_args()
    if os.path.exists(args.path):
        sys.exit(f"{args.path} exists: pass a new --path (the run creates and then deletes it)")

    fig: dict = {"rows": args.rows, "dim": args.dim, "cache_bytes": args.cache_bytes, "path": args.path}
    usage = shutil.disk_usage(os.path.dirname(os.path.abspath(args.path)))
    print(f"scale run: {args.rows:,} rows, dim {args.dim}, Adagrad, budget {gib(args.cache_bytes)}; "
          f"{gib(usage.free)} free at {args.path}", flush=True)  # fmt: skip
    rss = RssSampler()
    grads = np.full((args.batch, args.dim), 0.01, dtype=np.float32)
    try:
        store = mlkv.open(args.path, cache_bytes=args.cache_bytes)
        table = store.table("emb", dim=args.dim, optimizer=mlkv.optim.Adagrad(lr=0.05))

        rss.enter("load")
        t0 = time.perf_counter()
        for i in range(0, args.rows, args.batch):
            keys = hash64(np.arange(i, min(i + args.batch, args.rows), dtype=np.uint64))
            table.update(keys, grads[: len(keys)])
            if (i // args.batch) % max(1, args.rows // args.batch // 10) == 0 and i:
                el = time.perf_counter() - t0
                print(f"  load {i:>13,} rows  {i / el / 1e3:7.0f} K rows/s  anon {gib(rss.read()['anon'])}",
                      flush=True)  # fmt: skip
        store.flush()
        fig["load_seconds"] = time.perf_counter() - t0
        fig["load_rows_per_s"] = args.rows / fig["load_seconds"]
        print(f"load: {fig['load_seconds']:.1f} s = {fig['load_rows_per_s'] / 1e3:.0f} K rows/s", flush=True)

        rss.enter("train")
        rng = np.random.default_rng(0)
        step_keys = []
        for _ in range(args.steps):
            ids = (rng.zipf(args.zipf, args.step_ids) - 1) % args.rows
            # hashed ids spread over the key space, hot ones permuted away from the load order
            step_keys.append(np.unique(hash64(hash64(ids.astype(np.uint64)) % np.uint64(args.rows))))
        store.reset_stats()
        t0 = time.perf_counter()
        for keys in step_keys:
            table.get(keys)
            table.update(keys, np.full((len(keys), args.dim), 0.01, dtype=np.float32))
        fig["train_seconds"] = time.perf_counter() - t0
        fig["train_steps_per_s"] = args.steps / fig["train_seconds"]
        st = store.stats()
        fig["train_hit_rate"] = st["hit_rate"]
        fig["train_distinct_keys_per_step"] = float(np.mean([len(k) for k in step_keys]))
        print(f"train: {args.steps} steps of ~{fig['train_distinct_keys_per_step']:.0f} distinct keys in "
              f"{fig['train_seconds']:.1f} s = {fig['train_steps_per_s']:.1f} steps/s, hit rate "
              f"{st['hit_rate']:.3f}", flush=True)  # fmt: skip

        rss.enter("checkpoint")
        t0 = time.perf_counter()
        store.checkpoint({"phase": "scale run"})
        fig["checkpoint_seconds"] = time.perf_counter() - t0
        index = store._engine._tables["emb"].index  # a benchmark may look inside: the key index's table
        fig["index_bytes"] = index.nbytes
        fig["index_bytes_per_key"] = index.nbytes / max(1, len(index))
        st = store.stats()
        fig["stats_rss_anon_bytes"] = st.get("rss_anon_bytes")
        fig["stats_rss_file_bytes"] = st.get("rss_file_bytes")
        print(f"checkpoint: {fig['checkpoint_seconds']:.1f} s; index {gib(index.nbytes)} = "
              f"{fig['index_bytes_per_key']:.1f} B/key", flush=True)  # fmt: skip
        rss.enter("close")
        store.close()
        del table, store, index

        rss.enter("reopen")
        drop_from_page_cache(store_files(args.path))
        t0 = time.perf_counter()
        store = mlkv.open(args.path, cache_bytes=args.cache_bytes)
        fig["reopen_seconds"] = time.perf_counter() - t0
        fig["recovery_seconds"] = store.stats()["recovery_seconds"]
        assert len(store.table("emb")) == args.rows, "reopened store lost rows"
        recovery = f"engine recovery {fig['recovery_seconds']:.2f} s"
        print(f"reopen (cold): {fig['reopen_seconds']:.2f} s ({recovery})", flush=True)
        rss.enter("cold get")
        cold = cold_get(store, args)
        fig["cold_get"] = cold
        print(f"cold get: {cold['rows']:,} random known keys {cold['rows_per_s'] / 1e3:.1f} K rows/s vs the "
              f"device's random 4 KiB reads at depth {cold['depth']} {cold['device_reads_per_s'] / 1e3:.1f} "
              f"K/s: {cold['ratio_device']:.2f}x", flush=True)  # fmt: skip
        store.close(checkpoint=False)
        del store
        rss.enter("cli")

        fig["info_seconds"], info = run_cli("info", "--json", args.path)
        fig["disk_bytes"], fig["disk_allocated_bytes"] = info["disk_bytes"], info["disk_allocated_bytes"]
        assert info["tables"][0]["rows"] == args.rows, info
        disk = f"{gib(fig['disk_allocated_bytes'])} allocated, apparent {gib(fig['disk_bytes'])}"
        print(f"mlkv info: {fig['info_seconds']:.2f} s; on disk {disk}", flush=True)

        slab = os.path.join(args.path, "t0.slab")
        drop_from_page_cache(store_files(args.path))
        fig["check_seconds"], report = run_cli("check", "--json", args.path)
        fig["check_ok"] = report["ok"]
        drop_from_page_cache(store_files(args.path))
        with mlkv.open(args.path, readonly=True) as ro:
            drop_from_page_cache([slab])
            t0 = time.perf_counter()
            problems = ro.verify()
            fig["verify_seconds"] = time.perf_counter() - t0
            slot_bytes = ro._engine._tables["emb"].file.slot_bytes * ro._engine._tables["emb"].n_slots
        fig["verify_mb_per_s"] = slot_bytes / fig["verify_seconds"] / 1e6
        drop_from_page_cache([slab])
        nbytes, dt = sequential_read(slab)
        fig["sequential_read_mb_per_s"] = nbytes / dt / 1e6
        verify, seq = fig["verify_mb_per_s"], fig["sequential_read_mb_per_s"]
        print(f"mlkv check: {fig['check_seconds']:.1f} s, ok={report['ok']}; verify alone "
              f"{fig['verify_seconds']:.1f} s = {verify:.0f} MB/s of slots vs sequential read {seq:.0f} MB/s "
              f"({verify / seq:.2f}x); problems {len(problems)}", flush=True)  # fmt: skip
    finally:
        rss.stop()
        if not args.keep and os.path.exists(args.path):
            shutil.rmtree(args.path)
    fig["peak_rss"] = rss.peaks
    for phase, p in rss.peaks.items():
        print(f"  peak RSS {phase:<10} anon {gib(p['anon'])}  file {gib(p['file'])}")
    goal = args.cache_bytes + fig["index_bytes"] + 2**30
    worst = max(p["anon"] for ph, p in rss.peaks.items() if ph in ("load", "train"))
    print(f"peak anon in load/train {gib(worst)} vs goal budget + index + 1 GiB = {gib(goal)}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
