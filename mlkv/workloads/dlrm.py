"""DLRM (Naumov et al., 2019) on Criteo-format click logs, one embedding table per categorical column.

Model: a bottom MLP maps the 13 integer features, as log(1 + max(x, 0)), to a `dim` vector; each of the 26
categorical columns has its own table (`dlrm.C1`..`dlrm.C26`, key = the parsed 32-bit hash, so ids never
seen get a fresh row: full hashing, no vocabulary); the pairwise dot products of those 27 vectors and the
bottom output feed a top MLP that gives the click logit. Loss: binary cross-entropy; metrics: AUC, log loss.

Data: `--data FILE...` (Criteo Kaggle `train.txt`, Terabyte `day_N`, anything in that format; plain or
gzip; several files or glob patterns, read in order) streamed by `criteo_stream` (reading and parsing in
`--data-workers` processes, bounded memory). Test data: `--test-data FILE...`; else, with several files,
the last one; else the last `--test-fraction` of the single plain file's bytes (a single gzip file needs
`--test-data`). Without `--data` a synthetic Criteo dataset (see criteo_synth) is generated once and cached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import InvalidArgumentError
from . import criteo_stream, criteo_synth
from .criteo import CAT_COLUMNS, N_CAT, N_DENSE, CriteoBatch
from .criteo_stream import CriteoStream, Span
from .metrics import log_loss, roc_auc
from .tables import TableSpec
from .workload import Batch, Workload

EVAL_BATCH = 16384


def mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, tables, dim: int, bottom: tuple[int, ...] = (64,), top: tuple[int, ...] = (128, 64)):
        super().__init__()
        self.bottom = mlp([N_DENSE, *bottom, dim], last_relu=True)
        # one lookup of all 26 tables (mlkv.torch.EmbeddingBagCollection), a ModuleList of one bag per table
        self.embeddings = tables.embedding_bag_collection([f"dlrm.{c}" for c in CAT_COLUMNS], mode="sum")
        n = N_CAT + 1
        li, lj = torch.tril_indices(n, n, offset=-1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        self.top = mlp([dim + n * (n - 1) // 2, *top, 1], last_relu=False)

    def forward(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        """dense (B, 13) float32, cats (B, 26) int64 keys -> click logits (B,)."""
        x = self.bottom(dense)
        t = torch.cat([x.unsqueeze(1), self.embeddings(cats)], dim=1)  # (B, 27, dim)
        pairs = torch.bmm(t, t.transpose(1, 2))[:, self.li, self.lj]
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(1)


def to_batch(b: CriteoBatch) -> Batch:
    """Model inputs: dense = log(1 + max(x, 0)) as float32 (missing and negative counts give 0)."""
    dense = np.log1p(np.maximum(b.dense, 0).astype(np.float32))
    return {
        "dense": torch.from_numpy(dense),
        "cats": torch.from_numpy(b.cats),
        "labels": torch.from_numpy(b.labels),
        "size": len(b),
    }


class DLRMWorkload(Workload):
    name = "dlrm"
    epoch_split = "test"
    final_split = "test"

    def __init__(self, args: argparse.Namespace):
        self.batch_size = args.batch_size
        self.dim = args.dim
        self.lr = args.lr
        self.max_samples = args.max_samples
        self.max_test_samples = args.max_test_samples
        self.data_workers = args.data_workers
        self.facts: dict[str, Any] = {}
        if args.data:
            self._use_files(args)
        else:
            self._use_synthetic(args)
        self._vocabulary: list[np.ndarray] | None = None

    def _use_files(self, args) -> None:
        files = criteo_stream.expand_paths(args.data)
        test_files = criteo_stream.expand_paths(args.test_data) if args.test_data else []
        if test_files or getattr(args, "parse_only", False):  # --parse-only reads every --data file whole
            self.train_spans = [Span(f) for f in files]
            self.test_spans = [Span(f) for f in test_files]
        elif len(files) > 1:  # several files (days): the last one is the test data
            self.train_spans, self.test_spans = [Span(f) for f in files[:-1]], [Span(files[-1])]
        else:
            if not 0 < args.test_fraction < 1:
                raise InvalidArgumentError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
            head, tail = criteo_stream.tail_split(files[0], args.test_fraction)
            self.train_spans, self.test_spans = [head], [tail]
        self.n_train = args.max_samples  # unknown until read, unless capped
        train_files = list(dict.fromkeys(s.path for s in self.train_spans))
        test_names = [s.path for s in self.test_spans]
        self.facts = {
            "dataset": "criteo",
            "train_file": train_files[0] if len(train_files) == 1 else train_files,
            "test_file": test_names[0] if len(test_names) == 1 else test_names,
        }

    def _use_synthetic(self, args) -> None:
        spec = criteo_synth.SynthSpec(scale=args.scale, zipf=args.zipf)
        data_dir = args.data_dir or criteo_synth.default_data_dir()
        total = args.samples + args.test_samples
        bar_args = {"unit": "line", "unit_scale": True, "file": sys.stderr, "leave": False}
        with tqdm(
            total=total,
            desc="generating synthetic Criteo",
            disable=None if args.progress else True,
            **bar_args,
        ) as bar:
            train, test, meta = criteo_synth.ensure_dataset(
                data_dir, args.samples, args.test_samples, spec, progress=bar.update
            )
        self.train_spans, self.test_spans = [Span(train)], [Span(test)]
        self.n_train = min(args.samples, args.max_samples or args.samples)
        self.facts = {
            "dataset": "criteo-synthetic",
            "train_file": train,
            "test_file": test,
            "scale": spec.scale,
            "bayes_auc": meta["test"]["bayes_auc"],
            "bayes_logloss": meta["test"]["bayes_logloss"],
        }

    # ---- data -------------------------------------------------------------------------------------------
    def _read(self, spans: list[Span], batch_size: int, limit: int | None) -> Iterator[CriteoBatch]:
        # the stream's processes end when this generator ends or is closed or dropped (e.g. --max-steps)
        with CriteoStream(spans, batch_size, max_samples=limit, workers=self.data_workers) as stream:
            yield from stream

    def batches(self, epoch: int) -> Iterator[Batch]:
        return (to_batch(b) for b in self._read(self.train_spans, self.batch_size, self.max_samples))

    def parse_only(self) -> dict[str, Any]:
        """Read and parse the training data as training would, without training: lines per second."""
        return criteo_stream.measure_parse(
            self.train_spans, self.data_workers, self.max_samples, self.batch_size
        )

    def samples_per_epoch(self) -> int | None:
        return self.n_train

    def shard(self, batch: Batch, rank: int, world_size: int) -> Batch:
        n = batch["size"]
        if n < world_size:
            raise InvalidArgumentError(f"a batch of {n} samples cannot be shared by {world_size} ranks")
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        part = {k: batch[k][lo:hi] for k in ("dense", "cats", "labels")}
        return {**part, "size": hi - lo, "global_size": n}

    def keys(self, batch: Batch) -> dict[str, Any]:
        cats = batch["cats"]
        return {f"dlrm.{c}": cats[:, i] for i, c in enumerate(CAT_COLUMNS)}

    def vocabulary(self, column: int) -> np.ndarray:
        """Every key of `column` in the training and test data (the in-memory baseline needs them all)."""
        if self._vocabulary is None:
            seen: list[list[np.ndarray]] = [[] for _ in range(N_CAT)]
            parts = [(self.train_spans, self.max_samples), (self.test_spans, self.max_test_samples)]
            for spans, limit in parts:
                for b in self._read(spans, 1 << 18, limit):
                    for c in range(N_CAT):
                        seen[c].append(np.unique(b.cats[:, c]))
            self._vocabulary = [np.unique(np.concatenate(s)) for s in seen]
        return self._vocabulary[column]

    # ---- model ------------------------------------------------------------------------------------------
    def tables(self) -> dict[str, TableSpec]:
        return {
            f"dlrm.{c}": TableSpec(self.dim, self.lr, vocabulary=lambda i=i: self.vocabulary(i))
            for i, c in enumerate(CAT_COLUMNS)
        }

    def build_model(self, tables) -> nn.Module:
        return DLRM(tables, self.dim)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["dense"], batch["cats"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        labels, probs = [], []
        for b in self._read(self.test_spans, EVAL_BATCH, self.max_test_samples):
            batch = to_batch(b)
            probs.append(torch.sigmoid(model(batch["dense"], batch["cats"])).numpy())
            labels.append(b.labels)
        y, p = np.concatenate(labels), np.concatenate(probs)
        return {"auc": roc_auc(y, p), "logloss": log_loss(y, p)}

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)

    def identity(self) -> dict[str, Any]:
        return {"workload": self.name, "train_file": self.facts["train_file"], "dim": self.dim}
