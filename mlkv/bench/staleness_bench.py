"""`mlkv bench staleness`: what a staleness bound buys — throughput and accuracy per bound and trainer count.

Each case trains one workload (`mlkv train kge|dlrm`, the same flags and data as the command line) from a
fresh store with staleness bound s and N concurrent trainers, all cases in one run on the same batches:
samples/s, the final metric (KGE: filtered MRR; DLRM: AUC), staleness waits, asynchronous updates and the
observed lag distribution (at each tracked read, how many other holders — trainers' outstanding reads and
queued updates — held the row: an upper bound on the updates the read missed). Ratios are to the case
s=0 with one trainer of the same workload. "inf" is an unbounded bound (no read ever waits).

Measured, not asserted: on a 2-core machine two trainers compete with the applier, look-ahead and
write-back threads for the cores; the report says what it got (docs/staleness.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

UNBOUNDED = 1 << 30  # "inf": a bound no lag reaches
DEFAULT_BOUNDS = "0,1,2,4,16,inf"
KGE_DATASETS = ("umls", "kinships", "ml100k-kg", "wordnet", "nations")


def _bounds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        value = UNBOUNDED if part in ("inf", "unbounded") else int(part)
        if value < 0:
            raise argparse.ArgumentTypeError(f"bounds must be >= 0 or 'inf', got {part!r}")
        out.append(value)
    return out


def _counts(text: str) -> list[int]:
    out = [int(x) for x in text.split(",")]
    if any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"trainer counts must be >= 1, got {text!r}")
    return out


def _cases(args) -> list[tuple[str, list[str]]]:
    """(label, `mlkv train` argv) per workload to measure."""
    out = []
    for ds in args.datasets.split(","):
        if ds not in KGE_DATASETS:
            raise argparse.ArgumentTypeError(
                f"unknown KGE dataset {ds!r}; choose from {', '.join(KGE_DATASETS)}"
            )
        out.append((f"kge/{ds}", ["kge", "--dataset", ds, "--epochs", str(args.epochs),
                                  "--cache-bytes", args.kge_cache_bytes]))  # fmt: skip
    if args.dlrm:
        out.append(("dlrm", ["dlrm", "--epochs", "1", "--samples", str(args.dlrm_samples),
                             "--test-samples", str(max(args.dlrm_samples // 10, 1000)),
                             "--cache-bytes", args.dlrm_cache_bytes]))  # fmt: skip
    return out


def run_case(argv: list[str], bound: int, trainers: int, seed: int) -> dict[str, Any]:
    """Train once (fresh temporary store) and return the report with the store's staleness figures."""
    from mlkv.cli import build_parser
    from mlkv.workloads.cli import config_from_args, make_workload
    from mlkv.workloads.runner import train

    path = tempfile.mkdtemp(prefix="mlkv-staleness-")
    try:
        args = build_parser().parse_args(
            [
                "train",
                *argv,
                "--staleness-bound",
                str(bound),
                "--trainers",
                str(trainers),
                "--seed",
                str(seed),
                "--path",
                path,
                "--no-progress",
            ]
        )
        cfg = config_from_args(args, open(os.devnull, "w"))  # noqa: SIM115 - closed with the run
        try:
            report = train(make_workload(args), cfg, backend="mlkv")
        finally:
            cfg.log.close()
        return report
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _metric(report: dict) -> tuple[str, float | None]:
    for name in ("mrr", "auc"):
        if name in report:
            return name, report[name]
    return "metric", None


def run(args) -> dict[str, Any]:
    rows = []
    cases = _cases(args)
    if cases:  # untimed: compiles the kernels and reads the data once, so the first case is not penalised
        run_case([*cases[0][1], "--max-steps", "3"], 1, 1, args.seed)
    for label, argv in cases:
        for trainers in args.trainers:
            for bound in args.bounds:
                start = time.perf_counter()
                rep = run_case(argv, bound, trainers, args.seed)
                metric, value = _metric(rep)
                row = {
                    "workload": label,
                    "bound": "inf" if bound == UNBOUNDED else bound,
                    "trainers": trainers,
                    "samples_per_s": rep["samples_per_s"],
                    "metric": metric,
                    "value": value,
                    "final_loss": rep["final_loss"],
                    "staleness_waits": rep.get("staleness_waits"),
                    "staleness_wait_seconds": rep.get("staleness_wait_seconds"),
                    "async_updates": rep.get("async_updates"),
                    "lag_hist": rep.get("staleness_lag_hist"),
                    "hit_rate": rep.get("hit_rate"),
                    "seconds": time.perf_counter() - start,
                }
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
    for row in rows:  # ratios to s=0, one trainer, same workload
        base = next(
            (r for r in rows if r["workload"] == row["workload"] and r["bound"] == 0 and r["trainers"] == 1),
            None,
        )
        if base and base["samples_per_s"] and row["samples_per_s"]:
            row["speedup"] = row["samples_per_s"] / base["samples_per_s"]
            row["metric_delta"] = (row["value"] - base["value"]) if row["value"] is not None else None
    return {"cores": os.cpu_count(), "seed": args.seed, "rows": rows}


