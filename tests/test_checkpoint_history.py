"""Checkpoint history (issue 13 item 4): `keep_checkpoints=K`, `Store.checkpoints()`, readonly opens at a
kept checkpoint while a writer continues, `mlkv.rollback` / `mlkv rollback`, pruning (files deleted, slots
freed, disk cost that follows what changed), and kill -9 inside a pruning checkpoint or a rollback.

The oracle is a model: a dict table -> {key: row} after every checkpoint of a deterministic workload
(`step`), kept per checkpoint id. Run as a script, this file is the writer subprocess of the crash tests:

    python tests/test_checkpoint_history.py steps PATH FIRST LAST VARIANT   (steps, one checkpoint each)
    python tests/test_checkpoint_history.py rollback PATH ID

with HIST_CRASH_AT=<mlkv.faults point> armed (as MLKV_CRASH_AT) only for the last checkpoint or the
rollback, so the process kills itself with SIGKILL inside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlkv
from mlkv.engine import slab
from mlkv.engine.manifest import read_manifest, table_files
from mlkv.errors import InvalidArgumentError, InvalidTypeError
from mlkv.faults import POINTS

KEYS = 300
CACHE = "4KiB"  # ~250 rows of table "a": rows are evicted and written back within every epoch


# ---- the workload and its model -------------------------------------------------------------------------
def step_ops(c: int, variant: int) -> list[tuple]:
    """The operations of checkpoint c: ("create"|"drop", table, dim) or ("put"|"delete", table, keys, rows).
    Table "a" changes every time, "b" lives for checkpoints c % 6 in {2, 3, 4} and "c" changes rarely."""
    rng = np.random.default_rng([c, variant])
    ops: list[tuple] = []
    if c == 1:
        ops += [("create", "a", 4), ("create", "c", 2)]
    if c % 6 == 2:
        ops.append(("create", "b", 3))
    keys = rng.choice(KEYS, 40, replace=False).astype(np.uint64)
    ops.append(("put", "a", keys, rng.standard_normal((40, 4)).astype(np.float32)))
    ops.append(("delete", "a", rng.choice(KEYS, 15, replace=False).astype(np.uint64)))
    if c % 6 in (2, 3, 4):
        keys = rng.choice(KEYS, 10, replace=False).astype(np.uint64)
        ops.append(("put", "b", keys, rng.standard_normal((10, 3)).astype(np.float32)))
    if c % 6 == 5:
        ops.append(("drop", "b", None))
    if c % 4 == 1:
        keys = rng.choice(KEYS, 5, replace=False).astype(np.uint64)
        ops.append(("put", "c", keys, rng.standard_normal((5, 2)).astype(np.float32)))
    return ops


def model_step(model: dict, c: int, variant: int) -> dict:
    model = {name: dict(rows) for name, rows in model.items()}
    for op in step_ops(c, variant):
        kind, name = op[0], op[1]
        if kind == "create":
            model.setdefault(name, {})
        elif kind == "drop":
            del model[name]
        elif kind == "put":
            model[name].update({int(k): r.tolist() for k, r in zip(op[2], op[3], strict=False)})
        else:
            for k in op[2]:
                model[name].pop(int(k), None)
    return model


def store_step(store: mlkv.Store, c: int, variant: int) -> int:
    for op in step_ops(c, variant):
        kind, name = op[0], op[1]
        if kind == "create":
            store.table(name, dim=op[2])
        elif kind == "drop":
            store.drop_table(name)
        elif kind == "put":
            store.table(name).put(op[2], op[3])
        else:
            store.table(name).delete(op[2])
    return store.checkpoint({"step": c, "variant": variant})


def contents(store: mlkv.Store) -> dict:
    out = {}
    for name in store.tables():
        rows = {}
        for keys, values in store.table(name).items():
            rows.update({int(k): v.tolist() for k, v in zip(keys, values, strict=False)})
        out[name] = rows
    return out


def check_kept(path, models: dict, engine: str = "slab") -> list[int]:
    """Open every kept checkpoint readonly (no lock: a writer may hold the store) and compare it with the
    model; return the kept ids."""
    probe = mlkv.open(path, readonly=True, engine=engine, checkpoint=_last_id(path, engine))
    kept = probe.checkpoints()
    probe.close()
    for cid, metadata in kept:
        with mlkv.open(path, readonly=True, engine=engine, checkpoint=cid) as r:
            assert r.last_checkpoint() == (cid, metadata)
            assert r.checkpoints() == kept
            assert contents(r) == models[cid], f"checkpoint {cid} differs from the model"
    return [cid for cid, _ in kept]


def _last_id(path, engine: str) -> int:
    if engine == "memory":
        from mlkv.engine import memory

        return memory._REGISTRY[os.path.abspath(path)]["states"][-1][0]["checkpoint_id"]
    meta = read_manifest(os.fspath(path))["meta"]
    return meta and meta["checkpoint_id"]


def files_match_manifest(path) -> None:
    """The table files on disk are exactly those the kept checkpoints name (pruning deleted the rest)."""
    manifest = read_manifest(os.fspath(path))
    assert set(table_files(os.fspath(path))) == slab._manifest_files(manifest)


def run_steps(store, models: dict, first: int, last: int, variant: int = 0) -> None:
    for c in range(first, last + 1):
        assert store_step(store, c, variant) == c
        models[c] = model_step(models.get(c - 1, {}), c, variant)


# ---- behaviour ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kept_checkpoints_read_back_exactly_while_the_writer_continues(tmp_path, monkeypatch):
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 0)  # index snapshots rotate: generations get pruned too
    path = tmp_path / "s"
    models: dict = {}
    store = mlkv.open(path, keep_checkpoints=3, cache_bytes=CACHE)
    for c in range(1, 19):
        run_steps(store, models, c, c)
        # uncommitted writes of the next epoch land in the slab while the readers read
        store.table("a").put(np.arange(KEYS, dtype=np.uint64), np.ones((KEYS, 4), np.float32))
        assert check_kept(path, models) == list(range(max(1, c - 2), c + 1))
        assert [i for i, _ in store.checkpoints()] == list(range(max(1, c - 2), c + 1))
        assert store.last_checkpoint() == (c, {"step": c, "variant": 0})
        store.table("a").delete(np.arange(KEYS, dtype=np.uint64))  # the model's next step starts clean
        store.table("a").put(list(models[c]["a"]), np.array(list(models[c]["a"].values()), np.float32))
        files_match_manifest(path)
    store.close(checkpoint=False)
    assert check_kept(path, models) == [16, 17, 18]


def test_a_reader_keeps_its_view_while_the_writer_checkpoints(tmp_path):
    path = tmp_path / "s"
    models: dict = {}
    store = mlkv.open(path, keep_checkpoints=2, cache_bytes=CACHE)
    run_steps(store, models, 1, 3)
    reader = mlkv.open(path, readonly=True, checkpoint=2)
    store.table("a").put(np.arange(KEYS, dtype=np.uint64), np.full((KEYS, 4), 7, np.float32))
    store.table("a").delete(np.arange(0, KEYS, 3, dtype=np.uint64))
    store.flush()
    assert contents(reader) == models[2]  # the writer moved every key of "a" to fresh slots
    store.checkpoint()  # 4: checkpoint 2 is pruned, the reader's view is no longer guaranteed
    reader.close()
    store.close()


def test_rollback_gives_exactly_the_older_checkpoint_and_drops_the_later(tmp_path):
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=4, cache_bytes=CACHE) as store:
        run_steps(store, models, 1, 8)
        with pytest.raises(mlkv.StoreLockedError):
            mlkv.rollback(path, 6)
        assert store.checkpoints()[-1][0] == 8
    assert mlkv.rollback(path, 6) == [(7, {"step": 7, "variant": 0}), (8, {"step": 8, "variant": 0})]
    assert check_kept(path, models) == [5, 6]
    with mlkv.open(path, cache_bytes=CACHE) as store:
        assert store.keep_checkpoints == 4
        assert contents(store) == models[6]
        assert store.last_checkpoint() == (6, {"step": 6, "variant": 0})
        run_steps(store, models, 7, 9, variant=1)  # other work after the rollback: stale slots would show
    files_match_manifest(path)
    assert check_kept(path, models) == [6, 7, 8, 9]
    with pytest.raises(InvalidArgumentError, match=r"kept checkpoints: \[6, 7, 8, 9\]"):
        mlkv.rollback(path, 5)
    assert mlkv.rollback(path, 9) == []


def test_rollback_cli_prints_what_it_drops(tmp_path, capsys):
    from mlkv.cli import main

    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=3) as store:
        run_steps(store, models, 1, 4)
        assert main(["rollback", str(path), "3"]) == 2  # the writer holds the store
        assert "locked" in capsys.readouterr().err
    assert main(["rollback", str(path), "3"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint 3 is now the last one; dropped 1 later" in out and "checkpoint 4" in out
    assert main(["rollback", str(path), "1"]) == 2  # not kept: exit 2, the kept ids on stderr
    assert "kept checkpoints: [2, 3]" in capsys.readouterr().err
    assert check_kept(path, models) == [2, 3]


def test_pruning_frees_slots_so_disk_follows_what_changed(tmp_path):
    """K=4 over 12 checkpoints that each rewrite 2% of a 20000-row table: the slot file holds the table
    plus the rows changed in the kept epochs, not K copies of the table."""
    n, changed, dim = 20000, 400, 16
    rows_bytes = n * (16 + 4 * dim)
    sizes = {}
    for keep in (1, 4):
        path = tmp_path / f"k{keep}"
        with mlkv.open(path, keep_checkpoints=keep, cache_bytes="64KiB") as store:
            t = store.table("big", dim=dim)
            t.put(np.arange(n), np.zeros((n, dim), np.float32))
            store.checkpoint()
            rng = np.random.default_rng(0)
            for c in range(12):
                t.put(rng.choice(n, changed, replace=False), np.full((changed, dim), c, np.float32))
                store.checkpoint()
            n_slots = store._engine._tables["big"].n_slots
            # the superseded slots of kept epochs stay; later ones are reused
            assert n_slots <= n + (keep + 1) * changed, (keep, n_slots)
            sizes[keep] = sum(
                os.stat(os.path.join(path, f)).st_blocks * 512 for f in table_files(os.fspath(path))
            )
    # allocated bytes: fallocate reserves in 1 MiB steps; K copies of the table would be 4.8 MB more
    assert sizes[4] - sizes[1] <= 0.5 * rows_bytes + (2 << 20), sizes


def test_a_reopened_writer_never_reuses_slots_of_older_kept_checkpoints(tmp_path):
    """The free slots at open are those no kept checkpoint names, not only the last one."""
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=3, cache_bytes=CACHE) as store:
        run_steps(store, models, 1, 4)
    with mlkv.open(path, cache_bytes=CACHE) as store:
        # every key of "a" rewritten: takes every free slot, then grows the file
        store.table("a").put(np.arange(KEYS, dtype=np.uint64), np.full((KEYS, 4), 5, np.float32))
        store.flush()
        assert check_kept(path, models) == [2, 3, 4]


def test_verify_checks_the_slots_of_every_kept_checkpoint(tmp_path):
    """A flipped byte in a slot only an older kept checkpoint names (of a table since dropped, too) is found
    by store.verify() and `mlkv check` (exit 1)."""
    from mlkv.cli import main
    from mlkv.engine.slot_file import slot_bytes_for

    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=3, cache_bytes=CACHE) as store:
        run_steps(store, models, 1, 5)  # kept 3, 4, 5; table "b" (checkpoints 2-4) is dropped in 5
        assert store.verify() == []
        eng = store._engine
        first = read_manifest(os.fspath(path))["history"][0]["tables"]
        only_old = {}
        keys, slots = eng._tables["a"]._load(first["a"])
        only_old["a"] = (first["a"], int(slots[eng._tables["a"].index.lookup(keys) != slots][0]))
        b = first["b"]
        dropped = slab._SlabTable(os.fspath(path), b["id"], b["row_bytes"], b, True)
        only_old["b"] = (first["b"], int(dropped.index.items()[1][0]))
        dropped.file.close()
    for name, (st, slot) in only_old.items():
        f = path / f"t{st['id']}.slab"
        raw = bytearray(f.read_bytes())
        raw[4096 + slot * slot_bytes_for(st["row_bytes"]) + 16] ^= 1
        f.write_bytes(raw)
        with mlkv.open(path, readonly=True) as r:
            problems = r.verify()
        assert len(problems) == 1 and f"table {name!r}" in problems[0], problems
        assert main(["check", str(path)]) == 1
        raw[4096 + slot * slot_bytes_for(st["row_bytes"]) + 16] ^= 1
        f.write_bytes(raw)


def test_lowering_keep_prunes_at_open_and_persists(tmp_path, monkeypatch):
    """The open commits the shorter history; as no open deletes a file, the pruned checkpoints' files go
    at the next checkpoint."""
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 0)
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=5, cache_bytes=CACHE) as store:
        run_steps(store, models, 1, 7)
    with mlkv.open(path) as store:  # no argument: the stored 5
        assert store.keep_checkpoints == 5 and len(store.checkpoints()) == 5
    before = set(table_files(os.fspath(path)))
    with mlkv.open(path, keep_checkpoints=2) as store:
        assert [i for i, _ in store.checkpoints()] == [6, 7]
    assert set(table_files(os.fspath(path))) == before
    assert check_kept(path, models) == [6, 7]
    with mlkv.open(path, cache_bytes=CACHE) as store:
        assert store.keep_checkpoints == 2
        run_steps(store, models, 8, 8)
        files_match_manifest(path)
        assert before - set(table_files(os.fspath(path)))  # generations only checkpoints 3-5 named
        run_steps(store, models, 9, 9)
    assert check_kept(path, models) == [8, 9]


def test_default_keeps_only_the_last_checkpoint(tmp_path):
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, cache_bytes=CACHE) as store:
        assert store.keep_checkpoints == 1
        run_steps(store, models, 1, 4)
        assert store.checkpoints() == [(4, {"step": 4, "variant": 0})]
        files_match_manifest(path)
    assert read_manifest(os.fspath(path))["history"] == []
    assert check_kept(path, models) == [4]


def test_manifest_of_earlier_mlkv_without_history_opens(tmp_path):
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, cache_bytes=CACHE) as store:
        run_steps(store, models, 1, 3)
    body = read_manifest(os.fspath(path))
    old = {k: v for k, v in body.items() if k not in ("seq", "keep", "history")}
    slab.write_manifest(os.fspath(path), old)
    assert check_kept(path, models) == [3]
    with mlkv.open(path, keep_checkpoints=3, cache_bytes=CACHE) as store:
        assert store.checkpoints() == [(3, {"step": 3, "variant": 0})]
        run_steps(store, models, 4, 6)
    assert check_kept(path, models) == [4, 5, 6]


def test_memory_engine_keeps_copies(tmp_path):
    path = str(tmp_path / "m")
    models: dict = {}
    with mlkv.open(path, engine="memory", keep_checkpoints=3) as store:
        run_steps(store, models, 1, 5)
        assert check_kept(path, models, "memory") == [3, 4, 5]
    assert mlkv.rollback(path, 4, engine="memory") == [(5, {"step": 5, "variant": 0})]
    with mlkv.open(path, engine="memory") as store:
        assert contents(store) == models[4]
        run_steps(store, models, 5, 6, variant=2)
    assert check_kept(path, models, "memory") == [4, 5, 6]


def test_bad_arguments_raise_clear_errors_and_change_nothing(tmp_path):
    path = tmp_path / "s"
    models: dict = {}
    with mlkv.open(path, keep_checkpoints=2) as store:
        run_steps(store, models, 1, 3)
    for bad in (0, -1, True, "2", 1.5):
        with pytest.raises(InvalidArgumentError, match="keep_checkpoints must be an int >= 1") as e:
            mlkv.open(path, keep_checkpoints=bad)
        assert repr(bad) in str(e.value)
    for kwargs, words in (
        ({"checkpoint": 2}, "readonly=True"),
        ({"checkpoint": 2, "readonly": True, "keep_checkpoints": 3}, "not with readonly=True"),
        ({"checkpoint": 1, "readonly": True}, "kept checkpoints: [2, 3]"),
    ):
        with pytest.raises(InvalidArgumentError) as e:
            mlkv.open(path, **kwargs)
        assert words in str(e.value), (kwargs, str(e.value))
    with pytest.raises(InvalidTypeError):
        mlkv.open(path, checkpoint="2", readonly=True)
    assert check_kept(path, models) == [2, 3]


def test_rocksdb_keeps_one_checkpoint_and_says_so(tmp_path):
    path = tmp_path / "r"
    with mlkv.open(path, engine="rocksdb") as store:
        store.table("a", dim=2).put([1], np.ones((1, 2), np.float32))
        store.checkpoint()
        assert store.checkpoints() == [(1, None)]
    with pytest.raises(NotImplementedError, match="rocksdb") as e:
        mlkv.open(path, engine="rocksdb", keep_checkpoints=2)
    assert isinstance(e.value, mlkv.MlkvError)
    with mlkv.open(path, engine="rocksdb", readonly=True, checkpoint=1) as r:
        assert r.table("a").get([1]).tolist() == [[1.0, 1.0]]


# ---- crashes --------------------------------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
# before the index log is appended, after it (uncommitted), just before and just after the commit
CRASH_POINTS = ["slab:after_sync", "slab:after_log", "manifest:before_rename", "manifest:after_rename"]
assert set(CRASH_POINTS) <= set(POINTS)


def run_writer(*args, crash_at: str) -> None:
    env = {**os.environ, "HIST_CRASH_AT": crash_at, "PYTHONPATH": str(HERE.parent)}
    env.pop("MLKV_CRASH_AT", None)
    out = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True)
    assert out.returncode == -9, (crash_at, out.returncode, out.stderr[-2000:])


@pytest.mark.slow
def test_kill_inside_a_pruning_checkpoint_leaves_every_kept_checkpoint(tmp_path, monkeypatch):
    """kill -9 at each fault point of a checkpoint that prunes the oldest kept one: after reopening, the
    kept checkpoints are the old list (crash before the commit) or the new one (after), each exact."""
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 0)
    for point in CRASH_POINTS:
        path = tmp_path / point.replace(":", "_")
        models: dict = {}
        with mlkv.open(path, keep_checkpoints=3, cache_bytes=CACHE) as store:
            run_steps(store, models, 1, 5)
        models[6] = model_step(models[5], 6, 0)
        run_writer("steps", path, 6, 6, 0, crash_at=point)
        committed = point == "manifest:after_rename"
        assert check_kept(path, models) == ([4, 5, 6] if committed else [3, 4, 5]), point
        with mlkv.open(path, cache_bytes=CACHE) as store:
            run_steps(store, models, 7 if committed else 6, 8, variant=3)
        files_match_manifest(path)  # what the crash left (pruned or never committed) is gone now
        assert check_kept(path, models) == [6, 7, 8], point


@pytest.mark.slow
def test_kill_inside_a_rollback_leaves_the_old_or_the_new_history(tmp_path, monkeypatch):
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 0)
    for point in ("manifest:before_rename", "manifest:after_rename"):
        path = tmp_path / point.replace(":", "_")
        models: dict = {}
        with mlkv.open(path, keep_checkpoints=4, cache_bytes=CACHE) as store:
            run_steps(store, models, 1, 7)
        run_writer("rollback", path, 5, crash_at=point)
        committed = point == "manifest:after_rename"
        assert check_kept(path, models) == ([4, 5] if committed else [4, 5, 6, 7]), point
        if not committed:
            assert mlkv.rollback(path, 5) == [(6, {"step": 6, "variant": 0}), (7, {"step": 7, "variant": 0})]
        with mlkv.open(path, cache_bytes=CACHE) as store:
            assert contents(store) == models[5]
            run_steps(store, models, 6, 7, variant=4)
        files_match_manifest(path)
        assert check_kept(path, models) == [4, 5, 6, 7], point


@pytest.mark.slow
def test_kill_at_random_moments_leaves_every_kept_checkpoint(tmp_path, monkeypatch):
    """A writer with keep_checkpoints=3 checkpointing in a loop, SIGKILLed at a random moment, twice; it
    resumes after its last checkpoint with other work (another variant) each time."""
    monkeypatch.setattr(slab, "_MIN_LOG_BYTES", 0)
    path = tmp_path / "s"
    mlkv.open(path, keep_checkpoints=3).close()
    rng = np.random.default_rng(1)
    models: dict = {}
    first = 1
    for variant in range(2):
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        env.pop("MLKV_CRASH_AT", None)
        args = [sys.executable, __file__, "steps", str(path), str(first), "100000", str(variant)]
        w = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert w.stdout.readline().strip() == "started", w.stderr.read()
        deadline = time.monotonic() + 120
        while (_last_id(path, "slab") or 0) < first and time.monotonic() < deadline:
            time.sleep(0.05)  # the first step after an open is slow: the kill lands among later ones
        time.sleep(rng.uniform(0.3, 1.0))
        w.kill()
        w.wait()
        last = read_manifest(os.fspath(path))["meta"]["checkpoint_id"]
        assert last >= first + 2, "the writer made too few checkpoints to test anything"
        for c in range(first, last + 1):
            models[c] = model_step(models.get(c - 1, {}), c, variant)
        assert check_kept(path, models) == [last - 2, last - 1, last]
        first = last + 1
    with mlkv.open(path, cache_bytes=CACHE) as store:
        run_steps(store, models, first, first + 2, variant=9)
    files_match_manifest(path)


def _writer_main(argv: list[str]) -> None:
    slab._MIN_LOG_BYTES = 0
    crash_at = os.environ.get("HIST_CRASH_AT", "")
    if argv[0] == "steps":
        path, first, last, variant = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        store = mlkv.open(path, cache_bytes=CACHE)
        print("started", flush=True)
        for c in range(first, last + 1):
            if c == last:
                os.environ["MLKV_CRASH_AT"] = crash_at
            store_step(store, c, variant)
        store.close()
    else:
        os.environ["MLKV_CRASH_AT"] = crash_at
        mlkv.rollback(argv[1], int(argv[2]))


if __name__ == "__main__":
    _writer_main(sys.argv[1:])
