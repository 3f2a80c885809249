"""Where the shards of a sharded store live on disk, and the per-rank commit record of the checkpoints.

Layout under the root directory that every rank passes to `mlkv.distributed.open` (each machine has its
own root on its own disk; nothing is shared between machines):

    ROOT/rank-{r}-of-{N}/              an ordinary mlkv store: the rows of the keys owner_of(key, N) == r
    ROOT/rank-{r}-of-{N}.commit.json   {"format", "hash", "rank", "world_size", "checkpoint_id"}: the last
                                       checkpoint id this rank saw committed by ALL ranks

A shard is a plain store: `mlkv.open(ROOT/rank-r-of-N, readonly=True)` reads it offline, and
`owner_of(keys, N)` (hashing.py) says which shard holds a key. The commit record is replaced atomically
(temporary file, fsync, rename, directory fsync): after a crash it holds the old or the new id, never a mix.
"""

from __future__ import annotations

import json
import os
import re

from ..durable_files import fsync_dir, replace_atomically
from ..errors import CorruptionError, MlkvError
from .hashing import HASH_NAME

FORMAT = 1
_SHARD = re.compile(r"^rank-(\d+)-of-(\d+)$")


def shard_dir(root: str, rank: int, world_size: int) -> str:
    return os.path.join(root, f"rank-{rank}-of-{world_size}")


def record_path(root: str, rank: int, world_size: int) -> str:
    return shard_dir(root, rank, world_size) + ".commit.json"


def shard_sizes(root: str) -> set[int]:
    """The world sizes of the shard directories found in `root`."""
    if not os.path.isdir(root):
        return set()
    return {int(m.group(2)) for m in map(_SHARD.match, os.listdir(root)) if m and os.path.isdir(
        os.path.join(root, m.group(0)))}  # fmt: skip


def read_record(root: str, rank: int, world_size: int) -> int:
    """The checkpoint id of this rank's commit record (0: none yet)."""
    path = record_path(root, rank, world_size)
    try:
        with open(path) as f:
            rec = json.load(f)
    except FileNotFoundError:
        return 0
    except ValueError as e:
        raise CorruptionError(path, 0, f"not valid JSON: {e}") from None
    if not isinstance(rec, dict) or rec.get("hash") != HASH_NAME or rec.get("world_size") != world_size:
        raise MlkvError(f"{path} is not a commit record of hash {HASH_NAME} for {world_size} ranks: {rec!r}")
    return int(rec["checkpoint_id"])


def write_record(root: str, rank: int, world_size: int, checkpoint_id: int) -> None:
    body = json.dumps(
        {"format": FORMAT, "hash": HASH_NAME, "rank": rank, "world_size": world_size,
         "checkpoint_id": checkpoint_id}
    ).encode()  # fmt: skip
    replace_atomically(record_path(root, rank, world_size), lambda f: f.write(body))
    fsync_dir(root)


def agree(local_ids, records) -> tuple[int, str | None]:
    """The collective checkpoint every rank restores, from each rank's local store checkpoint id and commit
    record id (both 0 for none): (id, None), or (-1, why) when the shards cannot be brought to one cut.

    A record names an id only after every rank committed it locally, so the newest record C is a common
    checkpoint. Shards all at C: consistent. Shards all at C+1: every rank committed C+1 but the group
    died before recording it; it is common, so it counts (roll forward). Shards split between C and C+1:
    some ranks committed C+1 and others never did; the engine keeps one checkpoint per shard, so the shards
    at C+1 cannot return to C (see docs/distributed.md, "checkpoint protocol")."""
    c = max(records)
    ids = sorted(set(local_ids))
    if len(ids) == 1 and ids[0] in (c, c + 1):
        return ids[0], None
    at = {i: [r for r, x in enumerate(local_ids) if x == i] for i in ids}
    where = "; ".join(f"ranks {v} at checkpoint {i}" for i, v in at.items())
    if len(ids) == 1:
        why = (
            f"every shard is at checkpoint {ids[0]} but the last collective checkpoint is {c}: the shards "
            "were checkpointed outside mlkv.distributed (e.g. opened alone with mlkv.open and closed)"
        )
    else:
        why = (
            f"the shards are at different checkpoints ({where}; last collective checkpoint {c}): a rank "
            "failed while the group committed, or shards were checkpointed outside mlkv.distributed; "
            "shards ahead of the collective checkpoint cannot go back to it (one checkpoint per shard)"
        )
    return -1, why


__all__ = ["agree", "read_record", "record_path", "shard_dir", "shard_sizes", "write_record"]
