"""Train knowledge-graph embeddings (ComplEx by default) with the entity and relation tables in mlkv, then
report filtered MRR and Hits@k. The loop `mlkv train kge` runs, spelled out to copy from.

    python examples/train_kge.py --dataset umls            # nations, kinships, umls, ml100k-kg, wordnet
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
from mlkv.workloads.kge import ENTITY, RELATION, KGEModel, KGEWorkload


class StoreTables:
    """What KGEModel asks for: `kge.entity` and `kge.relation`, keys = ids, trained by Adagrad."""

    def __init__(self, store: mlkv.Store, dim: int, lr: float):
        self.store, self.dim, self.lr = store, dim, lr

    def embedding(self, name: str) -> Embedding:
        init = mlkv.init.Normal(0.0, 0.1)
        return Embedding(
            self.store.table(name, dim=self.dim, init=init, optimizer=mlkv.optim.Adagrad(lr=self.lr))
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="umls")
    p.add_argument("--model", default="complex", choices=("distmult", "complex", "transe"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-kge"))
    args = p.parse_args()

    # the workload object brings the data, negative sampling, loss and filtered evaluation
    settings = SimpleNamespace(dataset=args.dataset, model=args.model, dim=128, lr=0.1, reg=1e-3,
                               batch_size=512, negatives=256, seed=0, eval_triples=2000)  # fmt: skip
    work = KGEWorkload(settings)
    torch.manual_seed(0)
    with mlkv.open(args.path, cache_bytes="16MiB") as store:
        for name in (ENTITY, RELATION):  # start from fresh rows
            if name in store.tables():
                store.drop_table(name)
        model = KGEModel(StoreTables(store, dim=128, lr=0.1), args.model)
        sparse_opt = SparseOptimizer(model)
        for epoch in range(args.epochs):
            losses = []
            for batch in Prefetcher(work.batches(epoch), keys=work.keys, tables=store, depth=8):
                loss = work.loss(model, batch)
                sparse_opt.zero_grad()
                loss.backward()
                sparse_opt.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                valid = work.evaluate(model, "valid")
            model.train()
            print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}  valid MRR {valid['mrr']:.4f}")
        model.eval()
        with torch.no_grad():
            test = work.evaluate(model, "test")
        print("test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))


if __name__ == "__main__":
    main()
