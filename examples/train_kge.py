"""Train knowledge-graph embeddings (ComplEx by default) with the entity and relation tables in mlkv, report
filtered MRR and Hits@k, then use the trained rows: read them back, find nearest neighbours, export them.

    python examples/train_kge.py --dataset kinships --epochs 5   # nations, kinships, umls, ml100k-kg, wordnet

`mlkv.workloads.run` is the Python form of `mlkv train kge`: the options are the command's flags
(`mlkv train kge --help`), and it returns the report `--json` prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

import mlkv
import mlkv.workloads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="kinships")
    p.add_argument("--model", default="complex", choices=("distmult", "complex", "transe"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cache-bytes", default="50%", help="memory tier: bytes, or a share of the tables")
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-kge"))
    args = p.parse_args()

    report = mlkv.workloads.run(
        "kge",
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        cache_bytes=args.cache_bytes,
        path=args.path,
        overwrite=True,  # replace the rows of an earlier run of this example
        log_dir=os.path.join(args.path, "logs"),  # per-step metrics as JSON lines
        log=sys.stdout,  # the per-epoch lines
    )
    print(f"test MRR {report['mrr']:.4f}  hits@10 {report['hits@10']:.4f}  "
          f"{report['samples_per_s']:,.0f} samples/s  hit rate {100 * report['hit_rate']:.1f}% "
          f"(memory tier {report['cache_bytes']:,} of {report['table_bytes']:,} bytes)")  # fmt: skip

    # The trained rows stay in the store: any process can open it and read them.
    with mlkv.open(args.path, readonly=True, create=False) as store:
        entity = store.table("kge.entity")  # keys are entity ids 0..n-1
        keys = np.arange(len(entity))
        vectors = entity.get(keys, track=False)  # (n, dim) float32; untracked: a plain read
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        nearest = np.argsort(-(unit @ unit[0]))[1:6]
        print(f"entities closest to entity 0 (cosine): {nearest.tolist()}")
        out = os.path.join(args.path, "entity.npy")
        entity.export(out)  # entity.npy: weights sorted by key; entity.keys.npy: the keys
    print(f"exported {len(keys)} rows to {out} (np.load it)")


if __name__ == "__main__":
    main()
