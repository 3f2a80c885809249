"""GraphSAGE link prediction on the MovieLens-100k user-item graph with the node embeddings in mlkv, reported
as AUC on held-out edges. The loop `mlkv train gnn` runs, spelled out to copy from.

    python examples/train_gnn.py --epochs 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import torch

import mlkv
from mlkv.torch import Embedding, Prefetcher, SparseOptimizer
from mlkv.workloads.gnn import NODE, GNNWorkload, GraphSAGE


class StoreTables:
    """What GraphSAGE asks for: one node table (`gnn.node`, key = node id), trained by Adagrad."""

    def __init__(self, store: mlkv.Store, dim: int, lr: float):
        self.store, self.dim, self.lr = store, dim, lr

    def embedding(self, name: str) -> Embedding:
        init = mlkv.init.Normal(0.0, 0.1)
        return Embedding(
            self.store.table(name, dim=self.dim, init=init, optimizer=mlkv.optim.Adagrad(lr=self.lr))
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-gnn"))
    args = p.parse_args()

    # the workload object brings the graph, neighbour sampling, loss and AUC evaluation
    settings = SimpleNamespace(dim=64, layers=2, fanout=[10, 5], lr=0.05, batch_size=1024, seed=0)
    work = GNNWorkload(settings)
    torch.manual_seed(0)
    with mlkv.open(args.path, cache_bytes="1MiB") as store:
        if NODE in store.tables():  # start from fresh rows
            store.drop_table(NODE)
        model = GraphSAGE(StoreTables(store, dim=64, lr=0.05), dim=64, layers=2)
        sparse_opt = SparseOptimizer(model)
        dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for epoch in range(args.epochs):
            losses = []
            for batch in Prefetcher(work.batches(epoch), keys=work.keys, tables=store, depth=4):
                loss = work.loss(model, batch)
                dense_opt.zero_grad()
                sparse_opt.zero_grad()
                loss.backward()
                dense_opt.step()
                sparse_opt.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                auc = work.evaluate(model, "valid")["auc"]
            model.train()
            print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  valid AUC {auc:.4f}")
        model.eval()
        with torch.no_grad():
            auc = work.evaluate(model, "test")["auc"]
        print(f"test AUC {auc:.4f}  hit rate {100 * store.stats()['hit_rate']:.1f}%")


if __name__ == "__main__":
    main()
