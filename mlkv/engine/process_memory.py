"""process_memory: the resident memory of this whole process, anonymous and file-backed apart.

Read from /proc/self/status (Linux); (None, None) where there is no such file. Anonymous memory holds the
memory tiers, the key indexes and everything else the process allocates; file-backed memory is mapped file
pages: the slab files' pages read or written through their mapping, and shared libraries. Used by
`Store.stats()` and by a SlotFile deciding whether its mapped pages really grew past its window.
`memory_for_files()` is how much a file read into the page cache could occupy without pushing out what
the machine needs: MemAvailable (/proc/meminfo), capped by the memory limit of the process's cgroup (v1
`memory.limit_in_bytes`, v2 `memory.max`), whose page cache counts against it.
Thread-safe (reads of /proc and /sys files); about 20 us a call.
"""

from __future__ import annotations

import os


def process_memory() -> tuple[int | None, int | None]:
    """(anonymous, file-backed) resident bytes: RssAnon and RssFile + RssShmem, or (None, None)."""
    try:
        with open("/proc/self/status") as f:
            found = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                     if k in ("RssAnon", "RssFile", "RssShmem")}  # fmt: skip
    except (OSError, ValueError):
        return None, None
    if "RssAnon" not in found:
        return None, None
    return found["RssAnon"], found.get("RssFile", 0) + found.get("RssShmem", 0)


def _cgroup_limit() -> int | None:
    """The smallest memory limit of this process's cgroup and its parents (v1 or v2), or None where there is
    none or it is unknown."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [parts for line in f if len(parts := line.rstrip("\n").split(":", 2)) == 3]
    except OSError:
        return None
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    v2 = [path for h, controllers, path in lines if h == "0" and controllers == ""]
    root, name, path = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", v1[0]) if v1 else (
        "/sys/fs/cgroup", "memory.max", v2[0] if v2 else None)  # fmt: skip
    if path is None:
        return None
    parts = [p for p in path.split("/") if p]
    limits = []
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(root, *parts[:depth], name)) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" (v2) or a page-rounded 2**63 (v1): no limit
            limits.append(int(text))
    return min(limits, default=None)


def memory_for_files() -> int | None:
    """Bytes the page cache may take for a file without pushing out what the machine needs: MemAvailable,
    capped by this process's cgroup memory limit; None where /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            found = [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        return None
    if not found:
        return None
    avail, limit = found[0], _cgroup_limit()
    return avail if limit is None else min(avail, limit)
