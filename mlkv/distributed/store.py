"""ShardedStore and `mlkv.distributed.open`: one local Store per rank, opened, checkpointed and closed as one.

Opening is collective: every rank opens its own shard (layout.py) and the ranks agree on the checkpoint they
all recovered (`layout.agree`); a rank that recovered a different cut makes every rank raise, before any row
is served. Different world sizes never mix: a root holding shards for another world size is refused (use
`mlkv reshard`).

Checkpoint protocol (collective, every rank calls `checkpoint` with the same metadata):
 1. prepare: each rank flushes its memory tier to its engine (the bulk of the I/O); the ranks agree that all
    succeeded and that all are about to assign the same id; any failure aborts the checkpoint on every rank
    with nothing committed anywhere (every rank stays restorable at the previous collective checkpoint);
 2. commit: each rank commits its local store checkpoint (fsync + index log + manifest rename);
 3. record: the ranks agree all committed, then each rewrites its commit record (layout.py) with the id.
On open, the newest record wins; if every shard committed the next id but the record was not written yet,
that id counts (all shards have it). Only a rank dying inside step 2 while another rank finished it leaves
shards at different ids; the engine keeps one checkpoint per shard, so that is reported, not repaired.

`close()` never checkpoints implicitly (a lone rank's checkpoint would not be collective): call
`checkpoint()` (or mlkv.torch.save_checkpoint) on every rank first.

Thread-safety: collective methods from the training thread only; see table.py for lookahead/release.
"""

from __future__ import annotations

import os

import numpy as np

from .. import store as _store
from ..errors import InvalidArgumentError, MlkvError
from . import group as pg
from . import layout
from .table import ShardedTable

_KEY = "mlkv.distributed"  # the entry this module adds to every checkpoint's metadata


