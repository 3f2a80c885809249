"""The store layer: tables, schema, the memory tier and its budget, checkpoints, stats."""

from .store import Store, open_store
from .table import Table

__all__ = ["Store", "Table", "open_store"]
