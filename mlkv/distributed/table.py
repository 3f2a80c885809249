"""ShardedTable: one embedding table hash-partitioned over the ranks of a process group, used collectively.

Each rank's local Store holds the rows of the keys it owns (`owner_of`, see hashing.py). `get` and `update`
are collectives: every rank calls them for the same table in the same order (the SPMD contract of
torch.distributed; data-parallel training does this naturally: same model, same forward, same step). One
call routes the caller's keys to their owners with `all_to_all_single` (counts, then keys), the owners
serve them from their local table, and rows go back (get) or gradients go to the owners (update) the same
way: 3 collectives per call.

Numbers: an owner concatenates what every rank sent, in rank order, and makes ONE local `update` of it per
global step: gradients of a key read by several ranks are summed (as `Table.update` sums duplicates), the
optimizer runs once, and the table's step counter (Adam's bias correction) advances once per global step,
also on an owner that received no key in that step. With losses scaled by each rank's share of the global
batch, staleness 0 gives the single-process numbers up to float summation order.

Staleness: the group is one logical trainer. Owners serve every rank's tracked reads under one reader tag
per table, so the owner's StalenessGate keeps the books for all readers; since updates are collectives, a
read in step t always sees every update of steps < t (staleness 0 holds by construction).

Look-ahead and release are NOT collectives (the Prefetcher calls `lookahead` from its own thread, the
SparseOptimizer releases rows only some ranks read): they are queued (thread-safe) and travel with this
table's next get/update, so owners start prefetching those rows one call later, still batches ahead.

Thread-safety: get/update from one thread per rank; lookahead/release from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine.key_index import unique_inverse
from ..store.validate import as_keys, as_rows
from . import group as pg
from .hashing import owner_of

if TYPE_CHECKING:
    from .store import ShardedStore

#: look-ahead keys queued per table at most; beyond, announcements are dropped (they are only hints)
MAX_QUEUED_LOOKAHEAD = 1 << 22
_RELEASE, _AHEAD, _MAIN = 0, 1, 2


class ShardedTable:
    """A table whose rows are spread over ranks by key hash; the mlkv Table interface, called collectively.

    Obtained from ``ShardedStore.table(...)``; usable wherever mlkv.torch takes a table (``Embedding``,
    ``EmbeddingBag``, ``SparseOptimizer``, ``Prefetcher``).

    Attributes:
        name, dim, dtype, optimizer: as the local Table's (the same on every rank).
        local: this rank's shard, an ordinary mlkv Table holding only the keys this rank owns.
    """

    def __init__(self, store: ShardedStore, local):
        self._store = store
        self.local = local
        self.name: str = local.name
        self.dim: int = local.dim
        self.dtype: str = local.dtype
        self._reader_tag = ("mlkv.distributed", local.name)
        self._lock = threading.Lock()
        self._ahead: list[np.ndarray] = []
        self._ahead_n = 0
        self._release: list[np.ndarray] = []
        self.lookahead_dropped = 0

    @property
    def store(self) -> ShardedStore:
        return self._store

    @property
    def optimizer(self):
        return self.local.optimizer

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes on its owner (as the local Table's ``row_bytes``)."""
        return self.local.row_bytes

    @optimizer.setter
    def optimizer(self, value) -> None:
        self.local.optimizer = value

    @property
    def effective_staleness_bound(self) -> int:
        """0: sharded updates are collectives, applied before the call returns on every rank, so readers
        never miss an update whatever bound the shards are configured with."""
        return 0

    @property
    def step(self) -> int:
        """Global steps applied (the same on every rank)."""
        return self.local.step

    def __repr__(self) -> str:
        s = self._store
        return f"ShardedTable({self.name!r}, dim={self.dim}, rank={s.rank}, world_size={s.world_size})"

    # ---- routing --------------------------------------------------------------------------------------
    def _drain(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            rel = np.concatenate(self._release) if self._release else np.zeros(0, np.uint64)
            ahead = np.concatenate(self._ahead) if self._ahead else np.zeros(0, np.uint64)
            self._release, self._ahead, self._ahead_n = [], [], 0
        return rel, ahead

    def _route(self, main: np.ndarray, what: str):
        """Send (queued releases, queued look-ahead, `main` keys) to their owners.

        Returns (order: main's positions in send order, sent: per-rank counts of main, received keys by
        category as uint64, recv_main: per-rank counts of main keys received)."""
        world = self._store.world_size
        rel, ahead = self._drain()
        counts = np.zeros((world, 3), dtype=np.int64)
        sorted_parts, order = [], None
        for c, keys in enumerate((rel, ahead, main)):
            own = owner_of(keys, world) if len(keys) else np.zeros(0, np.int64)
            o = np.argsort(own, kind="stable")
            counts[:, c] = np.bincount(own, minlength=world)
            sorted_parts.append((keys[o], np.concatenate([[0], np.cumsum(counts[:, c])])))
            if c == _MAIN:
                order = o
        send = np.concatenate([k[off[d] : off[d + 1]] for d in range(world) for k, off in sorted_parts]).view(
            np.int64
        )
        recv_counts = pg.exchange_counts(counts, f"{what} of table {self.name!r} (counts)", self._store.group)
        got = (
            pg.all_to_all(
                torch.from_numpy(send),
                counts.sum(axis=1).tolist(),
                recv_counts.sum(axis=1).tolist(),
                f"{what} of table {self.name!r} (keys)",
                self._store.group,
            )
            .numpy()
            .view(np.uint64)
        )
        by_cat: list[list[np.ndarray]] = [[], [], []]
        at = 0
        for s in range(world):
            for c in range(3):
                n = int(recv_counts[s, c])
                by_cat[c].append(got[at : at + n])
                at += n
        received = [np.concatenate(parts) for parts in by_cat]
        self._serve_hints(received[_RELEASE], received[_AHEAD])
        return order, counts[:, _MAIN], received[_MAIN], recv_counts[:, _MAIN]

    def _serve_hints(self, released: np.ndarray, ahead: np.ndarray) -> None:
        if len(released):
            self.local.release(released, reader=self._reader_tag)
        if len(ahead):
            self.local.lookahead(ahead)

    # ---- the table interface ----------------------------------------------------------------------------
    def get(self, keys, track: bool = True, reader: Hashable | None = None) -> np.ndarray:
        """Embeddings of `keys`, float32 (len(keys), dim), read from their owners. Collective.

        Args:
            keys: 1-D int64 keys (this rank's; other ranks pass their own, possibly overlapping).
            track: a tracked read (training) counts as outstanding until the update or release of the key.
            reader: accepted for the Table interface; the group reads as one reader per table.

        Returns:
            float32 array (len(keys), dim).
        """
        k = as_keys(keys)
        uk, inv, _ = unique_inverse(k)
        order, sent, wanted, recv_main = self._route(uk, "get")
        if len(wanted):
            rows = self.local.get(wanted, track=track, reader=self._reader_tag if track else None)
        else:
            rows = np.zeros((0, self.dim), dtype=np.float32)
        back = pg.all_to_all(
            torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)),
            recv_main.tolist(),
            sent.tolist(),
            f"get of table {self.name!r} (rows)",
            self._store.group,
        ).numpy()
        out = np.empty((len(uk), self.dim), dtype=np.float32)
        out[order] = back
        return out[inv]

    def update(self, keys, grads, reader: Hashable | None = None, optimizer=None) -> None:
        """Send gradient rows to the owners, which sum them over all ranks and apply the optimizer once per
        call (one global step; also advancing the step counter of a shard that received nothing). Collective.

        Args:
            keys: 1-D int64 keys; duplicates (on this or other ranks) have their gradients summed.
            grads: float32 (len(keys), dim).
            reader: accepted for the Table interface (see get).
            optimizer: applied instead of the table's own for this update (``Table.update``); every rank
                passes the same (their SparseOptimizers share param groups), each owner applies its own.
        """
        k = as_keys(keys)
        g = as_rows(grads, len(k), self.dim, "grads")
        got_keys, got = self._send_rows(k, g, "update")
        if len(got_keys):
            extra = {} if optimizer is None else {"optimizer": optimizer}
            self.local.update(got_keys, got, reader=self._reader_tag, **extra)
        else:  # keep Adam's step in lockstep with the shards that did update (no other writer: SPMD)
            self.local.step += 1

    def update_async(self, keys, grads, reader: Hashable | None = None, optimizer=None) -> None:
        """``update``: applied synchronously (a collective), which meets every staleness bound."""
        self.update(keys, grads, reader=reader, optimizer=optimizer)

    def put(self, keys, values, reader: Hashable | None = None) -> None:
        """Overwrite embeddings at their owners (optimizer state kept). Collective. A key put by several
        ranks in one call gets the value of the highest rank (the last one, as in ``Table.put``)."""
        k = as_keys(keys)
        v = as_rows(values, len(k), self.dim, "values")
        got_keys, got = self._send_rows(k, v, "put")
        if len(got_keys):
            self.local.put(got_keys, got, reader=self._reader_tag)

    def _send_rows(self, k: np.ndarray, rows: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Route keys with one float32 row each to their owners: (keys received, rows received), in rank
        order of the senders."""
        order, sent, got_keys, recv_main = self._route(k, what)
        got = pg.all_to_all(
            torch.from_numpy(np.ascontiguousarray(rows[order], dtype=np.float32)),
            sent.tolist(),
            recv_main.tolist(),
            f"{what} of table {self.name!r} (rows)",
            self._store.group,
        ).numpy()
        return got_keys, got

    def release(self, keys, reader: Hashable | None = None) -> None:
        """Give back tracked reads without writing; queued, sent with this table's next get/update."""
        k = as_keys(keys)
        if len(k):
            with self._lock:
                self._release.append(k)

    def lookahead(self, keys) -> None:
        """Announce keys a coming batch reads; queued (any thread), routed to the owners with this table's
        next get/update, where they are prefetched. Keys beyond MAX_QUEUED_LOOKAHEAD are dropped."""
        k = as_keys(keys)
        with self._lock:
            if self._ahead_n + len(k) > MAX_QUEUED_LOOKAHEAD:
                self.lookahead_dropped += len(k)
                return
            self._ahead.append(k)
            self._ahead_n += len(k)

    def __len__(self) -> int:
        """Rows over all shards. Collective."""
        n = pg.all_reduce([len(self.local)], "sum", f"len of table {self.name!r}", self._store.group)
        return int(n[0])

    def items(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, embeddings) of THIS rank's shard, in batches (not collective)."""
        return self.local.items(batch_size)

    def flush(self) -> None:
        self.local.flush()


__all__ = ["MAX_QUEUED_LOOKAHEAD", "ShardedTable"]
