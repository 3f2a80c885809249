"""The MovieLens-100k user-item graph for link prediction, and neighbour sampling over it.

The ratings (`ml-100k.inter` in the `recbole` wheel: 943 users, 1682 films, 100,000 ratings) become an
undirected bipartite graph: node key u for user u, n_users + i for item i. Edges are split 80/10/10 with a
fixed seed (independent of --seed); only training edges form the adjacency that neighbours are sampled from,
so held-out edges never leak into the embeddings that score them. Each held-out edge gets one negative: an
(user, item) pair that is not a rating in any split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sources import wheel_file

SPLIT_SEED = 20240


@dataclass
class Graph:
    """CSR adjacency: the neighbours of node v are `neighbors[indptr[v]:indptr[v + 1]]`."""

    indptr: np.ndarray
    neighbors: np.ndarray

    @classmethod
    def from_edges(cls, n_nodes: int, edges: np.ndarray) -> Graph:
        """Undirected graph of `edges` (m, 2)."""
        src = np.concatenate([edges[:, 0], edges[:, 1]])
        dst = np.concatenate([edges[:, 1], edges[:, 0]])
        order = np.argsort(src, kind="stable")
        indptr = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n_nodes), out=indptr[1:])
        return cls(indptr, dst[order].astype(np.int64))

    def degree(self, nodes: np.ndarray) -> np.ndarray:
        return self.indptr[nodes + 1] - self.indptr[nodes]

    def sample(self, nodes: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """k neighbours per node drawn with replacement: (len(nodes), k) node ids and a validity mask
        (False for every slot of a node without neighbours, whose id is then the node itself)."""
        deg = self.degree(nodes)
        pick = (rng.random((len(nodes), k)) * np.maximum(deg, 1)[:, None]).astype(np.int64)
        has = deg > 0
        ids = np.where(
            has[:, None],
            self.neighbors[np.minimum(self.indptr[nodes, None] + pick, len(self.neighbors) - 1)],
            nodes[:, None],
        )
        return ids, np.repeat(has[:, None], k, axis=1)


@dataclass
class LinkDataset:
    name: str
    n_users: int
    n_items: int
    train: np.ndarray  # (m, 2) node keys: user, item
    valid: np.ndarray
    test: np.ndarray
    valid_neg: np.ndarray  # one non-edge per held-out edge
    test_neg: np.ndarray
    graph: Graph  # training edges only
    source: str

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items


def _negatives(pos: np.ndarray, edge_codes: np.ndarray, n_users: int, n_items: int, rng) -> np.ndarray:
    """For each (user, item) in `pos`, the same user with an item it never rated (`edge_codes`: every
    rating as user * n_nodes + item)."""
    users = pos[:, 0]
    items = n_users + rng.integers(0, n_items, len(pos))
    bad = np.isin(users * (n_users + n_items) + items, edge_codes)
    while bad.any():
        items[bad] = n_users + rng.integers(0, n_items, int(bad.sum()))
        bad = np.isin(users * (n_users + n_items) + items, edge_codes)
    return np.stack([users, items], axis=1)


def load_movielens() -> LinkDataset:
    path = wheel_file("recbole", "recbole/dataset_example/ml-100k/ml-100k.inter")
    raw = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=(0, 1), dtype=np.int64)
    user_ids, users = np.unique(raw[:, 0], return_inverse=True)
    item_ids, items = np.unique(raw[:, 1], return_inverse=True)
    n_users, n_items = len(user_ids), len(item_ids)
    edges = np.unique(np.stack([users, n_users + items], axis=1), axis=0)
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(edges))
    n_eval = len(edges) // 10
    test, valid, train = edges[order[:n_eval]], edges[order[n_eval : 2 * n_eval]], edges[order[2 * n_eval :]]
    codes = edges[:, 0] * (n_users + n_items) + edges[:, 1]
    return LinkDataset(
        "ml100k", n_users, n_items, train, valid, test,
        _negatives(valid, codes, n_users, n_items, rng), _negatives(test, codes, n_users, n_items, rng),
        Graph.from_edges(n_users + n_items, train), path,
    )  # fmt: skip


__all__ = ["Graph", "LinkDataset", "load_movielens"]
