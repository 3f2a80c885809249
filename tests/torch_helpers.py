"""Helpers shared by the tests of mlkv.torch: a Table spy that logs row traffic and its staleness books."""

from __future__ import annotations

import numpy as np

import mlkv


class SpyTable:
    """A Table that logs every get/update/release and keeps the staleness books of each reader."""

    def __init__(self, table: mlkv.Table):
        self._t = table
        self.gets: list[tuple[np.ndarray, bool, object]] = []
        self.updates: list[tuple[np.ndarray, object]] = []
        self.releases: list[tuple[np.ndarray, object]] = []
        self.held: dict[object, set[int]] = {}

    def __getattr__(self, name):
        return getattr(self._t, name)

    def get(self, keys, track=True, reader=None):
        k = np.asarray(keys).copy()
        self.gets.append((k, track, reader))
        if track:
            self.held.setdefault(reader, set()).update(k.tolist())
        return self._t.get(keys, track=track, reader=reader)

    def update(self, keys, grads, reader=None, **kw):
        k = np.asarray(keys).copy()
        self.updates.append((k, reader))
        self.held.get(reader, set()).difference_update(k.tolist())
        return self._t.update(keys, grads, reader=reader, **kw)

    def release(self, keys, reader=None):
        k = np.asarray(keys).copy()
        self.releases.append((k, reader))
        self.held.get(reader, set()).difference_update(k.tolist())
        return self._t.release(keys, reader=reader)

    def outstanding(self) -> int:
        return sum(len(v) for v in self.held.values())
