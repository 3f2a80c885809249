"""The `mlkv` command: inspect, verify and export stores, and run the benchmarks.

Exit status: 0 success; 1 the store is damaged (a checksum, magic or length test failed); 2 any other error
(no such store, unknown table, store in use, bad arguments). Errors are one line on stderr, never a
traceback. Results go to stdout (`--json` for machine-readable output), progress bars to stderr.
Commands are argparse subparsers, so `mlkv train ...` slots in beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import sys
from collections.abc import Sequence

import mlkv

from .engine import ENGINES
from .errors import CorruptionError, MlkvError, StoreLockedError
from .store.store import lost_marker

_MARKER = "MLKV"  # the JSON file in which every on-disk store names its engine


class UsageError(MlkvError):
    """A command-line mistake: reported on one line, exit status 2."""


# ---- opening stores -------------------------------------------------------------------------------------
def store_engine(path: str) -> str:
    """The engine named by PATH/MLKV, with a clear error when PATH is not an mlkv store."""
    if not os.path.exists(path):
        raise UsageError(f"no such store: {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory, so not an mlkv store")
    marker = os.path.join(path, _MARKER)
    try:
        with open(marker) as f:
            found = json.load(f)
    except FileNotFoundError:
        lost = lost_marker(path)
        if lost is not None:
            raise lost from None
        raise UsageError(f"{path} is not an mlkv store (it has no {_MARKER} file)") from None
    except ValueError as e:
        raise CorruptionError(marker, 0, f"not valid JSON: {e}") from None
    engine = found.get("engine") if isinstance(found, dict) else None
    if engine not in ENGINES:
        raise CorruptionError(marker, 0, f"names engine {engine!r}, expected one of {', '.join(ENGINES)}")
    return engine


def open_readonly(path: str) -> mlkv.Store:
    return mlkv.open(path, readonly=True, create=False, engine=store_engine(path))


def _lock_holder(path: str) -> int | None:
    try:
        with open(os.path.join(path, "LOCK")) as f:
            return int(f.read(32).strip())
    except (OSError, ValueError):
        return None


def _tree_bytes(path: str) -> tuple[int, int]:
    """(apparent size, bytes allocated on the device: st_blocks * 512) of every file under `path`. They
    differ: a slab file grows sparse, and the slots it reserves ahead are allocated but not yet written."""
    apparent = allocated = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile (a writer's compaction or checkpoint)
                st = os.stat(os.path.join(root, name))
                apparent += st.st_size
                allocated += st.st_blocks * 512
    return apparent, allocated


def _checkpoint_of(meta: dict | None) -> dict | None:
    if not meta or "checkpoint_id" not in meta:
        return None
    return {"id": meta["checkpoint_id"], "time": meta.get("time"), "metadata": meta.get("metadata")}


# ---- info -----------------------------------------------------------------------------------------------
def _info_open(path: str, store: mlkv.Store) -> dict:
    tables = []
    for name in store.tables():
        t = store.table(name)
        kind = t.optimizer.kind if t.optimizer else None
        tables.append(
            {"name": name, "dim": t.dim, "dtype": t.dtype, "optimizer": kind, "rows": len(t), "step": t.step}
        )
    apparent, allocated = _tree_bytes(path)
    return {
        "path": path,
        "engine": store.engine_name,
        "in_use_by_pid": None,
        "disk_bytes": apparent,
        "disk_allocated_bytes": allocated,
        "recovery_seconds": store.stats()["recovery_seconds"],
        "checkpoint": _checkpoint_of(store._engine.committed_meta()),
        "tables": tables,
    }


def _schema_rows(meta: dict | None, counts: dict) -> list[dict]:
    """The info table entries of a committed checkpoint's schemas, with `counts` of rows (None: unknown)."""
    tables = []
    for name, schema in sorted(((meta or {}).get("tables") or {}).items()):
        opt = schema.get("optimizer")
        tables.append(
            {
                "name": name,
                "dim": schema.get("dim"),
                "dtype": schema.get("dtype"),
                "optimizer": opt.get("kind") if opt else None,
                "rows": counts.get(name),
                "step": schema.get("step"),
            }
        )
    return tables


