"""Recovery time: how long `mlkv.open` takes on a big slab store, against reading its index at disk speed.

Recovery of a slab store = read the MANIFEST, load each table's index snapshot and replay its index log up
to the committed length, build the in-memory key -> slot index, map the slot files (rows are not read).
This times `mlkv.open` cold (every file of the store fsynced and evicted from the page cache with
POSIX_FADV_DONTNEED first) and warm (files cached), and compares with a plain sequential read (dd-like,
4 MiB blocks) of the same index bytes, cold and warm.

    python benchmarks/checkpoint_cost.py --keep       # builds the 5M-row store at the default path
    python benchmarks/recovery_time.py [--path DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from checkpoint_cost import machine, mib  # benchmarks/, the script's own directory

import mlkv

BLOCK = 4 << 20


def evict(path: str) -> None:
    """Write back and drop every file of the store from the page cache."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def index_files(path: str) -> list[tuple[str, int]]:
    """(file, bytes recovery reads) of every table's snapshot and committed log, from the MANIFEST."""
    with open(os.path.join(path, "MANIFEST"), "rb") as f:
        body = json.loads(f.read().partition(b"\n")[2])
    out = []
    for t in body["tables"].values():
        base = os.path.join(path, f"t{t['id']}.{t['gen']}")
        if t["has_snapshot"]:
            out.append((base + ".snap", os.path.getsize(base + ".snap")))
        if t["log_len"]:
            out.append((base + ".log", t["log_len"]))
    return out


def sequential_read(files: list[tuple[str, int]]) -> float:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for name, size in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            left = size
            while left > 0:
                n = os.readv(fd, [view[: min(BLOCK, left)]])
                if n <= 0:
                    break
                left -= n
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def time_open(path: str, readonly: bool) -> tuple[float, float, int]:
    """(wall seconds of mlkv.open, the engine's own recovery_seconds, rows)."""
    t0 = time.perf_counter()
    store = mlkv.open(path, readonly=readonly)
    dt = time.perf_counter() - t0
    try:
        rows = sum(len(store.table(name)) for name in store.tables())
        return dt, store.stats()["recovery_seconds"], rows
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="/tmp/mlkv-bench/checkpoint_cost")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.path, "MANIFEST")):
        sys.exit(f"no slab store at {args.path}: run benchmarks/checkpoint_cost.py --keep first")

    print(f"machine: {machine()}")
    files = index_files(args.path)
    index_bytes = sum(size for _, size in files)
    total = sum(os.path.getsize(os.path.join(args.path, f)) for f in os.listdir(args.path))
    print(f"store {args.path}: {mib(total)} on disk; recovery reads {mib(index_bytes)} of index:")
    for name, size in files:
        print(f"  {os.path.basename(name):<14} {size:>14,} bytes (~{size // 16:,} key/slot pairs)")

    results: dict[str, list[float]] = {}
    engine_s: dict[str, list[float]] = {}
    rows = 0
    for _ in range(args.repeats):
        for mode in ("cold", "warm"):
            if mode == "cold":
                evict(args.path)
            else:
                sequential_read(files)  # make sure the index is cached
            for readonly in (False, True):
                label = f"mlkv.open {mode}{' readonly' if readonly else ''}"
                dt, eng, rows = time_open(args.path, readonly)
                results.setdefault(label, []).append(dt)
                engine_s.setdefault(label, []).append(eng)
                if mode == "cold" and not readonly:
                    evict(args.path)
            if mode == "cold":
                evict(args.path)
            results.setdefault(f"sequential read {mode}", []).append(sequential_read(files))

    print(f"\nrows recovered: {rows:,}; median of {args.repeats} runs each:")
    for label, times in results.items():
        med = statistics.median(times)
        extra = f"  (engine recovery {statistics.median(engine_s[label]):.3f} s)" if label in engine_s else ""
        rate = index_bytes / med / 2**20
        print(f"  {label:<28} {med:7.3f} s  = {rate:8.1f} MiB/s of index{extra}")
    cold_open = statistics.median(results["mlkv.open cold"])
    cold_read = statistics.median(results["sequential read cold"])
    warm_open = statistics.median(results["mlkv.open warm"])
    print(f"\ncold open / cold sequential read of the index: {cold_open / cold_read:.1f}x")
    print(f"warm open: {warm_open:.3f} s ({rows / warm_open / 1e6:.1f} M keys/s)")


if __name__ == "__main__":
    main()
