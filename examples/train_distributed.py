"""Data-parallel training with embedding tables sharded over the ranks of a torch.distributed job.

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --path /tmp/mlkv-dist
    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py --path /tmp/mlkv-dist --resume

Each rank owns the rows whose key hashes to it (PATH/rank-R-of-N is an ordinary mlkv store), reads and
updates every other row through its owner (mlkv.distributed routes them with all_to_all), and trains on its
share of every global batch; the dense layers are averaged with one all_reduce per step. The loss is scaled by
the rank's share of the batch, so the summed gradients are those of the global batch's mean loss: at
staleness 0 the run computes what one process computes on the whole batch. Checkpoints are collective and
count only once every rank committed them; `--resume` continues from the last one. Multi-machine: the same
command with `--nnodes`, `--node_rank` and `--rdzv_endpoint` (see torchrun's documentation).

The data is a toy click log drawn from a fixed hidden model, so the script runs anywhere without files.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

import mlkv
import mlkv.distributed as mdist
import mlkv.torch

FIELDS, IDS, DIM = 4, 50_000, 16


def global_batch(step: int, size: int) -> dict:
    """The same global batch on every rank (a pure function of the step): Zipf ids, clicks from a hidden
    per-id score."""
    rng = np.random.default_rng(step)
    ids = (rng.zipf(1.2, (size, FIELDS)) % IDS + np.arange(FIELDS) * IDS).astype(np.int64)
    score = np.sin(ids * 0.37).sum(axis=1)
    clicks = (rng.random(size) < 1 / (1 + np.exp(-score))).astype(np.float32)
    return {"ids": torch.from_numpy(ids), "clicks": torch.from_numpy(clicks)}


def my_share(batch: dict, rank: int, world: int) -> dict:
    n = len(batch["clicks"])
    lo, hi = n * rank // world, n * (rank + 1) // world
    return {"ids": batch["ids"][lo:hi], "clicks": batch["clicks"][lo:hi], "share": (hi - lo) / n}


class Model(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.emb = mlkv.torch.EmbeddingBag(table, mode="sum")
        self.top = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.top(self.emb(ids)).squeeze(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="root of the sharded store (one per machine)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch, shared by the ranks")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is an error")
    args = p.parse_args()

    mdist.init(timeout=args.timeout)  # joins torchrun's process group (gloo on CPU, NCCL with CUDA)
    torch.manual_seed(0)  # the same dense initialisation on every rank
    store = mdist.open(args.path, cache_bytes="64MiB", create=not args.resume)
    rank, world = store.rank, store.world_size
    table = store.table("ids", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.05))
    model = Model(table)
    sparse_opt = mlkv.torch.SparseOptimizer(model)
    dense_opt = torch.optim.Adam(model.top.parameters(), lr=1e-3)
    dense_dir = os.path.join(store.path, "dense")  # per rank: machines share no disk
    start = 0
    if args.resume:
        start = mlkv.torch.load_checkpoint(store, model, dense_opt, dense_dir)["step"]

    batches = (my_share(global_batch(s, args.batch_size), rank, world) for s in range(start, args.steps))
    loader = mlkv.torch.Prefetcher(batches, keys=lambda b: {"ids": b["ids"]}, tables=store, depth=4)
    try:
        for step, batch in enumerate(loader, start=start + 1):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch["ids"]), batch["clicks"])
            loss = loss * batch["share"]  # summed over ranks: the mean over the global batch
            dense_opt.zero_grad()
            sparse_opt.zero_grad()
            loss.backward()
            mdist.all_reduce_gradients(model.top.parameters(), world)
            dense_opt.step()
            sparse_opt.step()  # gradients go to the rows' owners, which apply Adagrad once per step
            total = mdist.group.all_reduce([float(loss.detach())], "sum", "loss")[0]
            if step % args.checkpoint_every == 0 or step == args.steps:
                ckpt = mlkv.torch.save_checkpoint(store, model, dense_opt, dense_dir, {"step": step})
                if rank == 0:
                    print(f"step {step}  loss {total:.4f}  checkpoint {ckpt}", flush=True)
    finally:
        loader.close()
    rows = len(table)  # collective: the rows of every shard
    if rank == 0:
        print(f"{rows:,} rows over {world} shards in {args.path}")
    store.close()
    mdist.shutdown()


if __name__ == "__main__":
    main()
