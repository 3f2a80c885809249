"""Imported by the forkserver that starts the Criteo stream's workers, before it forks any of them.

Importing it compiles the parse loop (or loads it from numba's cache) in the server, so every worker forked
from it starts with the loop ready instead of spending a second or more on it. Importing it anywhere else
is harmless: it only warms the same loop in that process.
"""

from __future__ import annotations

from .criteo import warm_up

warm_up()
