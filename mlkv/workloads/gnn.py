"""GraphSAGE link prediction: learnable node embeddings in an mlkv table, mean aggregation over sampled
neighbours (1 or 2 layers), trained on MovieLens-100k user-item edges, scored by AUC on held-out edges.

The data loader samples each batch's computation graph (Hamilton et al., 2017): the batch's target nodes,
`fanout` neighbours of each, their neighbours in turn; the model reads the rows of every node in it with
one lookup of `gnn.node` (so the Prefetcher can announce them) and runs the layers innermost first:
h' = W [h_self || mean(h_neighbours)], ReLU between layers. An edge's logit is <z_user, z_item>; each
positive edge is paired with a random item for the same user as negative (binary cross-entropy).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from . import graph_data
from .metrics import roc_auc
from .tables import TableSpec
from .workload import Batch, Workload

NODE = "gnn.node"
EVAL_EDGES = 4096
EVAL_SEED = 7  # neighbour samples at evaluation: the same in every run and epoch


def computation_graph(graph: graph_data.Graph, targets: np.ndarray, fanouts: list[int], rng) -> tuple:
    """(every node whose row is needed, hops innermost first). A hop is (self positions, neighbour
    positions (n, k), mask (n, k)) into the node list of the level below it."""
    level, hops = targets, []
    for k in fanouts:
        nbr, mask = graph.sample(level, k, rng)
        below = np.unique(np.concatenate([level, nbr.ravel()]))
        hops.append((np.searchsorted(below, level), np.searchsorted(below, nbr), mask))
        level = below
    as_tensors = [tuple(torch.from_numpy(a) for a in hop) for hop in reversed(hops)]
    return torch.from_numpy(level), as_tensors


class GraphSAGE(nn.Module):
    def __init__(self, tables, dim: int, layers: int):
        super().__init__()
        self.nodes = tables.embedding(NODE)
        self.layers = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(layers))

    def forward(self, nodes: Tensor, hops: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """Representations of the outermost level's nodes (the targets), in their order."""
        h = self.nodes(nodes)
        for i, (layer, (own, nbr, mask)) in enumerate(zip(self.layers, hops, strict=True)):
            m = mask.unsqueeze(-1).to(h.dtype)
            mean = (h[nbr] * m).sum(1) / m.sum(1).clamp(min=1.0)
            h = layer(torch.cat([h[own], mean], dim=1))
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h


def edge_batch(graph, users, pos, neg, fanouts, rng) -> Batch:
    """The batch of edges (users, pos) against (users, neg): targets, their computation graph, positions."""
    targets = np.unique(np.concatenate([users, pos, neg]))
    nodes, hops = computation_graph(graph, targets, fanouts, rng)

    def at(x: np.ndarray) -> Tensor:  # positions among the targets
        return torch.from_numpy(np.searchsorted(targets, x))

    return {
        "nodes": nodes,
        "hops": hops,
        "user": at(users),
        "pos": at(pos),
        "neg": at(neg),
        "size": len(users),
    }


def edge_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    z = model(batch["nodes"], batch["hops"])
    u = z[batch["user"]]
    return (u * z[batch["pos"]]).sum(1), (u * z[batch["neg"]]).sum(1)


class GNNWorkload(Workload):
    name = "gnn"

    def __init__(self, args: argparse.Namespace):
        if len(args.fanout) != args.layers:
            raise InvalidArgumentError(
                f"--fanout needs one number per layer ({args.layers}), got {args.fanout}"
            )
        self.data = graph_data.load_movielens()
        self.dim, self.layers, self.fanouts, self.lr = args.dim, args.layers, list(args.fanout), args.lr
        self.batch_size, self.seed = args.batch_size, args.seed

    def tables(self) -> dict[str, TableSpec]:
        return {NODE: TableSpec(self.dim, self.lr, init_std=0.1, rows=self.data.n_nodes)}

    def build_model(self, tables) -> nn.Module:
        return GraphSAGE(tables, self.dim, self.layers)

    def samples_per_epoch(self) -> int:
        return len(self.data.train)

    def batches(self, epoch: int) -> Iterator[Batch]:
        d = self.data
        order = np.random.default_rng([self.seed, epoch]).permutation(len(d.train))
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            edges = d.train[order[start : start + self.batch_size]]
            rng = np.random.default_rng([self.seed, epoch, b])
            neg = d.n_users + rng.integers(0, d.n_items, len(edges))
            yield edge_batch(d.graph, edges[:, 0], edges[:, 1], neg, self.fanouts, rng)

    def keys(self, batch: Batch) -> dict[str, Any]:
        return {NODE: batch["nodes"]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        pos, neg = edge_logits(model, batch)
        bce = nn.functional.binary_cross_entropy_with_logits
        return bce(pos, torch.ones_like(pos)) + bce(neg, torch.zeros_like(neg))

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        d = self.data
        pos_edges, neg_edges = (d.valid, d.valid_neg) if split == "valid" else (d.test, d.test_neg)
        rng = np.random.default_rng(EVAL_SEED)
        scores, labels = [], []
        for s in range(0, len(pos_edges), EVAL_EDGES):
            p, n = pos_edges[s : s + EVAL_EDGES], neg_edges[s : s + EVAL_EDGES]
            pos, neg = edge_logits(model, edge_batch(d.graph, p[:, 0], p[:, 1], n[:, 1], self.fanouts, rng))
            scores += [pos.numpy(), neg.numpy()]
            labels += [np.ones(len(p)), np.zeros(len(n))]
        return {"auc": roc_auc(np.concatenate(labels), np.concatenate(scores))}

    def describe(self) -> dict[str, Any]:
        d = self.data
        return {
            "dataset": d.name,
            "nodes": d.n_nodes,
            "edges": {"train": len(d.train), "valid": len(d.valid), "test": len(d.test)},
            "layers": self.layers,
            "fanout": self.fanouts,
            "source": d.source,
        }

    def identity(self) -> dict[str, Any]:
        return {"workload": self.name, "dataset": self.data.name, "dim": self.dim, "layers": self.layers}


__all__ = ["GNNWorkload", "GraphSAGE", "computation_graph"]
