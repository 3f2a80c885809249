"""Plain SGD: no state, w -= lr * g (what torch.optim.SGD does to an nn.Embedding(sparse=True))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Optimizer, check_real, split_rows


@dataclass(frozen=True)
class SGD(Optimizer):
    lr: float

    kind: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_real("lr", self.lr, low=0.0, low_inclusive=False))

    def state_width(self, dim: int) -> int:
        return 0

    def apply(self, rows: np.ndarray, grads: np.ndarray, step: int) -> None:
        w, _, g = split_rows(self, rows, grads)
        w -= np.float32(self.lr) * g

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr}
