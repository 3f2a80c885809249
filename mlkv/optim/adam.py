"""Adam with both moments stored in the row, matching torch.optim.SparseAdam.

Only touched rows decay their moments (the SparseAdam approximation), but the bias correction uses one
step counter per table, passed in by the store. The float32 operation order mirrors
`torch.optim._functional.sparse_adam`:
  m += (g - m) * (1 - beta1);  v += (g*g - v) * (1 - beta2)
  w += -(lr * sqrt(1 - beta2**step) / (1 - beta1**step)) * (m / (sqrt(v) + eps))
with the step size computed in float64 and then rounded to float32, as torch does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError
from .base import Optimizer, check_real, split_rows


@dataclass(frozen=True)
class Adam(Optimizer):
    r"""Adam with both moments stored in the row, the same float32 arithmetic as ``torch.optim.SparseAdam``.

    Only the rows of an update decay their moments (SparseAdam's approximation); the bias correction uses
    the table's step counter, which advances once per :meth:`Table.update` and is checkpointed with it.

    Args:
        lr (float): learning rate, >= 0. Default: ``0.001``.
        betas (tuple[float, float]): decay rates of the first and second moment, each in [0, 1).
            Default: ``(0.9, 0.999)``.
        eps (float): added to the denominator, > 0. Default: ``1e-8``.

    Raises:
        InvalidArgumentError: a hyper-parameter is not a finite number in its range (the message names it).

    Shape:
        - state per row: :math:`2 \times \text{dim}` floats (``exp_avg``, ``exp_avg_sq``).
    """

    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    kind: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_real("lr", self.lr, low=0.0, low_inclusive=True))
        object.__setattr__(self, "eps", check_real("eps", self.eps, low=0.0, low_inclusive=False))
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InvalidArgumentError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
        b1 = check_real("betas[0]", betas[0], low=0.0, low_inclusive=True, high=1.0)
        b2 = check_real("betas[1]", betas[1], low=0.0, low_inclusive=True, high=1.0)
        object.__setattr__(self, "betas", (b1, b2))

    def state_width(self, dim: int) -> int:
        return 2 * dim

    def state_names(self, dim: int) -> dict[str, slice]:
        return {"exp_avg": slice(0, dim), "exp_avg_sq": slice(dim, 2 * dim)}

    def apply(self, rows: np.ndarray, grads: np.ndarray, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
            raise InvalidArgumentError(
                f"step must be an integer >= 1 (the table's update count), got {step!r}"
            )
        w, state, g = split_rows(self, rows, grads)
        dim = g.shape[1]
        m, v = state[:, :dim], state[:, dim:]
        beta1, beta2 = self.betas

        m_update = g - m
        m_update *= np.float32(1.0 - beta1)
        m += m_update
        v_update = g * g
        v_update -= v
        v_update *= np.float32(1.0 - beta2)
        v += v_update

        denom = np.sqrt(v)
        denom += np.float32(self.eps)
        step_size = self.lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        update = np.divide(m, denom)
        update *= np.float32(-step_size)
        w += update

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": self.lr, "betas": list(self.betas), "eps": self.eps}
