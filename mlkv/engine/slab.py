"""SlabEngine: the default engine. Each table is a SlotFile plus a vectorised in-memory key -> slot index.

Crash consistency by shadow slots: a slot that a kept checkpoint references is never overwritten. The first
write of a key after a checkpoint goes to a fresh slot (later writes in the same epoch update that slot in
place, like FASTER's mutable region). A checkpoint fsyncs the slot files, appends the changed (key, slot)
pairs to each table's index log, and commits by replacing the manifest. After a crash, the manifest's index
is exactly the last checkpoint and every slot it names still holds that checkpoint's bytes; slots written
later are free space.

Checkpoint history (`keep`, default 1). The manifest lists the last `keep` checkpoints: the committed one
(top-level `meta`/`tables`, as before) and `history`, the older kept ones, oldest first, each with its meta
and per-table states. A table state names a generation's snapshot and a committed length of its
append-only log, so an older checkpoint's index is that snapshot plus that log prefix: keeping its files
keeps it, and its cost is what changed since. The slots superseded in the epoch that ends with checkpoint
c are last referenced by the checkpoint before c; they are freed only once that checkpoint is pruned (with
keep=1: at c's commit, as before). So every slot of every kept checkpoint holds that checkpoint's bytes,
and a readonly open at an older kept checkpoint (`checkpoint=`) may read while a writer continues: it
loads the index at open and reads slots that no writer touches while that checkpoint stays kept (once the
writer prunes it, reads may fail their key check or see later bytes). At open, the free slots are those no
kept checkpoint names. `rollback` commits a manifest whose committed checkpoint is an older kept one and
drops the later ones. Each of these is one atomic manifest replacement: a crash leaves the old or the new
list of kept checkpoints, each intact.

Files, and when they are deleted. The manifest is the only root: a table's files are `t<id>.slab`,
`t<id>.<gen>.snap` and `t<id>.<gen>.log`, and each kept checkpoint names, per table, its id and gen.
A writable open of a directory without a manifest writes an empty one before anything else, so a store
that has table files always has a manifest. Hence:
- no manifest, but files named like table files: the manifest is lost, the store is damaged. Every open
  (readonly or not) raises CorruptionError naming the missing MANIFEST and the files found; nothing is
  deleted or created. A damaged manifest (bad magic, version, length or CRC-32) raises the same way.
- a file the manifest names is missing (`.slab`, `.snap`, or a `.log` it commits bytes of): CorruptionError
  naming the file; nothing is created in its place.
- opening never deletes a file (a writable open that lowers `keep` commits a manifest without the pruned
  checkpoints; their files go at the next checkpoint). Files are deleted only right after a checkpoint or a
  rollback has committed a manifest, and only those matching the patterns above that no checkpoint this
  manifest keeps names: tables created after the previous checkpoint by a process that
  then died (a writable open moves next_id past their ids, so they are never reused), tables dropped
  before every kept checkpoint (ids are never reused), and generations no kept checkpoint names
  (superseded, begun by a checkpoint that never committed, or of checkpoints a rollback dropped). Nothing
  a kept checkpoint references, and no file of any other name, is ever deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import numpy as np

from ..durable_files import fsync_dir, storage_errors
from ..errors import (
    CorruptionError,
    InvalidArgumentError,
    MlkvError,
    ReadOnlyError,
    StorageError,
    StorageFullError,
)
from ..faults import crash_point
from . import index_log
from .base import Engine, check_keep
from .key_index import KeyIndex, unique_keys
from .manifest import FILE_NAME, read_manifest, table_files, write_manifest
from .slot_file import SlotFile

_MIN_LOG_BYTES = 1 << 20


def _state_files(state: dict) -> set[str]:
    """The files a table state of the manifest names."""
    tid, gen = state["id"], state["gen"]
    names = {f"t{tid}.slab", f"t{tid}.{gen}.log"}
    if state["has_snapshot"]:
        names.add(f"t{tid}.{gen}.snap")
    return names


def _kept(manifest: dict) -> list[dict]:
    """The checkpoints a manifest keeps, oldest first, the committed one last: {"seq", "meta", "tables"}.
    A manifest of an earlier mlkv (no history) keeps one; a new store's (meta None) keeps none."""
    current = {"seq": manifest.get("seq", 0), "meta": manifest["meta"], "tables": manifest["tables"]}
    return [*manifest.get("history", []), *([current] if manifest["meta"] is not None else [])]


