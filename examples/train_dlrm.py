"""Train DLRM on Criteo-format click logs with its 26 embedding tables in mlkv, the memory tier far smaller
than the tables. This is the loop `mlkv train dlrm` runs, spelled out to copy from.

    python examples/train_dlrm.py                          # synthetic Criteo, generated once and cached
    python examples/train_dlrm.py --data train.txt         # the Criteo Kaggle file (last 10% for testing)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

import mlkv
from mlkv.torch import EmbeddingBag, Prefetcher, SparseOptimizer, save_checkpoint
from mlkv.workloads import criteo, criteo_synth
from mlkv.workloads.dlrm import DLRM, to_batch
from mlkv.workloads.metrics import log_loss, roc_auc

DIM = 16


class StoreTables:
    """What DLRM asks for its embeddings: one mlkv table per categorical column, trained by Adagrad."""

    def __init__(self, store: mlkv.Store, lr: float):
        self.store, self.lr = store, lr

    def embedding_bag(self, name: str) -> EmbeddingBag:
        return EmbeddingBag(self.store.table(name, dim=DIM, optimizer=mlkv.optim.Adagrad(lr=self.lr)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="Criteo-format training file (default: synthetic)")
    p.add_argument("--path", default=os.path.join(tempfile.gettempdir(), "mlkv-example-dlrm"))
    p.add_argument("--cache-bytes", default="16MiB")
    p.add_argument("--batch-size", type=int, default=4096)
    args = p.parse_args()

    if args.data:  # hold out the last 10% of the file's bytes
        size = os.path.getsize(args.data)
        cut = criteo.line_start_at_or_after(args.data, int(0.9 * size))
        train_part, test_part = (args.data, 0, cut), (args.data, cut, size)
    else:
        spec = criteo_synth.SynthSpec(scale=0.05)
        train, test, _ = criteo_synth.ensure_dataset(
            criteo_synth.default_data_dir(), 1_000_000, 100_000, spec
        )
        train_part, test_part = (train, 0, None), (test, 0, None)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the loader and look-ahead run on a second thread
    with mlkv.open(args.path, cache_bytes=args.cache_bytes) as store:
        for name in store.tables():  # start from fresh rows
            if name.startswith("dlrm."):
                store.drop_table(name)
        model = DLRM(StoreTables(store, lr=0.05), dim=DIM)
        sparse_opt = SparseOptimizer(model)  # pushes row gradients to the tables (Adagrad in the store)
        dense_opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # the MLPs: mlkv modules have no parameters

        path, start, stop = train_part
        batches = (to_batch(b) for b in criteo.read_batches(path, args.batch_size, start, stop))
        keys = lambda b: {f"dlrm.{c}": b["cats"][:, i] for i, c in enumerate(criteo.CAT_COLUMNS)}  # noqa: E731
        losses = []
        for batch in tqdm(Prefetcher(batches, keys=keys, tables=store, depth=8), unit="batch"):
            loss = F.binary_cross_entropy_with_logits(model(batch["dense"], batch["cats"]), batch["labels"])
            dense_opt.zero_grad()
            sparse_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            sparse_opt.step()
            losses.append(loss.item())

        model.eval()  # evaluation reads untracked
        labels, probs = [], []
        with torch.no_grad():
            path, start, stop = test_part
            for b in criteo.read_batches(path, 16384, start, stop):
                batch = to_batch(b)
                probs.append(torch.sigmoid(model(batch["dense"], batch["cats"])).numpy())
                labels.append(b.labels)
        y, prob = np.concatenate(labels), np.concatenate(probs)
        save_checkpoint(store, model, dense_opt, os.path.join(args.path, "dense"), {"steps": len(losses)})
        s = store.stats()
        print(f"test AUC {roc_auc(y, prob):.4f}  log loss {log_loss(y, prob):.4f}", end="  ")
        print(f"final loss {np.mean(losses[-10:]):.4f} (mean of the last 10 steps)")
        print(f"hit rate {100 * s['hit_rate']:.1f}%  stall {s['stall_seconds']:.1f} s  store: {args.path}")


if __name__ == "__main__":
    main()
