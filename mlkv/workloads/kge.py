"""Knowledge-graph embeddings: DistMult, ComplEx and TransE with shared negative sampling, filtered ranking.

Entities and relations are two tables (`kge.entity`, `kge.relation`; key = id). A batch of true triples
(h, r, t) shares `negatives` random entities (PyTorch-BigGraph style), each used once as a corrupted tail
and once as a corrupted head for every triple; the loss is the cross-entropy of the true triple among its
corruptions, plus L2 regularisation of the rows the batch read. Evaluation ranks every entity as the head
and as the tail of each held-out triple, with the other true triples filtered out (MRR, Hits@1/3/10).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from . import kg_data
from .metrics import filtered_ranks, ranking_metrics
from .tables import TableSpec
from .workload import Batch, Workload

EVAL_CHUNK = 256
ENTITY, RELATION = "kge.entity", "kge.relation"


# ---- scoring functions: score(h, r, t) for aligned rows, and against every row of a candidate matrix -----
def _complex_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.chunk(2, dim=-1)


class Scorer:
    """score: (B, d) x3 -> (B,); tails: h, r (B, d), candidates (N, d) -> (B, N); heads: candidates, r, t."""

    def score(self, h: Tensor, r: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def tails(self, h: Tensor, r: Tensor, cand: Tensor) -> Tensor:
        raise NotImplementedError

    def heads(self, cand: Tensor, r: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError


class DistMult(Scorer):
    def score(self, h, r, t):
        return (h * r * t).sum(-1)

    def tails(self, h, r, cand):
        return (h * r) @ cand.T

    def heads(self, cand, r, t):
        return (r * t) @ cand.T


class ComplEx(Scorer):
    """Re(<h, r, conj(t)>) with the first half of each row the real part, the second the imaginary."""

    def score(self, h, r, t):
        return (self._hr(h, r) * t).sum(-1)

    @staticmethod
    def _hr(h, r):
        (hr, hi), (rr, ri) = _complex_parts(h), _complex_parts(r)
        return torch.cat([hr * rr - hi * ri, hr * ri + hi * rr], dim=-1)

    @staticmethod
    def _rt(r, t):  # so that score(h) = <h, _rt(r, t)>
        (rr, ri), (tr, ti) = _complex_parts(r), _complex_parts(t)
        return torch.cat([rr * tr + ri * ti, rr * ti - ri * tr], dim=-1)

    def tails(self, h, r, cand):
        return self._hr(h, r) @ cand.T

    def heads(self, cand, r, t):
        return self._rt(r, t) @ cand.T


class TransE(Scorer):
    """-||h + r - t||_1."""

    def score(self, h, r, t):
        return -(h + r - t).abs().sum(-1)

    def tails(self, h, r, cand):
        return -torch.cdist(h + r, cand, p=1)

    def heads(self, cand, r, t):
        return -torch.cdist(t - r, cand, p=1)


SCORERS = {"distmult": DistMult, "complex": ComplEx, "transe": TransE}
INIT_STD = 0.1


class KGEModel(nn.Module):
    def __init__(self, tables, kind: str):
        super().__init__()
        self.entity = tables.embedding(ENTITY)
        self.relation = tables.embedding(RELATION)
        self.scorer = SCORERS[kind]()


# ---- the workload ---------------------------------------------------------------------------------------
class KGEWorkload(Workload):
    name = "kge"

    def __init__(self, args: argparse.Namespace):
        if args.model not in SCORERS:
            raise InvalidArgumentError(f"--model must be one of {', '.join(SCORERS)}, got {args.model!r}")
        if args.model == "complex" and args.dim % 2:
            raise InvalidArgumentError(
                f"ComplEx needs an even --dim (real and imaginary halves), got {args.dim}"
            )
        self.data = kg_data.load(args.dataset)
        self.kind, self.dim, self.lr, self.reg = args.model, args.dim, args.lr, args.reg
        self.batch_size, self.n_neg, self.seed = args.batch_size, args.negatives, args.seed
        eval_order = np.random.default_rng(kg_data.SPLIT_SEED).permutation(len(self.data.valid))
        self.valid_subset = self.data.valid[np.sort(eval_order[: args.eval_triples])]
        self._known_tails, self._known_heads = _answers(self.data)

    def tables(self) -> dict[str, TableSpec]:
        return {
            ENTITY: TableSpec(self.dim, self.lr, init_std=INIT_STD, rows=self.data.n_entities),
            RELATION: TableSpec(self.dim, self.lr, init_std=INIT_STD, rows=self.data.n_relations),
        }

    def build_model(self, tables) -> nn.Module:
        return KGEModel(tables, self.kind)

    def samples_per_epoch(self) -> int:
        return len(self.data.train)

    def batches(self, epoch: int) -> Iterator[Batch]:
        train = self.data.train
        order = np.random.default_rng([self.seed, epoch]).permutation(len(train))
        for b, start in enumerate(range(0, len(train), self.batch_size)):
            rows = train[order[start : start + self.batch_size]]
            rng = np.random.default_rng([self.seed, epoch, b])
            negs = rng.integers(0, self.data.n_entities, self.n_neg)
            triples = torch.from_numpy(rows)
            yield {
                "entities": torch.from_numpy(np.concatenate([rows[:, 0], rows[:, 2], negs])),
                "relations": triples[:, 1].contiguous(),
                "size": len(rows),
            }

    def shard(self, batch: Batch, rank: int, world_size: int) -> Batch:
        """This rank's triples; the shared negatives go to every rank (each triple scores against all)."""
        n = batch["size"]
        if n < world_size:
            raise InvalidArgumentError(f"a batch of {n} triples cannot be shared by {world_size} ranks")
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        ent = batch["entities"]
        parts = (ent[lo:hi], ent[n + lo : n + hi], ent[2 * n :])
        return {
            "entities": torch.cat(parts),
            "relations": batch["relations"][lo:hi],
            "size": hi - lo,
            "global_size": n,
        }

    def keys(self, batch: Batch) -> dict[str, Any]:
        return {ENTITY: batch["entities"], RELATION: batch["relations"]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        n = batch["size"]
        ent = model.entity(batch["entities"])
        r = model.relation(batch["relations"])
        h, t, negs = ent[:n], ent[n : 2 * n], ent[2 * n :]
        s = model.scorer
        pos = s.score(h, r, t).unsqueeze(1)
        target = torch.zeros(n, dtype=torch.int64)
        loss = nn.functional.cross_entropy(torch.cat([pos, s.tails(h, r, negs)], dim=1), target)
        loss = loss + nn.functional.cross_entropy(torch.cat([pos, s.heads(negs, r, t)], dim=1), target)
        if self.reg:
            loss = loss + self.reg * (h.pow(2).sum(-1) + r.pow(2).sum(-1) + t.pow(2).sum(-1)).mean()
        return loss

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        triples = self.valid_subset if split == "valid" else self.data.split(split)
        everything = model.entity(torch.arange(self.data.n_entities))
        ranks = []
        for start in range(0, len(triples), EVAL_CHUNK):
            tr = triples[start : start + EVAL_CHUNK]
            h, t = model.entity(torch.from_numpy(tr[:, 0])), model.entity(torch.from_numpy(tr[:, 2]))
            r = model.relation(torch.from_numpy(tr[:, 1]))
            tail_scores = model.scorer.tails(h, r, everything).numpy()
            head_scores = model.scorer.heads(everything, r, t).numpy()
            listed = tr.tolist()
            ranks.append(
                filtered_ranks(tail_scores, tr[:, 2], [self._known_tails[(a, b)] for a, b, _ in listed])
            )
            ranks.append(
                filtered_ranks(head_scores, tr[:, 0], [self._known_heads[(b, c)] for _, b, c in listed])
            )
        return ranking_metrics(np.concatenate(ranks))

    def describe(self) -> dict[str, Any]:
        d = self.data
        return {
            "dataset": d.name,
            "model": self.kind,
            "entities": d.n_entities,
            "relations": d.n_relations,
            "triples": {"train": len(d.train), "valid": len(d.valid), "test": len(d.test)},
            "source": d.source,
        }

    def identity(self) -> dict[str, Any]:
        return {"workload": self.name, "dataset": self.data.name, "model": self.kind, "dim": self.dim}


def _answers(data: kg_data.KGDataset) -> tuple[dict, dict]:
    """Every true tail of each (head, relation) and head of each (relation, tail), over all splits."""
    tails: dict[tuple[int, int], list[int]] = defaultdict(list)
    heads: dict[tuple[int, int], list[int]] = defaultdict(list)
    for h, r, t in np.concatenate([data.train, data.valid, data.test]).tolist():
        tails[(h, r)].append(t)
        heads[(r, t)].append(h)
    return (
        {k: np.array(v, dtype=np.int64) for k, v in tails.items()},
        {k: np.array(v, dtype=np.int64) for k, v in heads.items()},
    )


__all__ = ["SCORERS", "ComplEx", "DistMult", "KGEModel", "KGEWorkload", "TransE"]
