"""The hand-glued KV-store baseline for the workloads: embedding rows in RocksDB, read and written around
every step by plain code, as an ML engineer wires a table to RocksDB without mlkv.

Each table's rows (embedding + optimizer state, float32) live in one RocksDB database (the row store of
engine/naive_rows.py, shared with `mlkv bench train`) under a 10-byte key: the table's number (2 bytes)
and the key (8). Every forward reads the distinct keys of the batch with one ``multi_get`` per table,
synchronously; `step()` applies the table's row optimizer (the same `mlkv.optim` rule and numbers as the
mlkv run) and writes the rows back with one ``WriteBatch``.
No memory tier, no look-ahead, no staleness books, no checkpoints: the "rocksdb-naive" configuration of
`mlkv bench train`, for a whole workload. Rows start as mlkv's (same initialiser, through a throw-away
memory store, as the in-memory baseline), loaded for every key the data holds before training starts.

Only the pooled lookups a model asks through `embedding_bag_collection` are offered (DLRM); the other
workloads raise UnsupportedError. Thread-safety: one training thread.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling
from torch import nn

import mlkv

from ..engine.naive_rows import key_bytes, rocks_options, write_rows
from ..errors import InvalidArgumentError, UnsupportedError
from .tables import TableSpec, initial_rows

LOAD_CHUNK = 1 << 18


class RocksNaiveTables:
    """Tables in one RocksDB database at `path` (made fresh, removed by close())."""

    backend = "rocksdb-naive"

    def __init__(self, specs: dict[str, TableSpec], seed: int, path: str):
        from rocksdict import Rdict

        self.specs, self.seed, self.path = specs, seed, path
        self._prefixes = {name: i.to_bytes(2, "big") for i, name in enumerate(specs)}
        self._optimizers = {name: mlkv.optim.Adagrad(lr=spec.lr) for name, spec in specs.items()}
        self._steps = dict.fromkeys(specs, 0)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        self.db = Rdict(path, rocks_options())

    def _load(self, name: str) -> None:
        """Write the initial rows of every key of table `name` (not timed: before the first step)."""
        spec, opt = self.specs[name], self._optimizers[name]
        keys = spec.keys()
        emb = initial_rows(name, spec, keys, self.seed).numpy()  # itself in chunks, through one store
        for lo in range(0, len(keys), LOAD_CHUNK):
            part = slice(lo, lo + LOAD_CHUNK)
            n = len(keys[part])
            self.write(name, keys[part], np.concatenate([emb[part], opt.init_state(n, spec.dim)], axis=1))

    def read(self, name: str, keys: np.ndarray) -> np.ndarray:
        """Rows (embedding + state) of distinct keys, one multi_get."""
        width = self.specs[name].dim + self._optimizers[name].state_width(self.specs[name].dim)
        values = self.db[key_bytes(keys, self._prefixes[name])]
        missing = next((i for i, v in enumerate(values) if v is None), None)
        if missing is not None:
            bad = keys[missing]
            raise InvalidArgumentError(
                f"key {int(bad)} of table {name!r} is not in the rocksdb-naive baseline's vocabulary"
            )
        return np.frombuffer(b"".join(values), dtype=np.float32).reshape(len(keys), width).copy()

    def write(self, name: str, keys: np.ndarray, rows: np.ndarray) -> None:
        write_rows(self.db, key_bytes(keys, self._prefixes[name]), rows)

    def apply(self, name: str, keys: np.ndarray, rows: np.ndarray, grads: np.ndarray) -> None:
        self._steps[name] += 1
        self._optimizers[name].apply(rows, grads, self._steps[name])
        self.write(name, keys, rows)

    # ---- the table-backend surface (see tables.py) -----------------------------------------------------
    def embedding(self, name: str) -> nn.Module:
        raise UnsupportedError("the rocksdb-naive baseline offers pooled lookups only (the dlrm workload)")

    def embedding_bag(self, name: str, mode: str = "mean") -> nn.Module:
        raise UnsupportedError("the rocksdb-naive baseline offers pooled lookups only (the dlrm workload)")

    def embedding_bag_collection(self, names: list[str], mode: str = "sum") -> nn.Module:
        for name in names:
            self._load(name)
        return _NaiveBagCollection(self, names, mode)

    def sparse_optimizer(self, model: nn.Module) -> _NaiveStep:
        return _NaiveStep([m for m in model.modules() if isinstance(m, _NaiveBagCollection)])

    def sparse_parameters(self) -> list[nn.Parameter]:
        return []

    def close(self) -> None:
        self.db.close()
        shutil.rmtree(self.path, ignore_errors=True)


class _NaiveBagCollection(nn.Module):
    """Input (B, T) or (B, T, L) keys -> (B, T, dim): per table, np.unique, one multi_get, torch's
    embedding_bag on the rows; the rows read are kept for the step."""

    def __init__(self, tables: RocksNaiveTables, names: list[str], mode: str):
        super().__init__()
        self.tables, self.names, self.mode = tables, list(names), mode
        self.pending: list[tuple[str, np.ndarray, np.ndarray, torch.Tensor]] = []

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        bags = keys.unsqueeze(2) if keys.dim() == 2 else keys
        outs = []
        for t, name in enumerate(self.names):
            uk, inv = np.unique(bags[:, t].numpy(), return_inverse=True)
            rows = self.tables.read(name, uk)
            w = torch.from_numpy(np.ascontiguousarray(rows[:, : self.tables.specs[name].dim]))
            train = self.training and torch.is_grad_enabled()
            w.requires_grad_(train)
            outs.append(F.embedding_bag(torch.from_numpy(inv.reshape(bags[:, t].shape)), w, mode=self.mode))
            if train:
                self.pending.append((name, uk, rows, w))
        return torch.stack(outs, dim=1)


class _NaiveStep:
    """step(): each read that got a gradient is updated by its table's row optimizer and written back.
    Reads are applied one by one, each to the rows it read: enough for one forward per step (DLRM); two
    reads of a table in one step (gradient accumulation) would lose the first update, as naive code does."""

    def __init__(self, modules: list[_NaiveBagCollection]):
        self.modules = modules

    def step(self) -> None:
        for m in self.modules:
            for name, uk, rows, w in m.pending:
                if w.grad is not None:
                    m.tables.apply(name, uk, rows, w.grad.numpy())
            m.pending.clear()

    def zero_grad(self) -> None:
        for m in self.modules:
            for *_, w in m.pending:
                w.grad = None
