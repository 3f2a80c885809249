"""Train DLRM on Criteo-format click logs with its 26 embedding tables in mlkv behind a 16 MiB memory tier;
report test AUC and log loss beside the same model trained in memory with plain PyTorch.

    python examples/train_dlrm.py                          # synthetic Criteo, generated once and cached
    python examples/train_dlrm.py --data train.txt         # the Criteo Kaggle file (last 10% for testing)

`mlkv.workloads.run` is the Python form of `mlkv train dlrm`: the options are the command's flags
(`mlkv train dlrm --help`), and it returns the report `--json` prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import mlkv
import mlkv.workloads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="Criteo-format training file (default: synthetic)")
    p.add_argument("--samples", type=int, default=200_000, help="synthetic training samples")
    p.add_argument("--cache-bytes", default="16MiB")
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-dlrm"))
    args = p.parse_args()

    data = {"data": args.data} if args.data else {"samples": args.samples, "test_samples": args.samples // 10}
    report = mlkv.workloads.run(
        "dlrm",
        **data,
        epochs=1,
        cache_bytes=args.cache_bytes,
        path=args.path,
        overwrite=True,  # replace the rows of an earlier run of this example
        baseline=True,  # also train the same model in memory with plain PyTorch
        log=sys.stdout,
    )
    base = report["baseline"]
    print(f"mlkv:     test AUC {report['auc']:.4f}  log loss {report['logloss']:.4f}  "
          f"{report['samples_per_s']:,.0f} samples/s  hit rate {100 * report['hit_rate']:.1f}%  "
          f"stall {100 * report['stall_fraction']:.1f}%")  # fmt: skip
    print(f"in-memory test AUC {base['auc']:.4f}  log loss {base['logloss']:.4f}  "
          f"{base['samples_per_s']:,.0f} samples/s")  # fmt: skip
    tables, tier = report["table_bytes"], report["cache_bytes"]
    print(f"tables {tables:,} bytes with optimizer state, memory tier {tier:,} bytes")

    # The trained rows stay in the store, one table per categorical column (dlrm.C1 ... dlrm.C26).
    with mlkv.open(args.path, readonly=True, create=False) as store:
        for name in store.tables()[:3]:
            t = store.table(name)
            print(f"{name}: {len(t):,} rows of dim {t.dim}, {t.step} update steps")


if __name__ == "__main__":
    main()
