"""Shared pieces of the fault campaigns (`python -m mlkv.bench.faults`): exact table dumps, their
comparison, `mlkv check` run in process, and the tally every campaign prints.

A dump holds every row, every optimizer state, the row count and the Adam step of a table as exact bit
patterns (uint32 views of the float32 values), keys sorted, so "equal" means bit for bit. Nothing here
keeps state between calls; the functions are safe to call from several threads on different stores.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import threading
import traceback

import numpy as np

#: campaigns spawn writer processes from several threads: a child forked by one thread holds copies of the
#: other threads' open files (among them a store's flock'd LOCK) until it execs, so a store closed in that
#: window stays locked for a moment. Spawning and closing stores take turns under this lock.
SPAWN_LOCK = threading.Lock()


def table_dump(t) -> dict[str, np.ndarray]:
    """Everything table `t` holds, as exact bit patterns, keys sorted."""
    parts = list(t.items(batch_size=333))
    keys = np.concatenate([k for k, _ in parts]) if parts else np.empty(0, np.uint64)
    rows = np.concatenate([r for _, r in parts]) if parts else np.empty((0, t.dim), np.float32)
    order = np.argsort(keys)
    keys, rows = keys[order], rows[order]
    out = {"keys": keys, "rows": rows.view(np.uint32)}
    if len(np.unique(keys)) != len(keys):
        out["duplicate_keys"] = np.array([len(keys) - len(np.unique(keys))])
    for name, state in t.optimizer_state(keys).items():
        out[f"state.{name}"] = state.view(np.uint32)
    out["len"] = np.array([len(t)])
    out["step"] = np.array([t.step])
    return out


def store_dump(store, names=None) -> dict[str, dict[str, np.ndarray]]:
    """Dumps of the tables `names` (default: all) that exist in `store`."""
    present = store.tables()
    wanted = present if names is None else [n for n in names if n in present]
    return {name: table_dump(store.table(name)) for name in wanted}


def dump_difference(got: dict, want: dict) -> str | None:
    """The first difference between two store dumps, in words; None when they are equal bit for bit."""
    if sorted(got) != sorted(want):
        return f"tables {sorted(got)} != {sorted(want)}"
    for name in sorted(want):
        g, w = got[name], want[name]
        if sorted(g) != sorted(w):
            return f"table {name!r}: fields {sorted(g)} != {sorted(w)}"
        for field in w:
            a, b = g[field], w[field]
            if a.shape == b.shape and np.array_equal(a, b):
                continue
            if field == "rows" and a.shape == b.shape:
                bad = np.flatnonzero((a != b).any(axis=1))
                return f"table {name!r}: {len(bad)} of {len(b)} rows differ, first keys {w['keys'][bad[:5]]}"
            return (
                f"table {name!r} field {field!r}: got {a.ravel()[:6]} (size {a.size}), want {b.ravel()[:6]}"
            )
    return None


def wrong_rows(got: dict, want: dict) -> int:
    """How many returned rows (over all tables) differ from `want` or should not exist: the count that every
    campaign requires to be zero."""
    n = 0
    for name, g in got.items():
        w = want.get(name)
        if w is None:
            n += len(g["keys"])
            continue
        common, gi, wi = np.intersect1d(g["keys"], w["keys"], return_indices=True)
        n += len(g["keys"]) - len(common)  # rows that should not be there
        same = (g["rows"][gi] == w["rows"][wi]).all(axis=1)
        for field in (f for f in w if f.startswith("state.")):
            if field in g:
                same &= (g[field][gi] == w[field][wi]).all(axis=1)
        n += int((~same).sum())
    return n


def run_check(path: str) -> tuple[int, str]:
    """`mlkv check PATH` in this process: (exit status, what it printed)."""
    from ..cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(["check", os.fspath(path)])
        except Exception:
            return -1, traceback.format_exc()
    return rc, out.getvalue()


class Tally:
    """Outcome counts of a campaign plus the first few failures, each with what reproduces it."""

    def __init__(self, name: str):
        self.name = name
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.wrong_rows = 0
        self.extra = ""  # campaign-specific figures, printed under the counts
        self._lock = threading.Lock()

    def add(self, outcome: str, failure: str | None = None, wrong: int = 0) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.wrong_rows += wrong
            if failure is not None:
                self.failures.append(failure)

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [
            f"{self.name}: {self.cases} cases, {len(self.failures)} failures, {self.wrong_rows} wrong rows",
            "  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
        ]
        if self.extra:
            lines.append(self.extra)
        lines += [f"  FAIL {f}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures")
        return "\n".join(lines)
