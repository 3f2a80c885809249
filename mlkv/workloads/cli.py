"""`mlkv train dlrm|kge|gnn`: the flags of the training workloads and the handler that runs them.

Torch-free on purpose: the `mlkv` command builds this parser for every subcommand, and importing torch would
add seconds to `mlkv info`. The handler imports the runner and the workload only when it runs.
Output: per-epoch lines and a summary on stdout (on stderr with --json, whose one JSON object is then the
only, hence last, line of stdout); progress bars on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import replace
from typing import Any

from ..engine import ENGINES
from ..errors import InvalidArgumentError

KG_DATASETS = ("nations", "kinships", "umls", "ml100k-kg", "wordnet")
KGE_MODELS = ("distmult", "complex", "transe")


def _dlrm_flags(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("dlrm options")
    p.add_argument(
        "--data",
        metavar="FILE",
        nargs="+",
        help="Criteo-format training files, plain or .gz, or glob patterns (matches in natural order: "
        "day_2 before day_10), streamed in this order (default: synthetic data)",
    )
    p.add_argument(
        "--test-data",
        metavar="FILE",
        nargs="+",
        help="Criteo-format test files (default: the last of several --data files, else the tail of the "
        "single plain --data file)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share of a single plain --data file's bytes held out for testing (default 0.1)",
    )
    p.add_argument(
        "--data-workers",
        type=int,
        default=1,
        help="processes parsing the data besides one reading it; 0: parse in the training process "
        "(default 1)",
    )
    p.add_argument(
        "--parse-only",
        action="store_true",
        help="only read and parse every --data file and report lines/s (no training)",
    )
    p.add_argument("--max-samples", type=int, help="train on at most this many samples per epoch")
    p.add_argument("--max-test-samples", type=int, help="evaluate on at most this many samples")
    p.add_argument("--dim", type=int, default=16, help="embedding dimension (default 16)")
    g = parser.add_argument_group("synthetic data (when --data is not given; generated once, then cached)")
    g.add_argument("--samples", type=int, default=1_000_000, help="training samples (default 1,000,000)")
    g.add_argument("--test-samples", type=int, default=100_000, help="test samples (default 100,000)")
    g.add_argument(
        "--scale",
        type=float,
        default=0.05,
        help="ids per column = Criteo Kaggle cardinality x SCALE (default 0.05)",
    )
    g.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids (default 1.05)")
    g.add_argument("--data-dir", help="cache of generated files (default $MLKV_DATA_DIR or ~/.cache/mlkv)")


def _kge_flags(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("kge options")
    p.add_argument(
        "--model", choices=KGE_MODELS, default="complex", help="scoring function (default complex)"
    )
    p.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    p.add_argument(
        "--negatives",
        type=int,
        default=256,
        help="entities shared by a batch as corrupted heads and tails (default 256)",
    )
    p.add_argument(
        "--reg", type=float, default=1e-3, help="L2 regularisation of the batch's rows (default 1e-3)"
    )
    p.add_argument(
        "--eval-triples",
        type=int,
        default=2000,
        help="validation triples scored after each epoch (the final test uses all; default 2000)",
    )


def _gnn_flags(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("gnn options")
    p.add_argument("--dim", type=int, default=64, help="node embedding and hidden dimension (default 64)")
    p.add_argument("--layers", type=int, choices=(1, 2), default=2, help="GraphSAGE layers (default 2)")
    p.add_argument(
        "--fanout",
        type=int,
        nargs="+",
        default=[10, 5],
        help="neighbours sampled per node, one number per layer, outermost first (default 10 5)",
    )


# name -> (module, class, help, extra flags, default dataset, datasets, defaults of the shared flags)
WORKLOADS: dict[str, tuple] = {
    "dlrm": (
        "mlkv.workloads.dlrm", "DLRMWorkload", "DLRM on Criteo-format click logs (default: synthetic Criteo)",
        _dlrm_flags, "synthetic", ("synthetic", "criteo"),
        {"epochs": 1, "batch_size": 4096, "lr": 0.05, "cache_bytes": "16MiB"},
    ),
    "kge": (
        "mlkv.workloads.kge", "KGEWorkload", "knowledge-graph embeddings (DistMult, ComplEx, TransE)",
        _kge_flags, "umls", KG_DATASETS,
        {"epochs": 20, "batch_size": 512, "lr": 0.1, "cache_bytes": "50%"},
    ),
    "gnn": (
        "mlkv.workloads.gnn", "GNNWorkload", "GraphSAGE link prediction on the MovieLens-100k graph",
        _gnn_flags, "ml100k", ("ml100k",),
        {"epochs": 5, "batch_size": 1024, "lr": 0.05, "cache_bytes": "50%"},
    ),
}  # fmt: skip


def _shared_flags(p: argparse.ArgumentParser, dataset: str, datasets: tuple, d: dict[str, Any]) -> None:
    p.add_argument("--path", help="store directory (default: a temporary one, deleted at the end)")
    p.add_argument("--dataset", choices=datasets, default=dataset, help=f"dataset (default {dataset})")
    p.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs (default {d['epochs']})")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument(
        "--cache-bytes",
        default=d["cache_bytes"],
        help="memory tier budget: bytes such as 64MiB, or a share of the tables' size (rows with their "
        f"optimizer state) such as 50%% (default {d['cache_bytes'].replace('%', '%%')})",
    )
    p.add_argument(
        "--staleness-bound", type=int, default=0, help="updates a read may miss; 0 is exact (default 0)"
    )
    p.add_argument(
        "--lookahead",
        type=int,
        default=8,
        help="batches the prefetcher announces ahead; 0 turns it off (default 8)",
    )
    p.add_argument("--engine", choices=ENGINES, default="slab", help="storage engine (default slab)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --path")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete this workload's tables and checkpoints in --path and start again (without it, or "
        "--resume, a --path that holds a run is refused and left unchanged)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every STEPS steps (default: at the end of each epoch)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same model in memory with plain PyTorch and compare",
    )
    p.add_argument(
        "--rocksdb-baseline",
        action="store_true",
        help="dlrm: also train the same model with its rows glued to RocksDB by hand (one multi_get per "
        "table before each step, one WriteBatch after: the rocksdb-naive configuration of mlkv bench train)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help=f"samples per step (default {d['batch_size']})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=d["lr"],
        help=f"Adagrad learning rate of the embeddings (default {d['lr']})",
    )
    p.add_argument(
        "--dense-lr", type=float, default=1e-3, help="Adam learning rate of the dense layers (default 1e-3)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; fixed for determinism)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="how the store keeps embeddings (16 bits: half the bytes per weight; default float32)",
    )
    p.add_argument(
        "--trainers",
        type=int,
        default=1,
        help="concurrent trainer threads over one store, Hogwild-style on the tables under "
        "--staleness-bound; dense layers shared (default 1)",
    )
    p.add_argument("--max-steps", type=int, help="stop each epoch after this many steps (smoke tests)")
    p.add_argument(
        "--json", action="store_true", help="print the result as one JSON object (last line of stdout)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument(
        "--log-dir",
        metavar="DIR",
        help="append per-step metrics (loss, samples/s, hit rate, stall, staleness waits) and per-epoch "
        "evaluations to DIR/metrics.jsonl as JSON lines; also TensorBoard scalars in DIR if the "
        "tensorboard package is installed",
    )
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="draw loss and the evaluation metric, hit rate and stall over the steps into FILE, e.g. "
        "train.png (needs matplotlib: pip install 'mlkv[plot]')",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: shard the tables over the ranks (PATH/rank-R-of-N), each rank trains on 1/N "
        "of every batch (dlrm, kge); only rank 0 prints the summary",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --distributed: how long a rank waits for a peer before failing (default 300)",
    )


def add_train_parsers(subparsers) -> argparse.ArgumentParser:
    """Add `train` with its workloads to an argparse subparsers object; handlers are set as `func`."""
    train = subparsers.add_parser(
        "train", help="train DLRM, knowledge-graph embeddings or a GNN on mlkv tables"
    )
    sub = train.add_subparsers(dest="workload", metavar="WORKLOAD")
    for name, (_, _, help_, flags, dataset, datasets, defaults) in WORKLOADS.items():
        about = (
            "Reports accuracy, throughput, hit rate and stall time; "
            "--baseline adds the same model trained in memory with PyTorch."
        )
        p = sub.add_parser(name, help=help_, description=f"{help_}. {about}")
        _shared_flags(p, dataset, datasets, defaults)
        flags(p)
        p.set_defaults(func=cmd_train)
    train.set_defaults(func=lambda _: _usage(train))
    return train


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _validate(args: argparse.Namespace) -> None:
    for flag in ("baseline", "rocksdb_baseline"):
        if args.distributed and getattr(args, flag):
            name = "--" + flag.replace("_", "-")
            raise InvalidArgumentError(f"{name} trains in one process: run it without --distributed")
    if args.rocksdb_baseline and args.workload != "dlrm":
        raise InvalidArgumentError(
            f"--rocksdb-baseline is offered for the dlrm workload (pooled lookups), got {args.workload!r}"
        )
    for flag in ("epochs", "batch_size", "threads", "trainers"):
        if getattr(args, flag) < 1:
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.staleness_bound < 0 or args.lookahead < 0 or args.checkpoint_every < 0:
        raise InvalidArgumentError("--staleness-bound, --lookahead and --checkpoint-every must be >= 0")
    if args.workload == "dlrm" and args.dataset == "criteo" and not args.data:
        raise InvalidArgumentError("--dataset criteo needs --data FILE (a Criteo Kaggle/Terabyte file)")
    if getattr(args, "data_workers", 0) < 0:
        raise InvalidArgumentError(f"--data-workers must be >= 0, got {args.data_workers}")


def make_workload(args: argparse.Namespace):
    module, cls = WORKLOADS[args.workload][:2]
    return getattr(importlib.import_module(module), cls)(args)


def _validate_paths(args: argparse.Namespace) -> None:
    """Flags naming sizes, files and directories, checked before anything is trained or written."""
    from ..errors import InvalidArgumentError, PathNotFoundError
    from ..store.sizes import parse_bytes

    budget = str(args.cache_bytes).strip()
    if budget.endswith("%"):
        try:
            share = float(budget[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 1000:
            raise InvalidArgumentError(f"--cache-bytes {budget}: a share must be in (0%, 1000%]")
    else:
        parse_bytes(args.cache_bytes, "--cache-bytes")
    for flag in ("path", "log_dir"):
        where = getattr(args, flag)
        if where is not None and os.path.exists(where) and not os.path.isdir(where):
            raise InvalidArgumentError(f"--{flag.replace('_', '-')} {where} exists and is not a directory")
    marker = os.path.join(args.path or "", "MLKV")
    if args.resume and args.path is not None and not args.distributed and not os.path.exists(marker):
        raise PathNotFoundError(
            f"--resume: no mlkv store at {args.path} to continue (run once without --resume to start one)"
        )
    if args.plot is not None:
        from .monitor import check_plot_target

        check_plot_target(args.plot)


def config_from_args(args: argparse.Namespace, log=None):
    from .runner import TrainConfig

    return TrainConfig(
        path=args.path, epochs=args.epochs, seed=args.seed, cache_bytes=args.cache_bytes,
        log_dir=args.log_dir, plot=args.plot,
        staleness_bound=args.staleness_bound, lookahead=args.lookahead, engine=args.engine,
        resume=args.resume, overwrite=args.overwrite, dense_lr=args.dense_lr,
        checkpoint_every=args.checkpoint_every, distributed=args.distributed, dist_timeout=args.dist_timeout,
        threads=args.threads, dtype=args.dtype, trainers=args.trainers, max_steps=args.max_steps,
        progress=args.progress, log=log,
    )  # fmt: skip


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary(report: dict[str, Any], metrics: tuple[str, ...]) -> list[str]:
    """Human-readable lines of a report (and of its baseline, if any)."""
    r = report
    shown = "  ".join(f"{m} {r[m]:.4f}" for m in metrics)
    budget = r["cache_bytes"] / max(r["table_bytes"], 1)
    lines = [
        f"{r['workload']} on {r['dataset']}: {r['samples']:,} samples in {r['epochs']} epoch(s)",
        f"mlkv ({r['engine']} engine, staleness bound {r['staleness_bound']}, look-ahead {r['lookahead']}): "
        f"{r['split']} {shown}  final_loss {r['final_loss']:.4f}",
        f"  {r['samples_per_s']:,.0f} samples/s  hit rate {100 * r['hit_rate']:.1f}% "
        f"({r['lookahead_rows']:,} rows brought in by look-ahead)  stall {r['stall_seconds']:.1f} s "
        f"({100 * r['stall_fraction']:.1f}% of {r['train_seconds']:.1f} s)",
        f"  tables: {r['table_rows']:,} rows, {_size(r['table_bytes'])} with optimizer state; "
        f"memory tier budget {_size(r['cache_bytes'])} ({100 * budget:.0f}% of that)",
    ]
    if "bayes_auc" in report:
        lines.append(
            f"  the hidden model's own AUC on the test data (the ceiling): {report['bayes_auc']:.4f}"
        )
    base = report.get("baseline")
    if base:
        diff = "  ".join(f"{m} {base[m]:.4f} ({report[m] - base[m]:+.4f})" for m in metrics)
        lines.append(
            f"in-memory PyTorch baseline: {base['split']} {diff}  final_loss {base['final_loss']:.4f}"
        )
        lines.append(
            f"  {base['samples_per_s']:,.0f} samples/s  (mlkv minus baseline in parentheses; mlkv runs "
            f"{r['samples_per_s'] / max(base['samples_per_s'], 1e-9):.2f}x its speed)"
        )
    naive = report.get("rocksdb_naive")
    if naive:
        diff = "  ".join(f"{m} {naive[m]:.4f}" for m in metrics)
        lines.append(f"rocksdb-naive baseline: {naive['split']} {diff}  final_loss {naive['final_loss']:.4f}")
        lines.append(
            f"  {naive['samples_per_s']:,.0f} samples/s  (mlkv runs "
            f"{r['samples_per_s'] / max(naive['samples_per_s'], 1e-9):.2f}x its speed)"
        )
    return lines


def _headline_metrics(report: dict[str, Any]) -> tuple[str, ...]:
    return tuple(m for m in ("auc", "logloss", "mrr", "hits@1", "hits@3", "hits@10") if m in report)


def _parse_only(workload, args: argparse.Namespace, log) -> int:
    r = workload.parse_only()
    print(f"parsed {r['lines']:,} lines in {r['seconds']:.2f} s: {r['lines_per_s']:,.0f} lines/s after "
          f"the first batch ({r['startup_seconds']:.2f} s to it), {r['workers']} parser process(es)",
          file=log)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    return 0


def baseline(workload, cfg, log, backend: str = "torch") -> dict[str, Any]:
    """Train the same model in memory with plain PyTorch (the report's "baseline" entry), or with rows glued
    to RocksDB by hand (backend "rocksdb-naive": the "rocksdb_naive" entry)."""
    from .runner import train

    what = "in-memory PyTorch" if backend == "torch" else backend
    print(f"training the {what} baseline ...", file=log, flush=True)
    base = train(workload, replace(cfg, resume=False, path=None, log_dir=None, plot=None), backend=backend)
    keep = ("final_loss", "samples_per_s", "split", "train_seconds", *_headline_metrics(base))
    return {k: base[k] for k in keep}


def cmd_train(args: argparse.Namespace) -> int:
    from .runner import train

    _validate_paths(args)
    _validate(args)
    follower = args.distributed and os.environ.get("RANK", "0") != "0"  # torchrun's rank; rank 0 reports
    log = sys.stderr if args.json or follower else sys.stdout
    if follower:
        args.progress = False
    workload = make_workload(args)
    if getattr(args, "parse_only", False):
        return _parse_only(workload, args, log)
    cfg = config_from_args(args, log)
    report = train(workload, cfg, backend="mlkv")
    if follower:
        return 0
    if args.baseline:
        report["baseline"] = baseline(workload, cfg, log)
    if args.rocksdb_baseline:
        report["rocksdb_naive"] = baseline(workload, cfg, log, "rocksdb-naive")
    for line in summary(report, _headline_metrics(report)):
        print(line, file=log)
    if args.json:
        print(json.dumps(report))
    return 0


#: `mlkv train` flags that shape what the command prints, not the run: not options of mlkv.workloads.run
_OUTPUT_ONLY = frozenset({"json", "parse_only"})


def _workload_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `mlkv train NAME`."""
    if name not in WORKLOADS:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"unknown workload {name!r}; workloads: {', '.join(WORKLOADS)}")
    train = add_train_parsers(argparse.ArgumentParser(prog="mlkv").add_subparsers(dest="command"))
    sub = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def workload_options(name: str) -> dict[str, Any]:
    """Every option of workload `name` with its default: the flags of `mlkv train NAME`, dashes as
    underscores (``--cache-bytes`` -> ``cache_bytes``)."""
    args = _workload_parser(name).parse_args([])
    return {k: v for k, v in vars(args).items() if k not in {"func", *_OUTPUT_ONLY}}


def args_for(name: str, options: dict[str, Any]) -> argparse.Namespace:
    """The argparse namespace `mlkv train NAME` would build, with `options` in place of the defaults.

    Raises InvalidArgumentError for an unknown option (listing the valid ones) or a value outside a
    flag's choices (listing them)."""
    from ..errors import InvalidArgumentError

    defaults = workload_options(name)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InvalidArgumentError(
            f"unknown option(s) {', '.join(unknown)} for workload {name!r}; valid options: "
            f"{', '.join(sorted(defaults))}"
        )
    for action in _workload_parser(name)._actions:
        if action.choices is None or action.dest not in options:
            continue
        value = options[action.dest]
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in action.choices]
        if bad:
            raise InvalidArgumentError(
                f"{action.dest}={value!r} for workload {name!r}: expected one of "
                f"{', '.join(map(repr, action.choices))}"
            )
    return argparse.Namespace(
        command="train", workload=name, json=False, parse_only=False, **(defaults | options)
    )


__all__ = [
    "WORKLOADS", "add_train_parsers", "args_for", "baseline", "cmd_train", "config_from_args",
    "make_workload", "summary", "workload_options",
]  # fmt: skip
