"""Ways a user could lose tables (issue 8), each shown not to happen any more.

A store whose manifest, marker or engine database is missing refuses to open instead of coming up empty and
deleting the table files; a missing file the manifest names is a CorruptionError naming it; `mlkv check`
exits 1 with a report on any damage; re-running `mlkv train` on a trained path stops instead of replacing
the tables; an exception inside `with mlkv.open(...)` leaves the last checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import open_store, store_snapshot

import mlkv
import mlkv.torch
from mlkv.cli import main

DIM = 4


def _fill(path: str, engine: str = "slab", n: int = 300) -> dict:
    """A store with two checkpointed tables; returns its snapshot (the oracle of what must survive)."""
    with open_store(engine, path) as store:
        a = store.table("a", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.1))
        a.put(np.arange(n), np.arange(n * DIM, dtype=np.float32).reshape(n, DIM))
        a.update(np.arange(10), np.ones((10, DIM), dtype=np.float32))
        store.table("b", dim=2).put(np.arange(5), np.ones((5, 2), dtype=np.float32))
        store.checkpoint({"step": 1})
    with open_store(engine, path, readonly=True) as store:
        return store_snapshot(store)


def _files(path: str) -> dict[str, str]:
    """Every file under `path` (relative name -> SHA-256): proof that nothing was deleted or changed."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            if name in ("LOCK", "LOG") or name.startswith("LOG.old"):  # lock pid / RocksDB's info log
                continue
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _check(capsys, path: str, *flags: str) -> tuple[int, str, str]:
    rc = main(["check", path, *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


# ---- defect 1: a missing manifest or marker is damage, never an empty store -------------------------------
def test_missing_manifest_refuses_to_open_and_deletes_nothing(tmp_path, capsys):
    path = str(tmp_path / "s")
    _fill(path)
    os.remove(os.path.join(path, "MANIFEST"))
    before = _files(path)
    for readonly in (False, True):
        with pytest.raises(mlkv.CorruptionError, match="MANIFEST") as e:
            mlkv.open(path, readonly=readonly)
        assert "t0.slab" in str(e.value)  # names what it found without a manifest
        assert _files(path) == before
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "DAMAGED" in out and "MANIFEST" in out
    rc, out, _ = _check(capsys, path, "--json")
    assert rc == 1 and json.loads(out)["ok"] is False
    assert main(["info", path]) == 1
    _, err = capsys.readouterr()
    assert "damaged" in err and "MANIFEST" in err and len(err.strip().splitlines()) == 1
    assert _files(path) == before


def test_damaged_manifest_refuses_to_open_and_deletes_nothing(tmp_path, capsys):
    path = str(tmp_path / "s")
    _fill(path)
    with open(os.path.join(path, "MANIFEST"), "r+b") as f:
        f.write(b"garbage")
    before = _files(path)
    with pytest.raises(mlkv.CorruptionError, match="MANIFEST"):
        mlkv.open(path)
    assert _files(path) == before
    assert _check(capsys, path)[0] == 1


def test_files_that_only_look_like_table_files_are_left_alone(tmp_path):
    """Orphan cleanup removes exactly the t<id>.slab / t<id>.<gen>.snap|log names the manifest disowns."""
    path = str(tmp_path / "s")
    _fill(path)
    for name in ("train.log", "t0.slab.bak", "tables.snap", "t1.x.log"):
        with open(os.path.join(path, name), "w") as f:
            f.write("mine")
    with mlkv.open(path) as store:  # a checkpoint, after which cleanup runs
        store.table("a").update(np.arange(3), np.ones((3, DIM), dtype=np.float32))
        store.checkpoint()
    for name in ("train.log", "t0.slab.bak", "tables.snap", "t1.x.log"):
        assert os.path.exists(os.path.join(path, name)), name


def test_a_crash_before_the_first_checkpoint_still_reopens_empty(tmp_path, crash_store):
    path = str(tmp_path / "s")
    store = mlkv.open(path)
    store.table("a", dim=DIM).put(np.arange(10), np.ones((10, DIM), dtype=np.float32))
    store.flush()
    crash_store(store)
    assert os.path.exists(os.path.join(path, "t0.slab"))
    with mlkv.open(path) as store:  # t0 was created after the (initial) manifest: not part of the store
        assert store.tables() == []
        assert os.path.exists(os.path.join(path, "t0.slab"))  # opening deletes nothing
        store.table("b", dim=2).put([1], np.ones((1, 2), dtype=np.float32))
        store.checkpoint()  # the committed manifest does not name t0: removed after the commit
        assert sorted(f for f in os.listdir(path) if f.startswith("t")) == ["t1.0.log", "t1.slab"]
    with mlkv.open(path) as store:
        assert store.tables() == ["b"] and len(store.table("b")) == 1


def test_a_crashed_process_files_go_with_the_next_checkpoint_not_the_open(tmp_path, crash_store):
    path = str(tmp_path / "s")
    oracle = _fill(path)
    store = mlkv.open(path)
    store.drop_table("b")
    store.table("c", dim=2).put(np.arange(3), np.ones((3, 2), dtype=np.float32))
    store.flush()
    crash_store(store)
    with open(os.path.join(path, "t0.7.log"), "wb") as f:  # a generation a crashed checkpoint began
        f.write(b"x")
    before = _files(path)
    with mlkv.open(path) as store:
        assert store_snapshot(store) == oracle
        assert _files(path) == before  # opening deleted nothing
        store.table("d", dim=2).put([1], np.ones((1, 2), dtype=np.float32))  # id 3: t2 is never reused
        store.checkpoint()
    assert not os.path.exists(os.path.join(path, "t0.7.log"))
    assert not os.path.exists(os.path.join(path, "t2.slab"))  # "c": created after the checkpoint
    assert os.path.exists(os.path.join(path, "t1.slab"))  # "b": its drop was never committed
    assert os.path.exists(os.path.join(path, "t3.slab"))


def test_missing_marker_with_table_files_refuses_to_open(tmp_path, capsys):
    path = str(tmp_path / "s")
    oracle = _fill(path)
    os.remove(os.path.join(path, "MLKV"))
    before = _files(path)
    for engine in ("slab", "rocksdb"):
        with pytest.raises(mlkv.CorruptionError, match="MLKV") as e:
            mlkv.open(path, engine=engine)
    assert _files(path) == before  # no marker written, no rocksdb/ created
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "MLKV" in out
    restore = '{"format": 1, "engine": "slab"}'
    assert restore in str(e.value)  # the message says how to restore it; then everything is there
    with open(os.path.join(path, "MLKV"), "w") as f:
        f.write(restore)
    with mlkv.open(path) as store:
        assert store_snapshot(store) == oracle


def test_rocksdb_without_current_refuses_to_open_and_deletes_nothing(tmp_path, capsys):
    """RocksDB itself would start a new database there and then delete the old one's files."""
    path = str(tmp_path / "s")
    _fill(path, "rocksdb")
    os.remove(os.path.join(path, "rocksdb", "CURRENT"))
    before = _files(path)
    for _ in range(2):  # the second open is the one that deleted the tables
        with pytest.raises(mlkv.CorruptionError, match="CURRENT"):
            mlkv.open(path, engine="rocksdb")
    assert _files(path) == before
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "CURRENT" in out


def test_rocksdb_creation_cut_short_by_a_crash_still_opens(tmp_path):
    """RocksDB's first files (no CURRENT, no tables, no log yet) hold nothing to lose: created anew."""
    path = str(tmp_path / "s")
    mlkv.open(path, engine="rocksdb").close()
    db = os.path.join(path, "rocksdb")
    for name in os.listdir(db):
        if name not in ("IDENTITY", "LOG", "LOCK") and not name.startswith("OPTIONS"):
            os.remove(os.path.join(db, name))
    with mlkv.open(path, engine="rocksdb") as store:
        store.table("a", dim=2).put([1], np.ones((1, 2), dtype=np.float32))
    with mlkv.open(path, engine="rocksdb") as store:
        assert len(store.table("a")) == 1


def test_rocksdb_directory_missing_is_damage_for_check(tmp_path, capsys):
    path = str(tmp_path / "s")
    _fill(path, "rocksdb")
    for name in os.listdir(os.path.join(path, "rocksdb")):
        os.remove(os.path.join(path, "rocksdb", name))
    os.rmdir(os.path.join(path, "rocksdb"))
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "rocksdb" in out


# ---- defect 5: a missing file the manifest names is damage, named -------------------------------------
def _slab_with_snapshot(path: str) -> None:
    """Table "big" (id 0) commits a snapshot (over 65,536 pairs in one checkpoint) and a log record."""
    with mlkv.open(path) as store:
        t = store.table("big", dim=1)
        t.put(np.arange(70_000), np.zeros((70_000, 1), dtype=np.float32))
        store.checkpoint()
        t.put(np.arange(5), np.ones((5, 1), dtype=np.float32))
        store.checkpoint()


@pytest.mark.parametrize("name", ["t0.slab", "t0.1.snap", "t0.1.log"])
def test_missing_table_file_is_a_corruption_error_naming_it(tmp_path, capsys, name):
    path = str(tmp_path / "s")
    _slab_with_snapshot(path)
    assert sorted(f for f in os.listdir(path) if f.startswith("t")) == ["t0.1.log", "t0.1.snap", "t0.slab"]
    os.remove(os.path.join(path, name))
    before = _files(path)
    for readonly in (False, True):
        with pytest.raises(mlkv.CorruptionError, match=name.replace(".", r"\.")) as e:
            mlkv.open(path, readonly=readonly)
        assert "missing" in str(e.value)
        assert _files(path) == before  # the writable open recreated nothing
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "DAMAGED" in out and name in out and "missing" in out


# ---- defect 6: check's exit status -----------------------------------------------------------------------
def test_check_of_a_path_that_does_not_exist(tmp_path, capsys):
    rc, out, err = _check(capsys, str(tmp_path / "nope"))
    assert rc == 2 and "does not exist" in err and not out


def test_check_of_a_damaged_marker_prints_a_report(tmp_path, capsys):
    path = str(tmp_path / "s")
    _fill(path)
    with open(os.path.join(path, "MLKV"), "w") as f:
        f.write("{not json")
    rc, out, _ = _check(capsys, path)
    assert rc == 1 and "DAMAGED" in out and "MLKV" in out
    rc, out, _ = _check(capsys, path, "--json")
    assert rc == 1 and json.loads(out)["ok"] is False


# ---- defect 4: an exception inside `with mlkv.open(...)` does not checkpoint ------------------------------
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_in_with_block_closes_without_checkpoint(tmp_path, engine, exc):
    path = str(tmp_path / "s")
    oracle = _fill(path, engine)
    with pytest.raises(exc), open_store(engine, path) as store:
        store.table("a").update(np.arange(20), np.ones((20, DIM), dtype=np.float32))
        store.table("new", dim=2).put([1], np.ones((1, 2), dtype=np.float32))
        store.drop_table("b")
        raise exc
    assert store.closed
    with open_store(engine, path) as store:
        assert store_snapshot(store) == oracle
    with open_store(engine, path) as store:  # a clean exit still checkpoints, as close() documents
        store.table("a").update(np.arange(20), np.ones((20, DIM), dtype=np.float32))
    with open_store(engine, path) as store:
        assert store_snapshot(store) != oracle


def test_ctrl_c_in_with_block_keeps_the_dense_checkpoint_loadable(tmp_path):
    path, dense_dir = str(tmp_path / "s"), str(tmp_path / "dense")
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(KeyboardInterrupt), mlkv.open(path) as store:
        t = store.table("a", dim=DIM, optimizer=mlkv.optim.Adagrad(lr=0.1))
        t.put(np.arange(10), np.ones((10, DIM), dtype=np.float32))
        mlkv.torch.save_checkpoint(store, model, opt, dense_dir, {"step": 1})
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        t.update(np.arange(10), np.ones((10, DIM), dtype=np.float32))  # rows past the dense checkpoint
        with torch.no_grad():
            model.weight.add_(1.0)
        raise KeyboardInterrupt
    with mlkv.open(path) as store:
        meta = mlkv.torch.load_checkpoint(store, model, opt, dense_dir)
        assert meta["step"] == 1
        np.testing.assert_array_equal(store.table("a").get(np.arange(10)), np.ones((10, DIM), np.float32))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


# ---- defect 3: re-running a training job does not replace it ---------------------------------------------
KGE = ["train", "kge", "--dataset", "nations", "--dim", "8", "--negatives", "8", "--batch-size", "256",
       "--epochs", "1", "--max-steps", "2", "--no-progress"]  # fmt: skip


def test_train_twice_on_a_path_stops_and_changes_nothing(tmp_path, capsys):
    path = str(tmp_path / "s")
    assert main([*KGE, "--path", path]) == 0
    before = _files(path)
    capsys.readouterr()
    rc = main([*KGE, "--path", path])
    out, err = capsys.readouterr()
    assert rc in (1, 2) and "--resume" in err and "--overwrite" in err and "Traceback" not in out + err
    assert _files(path) == before

    assert main([*KGE, "--path", path, "--overwrite", "--json"]) == 0
    overwritten = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*KGE, "--path", str(tmp_path / "fresh"), "--json"]) == 0
    fresh = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert overwritten["final_loss"] == fresh["final_loss"]  # --overwrite started from scratch
    assert len(os.listdir(os.path.join(path, "kge-dense"))) == 1  # the earlier run's dense files are gone
    assert main([*KGE, "--path", path, "--overwrite", "--resume"]) == 2


