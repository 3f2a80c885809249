"""Plain SGD: no state, w -= lr * (g + weight_decay * w) (torch.optim.SGD on an nn.Embedding(sparse=True)).

Weight decay (L2, torch's formula `g += weight_decay * w`) is applied to the rows of the update only: a row
decays when it gets a gradient. torch refuses weight_decay with sparse gradients; with every row in every
update this equals torch.optim.SGD(weight_decay=...) on a dense nn.Embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Optimizer, check_real, split_rows


@dataclass(frozen=True)
class SGD(Optimizer):
    r"""Stochastic gradient descent on the rows of an update: :math:`w \leftarrow w - lr (g + \lambda w)`.

    Same result as ``torch.optim.SGD`` (no momentum) on an ``nn.Embedding(sparse=True)`` holding the rows.
    Stores no state in the row.

    Args:
        lr (float): learning rate, >= 0.
        weight_decay (float): L2 penalty :math:`\lambda` (torch's), applied to the rows of the update
            only. Default: ``0.0``.

    Raises:
        InvalidArgumentError: a hyper-parameter is not a finite number in its range (the message names it).

    Shape:
        - state per row: 0 floats.
    """

    lr: float
    weight_decay: float = 0.0

    kind: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_real("lr", self.lr, low=0.0, low_inclusive=True))
        wd = check_real("weight_decay", self.weight_decay, low=0.0, low_inclusive=True)
        object.__setattr__(self, "weight_decay", wd)

    def state_width(self, dim: int) -> int:
        return 0

    def apply(self, rows: np.ndarray, grads: np.ndarray, step: int) -> None:
        w, _, g = split_rows(self, rows, grads)
        if self.weight_decay:
            g = g + np.float32(self.weight_decay) * w
        w -= np.float32(self.lr) * g

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay}