class ShardedStore:
    """The shards of one sharded store as seen from one rank. Create with :func:`open`.

    Attributes:
        root: the directory passed to open (per machine).
        path: this rank's shard directory (``root/rank-{r}-of-{N}``), an ordinary mlkv store.
        local: this rank's Store.
        rank, world_size: this process's place in the group.
        cache_bytes, engine_name, readonly: of the local store (the memory budget is per rank).
    """

    def __init__(self, root: str, local, rank: int, world_size: int, group=None):
        self.root = root
        self.local = local
        self.path = local.path
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self._tables: dict[str, ShardedTable] = {}

    @property
    def cache_bytes(self) -> int:
        return self.local.cache_bytes

    @property
    def engine_name(self) -> str:
        return self.local.engine_name

    @property
    def readonly(self) -> bool:
        return self.local.readonly

    def __repr__(self) -> str:
        return f"mlkv.distributed.ShardedStore({self.root!r}, rank={self.rank}, world_size={self.world_size})"

    # ---- tables ---------------------------------------------------------------------------------------
    def table(self, name: str, **kwargs) -> ShardedTable:
        """Open or create sharded table `name` (same arguments as ``Store.table``; the same on every rank).
        Not collective: each rank opens its shard of the table."""
        local = self.local.table(name, **kwargs)
        t = self._tables.get(name)
        if t is None or t.local is not local:
            t = self._tables[name] = ShardedTable(self, local)
        return t

    def tables(self) -> list[str]:
        return self.local.tables()

    def drop_table(self, name: str) -> None:
        """Drop this rank's shard of `name` (call it on every rank)."""
        self._tables.pop(name, None)
        self.local.drop_table(name)

    def flush(self) -> None:
        self.local.flush()

    def stats(self) -> dict:
        """This rank's store statistics (hits, misses, bytes read, ...), not summed over ranks."""
        return self.local.stats()

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _agree_ok(self, ok: bool, what: str, error: BaseException | None) -> None:
        failed = pg.all_reduce([0 if ok else 1], "max", what, self.group)
        if failed[0]:
            if error is not None:
                raise error
            raise pg.DistributedError(f"{what} failed on another rank; rank {self.rank} committed nothing")

    def checkpoint(self, metadata: dict | None = None) -> int:
        """Collective checkpoint of every shard (see the module docstring for the protocol).

        Args:
            metadata: JSON-able; stored in every shard's checkpoint (the same on every rank).

        Returns:
            The checkpoint id, the same on every rank.

        Raises:
            DistributedError: a rank failed or the ranks disagree; no shard committed a new checkpoint,
                except when the failure came during the commit step itself (see module docstring).
        """
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidArgumentError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        last = self.local.last_checkpoint()
        ckpt = (last[0] if last else 0) + 1
        error: BaseException | None = None
        try:
            self.local.flush()
        except Exception as e:  # told to the other ranks, then raised here
            error = e
        self._agree_ok(error is None, "checkpoint prepare", error)
        ids = pg.all_gather_ints([ckpt], "checkpoint id agreement", self.group)[:, 0]
        if len(set(ids.tolist())) != 1:
            raise pg.DistributedError(f"ranks would assign different checkpoint ids {ids.tolist()}")
        meta = {**(metadata or {}), _KEY: {"rank": self.rank, "world_size": self.world_size, "id": ckpt}}
        try:
            got = self.local.checkpoint(meta)
            if got != ckpt:
                raise MlkvError(f"shard {self.path} committed checkpoint {got}, expected {ckpt}")
        except Exception as e:
            error = e
        self._agree_ok(error is None, "checkpoint commit", error)
        layout.write_record(self.root, self.rank, self.world_size, ckpt)
        return ckpt

    def last_checkpoint(self) -> tuple[int, dict | None] | None:
        """(id, metadata) of the last collective checkpoint (the same on every rank), or None."""
        return self.local.last_checkpoint()

    # ---- lifetime ---------------------------------------------------------------------------------------
    def close(self, checkpoint: bool = False) -> None:
        """Release this rank's shard. By default WITHOUT checkpointing (reopening restores the last
        collective checkpoint); ``checkpoint=True`` first takes a collective checkpoint (call it on every
        rank then)."""
        if checkpoint and not self.local.closed and not self.readonly:
            self.checkpoint()
        self.local.close(checkpoint=False)

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(root: str | os.PathLike, *, group=None, **store_kwargs) -> ShardedStore:  # noqa: A001
    """Open (or create) this rank's shard of the sharded store in `root`. Collective: call on every rank.

    Args:
        root: a directory on this machine; the shard is ``root/rank-{r}-of-{N}``.
        group: the process group for the row traffic, which moves CPU tensors (default: the default group
            when it is gloo, else a gloo group over the same ranks, e.g. beside NCCL's).
        **store_kwargs: passed to ``mlkv.open`` for the local shard (cache_bytes is per rank, engine,
            staleness_bound, create, ...).

    Returns:
        The ShardedStore, at the last checkpoint all ranks committed.

    Raises:
        DistributedError: no process group, a peer failed, or the shards recovered different checkpoints.
        MlkvError: `root` holds shards for a different world size.
    """
    rank, world = pg.rank_and_size(group)
    if group is None:
        group = pg.cpu_group()
    root = os.fspath(root)
    if store_kwargs.get("readonly"):
        raise InvalidArgumentError("open shards readonly with mlkv.open(root/rank-r-of-N, readonly=True)")
    error: BaseException | None = None
    local = None
    try:
        other = layout.shard_sizes(root) - {world}
        if other:
            raise MlkvError(
                f"{root} holds shards for {sorted(other)} ranks, this job has {world}; re-shard it with "
                f"`mlkv reshard {root} --world-size {world} OUT` or use another directory"
            )
        if store_kwargs.get("create", True):
            os.makedirs(root, exist_ok=True)
        local = _store.open_store(layout.shard_dir(root, rank, world), **store_kwargs)
        last = local.last_checkpoint()
        mine = [last[0] if last else 0, layout.read_record(root, rank, world)]
    except Exception as e:
        error, mine = e, [-1, -1]
    ids = pg.all_gather_ints(mine, "opening the sharded store", group)
    try:
        if error is not None:
            raise error
        if (ids < 0).any():
            bad = [int(r) for r in np.flatnonzero(ids[:, 0] < 0)]
            raise pg.DistributedError(f"rank(s) {bad} failed to open their shard of {root}")
        common, why = layout.agree(ids[:, 0].tolist(), ids[:, 1].tolist())
        if why is not None:
            raise pg.DistributedError(f"cannot open the sharded store {root}: {why}")
        if common > mine[1]:
            layout.write_record(root, rank, world, common)
    except BaseException:
        if local is not None:
            local.close(checkpoint=False)
        raise
    return ShardedStore(root, local, rank, world, group)


__all__ = ["ShardedStore", "open"]