def _manifest_files(manifest: dict) -> set[str]:
    names = set()
    for state in manifest["tables"].values():
        names |= _state_files(state)
    for entry in manifest.get("history", []):
        for state in entry["tables"].values():
            names |= _state_files(state)
    return names


def _last(items: list, n: int) -> list:
    return items[max(0, len(items) - n) :]


def _ids(entries: list[dict]) -> list:
    return [e["meta"].get("checkpoint_id") for e in entries]


class _SlabTable:
    """One table's slot file, index, and the bookkeeping that keeps checkpointed slots intact."""

    def __init__(
        self,
        directory: str,
        tid: int,
        row_bytes: int,
        state: dict | None,
        readonly: bool,
        older: list[tuple[int, dict]] = (),
    ):
        """`older`: (seq, state) of this table in the kept checkpoints before `state`, oldest first."""
        self.directory = directory
        self.tid = tid
        self.row_bytes = row_bytes
        if state is not None and not os.path.exists(self._path("slab")):
            raise CorruptionError(self._path("slab"), None, "slab file named by the manifest is missing")
        self.gen = state["gen"] if state else 0
        self.log_len = state["log_len"] if state else 0
        self.snapshot_pairs = state["snapshot_pairs"] if state else 0
        self.n_slots = state["n_slots"] if state else 0
        # the manifest's row count sizes the index (a count that is off, or none in an older manifest, only
        # means it grows); the snapshot is streamed into it part by part, then the log replayed: at 100M
        # keys a recovery holds the 4 GiB index, not the index plus the 1.6 GB snapshot too
        self.index = KeyIndex(state.get("rows", state["snapshot_pairs"]) if state else 0)
        if state:
            if state["has_snapshot"]:  # every slot the index names is below the manifest's slot count
                snap = self._path(f"{self.gen}.snap")
                index_log.load_snapshot_into(snap, self.index, self.n_slots, self.tid)
            index_log.replay_log_into(
                self._path(f"{self.gen}.log"), state["log_len"], self.index, self.n_slots, self.tid
            )
        self.rows_committed = len(self.index)  # live keys of the last commit (see `checkpoint`)
        self.file = SlotFile(self._path("slab"), row_bytes, readonly, table_id=tid)
        try:
            self.file.check_size(self.n_slots)  # a short file would SIGBUS on a mapped read
            self.file.ensure_capacity(self.n_slots)
        except BaseException:
            self.file.close()  # a failed open leaves no descriptor or mapping behind
            raise
        # frozen: the slots some kept checkpoint references. retired: (seq, slots) whose last reference is
        # the kept checkpoint `seq`, freed once it is pruned
        self.frozen = np.zeros(self.file.capacity, dtype=bool)
        if len(self.index) == self.n_slots:  # distinct slots below n_slots (checked by the load): every one,
            self.frozen[: self.n_slots] = True  # so no random scatter (3-4 s at 100M slots)
        else:
            self._freeze_live()
        self.retired: list[tuple[int, np.ndarray]] = []
        for seq, st in reversed(older):
            _, s = self._load(st)
            s = s[~self.frozen[s]]
            if len(s):
                self.retired.append((seq, s))
            self.frozen[s] = True
        self.free = np.flatnonzero(~self.frozen[: self.n_slots])
        self.pending_free: list[np.ndarray] = []
        self.changed: list[np.ndarray] = []  # keys written or deleted this epoch (see _note_changed)
        self.snapshot_due = False  # this epoch ends in a snapshot: `changed` need not list its keys
        self.has_snapshot = bool(state and state["has_snapshot"])

    def _freeze_live(self) -> None:
        """Mark every slot the index names frozen, walking the index part by part (no copy of its pairs)."""
        for _, slots in self.index.live_parts(keys=False):
            self.frozen[slots] = True

    def _path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"t{self.tid}.{suffix}")

    def _load(self, state: dict) -> tuple[np.ndarray, np.ndarray]:
        """The (keys, slots) of a committed table state: its snapshot plus its log prefix."""
        gen = state["gen"]
        snap = self._path(f"{gen}.snap") if state["has_snapshot"] else None
        keys, slots = index_log.load(snap, self._path(f"{gen}.log"), state["log_len"], self.tid)
        if len(slots) and int(slots.max()) >= min(state["n_slots"], self.n_slots):
            raise CorruptionError(self._path(f"{gen}.log"), 0, "index names a slot past the table end")
        return keys, slots

    def state(self) -> dict:
        return {
            "id": self.tid,
            "row_bytes": self.row_bytes,
            "gen": self.gen,
            "log_len": self.log_len,
            "n_slots": self.n_slots,
            "has_snapshot": self.has_snapshot,
            "snapshot_pairs": self.snapshot_pairs,
            "rows": len(self.index),  # live keys: `mlkv info` reads it without loading the index
        }

    def _allocate(self, n: int) -> np.ndarray:
        """n free slots, reserved on the device. Reuses freed slots first (the most recently freed: a slot
        a scan listed may come back under another key, see `scan`), then grows the file; a full device
        raises StorageFullError before anything changed."""
        take = min(n, len(self.free))
        if take < n:
            self.file.ensure_capacity(self.n_slots + n - take)
            if self.file.capacity > len(self.frozen):
                grown = np.zeros(self.file.capacity, dtype=bool)
                grown[: len(self.frozen)] = self.frozen
                self.frozen = grown
        slots = self.free[len(self.free) - take :]
        self.free = self.free[: len(self.free) - take]
        if take < n:
            extra = np.arange(self.n_slots, self.n_slots + n - take, dtype=np.int64)
            self.n_slots += n - take
            slots = np.concatenate([slots, extra])
        return slots

    def write(self, keys: np.ndarray, rows: np.ndarray) -> None:
        slots = self.index.lookup(keys)
        exists = slots >= 0
        shadow = ~exists | self.frozen[np.where(exists, slots, 0)] & exists
        if shadow.any():
            fresh = self._allocate(int(shadow.sum()))  # first: a full disk raises with nothing changed
            old = slots[shadow & exists]
            if len(old):
                self.pending_free.append(old)
            slots[shadow] = fresh
            self.index.assign(keys[shadow], fresh)
        self.file.write(keys, slots, rows)
        self._note_changed(keys)

    def delete(self, keys: np.ndarray) -> None:
        old = self.index.remove(keys)
        old = old[old >= 0]
        frozen = self.frozen[old]
        self.pending_free.append(old[frozen])
        self.free = np.concatenate([self.free, old[~frozen]])
        self._note_changed(keys)

    def _log_limit(self) -> int:
        """Bytes the index log may hold before the next checkpoint writes a snapshot instead."""
        return max(16 * self.snapshot_pairs, _MIN_LOG_BYTES)

    def _note_changed(self, keys: np.ndarray) -> None:
        """Remember the keys for this epoch's log record. Once the keys new since the last commit alone
        outgrow the log, the epoch ends in a snapshot of every live pair (decided now, for good: later
        deletes cannot undo it), so the keys need not be kept (a bulk load of 100M keys kept 800 MB)."""
        if self.snapshot_due:
            return
        self.changed.append(keys.copy())
        if self.log_len + 16 * (len(self.index) - self.rows_committed) > self._log_limit():
            self.snapshot_due = True
            self.changed = [np.empty(0, np.uint64)]  # non-empty: the epoch has changes

    def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slots = self.index.lookup(keys)
        return self.file.read(keys, slots), slots >= 0

    def checkpoint(self, ckpt: int) -> None:
        """Make this table's epoch durable up to (not including) the manifest commit.

        On a failure (StorageFullError...) the fields the manifest will record are either unchanged or
        name complete, durable files (a record or snapshot past what the manifest commits), so a later
        checkpoint can still commit: `changed` is kept, and its record supersedes every pair written here."""
        if not self.changed:
            return
        self.file.sync()
        crash_point("slab:after_sync")
        limit = self._log_limit()
        # the keys live now but not at the last commit changed: when they alone outgrow the log, the
        # snapshot is due without deduplicating every key written (a bulk load: 100M keys, ~7 GB)
        grown = len(self.index) - self.rows_committed
        due = self.snapshot_due or self.log_len + 16 * grown > limit
        keys = None if due else unique_keys(np.concatenate(self.changed))
        if keys is None or self.log_len + 16 * len(keys) > limit:
            gen, n = self.gen + 1, len(self.index)
            # streamed from the index table: at 100M keys, a copy of the pairs would be 1.6 GB more memory
            index_log.write_snapshot_parts(
                self._path(f"{gen}.snap"), ckpt, n, self.index.live_parts(), table_id=self.tid
            )
            index_log.create_log(self._path(f"{gen}.log"))
            self.gen, self.has_snapshot, self.snapshot_pairs, self.log_len = gen, True, n, 0
            epoch_slots = None  # every live slot (a superset: the ones this epoch did not write are frozen)
        else:
            slots = self.index.lookup(keys)
            log = self._path(f"{self.gen}.log")
            self.log_len = index_log.append_log(
                log, ckpt, keys, slots, committed=self.log_len, table_id=self.tid
            )
            epoch_slots = slots[slots >= 0]
        crash_point("slab:after_log")
        self._epoch_slots = epoch_slots

    def committed(self, prev_seq: int, oldest_seq: int) -> None:
        """The manifest now names this epoch: freeze its slots; the ones it replaced were last referenced
        by checkpoint `prev_seq`. Free every retired slot whose last reference is older than `oldest_seq`,
        the oldest kept checkpoint."""
        if self.changed:
            if self._epoch_slots is None:  # a snapshot: every live slot
                self._freeze_live()
            else:
                self.frozen[self._epoch_slots] = True
            if self.pending_free:
                self.retired.append((prev_seq, np.concatenate(self.pending_free)))
            self.pending_free.clear()
            self.changed.clear()
            self.snapshot_due = False
            self.rows_committed = len(self.index)
        if any(seq < oldest_seq for seq, _ in self.retired):
            old = [s for seq, s in self.retired if seq < oldest_seq]
            self.retired = [(seq, s) for seq, s in self.retired if seq >= oldest_seq]
            old = np.concatenate(old)
            self.frozen[old] = False
            self.free = np.concatenate([self.free, old])

    def verify(self, older: list[dict] = ()) -> list[str]:
        """Check the slots of the index and of the `older` table states (kept checkpoints), in one
        sequential pass: a slot that several kept checkpoints name holds the same key in all of them."""
        pairs = [self._load(st) for st in older]
        keys = np.concatenate([np.empty(0, np.uint64), *(k for k, _ in pairs)])
        slots = np.concatenate([np.empty(0, np.int64), *(s for _, s in pairs)])
        return self.file.verify(self.n_slots, self.index, keys, slots)  # one sequential pass in slot order

    def scan(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The keys live at the first batch, in file order, each read at the slot it has when its batch is
        read: between batches (the caller holds the engine lock per batch) a write may move a key to a
        fresh slot and a delete may free its slot for another key, so a listed slot is not trusted. A key
        deleted meanwhile is skipped; one inserted meanwhile is not yielded. Every key present for the whole
        scan is yielded exactly once, with its row as of its batch."""
        keys, slots = self.index.items()
        order = np.argsort(slots)  # file order: a sequential read
        keys = keys[order]
        for i in range(0, len(keys), batch_size):
            k = keys[i : i + batch_size]
            s = self.index.lookup(k)
            if (s < 0).any():
                k, s = k[s >= 0], s[s >= 0]
            yield k, np.ascontiguousarray(self.file.read(k, s))


class SlabEngine(Engine):
    name = "slab"

    def __init__(
        self, path: str, readonly: bool = False, keep: int | None = None, checkpoint: int | None = None
    ):
        """`keep`: checkpoints to keep (None: the manifest's, 1 for a new store); a writable open that
        changes it commits the manifest with the new value at once (pruning what it no longer keeps).
        `checkpoint` (readonly only): open the kept checkpoint of that id instead of the last one."""
        if keep is not None:
            check_keep(keep)
        if checkpoint is not None and not readonly:
            raise InvalidArgumentError(f"checkpoint={checkpoint!r} needs readonly=True")
        self.path = path
        self.readonly = readonly
        os.makedirs(path, exist_ok=True)
        start = time.perf_counter()
        manifest = read_manifest(path)
        if manifest is None:
            found = table_files(path)
            if found:
                shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
                raise CorruptionError(
                    os.path.join(path, FILE_NAME),
                    None,
                    f"the manifest is missing, but the directory holds table files ({shown}); refusing to "
                    "open: restore MANIFEST from a backup, or delete the table files to start empty",
                )
            manifest = {"engine": self.name, "next_id": 0, "meta": None, "tables": {}, "keep": keep or 1}
            if not readonly:  # from here on this store's table files always have a manifest beside them
                write_manifest(path, manifest)
            keep = None
        next_id = manifest["next_id"]
        if not readonly:  # table files of ids the manifest has not issued: a crashed process's, never reused
            for f in table_files(path):
                next_id = max(next_id, int(f[1:].split(".")[0]) + 1)
        if not readonly and keep is not None and keep != manifest.get("keep", 1):
            # history beyond the new keep goes now: commit the shorter list (its files go at the next commit)
            kept = _kept(manifest)
            older = _last(kept[: len(kept) - 1], keep - 1)
            manifest = {**manifest, "next_id": next_id, "keep": keep, "history": older}
            write_manifest(path, manifest, after_rename=lambda: crash_point("manifest:after_rename"))
        self.keep_checkpoints = manifest.get("keep", 1)
        self._tables: dict[str, _SlabTable] = {}
        self._listed: list[dict] | None = None  # an open at an older checkpoint: the kept ones at open
        if checkpoint is not None:
            manifest = self._open_checkpoint(manifest, checkpoint)
        else:
            self._load_tables(manifest)
        self._manifest = manifest
        self._next_id = next_id
        self._dropped: list[_SlabTable] = []
        self._failed: OSError | None = None  # a checkpoint failure that rules out further checkpoints
        self.recovery_seconds = time.perf_counter() - start

    def _load_tables(self, manifest: dict) -> None:
        """Open the tables of the manifest's committed checkpoint; a writable open accounts for the slots
        of every kept checkpoint."""
        history = [] if self.readonly else manifest.get("history", [])
        try:
            for name, st in manifest["tables"].items():
                tid = st["id"]
                older = [(e["seq"], o) for e in history for o in e["tables"].values() if o["id"] == tid]
                self._tables[name] = _SlabTable(self.path, tid, st["row_bytes"], st, self.readonly, older)
        except BaseException:  # a damaged table: the ones loaded before it leave no descriptor behind
            for t in self._tables.values():
                t.file.close()
            self._tables.clear()
            raise

    def _open_checkpoint(self, manifest: dict, checkpoint: int) -> dict:
        """Load the kept checkpoint `checkpoint`, as the manifest to use. A writer may commit (and delete
        files of pruned checkpoints) meanwhile: a file missing under a manifest that changed is retried."""
        for _ in range(100):
            entries = _kept(manifest)
            found = [e for e in entries if e["meta"].get("checkpoint_id") == checkpoint]
            if not found:
                raise InvalidArgumentError(
                    f"checkpoint {checkpoint!r} is not kept in {self.path}; kept checkpoints: {_ids(entries)}"
                )
            entry = found[0]
            try:
                self._load_tables(entry)
            except CorruptionError:
                now = read_manifest(self.path)
                if now == manifest:
                    raise
                manifest = now
                continue
            self._listed = [e["meta"] for e in entries]
            return {**manifest, "meta": entry["meta"], "tables": entry["tables"]}
        raise MlkvError(f"{self.path}: the manifest kept changing while checkpoint {checkpoint} was opened")

    def _remove_orphans(self, manifest: dict) -> None:
        """Delete the table files that no checkpoint of the manifest just committed names (module header)."""
        keep = _manifest_files(manifest)
        for f in table_files(self.path):
            if f not in keep:
                os.remove(os.path.join(self.path, f))

    def checkpoints(self) -> list[dict]:
        if self._listed is not None:
            return list(self._listed)
        return [e["meta"] for e in _kept(self._manifest)]

    def rollback(self, checkpoint_id: int) -> list[dict]:
        """Make the kept checkpoint `checkpoint_id` the committed one: the later ones are dropped (their
        files deleted once the new manifest has committed). Call it on a fresh writable open, before any
        write; the engine is closed afterwards. Returns the dropped checkpoints' metas, oldest first."""
        self._writable()
        entries = _kept(self._manifest)
        at = [i for i, e in enumerate(entries) if e["meta"].get("checkpoint_id") == checkpoint_id]
        if not at:
            raise InvalidArgumentError(
                f"checkpoint {checkpoint_id!r} is not kept in {self.path}; kept checkpoints: {_ids(entries)}"
            )
        i = at[0]
        dropped = entries[i + 1 :]
        self.close()
        if dropped:
            target = entries[i]
            body = {
                **self._manifest,
                "next_id": self._next_id,  # ids of the dropped checkpoints' tables are not reused either
                "seq": target["seq"],
                "meta": target["meta"],
                "tables": target["tables"],
                "history": entries[:i],
            }
            write_manifest(self.path, body, after_rename=lambda: crash_point("manifest:after_rename"))
            self._remove_orphans(body)
        return [e["meta"] for e in dropped]

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{self.path} is open readonly")

    def create_table(self, table: str, row_bytes: int) -> None:
        if table in self._tables:
            return
        self._writable()
        self._tables[table] = _SlabTable(self.path, self._next_id, row_bytes, None, False)
        self._tables[table].changed.append(np.empty(0, np.uint64))  # a new table is part of the next epoch
        self._next_id += 1

    def drop_table(self, table: str) -> None:
        self._writable()
        self._dropped.append(self._tables.pop(table))

    def tables(self) -> dict[str, int]:
        return {name: t.row_bytes for name, t in self._tables.items()}

    def read(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._tables[table].read(keys)

    def write(self, table: str, keys: np.ndarray, rows: np.ndarray) -> None:
        self._writable()
        if len(keys):
            self._tables[table].write(keys, rows)

    def delete(self, table: str, keys: np.ndarray) -> None:
        self._writable()
        if len(keys):
            self._tables[table].delete(keys)

    def contains(self, table: str, keys: np.ndarray) -> np.ndarray:
        return self._tables[table].index.lookup(keys) >= 0

    def count(self, table: str) -> int:
        return len(self._tables[table].index)

    def scan(self, table: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self._tables[table].scan(batch_size)

    def checkpoint(self, meta: dict) -> None:
        """Commit every write so far with `meta` (module header).

        Raises StorageFullError / StorageIOError with the last checkpoint intact on disk and in force. A
        full disk met while writing (not while syncing) may be retried once there is room; after any other
        failure (an fsync failed: the kernel may have dropped unsynced pages) every later checkpoint of this
        engine raises, and reopening the store continues from its last checkpoint."""
        self._writable()
        if self._failed is not None:
            f = self._failed
            what = f"{self.path}: cannot checkpoint after an earlier failure ({f}); reopen the store"
            raise type(f)(f.filename, what) if isinstance(f, StorageError) else MlkvError(what) from f
        meta = json.loads(json.dumps(meta))  # kept with the history: the caller's dict may change later
        ckpt = int(meta.get("checkpoint_id", 0))
        try:
            with storage_errors(self.path, "checkpointing"):
                for t in self._tables.values():
                    t.checkpoint(ckpt)
                # the new slab, snapshot and log files' directory entries, durable before a manifest names
                # them: after a power loss the rename alone could be on disk (tests/test_fault_campaigns.py)
                fsync_dir(self.path)
                kept = _kept(self._manifest)
                history = _last(kept, self.keep_checkpoints - 1)
                body = {
                    "engine": self.name,
                    "next_id": self._next_id,
                    "seq": self._manifest.get("seq", 0) + 1,
                    "keep": self.keep_checkpoints,
                    "meta": meta,
                    "tables": {name: t.state() for name, t in self._tables.items()},
                    "history": history,
                }
                write_manifest(self.path, body, after_rename=lambda: self._committed(body))
        except OSError as e:
            if not isinstance(e, StorageFullError) or e.fsync_failed:
                self._failed = e
            raise
        self._remove_orphans(body)

    def _committed(self, body: dict) -> None:
        """The new manifest is in place (its directory not yet synced): it is the state from now on."""
        crash_point("manifest:after_rename")
        prev_seq = self._manifest.get("seq", 0)
        self._manifest = body
        oldest = body["history"][0]["seq"] if body["history"] else body["seq"]
        for t in self._tables.values():
            t.committed(prev_seq, oldest)
        for t in self._dropped:
            t.file.close()
        self._dropped.clear()

    def committed_meta(self) -> dict | None:
        return self._manifest["meta"]

    def verify(self) -> list[str]:
        """Every slot of every kept checkpoint (an open at an older checkpoint: of that one), and of the
        writes since the last checkpoint."""
        older: dict[int, list[tuple[str, dict]]] = {}
        for entry in self._manifest.get("history", []) if self._listed is None else []:
            for name, st in entry["tables"].items():
                older.setdefault(st["id"], []).append((name, st))
        problems = []
        for name, t in self._tables.items():
            states = [st for _, st in older.pop(t.tid, [])]
            problems += [f"table {name!r}: {p}" for p in t.verify(states)]
        for tid, states in older.items():  # tables dropped since: their last kept state, and the ones before
            name, last = states[-1]
            t = _SlabTable(self.path, tid, last["row_bytes"], last, True)
            try:
                found = t.verify([st for _, st in states[:-1]])
            finally:
                t.file.close()
            problems += [f"table {name!r} (dropped, kept by an older checkpoint): {p}" for p in found]
        return problems

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))

    def evict_page_cache(self) -> None:
        for t in self._tables.values():
            t.file.drop_page_cache()

    def close(self) -> None:
        for t in list(self._tables.values()) + self._dropped:
            t.file.close()
        self._tables.clear()
