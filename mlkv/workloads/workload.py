"""Workload: what the shared training loop (`runner`) needs from a model and its data.

A workload owns its dataset, its model and its metrics; the runner owns everything else (store, optimizers,
look-ahead, checkpoints, progress, output). Batches must be a pure function of (seed, epoch, batch index),
drawn with numpy only (they are produced on the Prefetcher's thread), so that a resumed run sees the same
batches as an uninterrupted one and two runs with the same seed compute the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedError
from .tables import TableSpec

Batch = dict[str, Any]  # tensors and arrays, plus "size": the number of samples it counts as


class Workload(ABC):
    name: ClassVar[str]
    #: the evaluation split run after every epoch, and the one reported at the end
    epoch_split: ClassVar[str] = "valid"
    final_split: ClassVar[str] = "test"

    @abstractmethod
    def tables(self) -> dict[str, TableSpec]:
        """The embedding tables, by name (names carry the workload as prefix, e.g. 'kge.entity')."""

    @abstractmethod
    def build_model(self, tables) -> nn.Module:
        """The model, taking its embedding modules from `tables` (MlkvTables or TorchTables)."""

    @abstractmethod
    def batches(self, epoch: int) -> Iterable[Batch]:
        """The training batches of `epoch`, deterministic in (seed, epoch)."""

    @abstractmethod
    def samples_per_epoch(self) -> int | None:
        """Training samples per epoch, when known without reading the data (for the progress bar)."""

    @abstractmethod
    def keys(self, batch: Batch) -> dict[str, Any]:
        """Table name -> keys `batch` will read (announced ahead by the Prefetcher)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of `batch`."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics on `split` (called in eval mode under torch.no_grad())."""

    def shard(self, batch: Batch, rank: int, world_size: int) -> Batch:
        """Rank `rank`'s share of a global batch for data-parallel training (`--distributed`): about
        1/world_size of its samples, at least one each, with "size" the share's samples and "global_size"
        the batch's. Losses must be means over samples, so that share-weighted sums give the global mean."""
        raise UnsupportedError(f"workload {self.name!r} does not support --distributed")

    def describe(self) -> dict[str, Any]:
        """Facts about the dataset for the report (sizes, source files)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What must match for --resume to continue a run (dataset and model shape)."""
        return {"workload": self.name}