def _writer_pid(path: str) -> int | str | None:
    """The pid of the process holding PATH's writer lock ("unknown" if it wrote none), None if no writer:
    a shared lock taken and released at once."""
    from .store.lock import StoreLock

    try:
        StoreLock(path, readonly=True, on_disk=True).release()
    except StoreLockedError:
        return _lock_holder(path) or "unknown"
    return None


def _slab_rows(path: str, state: dict) -> int:
    """Live keys of a table state: the manifest's count, or (a manifest written before mlkv kept one)
    the length of its index, loaded from snapshot and log."""
    if "rows" in state:
        return state["rows"]
    from .engine import index_log

    base = os.path.join(path, f"t{state['id']}.{state['gen']}")
    snap = base + ".snap" if state["has_snapshot"] else None
    return len(index_log.load(snap, base + ".log", state["log_len"])[0])


def _info_slab(path: str) -> dict:
    """A slab store's info from its MANIFEST alone (no index load, no lock): the last committed checkpoint,
    whether or not a writer holds the store."""
    from .engine import open_engine
    from .engine.manifest import read_manifest

    manifest = read_manifest(path)
    if manifest is None:  # a new store, or one whose manifest is lost: the engine's open tells them apart
        open_engine("slab", path, readonly=True).close()
        manifest = {"meta": None, "tables": {}}
    pid = _writer_pid(path)
    counts = {name: _slab_rows(path, st) for name, st in manifest["tables"].items()}
    apparent, allocated = _tree_bytes(path)
    return {
        "path": path,
        "engine": "slab",
        "in_use_by_pid": pid,
        "committed_state_from": "MANIFEST",
        "disk_bytes": apparent,
        "disk_allocated_bytes": allocated,
        "recovery_seconds": None,
        "checkpoint": _checkpoint_of(manifest["meta"]),
        "tables": _schema_rows(manifest["meta"], counts),
    }


def _info_locked(path: str, engine: str) -> dict:
    """What the last committed checkpoint of a RocksDB store says, read without the lock a writer holds
    (RocksDB's read-only open takes no lock and sees the committed state)."""
    from .engine import open_engine

    meta, counts = None, {}
    try:
        eng = open_engine(engine, path, readonly=True)
    except (MlkvError, OSError, Exception) as e:  # rocksdict raises plain Exception
        source = f"unavailable: {e}"
    else:
        try:
            meta, source = eng.committed_meta(), "RocksDB read-only open"
            counts = {name: eng.count(name) for name in eng.tables()}
        finally:
            eng.close()
    apparent, allocated = _tree_bytes(path)
    return {
        "path": path,
        "engine": engine,
        "in_use_by_pid": _lock_holder(path) or "unknown",
        "committed_state_from": source,
        "disk_bytes": apparent,
        "disk_allocated_bytes": allocated,
        "recovery_seconds": None,
        "checkpoint": _checkpoint_of(meta),
        "tables": _schema_rows(meta, counts),
    }


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


_META_WIDTH = 100  # characters of one metadata value shown before it is cut (--json shows everything)


def _metadata_lines(meta) -> list[str]:
    """The checkpoint's user metadata, one top-level key per line, values as compact JSON cut to a line."""
    if not isinstance(meta, dict) or not meta:
        return [f"metadata    {json.dumps(meta)}"]
    lines = []
    for i, (key, value) in enumerate(meta.items()):
        text = json.dumps(value)
        if len(text) > _META_WIDTH:
            text = f"{text[:_META_WIDTH]}... ({len(text):,} characters; --json shows all)"
        lines.append(f"{'metadata' if i == 0 else '':<12}{key}: {text}")
    return lines


