"""stats() reports the process's anonymous and file-backed resident memory apart (what containers see).

Oracle: reading a slab table far larger than the memory tier maps its file pages (file-backed RSS grows by
about the bytes read, here with the slot file's unmapping window out of the way), while growing the memory
tier allocates anonymous memory.

The measurement runs in a fresh interpreter (this file run as a script): inside the pytest process, memory
freed by earlier tests is reused by malloc without the resident set growing, which hid the tier's growth.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import mlkv
from mlkv.engine import slot_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

N, DIM = 40_000, 64  # 512-byte rows with Adagrad state: a ~21 MiB slab file


def measure(path) -> dict:
    """Write the table, then report how each kind of resident memory moved while reading it."""
    slot_file.MAPPED_WINDOW_BYTES = 1 << 40  # keep what the reads map
    opt = mlkv.optim.Adagrad(0.1)
    with mlkv.open(path, cache_bytes="1MiB") as store:
        t = store.table("e", dim=DIM, optimizer=opt)
        for i in range(0, N, 10_000):
            t.put(np.arange(i, i + 10_000), np.ones((10_000, DIM), np.float32))
    out = {}
    with mlkv.open(path, cache_bytes="1MiB") as store:
        t = store.table("e")
        before = store.stats()
        for i in range(0, N, 5_000):
            t.get(np.arange(i, i + 5_000), track=False)  # every row read through the slab's mapping
        after = store.stats()
        out["anon_before"], out["file_before"] = before["rss_anon_bytes"], before["rss_file_bytes"]
        out["file_growth"] = after["rss_file_bytes"] - before["rss_file_bytes"]
    with mlkv.open(path, cache_bytes="64MiB") as store:  # a tier holding the table: anonymous
        t = store.table("e")
        anon = store.stats()["rss_anon_bytes"]
        t.get(np.arange(N), track=False)
        out["anon_growth"] = store.stats()["rss_anon_bytes"] - anon
    return out


def test_stats_report_anonymous_and_file_backed_memory_apart(tmp_path):
    argv = [sys.executable, __file__, str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["anon_before"] > 0 and got["file_before"] > 0
    assert got["file_growth"] > 10 * 2**20, got
    assert got["anon_growth"] > 10 * 2**20, got


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
