"""Rebuild an optimizer from the `config()` dict persisted in a store schema."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError
from .adagrad import Adagrad
from .adam import Adam
from .base import Optimizer
from .rowwise_adagrad import RowWiseAdagrad
from .sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.kind: cls for cls in (SGD, Adagrad, RowWiseAdagrad, Adam)}


def optimizer_from_config(cfg: dict[str, Any]) -> Optimizer:
    """The optimizer described by `cfg` (as returned by `Optimizer.config()`)."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise InvalidArgumentError(f"optimizer config must be a dict with a 'kind' key, got {cfg!r}")
    params = dict(cfg)
    kind = params.pop("kind")
    if kind not in OPTIMIZERS:
        raise InvalidArgumentError(f"unknown optimizer kind {kind!r}; expected one of {sorted(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[kind](**params)
    except TypeError as e:
        raise InvalidArgumentError(f"bad {kind} optimizer config {cfg!r}: {e}") from None
