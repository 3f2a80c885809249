"""GraphSAGE link prediction on the MovieLens-100k user-item graph with the node embeddings in mlkv, reported
as AUC on held-out edges, then the trained node rows read back from the store.

    python examples/train_gnn.py --epochs 5

`mlkv.workloads.run` is the Python form of `mlkv train gnn`: the options are the command's flags
(`mlkv train gnn --help`), and it returns the report `--json` prints.
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
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cache-bytes", default="50%", help="memory tier: bytes, or a share of the tables")
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-gnn"))
    p.add_argument("--plot", help="draw loss, AUC, hit rate and stall over training into this .png")
    args = p.parse_args()

    report = mlkv.workloads.run(
        "gnn",
        epochs=args.epochs,
        cache_bytes=args.cache_bytes,
        path=args.path,
        overwrite=True,  # replace the rows of an earlier run of this example
        plot=args.plot,
        log=sys.stdout,
    )
    hit, stall = 100 * report["hit_rate"], 100 * report["stall_fraction"]
    print(f"test AUC {report['auc']:.4f}  {report['samples_per_s']:,.0f} samples/s  "
          f"hit rate {hit:.1f}%  stall {stall:.1f}%")  # fmt: skip

    with mlkv.open(args.path, readonly=True, create=False) as store:
        nodes = store.table("gnn.node")  # key = node id (users first, then items)
        rows = nodes.get(np.arange(4), track=False)
        norms = np.linalg.norm(rows, axis=1).round(3).tolist()
        print(f"{len(nodes):,} node rows of dim {nodes.dim}; norms of nodes 0-3: {norms}")


if __name__ == "__main__":
    main()
