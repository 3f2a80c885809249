"""Training workloads on mlkv tables, each beside the same model trained in memory with plain PyTorch.

`mlkv.workloads.run(name, **options)` runs one from Python and returns its report, as `mlkv train NAME
--json` prints it. The modules:

- `dlrm`: DLRM on Criteo-format click logs (`criteo`: the format; `criteo_synth`: look-alike data).
- `kge`: DistMult / ComplEx / TransE on offline knowledge graphs (`kg_data`).
- `gnn`: GraphSAGE link prediction on the MovieLens-100k graph (`graph_data`).
- `runner`: the shared loop (look-ahead, checkpoints, resume, progress, report); `tables`: mlkv or in-memory
  embedding tables behind one interface; `metrics`: AUC, log loss, filtered ranks; `sources`: where the
  offline data live; `cli`: the `mlkv train dlrm|kge|gnn` flags (torch-free); `monitor`: per-step metrics
  (--log-dir JSON lines and TensorBoard, --plot).
"""

from __future__ import annotations

from typing import Any, TextIO


def run(name: str, *, log: TextIO | None = None, **options: Any) -> dict[str, Any]:
    """Train workload `name` as ``mlkv train NAME`` does and return the report ``--json`` prints.

    Example::

        >>> import mlkv.workloads
        >>> r = mlkv.workloads.run("kge", dataset="kinships", epochs=5, path="/tmp/kge-store")
        >>> r["mrr"], r["samples_per_s"], r["hit_rate"]

    Args:
        name (str): ``"dlrm"``, ``"kge"`` or ``"gnn"``.
        log (file, optional): where the per-epoch lines and the progress notes go (e.g. ``sys.stdout``);
            default: nowhere.
        **options: the flags of ``mlkv train NAME`` with underscores for dashes, e.g. ``epochs=5``,
            ``cache_bytes="4MiB"`` (or a share of the tables, ``"50%"``), ``staleness_bound=2``,
            ``lookahead=8``, ``path="/data/store"`` (default: a temporary store, deleted afterwards),
            ``resume=True``, ``baseline=True``, ``log_dir="runs/kge"``, ``plot="kge.png"``. Omitted
            options take the command's defaults; ``mlkv train NAME --help`` describes each, and
            ``mlkv.workloads.cli.workload_options(NAME)`` lists them with their defaults.

    Returns:
        dict: the report: ``final_loss``, ``samples_per_s``, the final metrics (``auc``/``logloss`` for
        dlrm, ``mrr``/``hits@k`` for kge, ``auc`` for gnn), per-epoch ``history``, and for the store
        ``hit_rate``, ``stall_seconds``, ``stall_fraction``, ``table_bytes``, ``cache_bytes``; with
        ``baseline=True`` also ``baseline``: the same model trained in memory with plain PyTorch; with
        ``rocksdb_baseline=True`` (dlrm) also ``rocksdb_naive``: its rows glued to RocksDB by hand.

    Raises:
        InvalidArgumentError: an unknown workload or option (the message lists the valid ones), a value
            outside an option's choices, or an invalid value (``epochs=0``).
        PathNotFoundError: ``resume=True`` and no store at ``path``, or the directory of ``plot`` is
            missing.
        MlkvError: ``path`` already holds a run of this workload and neither ``resume`` nor
            ``overwrite`` is set; or training diverged.
    """
    import io

    from .cli import _validate, _validate_paths, args_for, baseline, config_from_args, make_workload
    from .runner import train

    args = args_for(name, options)
    _validate_paths(args)
    _validate(args)
    sink = log if log is not None else io.StringIO()
    workload = make_workload(args)
    cfg = config_from_args(args, sink)
    report = train(workload, cfg, backend="mlkv")
    if args.baseline:
        report["baseline"] = baseline(workload, cfg, sink)
    if args.rocksdb_baseline:
        report["rocksdb_naive"] = baseline(workload, cfg, sink, "rocksdb-naive")
    return report


__all__ = ["run"]