def _lag_summary(hist: list[int] | None) -> str:
    if not hist or not sum(hist):
        return "-"
    total = sum(hist)
    mean = sum(i * n for i, n in enumerate(hist)) / total
    worst = max(i for i, n in enumerate(hist) if n)
    return f"mean {mean:.2f} max {worst}{'+' if worst == len(hist) - 1 else ''}"


def _line(r: dict) -> str:
    value = "-" if r["value"] is None else f"{r['value']:.4f}"
    return (
        f"{r['workload']:<14} s={r['bound']!s:<4} trainers={r['trainers']}  "
        f"{r['samples_per_s']:>10,.0f}/s  {r['metric']} {value}  waits {r['staleness_waits'] or 0}  "
        f"async {r['async_updates'] or 0}  lag {_lag_summary(r['lag_hist'])}"
    )


def format_report(report: dict) -> str:
    head = (f"{'workload':<14} {'s':>4} {'N':>2} {'samples/s':>11} {'x s0/N1':>8} {'metric':>7} "
            f"{'value':>7} {'delta':>8} {'waits':>7} {'lag':>18}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        delta = r.get("metric_delta")
        lines.append(
            f"{r['workload']:<14} {r['bound']!s:>4} {r['trainers']:>2} {r['samples_per_s']:>11,.0f} "
            f"{r.get('speedup', float('nan')):>8.2f} {r['metric']:>7} {value:>7} "
            f"{'-' if delta is None else f'{delta:+.4f}':>8} {r['staleness_waits'] or 0:>7} "
            f"{_lag_summary(r['lag_hist']):>18}"
        )
    return "\n".join(lines)


def plot(report: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 3.6 * len(workloads)), squeeze=False)
    for ax_row, w in zip(axes, workloads, strict=True):
        mine = [r for r in rows if r["workload"] == w]
        labels = [str(b) for b in dict.fromkeys(r["bound"] for r in mine)]
        for n in sorted({r["trainers"] for r in mine}):
            rs = [r for r in mine if r["trainers"] == n]
            x = [labels.index(str(r["bound"])) for r in rs]
            ax_row[0].plot(x, [r["samples_per_s"] for r in rs], "o-", label=f"{n} trainer(s)")
            ax_row[1].plot(x, [r["value"] for r in rs], "o-", label=f"{n} trainer(s)")
        for ax, title in zip(ax_row[:2], ("samples/s", mine[0]["metric"]), strict=True):
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel("staleness bound s")
            ax.set_title(f"{w}: {title}")
            ax.legend()
        for r in mine:
            hist = r["lag_hist"] or []
            if sum(hist):
                total = sum(hist)
                ax_row[2].plot(range(len(hist)), [h / total for h in hist], ".-",
                               label=f"s={r['bound']} N={r['trainers']}")  # fmt: skip
        ax_row[2].set_yscale("log")
        ax_row[2].set_xlabel("other holders at read time (bound on updates missed)")
        ax_row[2].set_title(f"{w}: lag distribution")
        ax_row[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--datasets", default="umls", help=f"KGE datasets, comma-separated ({', '.join(KGE_DATASETS)})"
    )
    p.add_argument("--epochs", type=int, default=2, help="KGE epochs per case (default 2)")
    p.add_argument("--kge-cache-bytes", default="256KiB", help="KGE memory tier (default 256KiB)")
    p.add_argument("--dlrm", action="store_true", help="also the DLRM workload (synthetic Criteo)")
    p.add_argument(
        "--dlrm-samples", type=int, default=200_000, help="DLRM training samples (default 200,000)"
    )
    p.add_argument("--dlrm-cache-bytes", default="4MiB", help="DLRM memory tier (default 4MiB)")
    p.add_argument(
        "--bounds", type=_bounds, default=_bounds(DEFAULT_BOUNDS), help=f"default {DEFAULT_BOUNDS}"
    )
    p.add_argument("--trainers", type=_counts, default=[1, 2], help="trainer counts (default 1,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="throughput, metric and lag distribution per bound")
    p.add_argument("--json", action="store_true", help="also print the report as JSON (last stdout line)")


def main(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError("--plot needs matplotlib (pip install matplotlib)") from None
    report = run(args)
    print(format_report(report))
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    return 0
