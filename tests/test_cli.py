"""The `mlkv` command: info / check / export on small stores, damage detection, error exits, the bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import mlkv
from mlkv.cli import main
from mlkv.engine.slot_file import HEADER_BYTES, slot_bytes_for

N_ROWS = 500


def _make_store(path: str, engine: str = "slab") -> str:
    keys = np.arange(N_ROWS, dtype=np.int64) * 7919 - 1000  # negative keys too: ids are 64-bit patterns
    with mlkv.open(path, engine=engine) as store:
        user = store.table("user", dim=8, optimizer=mlkv.optim.Adagrad(lr=0.1))
        user.put(keys, np.arange(N_ROWS * 8, dtype=np.float32).reshape(N_ROWS, 8))
        user.update(keys[:50], np.ones((50, 8), dtype=np.float32))
        store.table("plain", dim=4).get(np.arange(10))
        store.checkpoint({"step": 3, "dense": "model.pt"})
    return path


@pytest.fixture
def slab_store(tmp_path) -> str:
    return _make_store(str(tmp_path / "store"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_the_commands(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for command in ("info", "check", "export", "bench"):
        assert command in out
    rc, out, _ = _run(capsys, "bench", "store", "--help")
    assert rc == 0 and "--engines" in out and "--dist" in out
    for flag in ("--only", "--lookahead", "--threads", "--compute-ms"):
        assert flag in out


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_info_reports_tables_and_checkpoint(tmp_path, capsys, engine):
    path = _make_store(str(tmp_path / "store"), engine)
    rc, out, _ = _run(capsys, "info", path)
    assert rc == 0
    assert engine in out and "user" in out and "adagrad" in out and "500" in out
    assert ("recovery" in out) == (engine == "rocksdb")  # slab: answered from the MANIFEST, no index load
    meta = out[out.index("metadata") :].splitlines()[:2]  # one line per key of the checkpoint's metadata
    assert {" ".join(line.split()[-2:]) for line in meta} == {"step: 3", 'dense: "model.pt"'}

    rc, out, _ = _run(capsys, "info", path, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["engine"] == engine and info["in_use_by_pid"] is None
    assert info["checkpoint"]["metadata"] == {"step": 3, "dense": "model.pt"}
    assert info["checkpoint"]["id"] >= 1 and info["checkpoint"]["time"] > 0
    assert info["disk_bytes"] > 0 and info["disk_allocated_bytes"] > 0
    assert info["recovery_seconds"] is None if engine == "slab" else info["recovery_seconds"] >= 0
    tables = {t["name"]: t for t in info["tables"]}
    assert tables["user"] == {
        "name": "user", "dim": 8, "dtype": "float32", "optimizer": "adagrad", "rows": N_ROWS, "step": 1,
    }  # fmt: skip
    assert tables["plain"]["optimizer"] is None and tables["plain"]["rows"] == 10


def test_info_on_a_store_in_use_reads_the_manifest(slab_store, capsys):
    with mlkv.open(slab_store) as writer:  # holds the writer lock, as a training process would
        writer.table("user").put([1], np.zeros((1, 8), dtype=np.float32))
        rc, out, _ = _run(capsys, "info", slab_store, "--json")
        assert rc == 0
        info = json.loads(out)
        assert info["in_use_by_pid"] == os.getpid()
        assert info["checkpoint"]["metadata"]["step"] == 3
        assert {t["name"] for t in info["tables"]} == {"user", "plain"}
        rc, out, _ = _run(capsys, "info", slab_store)
        assert rc == 0 and f"pid {os.getpid()}" in out
        rc, _, err = _run(capsys, "check", slab_store)
        assert rc == 2 and "locked" in err


def test_check_ok(slab_store, capsys):
    rc, out, _ = _run(capsys, "check", slab_store)
    assert rc == 0 and out.startswith("OK") and "510 rows" in out


def test_check_reports_a_damaged_row(slab_store, capsys):
    row_bytes = 4 * (8 + 8)  # dim 8 + Adagrad accumulator
    where = HEADER_BYTES + 3 * slot_bytes_for(row_bytes) + 16 + row_bytes // 2  # mid-row of slot 3
    slab = os.path.join(slab_store, "t0.slab")  # "user" was created first: table id 0
    with open(slab, "r+b") as f:
        f.seek(where)
        old = f.read(4)
        f.seek(where)
        f.write(bytes(b ^ 0x5A for b in old))

    rc, out, err = _run(capsys, "check", slab_store)
    assert rc == 1
    assert "DAMAGED" in out and "'user'" in out and "t0.slab" in out and "checksum" in out
    assert "Traceback" not in out + err

    rc, out, _ = _run(capsys, "check", slab_store, "--json")
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and len(report["problems"]) == 1


def test_check_reports_a_damaged_manifest(slab_store, capsys):
    manifest = os.path.join(slab_store, "MANIFEST")
    with open(manifest, "r+b") as f:
        raw = bytearray(f.read())
        raw[len(raw) // 2] ^= 0x01
        f.seek(0)
        f.write(raw)
    rc, out, err = _run(capsys, "check", slab_store)
    assert rc == 1 and "DAMAGED" in out and "MANIFEST" in out
    assert "Traceback" not in out + err
    rc, _, err = _run(capsys, "info", slab_store)  # info says so too, on one line
    assert rc == 1 and "damaged" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("engine", ["slab", "rocksdb"])
def test_export_matches_table_get(tmp_path, capsys, engine):
    path = _make_store(str(tmp_path / "store"), engine)
    out_file = str(tmp_path / "user.safetensors")
    rc, out, _ = _run(capsys, "export", path, "user", out_file)
    assert rc == 0 and "500 rows" in out

    exported = load_file(out_file)
    keys, weights = exported["keys"], exported["weights"]
    assert keys.dtype == np.int64 and weights.dtype == np.float32 and weights.shape == (N_ROWS, 8)
    assert len(np.unique(keys)) == N_ROWS
    with mlkv.open(path, engine=engine, readonly=True, create=False) as store:
        np.testing.assert_array_equal(weights, store.table("user").get(keys, track=False))


def test_errors_exit_2_with_one_line(tmp_path, slab_store, capsys):
    not_a_store = tmp_path / "empty"
    not_a_store.mkdir()
    cases = [
        (["info", str(tmp_path / "missing")], "does not exist"),
        (["check", str(tmp_path / "missing")], "does not exist"),
        (["info", str(not_a_store)], "not an mlkv store"),
        (["export", slab_store, "nope", str(tmp_path / "x.safetensors")], "no table 'nope'"),
        (["export", slab_store, "user", str(tmp_path / "no" / "dir" / "x.safetensors")], "does not exist"),
    ]
    for argv, message in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        lines = [line for line in err.splitlines() if not line.endswith("...")]  # progress notes
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (argv, err)
    for argv in (["info"], ["frobnicate"], ["bench"], [], ["bench", "store", "--engines", "lmdb"]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and "usage" in err, argv


def test_bench_store_small_run(tmp_path, capsys):
    rc, out, _ = _run(
        capsys,
        "bench", "store", "--keys", "3000", "--dim", "8", "--batch", "256", "--seconds", "0.05",
        "--cold-seconds", "0.02", "--engines", "slab,memory", "--path", str(tmp_path), "--no-progress",
        "--json",
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out)
    got = {(r["subject"], r["measurement"]) for r in report["results"]}
    for want in [
        ("numpy", "in-memory gather"),
        ("memmap", "warm gather"),
        ("memmap", "cold gather"),
        ("slab", "cached get"),
        ("slab", "warm get"),
        ("slab", "cold get"),
        ("slab", "warm update"),
        ("memory", "warm get"),
    ]:
        assert want in got
    assert ("memory", "cold get") not in got  # nothing on disk to evict
    assert all(r["keys_per_s"] > 0 for r in report["results"])
    cached = next(r for r in report["results"] if r["measurement"] == "cached get")
    assert cached["hit_rate"] == 1.0
    assert report["ratios"][0]["name"].startswith("slab cached get / numpy in-memory gather")
    assert os.listdir(tmp_path) == []  # the stores were removed


def test_bench_store_times_slab_and_rocksdb_side_by_side(tmp_path, capsys):
    rc, out, _ = _run(
        capsys,
        "bench", "store", "--only", "store", "--keys", "2000", "--dim", "4", "--batch", "128",
        "--seconds", "0.05", "--cold-seconds", "0.02", "--engines", "slab,rocksdb", "--path", str(tmp_path),
        "--no-progress", "--json",
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out)
    side = [r for r in report["results"] if r["measurement"] == "warm get, interleaved"]
    assert sorted(r["subject"] for r in side) == ["rocksdb", "slab"]
    assert all(r["keys_per_s"] > 0 and len(r["samples"]) == 6 and 0 < r["hit_rate"] < 1 for r in side)
    ratio = next(r for r in report["ratios"] if r["target"] == 10.0)
    assert ratio["name"] == "slab warm get, interleaved / rocksdb warm get, interleaved"
    rate = {r["subject"]: r["keys_per_s"] for r in side}
    assert ratio["value"] == pytest.approx(rate["slab"] / rate["rocksdb"])


def test_bench_lookahead_small_run(tmp_path, capsys):
    """`--only lookahead` on a tiny table: every (regime, K, T) run is there, with ratios to K=0 and T=1."""
    argv = [
        "bench", "store", "--only", "lookahead", "--keys", "4000", "--dim", "8", "--batch", "128",
        "--lookahead", "1,4", "--threads", "2", "--compute-ms", "1", "--la-batches", "6", "--la-warmup", "2",
        "--path", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    rc, out, _ = _run(capsys, *argv, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["results"] == [] and report["ratios"] == []  # the get/update measurements were skipped
    la = report["lookahead"]
    assert la["config"]["depths"] == [0, 1, 4] and la["config"]["threads"] == [1, 2]
    assert la["config"]["regimes"] == ["warm", "cold"] and la["config"]["staleness_bound"] == 1
    want = {(r, k, t) for r in ("warm", "cold") for k in (0, 1, 4) for t in (1, 2)}
    assert {(r["regime"], r["depth"], r["threads"]) for r in la["runs"]} == want
    assert {(r["regime"], r["depth"], r["threads"]) for r in la["summary"]} == want
    for run in la["runs"]:
        assert run["batches"] == 6 and sum(run["per_thread_batches"]) == 6
        assert run["batches_per_s"] > 0 and run["keys_per_s"] == pytest.approx(128 * run["batches_per_s"])
        assert 0 <= run["hit_rate"] <= 1 and run["stall_seconds"] >= 0
        assert run["lookahead_dropped"] >= 0 and run["misses"] >= 0
        assert (run["lookahead_rows"] > 0) == (run["depth"] > 0)
    for row in la["summary"]:
        assert row["throughput_vs_k0"] > 0 and row["throughput_vs_t1"] > 0
        if row["depth"] == 0:
            assert row["throughput_vs_k0"] == 1.0
        if row["threads"] == 1:
            assert row["throughput_vs_t1"] == 1.0
        for key in ("hidden_stall", "hidden_wall", "stall_ms_per_batch", "store_ms_per_batch"):
            assert key in row
    assert set(la["target"]) >= {"depth", "target", "hidden_stall", "hidden_wall"}
    assert la["target"]["depth"] == 8 and la["target"]["hidden_stall"] is None  # K=8 was not run
    assert os.listdir(tmp_path) == []

    rc, out, _ = _run(capsys, *argv[:-1], "--la-regimes", "cold", "--threads", "1", "--la-repeats", "2")
    assert rc == 0  # the table: one line per (regime, K, T), medians of the repeats
    lines = out.splitlines()
    assert any(
        line.startswith("look-ahead: slab engine") and "median of 2 repeat(s)" in line for line in lines
    )
    rows = [line.split() for line in lines if line.split()[1:2] in (["0"], ["1"], ["4"])]
    assert [(r[0], r[1], r[2]) for r in rows] == [("cold", "0", "1"), ("cold", "1", "1"), ("cold", "4", "1")]
    assert any(line.startswith("target: cold, K=8") for line in lines)


def test_bench_lookahead_rejects_bad_arguments(capsys):
    for argv in (["--lookahead", "x"], ["--lookahead", "-1"], ["--la-regimes", "hot"], ["--only", "nope"]):
        rc, _, err = _run(capsys, "bench", "store", *argv)
        assert rc == 2 and "usage" in err, argv
    rc, _, err = _run(capsys, "bench", "store", "--only", "lookahead", "--threads", "0", "--keys", "100")
    assert rc == 2 and "--threads" in err


def test_info_cuts_long_metadata_values_to_a_line(tmp_path, capsys):
    path = str(tmp_path / "s")
    with mlkv.open(path) as store:
        store.table("t", dim=2).get([1])
        store.checkpoint({"history": list(range(1000)), "epoch": 2})
    rc, out, _ = _run(capsys, "info", path)
    assert rc == 0 and "history: [0, 1, 2" in out and "--json shows all" in out and "epoch: 2" in out
    assert max(len(line) for line in out.splitlines()) < 200
    rc, out, _ = _run(capsys, "info", path, "--json")
    assert json.loads(out)["checkpoint"]["metadata"]["history"] == list(range(1000))


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_a_closed_pipe_ends_quietly(slab_store, reader):
    """`mlkv info | head -1`: no traceback, no "Broken pipe" message. With `true` the reader is gone before
    mlkv writes a byte (mlkv takes ~1 s to start), so the write always meets a closed pipe."""
    cmd = f"{sys.executable} -m mlkv info --json {slab_store} | {reader}; echo $? >&2"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip() in ("0", "141"), done.stderr  # exit 141 (SIGPIPE's) when the pipe was closed
    if reader == "head -1":
        assert done.stdout == "{\n"


def test_console_entry_point(slab_store):
    argv = [sys.executable, "-m", "mlkv", "info", slab_store, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tables"][1]["name"] == "user"
