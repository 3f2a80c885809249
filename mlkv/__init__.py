"""mlkv: train embedding tables far larger than RAM, with PyTorch, on a local disk-based store."""

from . import init, optim
from .errors import (
    CorruptionError,
    MlkvError,
    ReadOnlyError,
    SchemaError,
    StalenessTimeout,
    StoreClosedError,
    StoreLockedError,
)
from .store import Store, Table
from .store import open_store as open  # noqa: A004 - mlkv.open is the public name

__version__ = "0.1.0"

__all__ = [
    "CorruptionError",
    "MlkvError",
    "ReadOnlyError",
    "SchemaError",
    "StalenessTimeout",
    "StoreClosedError",
    "StoreLockedError",
    "Store",
    "Table",
    "init",
    "open",
    "optim",
]
