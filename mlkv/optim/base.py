"""The optimizer interface: an update rule whose state lives in the same float32 row as the embedding.

A table row is one float32 vector `[embedding (dim) | state (state_width(dim))]`, so a row read from disk
carries everything its update needs and a checkpoint captures weights and state together. The store calls
`apply` with the touched rows (unique keys, duplicate gradients already summed) and writes them back.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError


class Optimizer(ABC):
    """Base class of the row-wise optimizers; subclasses are frozen dataclasses of their hyperparameters."""

    kind: ClassVar[str]

    @abstractmethod
    def state_width(self, dim: int) -> int:
        """Float32 words of optimizer state stored after the `dim` embedding columns."""

    def state_names(self, dim: int) -> dict[str, slice]:
        """State name -> column slice within the state part of a row (for `table.optimizer_state`)."""
        return {}

    def init_state(self, n: int, dim: int) -> np.ndarray:
        """The state of `n` new rows, shape (n, state_width(dim)); zeros unless the rule says otherwise."""
        return np.zeros((n, self.state_width(dim)), dtype=np.float32)

    @abstractmethod
    def apply(self, rows: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Update `rows` (n, dim + state_width) in place from `grads` (n, dim).

        `step` is the table's update count including this one (1 on the first update); only Adam uses it.
        """

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able `{"kind": ..., **hyperparameters}`, persisted in the store schema."""


def split_rows(
    opt: Optimizer, rows: np.ndarray, grads: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and return (weights view, state view, float32 grads) for an `apply` call."""
    if not isinstance(rows, np.ndarray) or rows.dtype != np.float32:
        raise InvalidTypeError(
            f"rows must be a float32 numpy array, got {getattr(rows, 'dtype', type(rows).__name__)}"
        )
    grads = np.asarray(grads, dtype=np.float32)
    if grads.ndim != 2:
        raise InvalidArgumentError(f"grads must be 2-D (n, dim), got shape {grads.shape}")
    n, dim = grads.shape
    expected = (n, dim + opt.state_width(dim))
    if rows.shape != expected:
        raise InvalidArgumentError(
            f"rows must have shape {expected} for {opt.kind} with dim={dim}, got {rows.shape}"
        )
    return rows[:, :dim], rows[:, dim:], grads


def check_real(name: str, value: Any, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    """`value` as a float, or ValueError naming the expected range and the received value."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    above = v >= low if low_inclusive else v > low
    if not (ok and math.isfinite(v) and above and v < high):
        lo = "[" if low_inclusive else "("
        raise InvalidArgumentError(f"{name} must be a finite number in {lo}{low}, {high}), got {value!r}")
    return v
