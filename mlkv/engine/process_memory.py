"""process_memory: the resident memory of this whole process, anonymous and file-backed apart.

Read from /proc/self/status (Linux); (None, None) where there is no such file. Anonymous memory holds the
memory tiers, the key indexes and everything else the process allocates; file-backed memory is mapped file
pages: the slab files' pages read or written through their mapping, and shared libraries. Used by
`Store.stats()` and by a SlotFile deciding whether its mapped pages really grew past its window.
Thread-safe (a read of a /proc file); about 20 us a call.
"""

from __future__ import annotations


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