def test_train_api_refuses_an_existing_run_unless_overwrite(tmp_path):
    import argparse

    from mlkv.workloads.cli import add_train_parsers, config_from_args, make_workload
    from mlkv.workloads.runner import train

    parser = argparse.ArgumentParser()
    add_train_parsers(parser.add_subparsers(dest="command"))
    path = str(tmp_path / "s")
    args = parser.parse_args([*KGE, "--path", path])
    cfg = config_from_args(args, log=io.StringIO())
    assert cfg.overwrite is False
    train(make_workload(args), cfg)
    before = _files(path)
    with pytest.raises(mlkv.MlkvError, match="--overwrite"):
        train(make_workload(args), cfg)
    assert _files(path) == before
    cfg.overwrite = True
    train(make_workload(args), cfg)


# ---- the RocksDB engine names table and key, not an offset ------------------------------------------------
def test_rocksdb_corruption_error_names_table_and_key(tmp_path):
    from rocksdict import Options, Rdict

    path = str(tmp_path / "s")
    with mlkv.open(path, engine="rocksdb") as store:
        store.table("emb", dim=DIM).put(np.arange(100), np.ones((100, DIM), dtype=np.float32))
        store.checkpoint()
    db = Rdict(os.path.join(path, "rocksdb"), Options(raw_mode=True))
    key = b"D" + (1).to_bytes(4, "big") + (42).to_bytes(8, "big")  # table id 1 ("emb"), key 42
    value = bytearray(db[key])
    value[6] ^= 0xFF
    db[key] = bytes(value)
    db.close()
    with mlkv.open(path, engine="rocksdb") as store, pytest.raises(mlkv.CorruptionError) as e:
        store.table("emb").get(np.arange(100))
    assert "'emb'" in str(e.value) and "key 42" in str(e.value) and "offset" not in str(e.value)
    assert e.value.key == 42 and e.value.table == "emb"


def test_a_failure_inside_a_step_leaves_the_last_training_checkpoint(tmp_path, monkeypatch, capsys):
    """The sparse rows of step 3 are applied, then the step fails: train() closes the store without
    committing that half step, so --resume continues from step 2's checkpoint."""
    path = str(tmp_path / "s")
    real = mlkv.torch.SparseOptimizer.step
    calls = []

    def failing(self, *a, **kw):
        real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure after the rows were updated")

    monkeypatch.setattr(mlkv.torch.SparseOptimizer, "step", failing)
    flags = [*KGE, "--path", path, "--checkpoint-every", "1", "--max-steps", "4"]
    with pytest.raises(RuntimeError, match="injected"):
        main(flags)
    capsys.readouterr()
    with mlkv.open(path, readonly=True) as store:
        assert store.last_checkpoint()[1]["loop"]["step"] == 2
    monkeypatch.setattr(mlkv.torch.SparseOptimizer, "step", real)
    assert main([*flags, "--resume"]) == 0
    assert "resumed at epoch 1, step 2" in capsys.readouterr().out
