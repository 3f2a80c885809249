"""Fault campaigns, rerunnable by anyone (docs/reliability.md has the figures of the last runs):

    python -m mlkv.bench.faults crash --trials 200       # SIGKILL a multi-threaded writer, check recovery
    python -m mlkv.bench.faults powerloss --trials 20    # lost un-fsynced writes and torn tails
    python -m mlkv.bench.faults fuzz --cases 500         # damaged files of closed stores
    python -m mlkv.bench.faults soak --ops 2000          # 4 threads, constant eviction, exact counters

Each prints its tally (cases, failures, wrong rows, outcomes, and for each failure what reproduces it)
and exits 1 if anything failed. `--engine` picks slab, rocksdb or both (default both); `--seed` shifts
every random choice; `--workdir` holds the stores (default: a temp directory, removed afterwards; a failed
case's files are kept there for inspection when --workdir is given). tests/test_fault_campaigns.py runs the
same code with small counts in CI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlkv.bench.faults", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="campaign", required=True)
    for name, count, default, what in (
        ("crash", "--trials", 200, "SIGKILLs (each one trial)"),
        ("powerloss", "--trials", 20, "killed writers, each giving several disk images"),
        ("fuzz", "--cases", 500, "damaged copies"),
        ("soak", "--ops", 2000, "operations per thread"),
    ):
        c = sub.add_parser(name)
        c.add_argument(count, type=int, default=default, help=f"{what} (default {default})")
        c.add_argument("--engine", choices=("slab", "rocksdb", "both"), default="both")
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    engines = ("slab", "rocksdb") if args.engine == "both" else (args.engine,)
    with tempfile.TemporaryDirectory(prefix="mlkv-faults-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.campaign == "crash":
            from .fault_crash import campaign

            tallies = [campaign(args.trials, engines, workdir, seed=args.seed)]
        elif args.campaign == "powerloss":
            from .fault_powerloss import campaign

            tallies = [campaign(args.trials, engines, workdir, seed=args.seed)]
        elif args.campaign == "fuzz":
            from .fault_fuzz import campaign

            tallies = [campaign(args.cases, engines, workdir, seed=args.seed)]
        else:
            from .fault_soak import soak

            tallies = [soak(e, workdir, ops=args.ops, seed=args.seed) for e in engines]
        for t in tallies:
            print(t.summary())
        print(f"{args.campaign}: {time.perf_counter() - start:.0f} s")
    return 1 if any(t.failures for t in tallies) else 0


if __name__ == "__main__":
    sys.exit(main())