def format_info(info: dict) -> str:
    lines = [f"store       {info['path']}", f"engine      {info['engine']}"]
    if info["in_use_by_pid"] is not None:
        lines.append(
            f"in use      by a writer (pid {info['in_use_by_pid']}); showing the last committed checkpoint"
            f" ({info['committed_state_from']})"
        )
    allocated, apparent = _size(info["disk_allocated_bytes"]), _size(info["disk_bytes"])
    lines.append(f"on disk     {allocated} allocated (apparent size {apparent})")
    if info["recovery_seconds"] is not None:
        lines.append(f"recovery    {info['recovery_seconds']:.3f} s (spent by this open loading the index)")
    ck = info["checkpoint"]
    if ck is None:
        lines.append("checkpoint  none yet")
    else:
        when = ""
        if ck["time"] is not None:
            stamp = datetime.datetime.fromtimestamp(ck["time"], tz=datetime.timezone.utc)
            when = f" at {stamp:%Y-%m-%d %H:%M:%S} UTC"
        lines.append(f"checkpoint  {ck['id']}{when}")
        lines += _metadata_lines(ck["metadata"])
    lines.append(f"tables      {len(info['tables'])}")
    if info["tables"]:
        rows = [["name", "dim", "dtype", "optimizer", "rows", "step"]]
        for t in info["tables"]:
            n = "?" if t["rows"] is None else f"{t['rows']:,}"
            rows.append([t["name"], str(t["dim"]), str(t["dtype"]), str(t["optimizer"]), n, str(t["step"])])
        lines += _columns(rows)
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    engine = store_engine(args.path)
    if engine == "slab":
        info = _info_slab(args.path)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    try:
        store = mlkv.open(args.path, readonly=True, create=False, engine=engine)
    except StoreLockedError:
        info = _info_locked(args.path, engine)
    else:
        with store:
            info = _info_open(args.path, store)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---- check ----------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0: sound; 1: damaged, including a store that cannot be opened for damage (report on stdout);
    2: not a store, in use, or a usage error (one line on stderr)."""
    engine, tables, rows = None, [], 0
    try:
        engine = store_engine(args.path)
        with mlkv.open(args.path, readonly=True, create=False, engine=engine) as store:
            tables = store.tables()
            rows = sum(len(store.table(name)) for name in tables)
            print(f"verifying {rows:,} rows in {len(tables)} tables of {args.path} ...", file=sys.stderr)
            problems = store.verify()
    except CorruptionError as e:  # damage found while opening: the manifest, an index log, a header
        problems = [str(e)]
    report = {"path": args.path, "engine": engine, "tables": tables, "rows": rows, "problems": problems}
    if args.json:
        print(json.dumps({**report, "ok": not problems}, indent=2))
    elif problems:
        print(f"DAMAGED: {args.path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"OK: {args.path}: {len(tables)} tables, {rows:,} rows, every checksum verified")
    return 1 if problems else 0


# ---- export ---------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .store.export import EXPORT_FORMATS, export_format

    try:
        fmt = export_format(args.out)
    except ValueError:
        raise UsageError(
            f"cannot tell the format of {args.out}: OUT must end in {', '.join(EXPORT_FORMATS)}"
        ) from None
    if args.format is not None and args.format != fmt:
        raise UsageError(
            f"--format {args.format} disagrees with OUT {args.out} (a {fmt} file by its suffix); "
            f"the suffix decides: name the file {os.path.splitext(args.out)[0]}.{args.format}"
        )
    with open_readonly(args.path) as store:
        if args.table not in store.tables():
            raise UsageError(
                f"no table {args.table!r} in {args.path}; its tables: {', '.join(store.tables()) or 'none'}"
            )
        table = store.table(args.table)
        print(f"exporting table {args.table!r} of {args.path} to {args.out} ...", file=sys.stderr)
        n = table.export(args.out)
    if args.json:
        print(json.dumps({"table": args.table, "rows": n, "dim": table.dim, "out": args.out}))
    else:
        print(f"wrote {n:,} rows of table {args.table!r} (dim {table.dim}) to {args.out}")
    return 0


# ---- reshard ---------------------------------------------------------------------------------------------
def cmd_reshard(args: argparse.Namespace) -> int:
    from .distributed import reshard

    out = reshard(args.src, args.world_size, args.out)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['rows']:,} rows of {len(out['tables'])} tables moved from {out['from']} to {out['to']} "
              f"shards in {args.out} (checkpoint {out['checkpoint_id']})")  # fmt: skip
    return 0


# ---- rollback -------------------------------------------------------------------------------------------
def cmd_rollback(args: argparse.Namespace) -> int:
    """Make kept checkpoint ID the last one (mlkv.rollback); print what it dropped."""
    dropped = mlkv.rollback(args.path, args.id, engine=store_engine(args.path))
    if args.json:
        print(json.dumps({"path": args.path, "checkpoint": args.id, "dropped": [i for i, _ in dropped]}))
    elif not dropped:
        print(f"{args.path}: checkpoint {args.id} is already the last one; nothing dropped")
    else:
        print(f"{args.path}: checkpoint {args.id} is now the last one; dropped {len(dropped)} later:")
        for i, metadata in dropped:
            print(f"  checkpoint {i}  metadata {json.dumps(metadata)}")
    return 0


# name: (module in mlkv.bench with add_arguments(parser) and main(args), help, description)
_BENCHES = {
    "store": (
        "store_bench",
        "batched get/update per engine vs numpy gather and memory-mapped files; look-ahead depths",
        "Batched get/update throughput of each engine, warm and cold, beside numpy in-memory gathers (the "
        "memory limit) and a memory-mapped flat file (the disk limit), all in one run. Cold = fsync + "
        "POSIX_FADV_DONTNEED of the files before every timed batch. Then a training loop (lookahead K "
        "batches ahead, get, simulated compute, update) for each depth K and trainer thread count, warm and "
        "cold (files evicted once before the loop), as ratios to K=0 and T=1 (`--only lookahead` runs just "
        "that part).",
    ),
    "train": (
        "train_bench",
        "one DLRM-like training job: torch in RAM, torch over mmap, naive RocksDB/slab, mlkv side by side",
        "Trains one DLRM-like workload on the same batches under each configuration (torch-memory, "
        "torch-mmap, rocksdb-naive, slab-naive, mlkv-nolookahead, mlkv at staleness 0 and --bound) at "
        "several memory budgets, warm and cold, each run in its own process: samples/s, ratio to "
        "torch-memory, hit rate, stall share, peak anonymous and file-backed RSS.",
    ),
    "staleness": (
        "staleness_bench",
        "throughput, accuracy and lag per staleness bound and trainer count (KGE, DLRM)",
        "Train KGE (and with --dlrm the DLRM workload) at each staleness bound with 1 and 2 concurrent "
        "trainers, all in one run: samples/s, MRR/AUC, staleness waits and the observed lag distribution, "
        "with ratios to s=0 and one trainer.",
    ),
    "churn": (
        "churn_bench",
        "table size and accuracy with admission/expiry on an id stream that keeps growing",
        "Train one model on a stream whose ids are born and die (plus one-off noise ids) with no "
        "admission/expiry, admit_after=2, ttl_steps, max_rows and admission+ttl: rows stored and "
        "progressive AUC per configuration.",
    ),
}


def _run_bench(args: argparse.Namespace) -> int:
    return importlib.import_module(f"{__package__}.bench.{_BENCHES[args.bench][0]}").main(args)


# ---- parser and entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlkv",
        description="Inspect, verify and export mlkv stores; run the benchmarks and training workloads.",
        epilog="exit status: 0 ok, 1 store damaged, 2 any other error",
    )
    p.add_argument("--version", action="version", version=f"mlkv {mlkv.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="engine, tables, size and last checkpoint of a store")
    info.add_argument("path", metavar="PATH", help="store directory")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)

    rollback = sub.add_parser(
        "rollback",
        help="make an older kept checkpoint the last one, dropping the later ones",
        description="Make kept checkpoint ID (see `mlkv info`, or store.checkpoints()) the store's last "
        "checkpoint. The later checkpoints are dropped for good; the ones dropped are printed. Refused "
        "while the store is open elsewhere.",
    )
    rollback.add_argument("path", metavar="PATH", help="store directory")
    rollback.add_argument("id", metavar="ID", type=int, help="id of a kept checkpoint")
    rollback.add_argument("--json", action="store_true", help="print machine-readable JSON")
    rollback.set_defaults(func=cmd_rollback)

    check = sub.add_parser("check", help="verify every checksum; exit 1 if the store is damaged")
    check.add_argument("path", metavar="PATH", help="store directory")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(func=cmd_check)

    export = sub.add_parser(
        "export",
        help="write a table's keys and weights, sorted by key, to a .safetensors, .npy or .pt file",
        description="Write a table's keys (int64) and embeddings (float32, one row per key), sorted by key. "
        "OUT's suffix picks the format: .safetensors (tensors 'keys' and 'weights'), .npy (OUT.npy holds "
        "the weights, OUT.keys.npy the keys; plain numpy loads both), .pt (torch.save of "
        "{'keys': ..., 'weights': ...}). Row i of the weights is the embedding of keys[i].",
    )
    export.add_argument("path", metavar="PATH", help="store directory")
    export.add_argument("table", metavar="TABLE", help="table name")
    export.add_argument("out", metavar="OUT", help="output file: OUT.safetensors, OUT.npy or OUT.pt")
    export.add_argument(
        "--format",
        choices=("safetensors", "npy", "pt"),
        help="the format OUT's suffix must name (a check: the suffix decides; a mismatch is an error)",
    )
    export.add_argument("--json", action="store_true", help="print machine-readable JSON")
    export.set_defaults(func=cmd_export)

    bench = sub.add_parser("bench", help="benchmarks with baselines measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench.set_defaults(func=lambda _: _missing(bench))
    for name, (module, help_, description) in _BENCHES.items():
        one = bench_sub.add_parser(name, help=help_, description=description)
        importlib.import_module(f"{__package__}.bench.{module}").add_arguments(one)
        one.set_defaults(func=_run_bench)

    reshard = sub.add_parser(
        "reshard",
        help="copy a sharded store (mlkv.distributed) into shards for another world size",
        description="Streams every row (embedding and optimizer state) of the sharded store IN, at its last "
        "collective checkpoint, into N new shards in OUT, placed by the documented key hash; the dense "
        "checkpoint goes with them, so `train ... --distributed --resume` continues with N ranks.",
    )
    reshard.add_argument("src", metavar="IN", help="root of the sharded store (rank-R-of-M directories)")
    reshard.add_argument("--world-size", type=int, required=True, metavar="N", help="output shards")
    reshard.add_argument("out", metavar="OUT", help="output root (must not exist or be empty)")
    reshard.add_argument("--json", action="store_true", help="print machine-readable JSON")
    reshard.set_defaults(func=cmd_reshard)

    from .workloads.cli import add_train_parsers

    add_train_parsers(sub)
    return p


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error argparse has already reported
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        return _missing(parser)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that went away is reported here, not at exit
        return rc
    except BrokenPipeError:  # `mlkv ... | head`: the reader has all it wants; stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe
    except CorruptionError as e:
        print(f"mlkv {args.command}: damaged store: {e} (run `mlkv check`)", file=sys.stderr)
        return 1
    except (MlkvError, OSError, KeyError, ValueError) as e:
        print(f"mlkv {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mlkv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
