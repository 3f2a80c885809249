"""Checkpoint cost follows the changes, not the table size.

A slab table of ROWS rows (dim 16 float32 + SGD: 64-byte rows, 80-byte slots) is loaded with `put` in big
batches and checkpointed (the full write: every row flushed from the memory tier to the slot file, fsynced,
and the whole key -> slot index written). Then, repeatedly, 1% of the rows (random keys) are updated and
checkpointed again. For comparison, a full rewrite (every row put again, then checkpoint) is timed too.
Prints the median of each, the 1%-to-full ratio (target < 10%) and the disk bytes after each phase.

    python benchmarks/checkpoint_cost.py [--rows 5000000] [--path DIR] [--keep] [--profile]

The store is left at --path with --keep, for benchmarks/recovery_time.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import time

import numpy as np

import mlkv
from mlkv.engine.key_index import hash64

DIM = 16
TABLE = "emb"


def hashed_ids(n: int) -> np.ndarray:
    """n distinct 64-bit keys that look like hashed feature ids (splitmix64 of 0..n-1)."""
    with np.errstate(over="ignore"):
        return hash64(np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))


def machine() -> str:
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in model.splitlines() if "Model name" in ln), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def timed(fn, profile: bool = False) -> tuple[float, str]:
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    fn()
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    report = ""
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(18)
        report = out.getvalue()
    return dt, report


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--touch", type=float, default=0.01, help="fraction of rows updated per small checkpoint")
    ap.add_argument("--repeats", type=int, default=5, help="small checkpoints (median reported)")
    ap.add_argument("--full-repeats", type=int, default=2, help="full rewrites after the first checkpoint")
    ap.add_argument("--batch", type=int, default=500_000)
    ap.add_argument("--cache", default="2GiB", help="cache_bytes (default holds every row)")
    ap.add_argument("--path", default="/tmp/mlkv-bench/checkpoint_cost")
    ap.add_argument("--keep", action="store_true", help="leave the store for recovery_time.py")
    ap.add_argument("--profile", action="store_true", help="cProfile the small checkpoints")
    args = ap.parse_args()

    print(f"machine: {machine()}")
    print(f"mlkv {mlkv.__version__}, numpy {np.__version__}, store at {args.path}")
    shutil.rmtree(args.path, ignore_errors=True)
    os.makedirs(os.path.dirname(args.path) or ".", exist_ok=True)
    rng = np.random.default_rng(0)
    keys = hashed_ids(args.rows)
    n_touch = max(1, int(args.rows * args.touch))

    store = mlkv.open(args.path, cache_bytes=args.cache)
    t = store.table(TABLE, dim=DIM, optimizer=mlkv.optim.SGD(lr=0.01))
    print(f"table: {args.rows:,} rows, dim {DIM} float32 + SGD ({4 * DIM} bytes/row), cache {args.cache}")

    def put_all() -> None:
        for i in range(0, args.rows, args.batch):
            k = keys[i : i + args.batch]
            t.put(k, rng.standard_normal((len(k), DIM), dtype=np.float32))

    dt_load, _ = timed(put_all)
    rate = args.rows / dt_load / 1e6
    print(f"load (put, batches of {args.batch:,}): {dt_load:.2f} s ({rate:.2f} M rows/s)")

    full: list[float] = []
    dt, _ = timed(lambda: store.checkpoint({"phase": "load"}))
    full.append(dt)
    print(f"checkpoint #1 (full write, {args.rows:,} rows): {dt:.3f} s; disk {mib(store.disk_bytes())}")

    small: list[float] = []
    profiles: list[str] = []
    for r in range(args.repeats):
        k = rng.choice(keys, n_touch, replace=False)
        t.update(k, rng.standard_normal((n_touch, DIM), dtype=np.float32))
        dt, prof = timed(lambda r=r: store.checkpoint({"phase": "touch", "repeat": r}), args.profile)
        small.append(dt)
        profiles.append(prof)
        print(f"checkpoint after updating {n_touch:,} random rows ({args.touch:.0%}): {dt:.3f} s; "
              f"disk {mib(store.disk_bytes())}")  # fmt: skip

    for r in range(args.full_repeats):
        put_all()
        dt, _ = timed(lambda r=r: store.checkpoint({"phase": "rewrite", "repeat": r}))
        full.append(dt)
        disk = mib(store.disk_bytes())
        print(f"checkpoint after rewriting all {args.rows:,} rows: {dt:.3f} s; disk {disk}")

    m_full, m_small = statistics.median(full), statistics.median(small)
    print()
    print(f"full checkpoint:  first {full[0]:.3f} s, median of {len(full)} {m_full:.3f} s")
    print(f"{args.touch:.0%} checkpoint:    median of {len(small)} {m_small:.3f} s "
          f"(min {min(small):.3f}, max {max(small):.3f})")  # fmt: skip
    ratio, first = m_small / m_full, m_small / full[0]
    print(f"ratio {args.touch:.0%} / full: {ratio:.1%} (target < 10%); vs the first checkpoint: {first:.1%}")
    print(f"disk bytes: {store.disk_bytes():,} ({mib(store.disk_bytes())})")
    for name in sorted(os.listdir(args.path)):
        print(f"  {name:<16} {os.path.getsize(os.path.join(args.path, name)):>14,}")
    if args.profile:
        i = int(np.argsort(small)[len(small) // 2])
        print(f"\nprofile of the median {args.touch:.0%} checkpoint (#{i + 1}):\n{profiles[i]}")
    store.close()
    if not args.keep:
        shutil.rmtree(args.path, ignore_errors=True)


if __name__ == "__main__":
    main()
