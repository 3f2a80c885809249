"""Where a workload's embedding tables live: in an mlkv store, or in memory as plain PyTorch (the baseline).

Models ask a table backend for their embedding modules, so the mlkv run and the in-memory baseline run the
same model code. Both start from the same rows (the baseline's are read from the same `mlkv.init`
initialiser through a throw-away memory store) and apply the same Adagrad rule: mlkv.optim.Adagrad in the
store, torch.optim.Adagrad on `sparse=True` nn.Embedding(Bag) weights in memory. At staleness 0 the two
runs compute the same numbers up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import mlkv
import mlkv.torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class TableSpec:
    """One embedding table. `rows`: keys are 0..rows-1; otherwise `vocabulary()` lists every key the data
    holds (only the in-memory baseline needs it, to size its weight and map keys to rows)."""

    dim: int
    lr: float
    init_std: float = 0.01
    rows: int | None = None
    vocabulary: Callable[[], np.ndarray] | None = None

    def keys(self) -> np.ndarray:
        if self.rows is not None:
            return np.arange(self.rows, dtype=np.int64)
        if self.vocabulary is None:
            raise InvalidArgumentError("a TableSpec needs rows= or vocabulary= for the in-memory baseline")
        return np.asarray(self.vocabulary(), dtype=np.int64)


class MlkvTables:
    """Embedding modules over tables of an mlkv Store (mlkv.torch), trained by one SparseOptimizer.
    `dtype`: how the tables store embeddings (``float32``, ``float16``, ``bfloat16``; see Store.table)."""

    backend = "mlkv"

    def __init__(self, store: mlkv.Store, specs: dict[str, TableSpec], seed: int, dtype: str = "float32"):
        self.store = store
        self.specs = specs
        self.seed = seed
        self.dtype = dtype

    def table(self, name: str) -> mlkv.Table:
        spec = self.specs[name]
        return self.store.table(
            name,
            dim=spec.dim,
            dtype=self.dtype,
            optimizer=mlkv.optim.Adagrad(lr=spec.lr),
            init=mlkv.init.Normal(0.0, spec.init_std, seed=self.seed),
        )

    def embedding(self, name: str) -> nn.Module:
        return mlkv.torch.Embedding(self.table(name))

    def embedding_bag(self, name: str, mode: str = "mean") -> nn.Module:
        return mlkv.torch.EmbeddingBag(self.table(name), mode=mode)

    def embedding_bag_collection(self, names: list[str], mode: str = "sum") -> nn.Module:
        return mlkv.torch.EmbeddingBagCollection([self.table(n) for n in names], mode=mode)

    def sparse_optimizer(self, model: nn.Module) -> mlkv.torch.SparseOptimizer:
        return mlkv.torch.SparseOptimizer(model)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return []  # the rows live in the store, not in parameters


class _KeyToRow(nn.Module):
    """Maps arbitrary int64 keys to rows of a dense weight through a sorted vocabulary (None: key = row)."""

    def __init__(self, vocabulary: np.ndarray | None, table: str):
        super().__init__()
        self.table = table
        self.vocab = None if vocabulary is None else torch.from_numpy(np.sort(vocabulary))

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        if self.vocab is None:
            return keys
        keys = keys.contiguous()
        idx = torch.searchsorted(self.vocab, keys).clamp_(max=len(self.vocab) - 1)
        if not bool((self.vocab[idx] == keys).all()):
            bad = keys[self.vocab[idx] != keys][0]
            raise InvalidArgumentError(
                f"key {int(bad)} of table {self.table!r} is not in the baseline's vocabulary"
            )
        return idx


class _BaselineEmbedding(_KeyToRow):
    def __init__(self, weight: torch.Tensor, vocabulary: np.ndarray | None, table: str):
        super().__init__(vocabulary, table)
        self.inner = nn.Embedding.from_pretrained(weight, freeze=False, sparse=True)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return self.inner(self.rows(keys))


class _BaselineEmbeddingBag(_KeyToRow):
    def __init__(self, weight: torch.Tensor, vocabulary: np.ndarray | None, table: str, mode: str):
        super().__init__(vocabulary, table)
        self.inner = nn.EmbeddingBag.from_pretrained(weight, freeze=False, sparse=True, mode=mode)

    def forward(self, keys: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(self.rows(keys), offsets)


class _BaselineBagCollection(nn.ModuleList):
    """The in-memory twin of mlkv.torch.EmbeddingBagCollection: one nn.EmbeddingBag per table, looked up one
    after the other and stacked, as the reference DLRM (facebookresearch/dlrm) runs its ModuleList."""

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        bags = keys.unsqueeze(2) if keys.dim() == 2 else keys
        return torch.stack([m(bags[:, t]) for t, m in enumerate(self)], dim=1)


def initial_rows(
    name: str, spec: TableSpec, keys: np.ndarray, seed: int, chunk: int = 1 << 20
) -> torch.Tensor:
    """The rows an mlkv table `name` would create for `keys`, read through a throw-away memory store."""
    out = np.empty((len(keys), spec.dim), dtype=np.float32)
    with mlkv.open("<mlkv.workloads baseline init>", engine="memory", cache_bytes="64MiB") as store:
        t = MlkvTables(store, {name: spec}, seed).table(name)
        for i in range(0, len(keys), chunk):
            out[i : i + chunk] = t.get(keys[i : i + chunk], track=False)
            t.delete(keys[i : i + chunk])  # keep at most one chunk of rows alive
        store.drop_table(name)
    return torch.from_numpy(out)


class TorchTables:
    """The in-memory baseline: nn.Embedding(Bag)(sparse=True) weights trained by torch.optim.Adagrad."""

    backend = "torch"

    def __init__(self, specs: dict[str, TableSpec], seed: int):
        self.specs = specs
        self.seed = seed
        self._weights: dict[str, nn.Parameter] = {}

    def _weight(self, name: str) -> tuple[torch.Tensor, np.ndarray | None]:
        spec = self.specs[name]
        keys = spec.keys()
        vocab = None if spec.rows is not None else keys
        return initial_rows(name, spec, keys, self.seed), vocab

    def embedding(self, name: str) -> nn.Module:
        m = _BaselineEmbedding(*self._weight(name), name)
        self._weights[name] = m.inner.weight
        return m

    def embedding_bag(self, name: str, mode: str = "mean") -> nn.Module:
        m = _BaselineEmbeddingBag(*self._weight(name), name, mode)
        self._weights[name] = m.inner.weight
        return m

    def embedding_bag_collection(self, names: list[str], mode: str = "sum") -> nn.Module:
        return _BaselineBagCollection(self.embedding_bag(n, mode) for n in names)

    def sparse_optimizer(self, model: nn.Module) -> torch.optim.Adagrad:
        groups = [{"params": [w], "lr": self.specs[name].lr} for name, w in self._weights.items()]
        torch.sparse.check_sparse_tensor_invariants.disable()  # torch's default; said, so it does not warn
        return torch.optim.Adagrad(groups, lr=groups[0]["lr"], eps=1e-10)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self._weights.values())


def dense_parameters(model: nn.Module, sparse: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    skip = {id(p) for p in sparse}
    return [p for p in model.parameters() if id(p) not in skip]


__all__ = ["MlkvTables", "TableSpec", "TorchTables", "dense_parameters", "initial_rows"]
