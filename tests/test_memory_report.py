"""stats() reports the process's anonymous and file-backed resident memory apart (what containers see).

Oracle: reading a slab table far larger than the memory tier maps its file pages (file-backed RSS grows by
about the bytes read, here with the slot file's unmapping window out of the way), while growing the memory
tier allocates anonymous memory.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import mlkv
from mlkv.engine import slot_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

N, DIM = 40_000, 64  # 512-byte rows with Adagrad state: a ~21 MiB slab file


def test_stats_report_anonymous_and_file_backed_memory_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(slot_file, "MAPPED_WINDOW_BYTES", 1 << 40)  # keep what the reads map
    opt = mlkv.optim.Adagrad(0.1)
    with mlkv.open(tmp_path, cache_bytes="1MiB") as store:
        t = store.table("e", dim=DIM, optimizer=opt)
        for i in range(0, N, 10_000):
            t.put(np.arange(i, i + 10_000), np.ones((10_000, DIM), np.float32))
    with mlkv.open(tmp_path, cache_bytes="1MiB") as store:
        t = store.table("e")
        before = store.stats()
        assert before["rss_anon_bytes"] > 0 and before["rss_file_bytes"] > 0
        for i in range(0, N, 5_000):
            t.get(np.arange(i, i + 5_000), track=False)  # every row read through the slab's mapping
        after = store.stats()
        assert after["rss_file_bytes"] - before["rss_file_bytes"] > 10 * 2**20
    with mlkv.open(tmp_path, cache_bytes="64MiB") as store:  # a tier holding the table: anonymous
        t = store.table("e")
        anon = store.stats()["rss_anon_bytes"]
        t.get(np.arange(N), track=False)
        assert store.stats()["rss_anon_bytes"] - anon > 10 * 2**20
