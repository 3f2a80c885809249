"""Fault injection for crash tests: MLKV_CRASH_AT=<point> kills the process with SIGKILL at that point.

The points sit at the steps of a checkpoint where a crash is most interesting. Reading one environment
variable per checkpoint step costs nothing measurable; no hot path calls this.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "checkpoint:start",  # dirty rows flushed to the engine, nothing synced yet
    "slab:after_sync",  # one table's slot file fsynced, its index log not yet appended
    "slab:after_log",  # one table's index log appended and fsynced
    "manifest:before_rename",  # the new manifest is written and fsynced as MANIFEST.tmp
    "manifest:after_rename",  # committed; old slots not yet released
)


def crash_point(name: str) -> None:
    if os.environ.get("MLKV_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
