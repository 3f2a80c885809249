"""Adagrad with one accumulator per weight, matching torch.optim.Adagrad on sparse gradients.

The float32 operation order mirrors torch's sparse branch (`_single_tensor_adagrad`):
g += weight_decay * w; sum += g*g; std = sqrt(sum) + eps; w += -lr * (g / std).

Weight decay (L2, torch's formula) is applied to the rows of the update only: a row decays when it gets a
gradient. torch refuses weight_decay with sparse gradients; with every row in every update this equals
torch.optim.Adagrad(weight_decay=...) on a dense nn.Embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Optimizer, check_real, split_rows


@dataclass(frozen=True)
class Adagrad(Optimizer):
    r"""Adagrad with one accumulator per weight, the same float32 arithmetic as ``torch.optim.Adagrad``
    on sparse gradients: :math:`s \leftarrow s + g^2`,
    :math:`w \leftarrow w - lr\, g / (\sqrt{s} + \epsilon)`.

    The accumulator is stored in the row beside the embedding (``optimizer_state(keys)["sum"]``).

    Args:
        lr (float): learning rate, >= 0.
        eps (float): added to the denominator, > 0 (torch allows 0; here a zero gradient on a zero
            accumulator must stay 0). Default: ``1e-10``.
        initial_accumulator_value (float): starting value of the accumulator, >= 0. Default: ``0.0``.
        weight_decay (float): L2 penalty (torch's formula), applied to the rows of the update only.
            Default: ``0.0``.

    Raises:
        InvalidArgumentError: a hyper-parameter is not a finite number in its range (the message names it).

    Shape:
        - state per row: :math:`\text{dim}` floats.
    """

    lr: float
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    weight_decay: float = 0.0

    kind: ClassVar[str] = "adagrad"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_real("lr", self.lr, low=0.0, low_inclusive=True))
        # eps > 0 (torch allows 0): a zero gradient on a zero accumulator must give 0, not 0/0 = nan
        object.__setattr__(self, "eps", check_real("eps", self.eps, low=0.0, low_inclusive=False))
        value = check_real(
            "initial_accumulator_value", self.initial_accumulator_value, low=0.0, low_inclusive=True
        )
        object.__setattr__(self, "initial_accumulator_value", value)
        wd = check_real("weight_decay", self.weight_decay, low=0.0, low_inclusive=True)
        object.__setattr__(self, "weight_decay", wd)

    def state_width(self, dim: int) -> int:
        return dim

    def state_names(self, dim: int) -> dict[str, slice]:
        return {"sum": slice(0, dim)}

    def init_state(self, n: int, dim: int) -> np.ndarray:
        return np.full((n, dim), self.initial_accumulator_value, dtype=np.float32)

    def apply(self, rows: np.ndarray, grads: np.ndarray, step: int) -> None:
        w, acc, g = split_rows(self, rows, grads)
        if self.weight_decay:
            g = g + np.float32(self.weight_decay) * w
        acc += g * g
        std = np.sqrt(acc)
        std += np.float32(self.eps)
        update = np.divide(g, std)
        update *= np.float32(-self.lr)
        w += update

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
            "weight_decay": self.weight_decay,
        }
