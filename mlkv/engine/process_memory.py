"""process_memory: the resident memory of this whole process, anonymous and file-backed apart.

Read from /proc/self/status (Linux); (None, None) where there is no such file. Anonymous memory holds the
memory tiers, the key indexes and everything else the process allocates; file-backed memory is mapped file
pages: the slab files' pages read or written through their mapping, and shared libraries. Used by
`Store.stats()` and by a SlotFile deciding whether its mapped pages really grew past its window.
`memory_for_files()` is how much a file read into the page cache could occupy without pushing out what
the machine needs: MemAvailable (/proc/meminfo), capped by the room left in the process's cgroup and its
parents (limit - usage + reclaimable inactive file pages; v1 and v2), whose page cache counts against it.
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


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cgroup_room() -> int | None:
    """The least room left in this process's cgroup and its parents (v1 or v2): limit - usage + the
    inactive file pages the group may reclaim; None where no group has a limit or it is unknown."""
    text = _read("/proc/self/cgroup")
    if text is None:
        return None
    lines = [parts for line in text.splitlines() if len(parts := line.split(":", 2)) == 3]
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    v2 = [path for h, controllers, path in lines if h == "0" and controllers == ""]
    if v1:
        root, files, path = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes"), v1[0]
    elif v2:
        root, files, path = "/sys/fs/cgroup", ("memory.max", "memory.current"), v2[0]
    else:
        return None
    parts = [p for p in path.split("/") if p]
    rooms = []
    for depth in range(len(parts), -1, -1):
        group = os.path.join(root, *parts[:depth])
        limit, usage = (_read(os.path.join(group, name)) for name in files)
        if limit is None or usage is None or not limit.strip().isdigit() or int(limit) >= 1 << 60:
            continue  # "max" (v2) or a page-rounded 2**63 (v1): no limit here
        stat = dict(line.split() for line in (_read(os.path.join(group, "memory.stat")) or "").splitlines())
        inactive = int(stat.get("total_inactive_file", stat.get("inactive_file", 0)))
        rooms.append(max(0, int(limit) - int(usage) + inactive))
    return min(rooms, default=None)


def memory_for_files() -> int | None:
    """Bytes the page cache may take for a file without pushing out what the machine needs: MemAvailable,
    capped by the room left in this process's cgroup; None where /proc/meminfo cannot be read."""
    text = _read("/proc/meminfo")
    found = [
        int(line.split()[1]) * 1024 for line in (text or "").splitlines() if line.startswith("MemAvailable:")
    ]
    if not found:
        return None
    room = _cgroup_room()
    return found[0] if room is None else min(found[0], room)
